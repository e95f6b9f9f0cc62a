"""The speech API: OpenAI's `POST /v1/audio/speech`, streamed from a fleet's replicas.

`Gateway` holds what requests read (the config, the verifier, each fleet's state) and
is swapped into by the background loops in `server`; `build` makes the Starlette app.
Everything here runs on one event loop: no locks.

A request is validated as OpenAI validates it (the same fields, limits and error
shape), authenticated, routed by `model` to a fleet, and sent to the replica with the
least outstanding work of two picked at random. A replica that fails before the first
audio is marked (outlier ejection) and the request is retried once on another one:
synthesis is idempotent, and nothing has been sent yet. After the first audio the
response is committed; a replica failing then ends the response early (the client
sees a truncated transfer, never a clean end).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import exposition as prom
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from ttsfleet.failover import residency
from ttsfleet.gateway import audio
from ttsfleet.gateway.auth import AuthError, KeySet, Principal, Tickets, Verifier
from ttsfleet.gateway.cache import ReplyCache, normalise
from ttsfleet.gateway.config import GatewayConfig
from ttsfleet.gateway.config import Route as SpeechRoute
from ttsfleet.gateway.fleet import Fleet
from ttsfleet.gateway.limits import Admission, Limiter
from ttsfleet.routing import breaker
from ttsfleet.serving.engine import RATE_RANGE
from ttsfleet.triton import aio, contract

log = logging.getLogger("ttsfleet.gateway")
# One line per speech request as its response starts: status, tenant, region, fleet.
access = logging.getLogger("ttsfleet.gateway.access")

SPEED_RANGE = (0.25, 4.0)  # OpenAI's
STREAM_FORMATS = ("audio", "sse")
MAX_BODY_BYTES = 64 * 1024
FIRST_SLICE_SAMPLES = 2048  # ~93 ms at 22.05 kHz: two MP3 frames and change
# Why a request goes to a route's fallback (or is shed, without one).
REFUSALS = {
    "unavailable": "has no ready replicas",
    "overloaded": "has every replica at its queue limit",
    "breaker-open": "has its circuit breaker open after failures or slow answers",
}


class ApiError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        kind: str = "invalid_request_error", headers: Mapping[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind
        )  # fmt: skip
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The `error` object: on HTTP the response body's, on the WebSocket a message's."""
        return {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body()}, status_code=self.status, headers=self.headers)


def unavailable(message: str, retry_after: float) -> ApiError:
    """503 with Retry-After: shed, or no fleet can take the request now."""
    return ApiError(
        503, message, kind="server_error", code="service_unavailable",
        headers={"retry-after": str(max(1, math.ceil(retry_after)))},
    )  # fmt: skip


def limited(admission: Admission) -> ApiError:
    """429 in OpenAI's shape, with the RateLimit headers and Retry-After."""
    code = "concurrency_limit_exceeded" if admission.refused == "streams" else "rate_limit_exceeded"
    return ApiError(
        429, admission.message(), kind="rate_limit_error", code=code,
        headers=admission.headers(),
    )  # fmt: skip


@dataclass(frozen=True)
class Speech:
    """One validated `/v1/audio/speech` request."""

    route: SpeechRoute
    text: str
    voice: str  # the engine's
    response_format: str
    speed: float
    sse: bool

    @property
    def engine_rate(self) -> float:
        """The part of `speed` the engine makes; the gateway time-stretches the rest."""
        return min(max(self.speed, RATE_RANGE[0]), RATE_RANGE[1])

    @property
    def tempo(self) -> float:
        return self.speed / self.engine_rate

    def pipeline(self, sample_rate: int) -> audio.Pipeline:
        """The encoder of this request's audio (its format, and the tempo left to make)."""
        return audio.Pipeline(self.response_format, sample_rate, self.tempo)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        fleet = ["fleet"]
        self.inflight = Gauge(
            contract.GATEWAY_INFLIGHT_STREAMS, "Streams open to a fleet's replicas.", fleet,
            registry=self.registry,
        )  # fmt: skip
        self.queued = Gauge(
            contract.GATEWAY_QUEUED_CHARACTERS,
            "Characters of text sent to a fleet and not yet fully spoken.", fleet,
            registry=self.registry,
        )  # fmt: skip
        self.ttfa = Histogram(
            contract.GATEWAY_TIME_TO_FIRST_AUDIO,
            "From the request to the first audio samples from a replica.", fleet,
            buckets=(0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10),
            registry=self.registry,
        )  # fmt: skip
        self.requests = Counter(
            contract.GATEWAY_REQUESTS, "Speech API requests by fleet and status code.",
            ["fleet", "code"], registry=self.registry,
        )  # fmt: skip
        self.cache = Counter(
            contract.GATEWAY_CACHE_REQUESTS, "Speech requests answered from the reply cache "
            "(hit) or not (miss).", ["fleet", "result"], registry=self.registry,
        )  # fmt: skip
        self.websockets = Gauge(
            contract.GATEWAY_WEBSOCKETS, "Speech WebSockets open.", registry=self.registry
        )
        self.contexts = Counter(
            contract.GATEWAY_CONTEXTS, "WebSocket contexts ended, by how they ended "
            "(completed, cancelled, failed, disconnected).", ["fleet", "reason"],
            registry=self.registry,
        )  # fmt: skip
        self.retries = Counter(
            contract.GATEWAY_RETRIES, "Requests retried on another replica before audio.", fleet,
            registry=self.registry,
        )  # fmt: skip
        self.limited = Counter(
            contract.GATEWAY_RATELIMITED, "Requests refused (429) by a tenant's limits, by tier "
            "and limit (requests, characters, streams).", ["tier", "limit"],
            registry=self.registry,
        )  # fmt: skip
        self.limits_shared = Gauge(
            contract.GATEWAY_RATELIMIT_SHARED, "1 while rate limits are shared through Redis, "
            "0 while this replica limits on its own.", registry=self.registry,
        )  # fmt: skip
        self.breaker = Gauge(
            contract.GATEWAY_BREAKER_STATE, "1 for a fleet's breaker's current state.",
            ["fleet", "state"], registry=self.registry,
        )  # fmt: skip
        self.fallbacks = Counter(
            contract.GATEWAY_FALLBACKS, "Requests sent to a route's fallback fleet, by why "
            "(breaker-open, overloaded, unavailable, failed).", ["fleet", "fallback", "reason"],
            registry=self.registry,
        )  # fmt: skip
        self.shed = Counter(
            contract.GATEWAY_SHED, "Requests refused at once (503) because no fleet could take "
            "them, by why.", ["fleet", "reason"], registry=self.registry,
        )  # fmt: skip
        self.residency = Counter(
            contract.GATEWAY_RESIDENCY_REFUSED, "Requests of a tenant pinned to other regions "
            "refused here (421 or 503), by residency set.", ["set"], registry=self.registry,
        )  # fmt: skip

    def breaker_state(self, fleet: str, state: breaker.State) -> None:
        for each in breaker.State:
            self.breaker.labels(fleet, each.value).set(1 if each is state else 0)


class Gateway:
    """The state requests read; the server's loops replace its parts."""

    def __init__(self, config: GatewayConfig, keys: KeySet | None = None) -> None:
        self.metrics = Metrics()
        self.channels = aio.Channels()
        self.fleets: dict[str, Fleet] = {}
        self.verifier: Verifier | None = None
        self.keys_loaded = False
        self.tickets = Tickets()
        self.ticket_key_file: str | None = None
        self.listed: set[str] = set()  # fleets whose endpoints are known (fixed or watched)
        self.limiter: Limiter | None = None
        self.redis_address: str | None = None  # host:port of a watched Redis Service
        self.config = config
        self.apply(config)
        if keys is not None:
            self.use_keys(keys)

    def apply(self, config: GatewayConfig) -> None:
        """A new config: fleets that stay keep their state; fixed endpoints apply now;
        the reply cache starts empty (a route may now lead elsewhere)."""
        self.cache = ReplyCache(config.cache_bytes)
        self.config = config
        wanted = config.fleets()
        round_robin = config.balancer == "round-robin"
        policy = config.breaker.policy()
        for key in [k for k in self.fleets if k not in wanted]:
            del self.fleets[key]
        for key, spec in wanted.items():
            fleet = self.fleets.get(key)
            if fleet is None or fleet.round_robin != round_robin:
                fleet = self.fleets[key] = Fleet(key, round_robin=round_robin)
                fleet.on_breaker = functools.partial(self._breaker_moved, key)
                self.metrics.breaker_state(key, breaker.State.CLOSED)
            fleet.set_breaker_policy(policy)
            fleet.max_streams = spec.max_streams_per_replica
            if spec.endpoints is not None:
                fleet.set_addresses(spec.endpoints)
                self.listed.add(key)
        self.listed &= set(wanted)
        self._ticket_key(config)
        self._limits(config)
        if config.auth is None:
            self.verifier = None
        elif self.verifier is None or self.verifier.config != config.auth.verifier_config():
            previous = self.verifier
            self.verifier = Verifier(config.auth.verifier_config(), KeySet())
            if previous is not None and self.keys_loaded:
                self.verifier.use_keys(previous.keys)

    def _breaker_moved(self, key: str, state: breaker.State) -> None:
        log.warning("the breaker of fleet %s is %s", key, state.value)
        self.metrics.breaker_state(key, state)

    def _limits(self, config: GatewayConfig) -> None:
        """A limiter for the config's limits; the one before stays while its Redis
        does (streams it admitted are released by it, whatever comes after)."""
        limits = config.rate_limits
        if limits is None:
            self.limiter = None
            return
        url = limits.redis_url
        if limits.redis_service is not None and self.redis_address is not None:
            url = f"redis://{self.redis_address}"
        if self.limiter is not None and self.limiter.url == url:
            self.limiter.config = limits
        else:
            self.limiter = Limiter.connect(limits, url)
            self.limiter.on_backend = lambda shared: self.metrics.limits_shared.set(int(shared))
            self.metrics.limits_shared.set(int(url is not None))

    def set_redis(self, addresses: list[str]) -> None:
        """The ready endpoints of the Redis Service (the one the operator runs): limits
        are shared through one of them. With none ready the last address is kept: the
        limiter finds no Redis there and limits on its own until one answers (its
        Redis-down path), so a late word of a gap cannot undo a reconnection."""
        if addresses and self.redis_address not in addresses:
            self.redis_address = addresses[0]
            log.info("rate limits' Redis: %s", self.redis_address)
            self._limits(self.config)

    def _ticket_key(self, config: GatewayConfig) -> None:
        path = config.auth.ticket_key_file if config.auth is not None else None
        if path == self.ticket_key_file:
            return
        self.ticket_key_file = path
        try:
            self.tickets = Tickets(Path(path).read_bytes().strip() if path else None)
        except OSError as err:
            log.error("tickets redeem only on this replica: cannot read %s: %s", path, err)
            self.tickets = Tickets()

    def use_keys(self, keys: KeySet) -> None:
        if self.verifier is not None:
            self.verifier.use_keys(keys)
            self.keys_loaded = True

    def set_endpoints(self, key: str, addresses: list[str]) -> None:
        fleet = self.fleets.get(key)
        if fleet is not None:
            fleet.set_addresses(addresses)
            self.listed.add(key)

    def ready(self) -> tuple[bool, str]:
        if self.config.auth is not None and not self.keys_loaded:
            return False, "the JWKS is not loaded yet"
        unknown = sorted(set(self.fleets) - self.listed)
        if unknown:
            return False, f"the endpoints of {', '.join(unknown)} are not known yet"
        return True, "ok"

    # ---- requests ---------------------------------------------------------------------------

    def authenticate(self, header: str | None) -> Principal | None:
        """The caller with this `Authorization` header; ApiError 401/403/503."""
        if self.verifier is None:
            return None
        if not self.keys_loaded:
            raise ApiError(
                503, "The gateway has not loaded its keys yet: retry", kind="server_error"
            )
        try:
            principal = self.verifier.verify(header)
        except AuthError as err:
            raise ApiError(401, err.message, code=err.code) from None
        assert self.config.auth is not None
        missing = set(self.config.auth.required_scopes) - principal.scopes
        if missing:
            raise ApiError(
                403, f"The token lacks the scope(s) {', '.join(sorted(missing))}",
                code="insufficient_scope", kind="permission_error",
            )  # fmt: skip
        return principal

    def redeem(self, ticket: str) -> Principal:
        """The principal of a WebSocket ticket; ApiError 401 when it is not valid."""
        try:
            return self.tickets.redeem(ticket)
        except AuthError as err:
            raise ApiError(401, err.message, param="ticket", code=err.code) from None

    def voices(self, route: SpeechRoute) -> tuple[str, ...]:
        return (*route.voices, *(() if route.fleet.voice in route.voices else (route.fleet.voice,)))

    def validate(self, body: Any) -> Speech:
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object")
        model = text_field(body, "model", required=True)
        route = self.config.route(model)
        if route is None:
            known = ", ".join(m for r in self.config.routes for m in r.models)
            raise ApiError(
                404, f"The model '{model}' does not exist on this gateway: use one of {known}",
                param="model", code="model_not_found",
            )  # fmt: skip
        text = text_field(body, "input", required=True)
        if not text.strip():
            raise ApiError(400, "'input' is empty: send the text to speak", param="input")
        if not any(ch.isalnum() for ch in text):  # "?!": the voice has nothing to say
            raise ApiError(
                400, "'input' has no letters or digits: send words to speak", param="input"
            )
        refuse_nul(text, "input")
        limit = self.config.max_input_characters
        if len(text) > limit:
            raise ApiError(
                400, f"'input' has {len(text)} characters; the maximum is {limit}: split the text",
                param="input", code="string_above_max_length",
            )  # fmt: skip
        voice = _voice(body)
        voices = self.voices(route)
        if voice not in voices:
            raise ApiError(
                400, f"The voice '{voice}' is not available for model '{model}': use one of "
                f"{', '.join(voices)}", param="voice",
            )  # fmt: skip
        fmt = text_field(body, "response_format") or "mp3"
        if fmt not in audio.FORMATS:
            raise ApiError(
                400, f"'response_format' must be one of {', '.join(audio.FORMATS)} "
                f"(got '{fmt}')", param="response_format",
            )  # fmt: skip
        speed = body.get("speed", 1.0)
        if speed is None:
            speed = 1.0
        number = isinstance(speed, int | float) and not isinstance(speed, bool)
        if not number or (isinstance(speed, float) and not math.isfinite(speed)):
            raise ApiError(400, "'speed' must be a number from 0.25 to 4.0", param="speed")
        if not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
            raise ApiError(
                400, f"'speed' is {speed}; it must be from 0.25 to 4.0", param="speed",
                code="decimal_out_of_range",
            )  # fmt: skip
        text_field(body, "instructions")  # accepted, and ignored by these voices
        stream_format = text_field(body, "stream_format") or "audio"
        if stream_format not in STREAM_FORMATS:
            raise ApiError(
                400, f"'stream_format' must be 'audio' or 'sse' (got '{stream_format}')",
                param="stream_format",
            )  # fmt: skip
        engine_voice = route.fleet.voice
        return Speech(route, text, engine_voice, fmt, float(speed), stream_format == "sse")

    async def admit(self, tenant: str, characters: int, *, stream: bool = True) -> Admitted:
        """The tenant's limits for one more request of `characters` (and a stream slot,
        when it streams); 429 (ApiError) when over them. Release what is returned when
        done. A tenant pinned to regions other than this gateway's is refused first
        (421 while one of its regions is healthy, 503 when none is)."""
        self.resident(tenant)
        limiter = self.limiter
        if limiter is None:
            return Admitted(None, None)
        admission = self._within(await limiter.admit(tenant, characters, stream=stream))
        return Admitted(limiter, admission)

    def resident(self, tenant: str) -> None:
        """ApiError unless this gateway's region may serve `tenant` (data residency)."""
        region = self.config.region
        if region is None:
            return
        decision = residency.decide(tenant, region.name, region.residency, region.healthy)
        if decision.allowed:
            return
        self.metrics.residency.labels(decision.pinned.name if decision.pinned else "").inc()
        if decision.status == 503:
            raise unavailable(decision.message, 30)
        raise ApiError(421, decision.message, code="misdirected_request", kind="server_error")

    async def charge(self, tenant: str, characters: int) -> None:
        """More characters of a request already admitted; 429 when over the limit."""
        if self.limiter is not None:
            self._within(await self.limiter.charge(tenant, characters))

    def _within(self, admission: Admission) -> Admission:
        """`admission` if it was allowed; counted and raised as a 429 if not."""
        if not admission.allowed:
            self.metrics.limited.labels(admission.tier.name, admission.refused or "").inc()
            raise limited(admission)
        return admission

    async def speak(self, speech: Speech, started: float, tenant: str) -> Response:
        """Within `tenant`'s limits: a reply spoken before, from the cache (a request,
        not a stream), or a stream opened on a replica (retrying once before any audio)
        and streamed, holding one of the tenant's stream slots until it ends."""
        fleet = self.fleets[speech.route.fleet.key]
        media = "text/event-stream" if speech.sse else audio.FORMATS_MEDIA[speech.response_format]
        key: tuple[Any, ...] = (
            fleet.key, speech.route.fleet.version, speech.voice, normalise(speech.text),
            speech.speed, speech.response_format, speech.sse,
        )  # fmt: skip
        cached = self.cache.get(key) if self.config.cache_bytes else None
        admitted = await self.admit(tenant, len(speech.text), stream=cached is None)
        headers = {"cache-control": "no-store"} | admitted.headers()
        if self.config.cache_bytes:
            self.metrics.cache.labels(fleet.key, "miss" if cached is None else "hit").inc()
        if cached is not None:
            headers["server-timing"] = "cache;desc=hit"
            # The same bytes at once, in one write (with a Content-Length: all known).
            return Response(cached, media_type=media, headers=headers)
        try:
            opened = await self.connect(speech)
        except BaseException as err:
            await admitted.release()
            if isinstance(err, ApiError):  # admitted, then refused (503): within the limits
                err.headers = admitted.headers() | err.headers
            raise
        if opened.first is not None:
            self.metrics.ttfa.labels(fleet.key).observe(opened.arrived - started)
        if opened.fleet is not fleet:  # a fallback's audio is not the route's: not cached
            key = ()
            headers["x-ttsfleet-fallback"] = opened.fleet.key
            headers["x-ttsfleet-fallback-reason"] = opened.fallback_reason
        body = self._body(speech, opened, key, admitted)
        # Server-Timing: the replica's time to first audio as the gateway saw it, and
        # the gateway's own time before it (browsers' dev tools show both).
        headers["server-timing"] = (
            f"upstream;dur={(opened.arrived - opened.asked) * 1000:.2f}, "
            f"gateway;dur={(opened.asked - started) * 1000:.2f}"
        )
        return StreamingResponse(body, media_type=media, headers=headers)

    async def connect(self, speech: Speech, *, admitted: bool = False) -> Opened:
        """A stream of `speech.text` on the route's fleet, or on its fallback while the
        fleet's breaker is open, it has no ready replica, all its replicas are over
        their queue limit, or it failed this request; 503 with Retry-After when neither
        can take it. `admitted`: the request continues one already taken (a WebSocket
        context's next sentence), never shed for being over the queue limit."""
        route = speech.route
        primary = self.fleets[route.fleet.key]
        reason = self._refusal(primary, admitted)
        if reason is None:
            try:
                return await self.open(primary, speech)
            except ApiError:
                if route.fallback is None:
                    raise
                reason = "failed"
        if route.fallback is None:
            self.metrics.shed.labels(primary.key, reason).inc()
            wait = primary.breaker_retry_after() if reason == "breaker-open" else 1
            raise unavailable(f"{primary.key} {REFUSALS[reason]}: retry later", wait)
        fallback = self.fleets[route.fallback.key]
        self.metrics.fallbacks.labels(primary.key, fallback.key, reason).inc()
        if fallback.overloaded() and not admitted:
            self.metrics.shed.labels(fallback.key, "overloaded").inc()
            raise unavailable(f"{primary.key} and its fallback {fallback.key} are full: retry", 1)
        opened = await self.open(fallback, replace(speech, voice=route.fallback.voice))
        opened.fallback_reason = reason
        return opened

    @staticmethod
    def _refusal(fleet: Fleet, admitted: bool) -> str | None:
        """Why `fleet` should not be asked (None: ask it)."""
        if not fleet.addresses:
            return "unavailable"
        if not admitted and fleet.overloaded():
            return "overloaded"
        if not fleet.breaker_allows():
            return "breaker-open"
        return None

    async def open(self, fleet: Fleet, speech: Speech) -> Opened:
        """A stream of `speech.text` on a replica, its first audio received; retried once
        on another replica when the first fails before any audio; 503 when none can.
        The caller owns the stream: it must call `close` on it."""
        characters = len(speech.text)
        tried: frozenset[str] = frozenset()
        failure = "no ready replicas"
        for attempt in range(2):
            address = fleet.pick(characters, exclude=tried)
            if address is None:
                break
            if attempt:
                self.metrics.retries.labels(fleet.key).inc()
            tried |= {address}
            self._begin(fleet, address, characters)
            asked = time.perf_counter()
            upstream = aio.stream(
                self.channels.stub(address), speech.text, voice=speech.voice,
                rate=speech.engine_rate, timeout=self.config.request_timeout_seconds,
            )  # fmt: skip
            try:
                first = await asyncio.wait_for(
                    anext(upstream, None), self.config.first_audio_timeout_seconds
                )
            except (aio.UpstreamError, TimeoutError) as err:
                failure = str(err) or "no audio in time"
                log.warning("replica %s failed before audio: %s", address, failure)
                await upstream.aclose()
                self.release(fleet, address, characters)
                fleet.record(address, ok=False)
                fleet.observe(address, max(time.perf_counter() - asked, 1.0))
                continue
            except BaseException:
                await upstream.aclose()
                self.release(fleet, address, characters)
                raise
            fleet.record(address, ok=True)
            arrived = time.perf_counter()
            fleet.observe(address, arrived - asked)
            fleet.breaker_record(True, arrived - asked)  # the request's outcome, not a try's
            if first is not None:
                fleet.sample_rate = first.sample_rate
            return Opened(self, fleet, address, characters, first, upstream, asked, arrived)
        fleet.breaker_record(False, 0.0)
        raise unavailable(f"No replica of {fleet.key} could serve the request: {failure}", 1)

    def _begin(self, fleet: Fleet, address: str, characters: int) -> None:
        fleet.begin(address, characters)
        self.metrics.inflight.labels(fleet.key).inc()
        self.metrics.queued.labels(fleet.key).inc(characters)

    def release(self, fleet: Fleet, address: str, characters: int) -> None:
        fleet.end(address, characters)
        self.metrics.inflight.labels(fleet.key).dec()
        self.metrics.queued.labels(fleet.key).dec(characters)

    async def _body(
        self, speech: Speech, opened: Opened, key: tuple[Any, ...], admitted: Admitted
    ) -> AsyncIterator[bytes]:
        keep = self.config.cache_bytes > 0 and bool(key)  # the bytes are kept for the cache
        sent: list[bytes] = []
        try:
            pipeline = speech.pipeline(opened.sample_rate)
            samples = 0
            async for samples_in in opened.audio():
                samples += samples_in.size
                if encoded := pipeline.feed(samples_in):
                    framed = _frame(encoded, speech.sse)
                    if keep:
                        sent.append(framed)
                    yield framed
            tail = [_frame(pipeline.finish(), speech.sse)]
            if speech.sse:
                spent = usage(len(speech.text), samples, opened.sample_rate)
                tail.append(_sse({"type": "speech.audio.done", "usage": spent}))
            for framed in tail:
                yield framed
            if keep:
                self.cache.put(key, [*sent, *tail])
        finally:
            await opened.close()
            await admitted.release()


@dataclass
class Admitted:
    """A request the tenant's limits let through, holding its stream slot until
    `release` (idempotent); nothing when no limits are configured."""

    limiter: Limiter | None
    admission: Admission | None
    released: bool = False

    def headers(self) -> dict[str, str]:
        return self.admission.headers() if self.admission is not None else {}

    async def release(self) -> None:
        if self.released or self.limiter is None or self.admission is None:
            return
        self.released = True
        await self.limiter.release(self.admission)


@dataclass
class Opened:
    """A replica's stream of one text, its first audio already received."""

    gateway: Gateway
    fleet: Fleet
    address: str
    characters: int
    first: aio.Chunk | None
    upstream: AsyncGenerator[aio.Chunk]
    asked: float
    arrived: float
    closed: bool = False
    fallback_reason: str = field(default="")  # why the route's fallback serves it, if it does

    @property
    def sample_rate(self) -> int:
        return self.first.sample_rate if self.first is not None else self.fleet.sample_rate

    async def audio(self) -> AsyncIterator[aio.Audio]:
        """The samples as they arrive; the first sentence in slices, so that its first
        bytes are encoded and sent before the whole sentence is (12 ms of MP3 for 1.5 s)."""
        if self.first is not None:
            for piece in _slices(self.first.audio, FIRST_SLICE_SAMPLES):
                yield piece
        try:
            async for chunk in self.upstream:
                yield chunk.audio
        except aio.UpstreamError as err:
            log.warning("replica %s failed mid-stream: %s", self.address, err)
            self.fleet.record(self.address, ok=False)
            raise

    async def close(self) -> None:
        """Cancel the replica's stream if it is still going (Triton stops at its next
        chunk) and give back its share of the replica's outstanding work."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            await self.upstream.aclose()
        self.gateway.release(self.fleet, self.address, self.characters)


async def read_body(request: Request) -> bytes:
    """The request's body, at most MAX_BODY_BYTES of it: 413 at once (closing the
    connection, nothing read) when its Content-Length says it is bigger, or as soon as
    a chunked body grows past it. (A body that trickles in is cut off by the server's
    request deadline, `server.REQUEST_SECONDS`.)"""
    too_big = ApiError(
        413, f"The request body is over {MAX_BODY_BYTES} bytes: send less text",
        headers={"connection": "close"},
    )  # fmt: skip
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
            raise too_big
        return await request.body()
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_big
        parts.append(chunk)
    return b"".join(parts)


def tenant(principal: Principal | None, request: Request | WebSocket) -> str:
    """Whom a request's limits are counted against: the token's tenant, or without
    auth the client's address (behind a proxy, the proxy's)."""
    if principal is not None:
        return principal.tenant
    return f"client:{request.client.host if request.client else 'unknown'}"


def _slices(audio: aio.Audio, size: int) -> list[aio.Audio]:
    return [audio[i : i + size] for i in range(0, len(audio), size)] or [audio]


def _frame(data: bytes, sse: bool) -> bytes:
    if not sse or not data:
        return data
    return _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})


def _sse(event: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def usage(characters: int, samples: int, rate: int) -> dict[str, int]:
    """Characters in and audio out, as tokens: roughly 4 characters a token, and
    OpenAI's audio models count about 20 tokens per second of audio."""
    input_tokens = max(1, characters // 4)
    output_tokens = round(samples / rate * 20) if rate else 0
    return {
        "input_tokens": input_tokens, "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }  # fmt: skip


def text_field(body: Mapping[str, Any], field: str, *, required: bool = False) -> str:
    value = body.get(field)
    if value is None:
        if required:
            raise ApiError(400, f"'{field}' is required", param=field)
        return ""
    if not isinstance(value, str):
        raise ApiError(400, f"'{field}' must be a string", param=field)
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800") is no text to speak or echo
        raise ApiError(400, f"'{field}' is not valid Unicode text", param=field) from None
    return value


def refuse_nul(text: str, field: str) -> None:
    """The engine fails on a NUL: a bad request (400 naming `field`), not a failing replica."""
    if "\0" in text:
        raise ApiError(400, f"'{field}' has a NUL character", param=field)


def _voice(body: Mapping[str, Any]) -> str:
    value = body.get("voice")
    if isinstance(value, dict) and isinstance(value.get("id"), str):  # {"id": "..."}
        body = {"voice": value["id"]}
    return text_field(body, "voice", required=True)


# ---- the ASGI app ---------------------------------------------------------------------------


def build(gateway: Gateway, lifespan: Any = None) -> Starlette:
    metrics = gateway.metrics

    async def speech(request: Request) -> Response:
        started = time.perf_counter()
        fleet, who = "", "-"
        try:
            principal = gateway.authenticate(request.headers.get("authorization"))
            try:
                raw = await read_body(request)
            except ClientDisconnect:  # gone, or cut off for sending too slowly
                return Response(status_code=408)
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):  # not JSON, not UTF-8, too deep, too long
                raise ApiError(
                    400, "We could not parse the JSON body of your request: send a JSON object "
                    "with 'model', 'input' and 'voice'",
                ) from None  # fmt: skip
            spoken = gateway.validate(body)
            fleet, who = spoken.route.fleet.key, tenant(principal, request)
            response: Response = await gateway.speak(spoken, started, who)
        except ApiError as err:
            response = err.response()
        metrics.requests.labels(fleet, str(response.status_code)).inc()
        region = gateway.config.region.name if gateway.config.region else "-"
        access.info(
            "speech status=%d tenant=%s region=%s fleet=%s ms=%.0f", response.status_code, who,
            region, fleet or "-", (time.perf_counter() - started) * 1000,
        )  # fmt: skip
        return response

    async def models(request: Request) -> Response:
        try:
            gateway.authenticate(request.headers.get("authorization"))
        except ApiError as err:
            return err.response()
        data = [
            {"id": model, "object": "model", "created": 0, "owned_by": "ttsfleet"}
            for route in gateway.config.routes
            for model in route.models
        ]
        return JSONResponse({"object": "list", "data": data})

    async def voices(request: Request) -> Response:
        try:
            gateway.authenticate(request.headers.get("authorization"))
        except ApiError as err:
            return err.response()
        data = [
            {"id": voice, "models": list(route.models), "engine_voice": route.fleet.voice,
             "fleet": route.fleet.key}
            for route in gateway.config.routes
            for voice in gateway.voices(route)
        ]  # fmt: skip
        return JSONResponse({"object": "list", "data": data})

    async def healthz(_: Request) -> Response:
        return Response("ok\n", media_type="text/plain")

    async def readyz(_: Request) -> Response:
        ok, why = gateway.ready()
        return Response(f"{why}\n", status_code=200 if ok else 503, media_type="text/plain")

    async def metrics_page(_: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

    async def openapi(_: Request) -> Response:
        return JSONResponse(openapi_document(gateway.config))

    async def ticket(request: Request) -> Response:
        try:
            principal = gateway.authenticate(request.headers.get("authorization"))
        except ApiError as err:
            return err.response()
        if principal is None:  # no auth configured: any ticket would do; issue one anyway
            principal = Principal("anonymous", "default", frozenset(), time.time() + 3600)
        issued, expires = gateway.tickets.issue(principal)
        return JSONResponse(
            {"ticket": issued, "expires_at": int(expires),
             "url": f"/v1/audio/speech/stream?ticket={issued}"},
            headers={"cache-control": "no-store"},
        )  # fmt: skip

    async def stream(socket: WebSocket) -> None:
        from ttsfleet.gateway.ws import Session  # noqa: PLC0415 - ws imports this module

        await Session(gateway, socket).run()

    page = resources.files("ttsfleet.gateway").joinpath("static/index.html").read_bytes()

    async def index(_: Request) -> Response:
        # The page holds no secret: every call it makes carries the user's own token.
        return Response(page, media_type="text/html; charset=utf-8",
                        headers={"cache-control": "no-cache"})  # fmt: skip

    return Starlette(
        middleware=[Middleware(RegionHeader, gateway=gateway)],
        routes=[
            Route("/v1/audio/speech", speech, methods=["POST"]),
            Route("/v1/audio/speech/tickets", ticket, methods=["POST"]),
            WebSocketRoute("/v1/audio/speech/stream", stream),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/voices", voices, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_page, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/", index, methods=["GET"]),
        ],
        exception_handlers={404: _not_found, 405: _not_allowed},
        lifespan=lifespan,
    )


class RegionHeader:
    """Names the gateway's region on every HTTP response (x-ttsfleet-region)."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app, self.gateway = app, gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        region = self.gateway.config.region
        if scope["type"] != "http" or region is None:
            await self.app(scope, receive, send)
            return
        name = region.name.encode()

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"x-ttsfleet-region", name)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, named)


async def _not_found(request: Request, _: Exception) -> Response:
    return ApiError(404, f"No route {request.method} {request.url.path}").response()


async def _not_allowed(request: Request, exc: Exception) -> Response:
    response = ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()
    response.headers.update(getattr(exc, "headers", None) or {})  # Allow: the methods that are
    return response


def openapi_document(config: GatewayConfig) -> dict[str, Any]:
    """The API's OpenAPI 3.1 description, with this gateway's models and voices: every
    path the gateway serves, every status code and media type it answers with (the
    schemathesis test in tests/integration/test_gateway_schema.py holds it to that)."""
    models = [m for route in config.routes for m in route.models]
    voices = sorted({v for route in config.routes for v in (*route.voices, route.fleet.voice)})

    def json_body(schema: dict[str, Any]) -> dict[str, Any]:
        return {"application/json": {"schema": schema}}

    def ref(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    def failures(codes: dict[str, str]) -> dict[str, Any]:
        return {code: {"description": why, "content": json_body(ref("Error"))}
                for code, why in codes.items()}  # fmt: skip

    def with_headers(response: dict[str, Any], headers: dict[str, Any]) -> dict[str, Any]:
        return response | {"headers": headers}

    # Without auth configured nobody is turned away, and there are no keys to wait for.
    keys = "the gateway has not loaded its signing keys yet"
    denied = {} if config.auth is None else {
        "401": "Missing, expired or wrongly signed token",
        "403": "The token lacks a required scope",
    }  # fmt: skip
    unready = {} if config.auth is None else {"503": f"Retry: {keys}"}
    text = {"type": "string"}
    nullable = {"type": ["string", "null"]}
    integer = {"type": "integer", "minimum": 0}
    no_store = text | {"const": "no-store"}
    voice_name = text | {"enum": voices}
    voice_object = {"type": "object", "required": ["id"], "properties": {"id": voice_name}}
    request = {
        "type": "object",
        "required": ["model", "input", "voice"],
        "properties": {
            "model": text | {"enum": models},
            # Something to speak (a letter or digit: `[^\W_]` with Unicode classes), no NUL.
            "input": text
            | {
                "minLength": 1,
                "maxLength": config.max_input_characters,
                "pattern": "^[^\\u0000]*[^\\W_][^\\u0000]*$",
            },
            "voice": {"anyOf": [voice_name, voice_object]},
            # The optional fields take null for their default.
            "response_format": {"enum": [*audio.FORMATS, None], "default": "mp3"},
            "speed": {"type": ["number", "null"], "minimum": 0.25, "maximum": 4.0, "default": 1.0},
            "instructions": nullable | {"description": "Accepted; these voices ignore it."},
            "stream_format": {"enum": [*STREAM_FORMATS, None], "default": "audio"},
        },
    }
    event = {  # the JSON in each server-sent event's data
        "oneOf": [
            {
                "type": "object",
                "required": ["type", "audio"],
                "properties": {
                    "type": {"const": "speech.audio.delta"},
                    "audio": text | {"contentEncoding": "base64"},
                },
            },
            {
                "type": "object",
                "required": ["type", "usage"],
                "properties": {
                    "type": {"const": "speech.audio.done"},
                    "usage": {
                        "type": "object",
                        "required": ["input_tokens", "output_tokens", "total_tokens"],
                        "properties": {
                            "input_tokens": integer,
                            "output_tokens": integer,
                            "total_tokens": integer,
                        },
                    },
                },
            },
        ]
    }
    sse = {  # OpenAPI before 3.2 has no itemSchema: this schema is each event's
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": text | {"contentMediaType": "application/json", "contentSchema": ref("Event")}
        },
    }
    binary = {"schema": text | {"format": "binary"}}
    limited = config.rate_limits is not None
    limit_headers = {  # draft-ietf-httpapi-ratelimit-headers-09
        "RateLimit-Policy": {"required": True, "schema": text},
        "RateLimit": {"required": True, "schema": text},
    } if limited else {}  # fmt: skip
    retry_after = {"Retry-After": {"required": True, "schema": text | {"pattern": "^[0-9]+$"}}}
    speech_ok = {
        "description": "Audio as it is generated, or server-sent events (stream_format sse)",
        "headers": {
            "Cache-Control": {"required": True, "schema": no_store},
            "Server-Timing": {
                "description": "The replica's time to first audio and the gateway's before it, "
                "or a hit in the reply cache",
                "required": True,
                "schema": text,
            },
            "X-TtsFleet-Fallback": {
                "description": "The fallback fleet (namespace/name) that spoke instead of the "
                "route's own",
                "schema": text,
            },
            "X-TtsFleet-Fallback-Reason": {
                "schema": {"enum": ["unavailable", "overloaded", "breaker-open", "failed"]}
            },
        }
        | limit_headers,
        "content": {media: binary for media in audio.FORMATS_MEDIA.values()}
        | {"text/event-stream": {"schema": sse}},
    }
    model = {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": text | {"enum": models},
            "object": {"const": "model"},
            "created": integer,
            "owned_by": text,
        },
    }
    voice = {
        "type": "object",
        "required": ["id", "models", "engine_voice", "fleet"],
        "properties": {
            "id": voice_name,
            "models": {"type": "array", "items": text | {"enum": models}},
            "engine_voice": text,
            "fleet": text | {"description": "namespace/name of the TtsDeployment"},
        },
    }

    ticket = {
        "type": "object",
        "required": ["ticket", "expires_at", "url"],
        "properties": {
            "ticket": text,
            "expires_at": integer | {"description": "Unix time"},
            "url": text | {"description": "The WebSocket's path, the ticket in its query"},
        },
    }

    def listing(item: str) -> dict[str, Any]:
        items = {"type": "array", "items": ref(item)}
        return {
            "type": "object",
            "required": ["object", "data"],
            "properties": {"object": {"const": "list"}, "data": items},
        }

    def public(summary: str, responses: dict[str, Any]) -> dict[str, Any]:
        """An operation anyone may call: no token."""
        return {"get": {"summary": summary, "security": [], "responses": responses}}

    def authenticated(method: str, summary: str, what: str, schema: str) -> dict[str, Any]:
        """An operation that takes the token and answers JSON."""
        ok = {"description": what, "content": json_body(ref(schema))}
        return {method: {"summary": summary, "responses": {"200": ok} | failures(denied | unready)}}

    def plain(description: str, media: str = "text/plain") -> dict[str, Any]:
        return {"description": description, "content": {media: {"schema": text}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "ttsfleet speech API", "version": "v1"},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["message", "type", "param", "code"],
                            "properties": {
                                "message": text,
                                "type": text,
                                "param": nullable,
                                "code": nullable,
                            },
                        }
                    },
                },
                "SpeechRequest": request,
                "Event": event,
                "Model": model,
                "ModelList": listing("Model"),
                "Voice": voice,
                "VoiceList": listing("Voice"),
                "Ticket": ticket,
            },
        },
        "security": [{"bearer": []}] if config.auth is not None else [],
        "paths": {
            "/v1/audio/speech": {
                "post": {
                    "summary": "Speak text; the audio streams as it is generated",
                    "requestBody": {
                        "required": True,
                        "content": json_body(ref("SpeechRequest")),
                    },
                    "responses": {"200": speech_ok}
                    | failures(
                        {
                            "400": "Invalid request: the message names the field",
                            "404": "Unknown model",
                            "413": f"The request body is over {MAX_BODY_BYTES} bytes",
                        }
                        | denied
                    )
                    | {
                        "503": {
                            "description": "Retry: no replica could serve the request, or the "
                            "fleet sheds load (Retry-After says when)"
                            + ("" if config.auth is None else f", or {keys}"),
                            "content": json_body(ref("Error")),
                        }
                    }
                    | (
                        failures(
                            {
                                "421": "The tenant is pinned to other regions (data "
                                "residency); the message names the region to use"
                            }
                        )
                        if config.region is not None and config.region.residency
                        else {}
                    )
                    | (
                        {
                            "429": with_headers(
                                failures(
                                    {
                                        "429": "Over the tenant's rate or stream limit "
                                        "(type rate_limit_error)"
                                    }
                                )["429"],
                                limit_headers | retry_after,
                            )
                        }
                        if limited
                        else {}
                    ),
                }
            },
            "/v1/audio/speech/tickets": {
                "post": {
                    "summary": "A short-lived ticket for the speech WebSocket "
                    "(/v1/audio/speech/stream), which browsers cannot send a token to",
                    "responses": {
                        "200": {
                            "description": "The ticket",
                            "headers": {
                                "Cache-Control": {"required": True, "schema": no_store},
                            },
                            "content": json_body(ref("Ticket")),
                        }
                    }
                    | failures(denied | unready),
                }
            },
            "/v1/models": authenticated(
                "get", "The models this gateway routes", "The models", "ModelList"
            ),
            "/v1/voices": authenticated(
                "get", "The voices each model accepts", "The voices", "VoiceList"
            ),
            "/healthz": public("Liveness: the process serves", {"200": plain("ok")}),
            "/readyz": public(
                "Readiness: keys loaded and every fleet's endpoints known",
                {"200": plain("ok"), "503": plain("What the gateway still waits for")},
            ),
            "/metrics": public("Prometheus metrics", {"200": plain("The text exposition format")}),
            "/openapi.json": public(
                "This document",
                {"200": {"description": "OpenAPI 3.1", "content": json_body({"type": "object"})}},
            ),
            "/": public("The speech page", {"200": plain("The page", "text/html")}),
        },
    }
