"""The speech WebSocket, `/v1/audio/speech/stream`: text in pieces, audio as it is made.

A voice agent keeps one socket per call and speaks through *contexts* (`context_id`):
text arrives in pieces as its language model writes it (`continue`), the gateway cuts
it into sentences and has each synthesised as soon as it is complete, `flush` speaks
what is buffered now, `close` ends a context after its audio, and `cancel` stops it at
once (barge-in: the caller spoke). Each context is one audio stream in one format, one
encoder from its first sentence to its last, sent in order as base64 `audio` messages
and ended by one `done`. The message shapes, with an example session, are in
docs/speech-websocket.md.

Authentication without headers (browsers cannot set them on a WebSocket): a bearer
token in the first message, or a ticket from `POST /v1/audio/speech/tickets` in the
URL; an `Authorization` header works too. Nothing is spoken before one of them passes.

Each context has one task that speaks its sentences one at a time, one replica stream
per sentence; a `cancel` cancels that stream's gRPC call at once, and the replica stops
at its next chunk (at most 1.5 s of audio with the chunked engine, the sentence with the
sentence engine); a single writer task sends
the socket's messages,
so that a cancelled context's queued audio is dropped rather than sent. A disconnect
cancels every context and with them every replica stream the socket held.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from ttsfleet.gateway import audio
from ttsfleet.gateway.app import (
    Admitted,
    ApiError,
    Speech,
    refuse_nul,
    tenant,
    text_field,
    usage,
)
from ttsfleet.gateway.auth import Principal

if TYPE_CHECKING:
    from ttsfleet.gateway.app import Gateway

log = logging.getLogger("ttsfleet.gateway")

AUTH_SECONDS = 10.0  # for the first message, when it must carry the token
MAX_CONTEXTS = 16  # open at once on one socket
MAX_MESSAGE_BYTES = 256 * 1024
OUTBOX = 64  # messages waiting for the socket; a slow reader slows synthesis down
SOFT_SENTENCE = 220  # characters: text with no sentence end is cut at a pause past this
SETTINGS = ("model", "voice", "response_format", "speed")
CLOSE_POLICY = 1008  # RFC 6455: policy violation (authentication failed)

# A sentence ends at . ! ? … (and their CJK forms), after any closing quotes or
# brackets, before whitespace; a blank line ends one too.
_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*\s+|\n\s*\n")
_PAUSE = re.compile(r"[,;:\u2013\u2014]\s+|\s+")
_ABBREVIATIONS = frozenset(
    ("mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "a.m", "p.m")
)


def sentences(buffer: str, *, everything: bool = False) -> tuple[list[str], str]:
    """The complete sentences at the start of `buffer`, and the rest (all of it is
    taken when `everything`). A run of text with no sentence end is cut at its last
    pause past SOFT_SENTENCE characters, so synthesis never waits on a huge sentence."""
    out: list[str] = []
    start = 0
    for match in _END.finditer(buffer):
        word = buffer[start : match.start()].rsplit(None, 1)[-1:] or [""]
        if word[0].lower().rstrip(".") in _ABBREVIATIONS and "\n" not in match.group():
            continue  # "Dr. Smith": not an end
        piece = buffer[start : match.end()].strip()
        if piece:
            out.append(piece)
        start = match.end()
    rest = buffer[start:]
    while len(rest) > SOFT_SENTENCE:
        cut = max((m.end() for m in _PAUSE.finditer(rest, 0, SOFT_SENTENCE)), default=0)
        cut = cut or SOFT_SENTENCE
        out.append(rest[:cut].strip())
        rest = rest[cut:]
    if everything and rest.strip():
        out.append(rest.strip())
        rest = ""
    return [s for s in out if s], rest


class _Flush:
    """A marker in a context's queue: push out what the encoder holds back."""


_FLUSH = _Flush()
_CLOSE = None


@dataclass(eq=False)
class Context:
    id: str
    speech: Speech  # the settings; `text` is each sentence's in turn
    admitted: Admitted  # its place within the tenant's limits, released when it ends
    queue: asyncio.Queue[str | _Flush | None] = field(default_factory=asyncio.Queue)
    buffer: str = ""
    pipeline: audio.Pipeline | None = None
    task: asyncio.Task[None] | None = None
    cancelled: bool = False
    closing: bool = False
    sequence: int = 0
    samples: int = 0
    sample_rate: int = 0
    characters: int = 0

    def done(self, reason: str) -> dict[str, Any]:
        """The context's last message."""
        spent = usage(self.characters, self.samples, self.sample_rate)
        return {"type": "done", "context_id": self.id, "reason": reason, "usage": spent}


class Session:
    """One WebSocket: its contexts, their tasks, and the writer."""

    def __init__(self, gateway: Gateway, socket: WebSocket) -> None:
        self.gateway = gateway
        self.socket = socket
        self.contexts: dict[str, Context] = {}
        self.outbox: asyncio.Queue[tuple[Context | None, dict[str, Any]]] = asyncio.Queue(OUTBOX)
        self.principal: Principal | None = None
        self.releases: set[asyncio.Future[None]] = set()  # stream slots being given back

    @property
    def tenant(self) -> str:
        return tenant(self.principal, self.socket)

    async def run(self) -> None:
        await self.socket.accept()
        metrics = self.gateway.metrics
        metrics.websockets.inc()
        writer = asyncio.create_task(self._write())
        try:
            if await self._authenticate():
                await self._send(None, {"type": "ready"})
                await self._read()
        except WebSocketDisconnect:
            pass
        finally:
            for context in list(self.contexts.values()):
                await self._stop(context, "disconnected")
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            metrics.websockets.dec()

    # ---- authentication -----------------------------------------------------------------

    async def _authenticate(self) -> bool:
        gateway = self.gateway
        if gateway.verifier is None:
            return True
        header = self.socket.headers.get("authorization")
        ticket = self.socket.query_params.get("ticket")
        try:
            if header:
                self.principal = gateway.authenticate(header)
            elif ticket:
                self.principal = gateway.redeem(ticket)
            else:
                try:
                    first = await asyncio.wait_for(self._receive(), AUTH_SECONDS)
                except TimeoutError:
                    raise ApiError(
                        401, f"No auth message in {AUTH_SECONDS:.0f}s: send "
                        '{"type": "auth", "token": "<JWT>"} first, or connect with ?ticket=',
                        code="invalid_api_key",
                    ) from None  # fmt: skip
                if first.get("type") != "auth":
                    raise ApiError(
                        401, "The first message must be "
                        '{"type": "auth", "token": "<JWT>"} (or connect with ?ticket=)',
                        param="type", code="invalid_api_key",
                    )  # fmt: skip
                token = first.get("token")
                if not isinstance(token, str) or not token.strip():
                    raise ApiError(
                        401, "'token' must be the bearer token (a JWT)", param="token",
                        code="invalid_api_key",
                    )  # fmt: skip
                self.principal = gateway.authenticate(f"Bearer {token.strip()}")
        except ApiError as err:
            await self._error(None, err)
            await self._drain()
            await self.socket.close(CLOSE_POLICY, err.message[:120])
            return False
        return True

    # ---- reading ----------------------------------------------------------------------

    async def _read(self) -> None:
        idle = self.gateway.config.websocket_idle_seconds
        while True:
            try:
                message = await asyncio.wait_for(self._receive(), idle)
            except TimeoutError:
                if self.contexts:
                    continue  # speaking, or waiting for more text: not idle
                await self._error(
                    None, ApiError(408, f"Nothing was sent for {idle:.0f}s: the socket is "
                                   "closed; reconnect to speak again", code="idle_timeout"),
                )  # fmt: skip
                await self._drain()
                await self.socket.close(1000, "idle")
                return
            except ApiError as err:
                await self._error(None, err)
                continue
            try:
                await self._handle(message)
            except ApiError as err:
                await self._error(_context_id(message), err)

    async def _receive(self) -> dict[str, Any]:
        """The next message as a JSON object; ApiError for anything else."""
        event = await self.socket.receive()
        if event["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(event.get("code", 1000))
        raw = event.get("text")
        if raw is None:
            raise ApiError(400, "Messages must be JSON text frames, not binary")
        if len(raw) > MAX_MESSAGE_BYTES:
            raise ApiError(400, f"A message is over {MAX_MESSAGE_BYTES} bytes: send less text")
        try:
            message = json.loads(raw)
        except json.JSONDecodeError:
            raise ApiError(400, "A message is not JSON: send a JSON object") from None
        if not isinstance(message, dict):
            raise ApiError(400, "A message must be a JSON object with a 'type'")
        return message

    async def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "ping":
            await self._send(None, {"type": "pong"})
            return
        if kind == "auth":
            return  # already authenticated (a header or ticket, or no auth configured)
        if kind not in ("continue", "flush", "close", "cancel"):
            raise ApiError(
                400, f"Unknown message type {kind!r}: use continue, flush, close, cancel, "
                "ping or auth", param="type",
            )  # fmt: skip
        context_id = message.get("context_id")
        if not isinstance(context_id, str) or not context_id:
            raise ApiError(400, "'context_id' is required: a string naming the context",
                           param="context_id")  # fmt: skip
        context = self.contexts.get(context_id)
        if kind == "continue":
            await self._continue(context_id, context, message)
            return
        if context is None:
            raise ApiError(
                400, f"No open context {context_id!r}: start one with a continue message",
                param="context_id",
            )  # fmt: skip
        if kind == "cancel":
            await self._stop(context, "cancelled")
        elif not context.closing:
            self._feed(context, everything=True)
            if kind == "close":
                context.closing = True
                context.queue.put_nowait(_CLOSE)
            else:
                context.queue.put_nowait(_FLUSH)

    async def _continue(
        self, context_id: str, context: Context | None, message: dict[str, Any]
    ) -> None:
        text = text_field(message, "text")
        refuse_nul(text, "text")
        held = len(context.buffer if context is not None else "") + len(text)
        limit = self.gateway.config.max_input_characters
        if held > limit:  # checked first: a refused message opens no context
            raise ApiError(
                400, f"Context {context_id!r} would hold {held} characters not yet spoken; the "
                f"maximum is {limit}: send a flush or end sentences sooner", param="text",
                code="string_above_max_length",
            )  # fmt: skip
        if context is None:
            if len(self.contexts) >= MAX_CONTEXTS:
                raise ApiError(
                    400, f"{MAX_CONTEXTS} contexts are open on this socket: close or cancel "
                    "one first", param="context_id", code="too_many_contexts",
                )  # fmt: skip
            body = {name: message[name] for name in SETTINGS if name in message}
            speech = self.gateway.validate(body | {"input": "settings"})  # text comes later
            # A context is a request and a stream; its text is charged as it comes.
            admitted = await self.gateway.admit(self.tenant, 0)
            context = self.contexts[context_id] = Context(context_id, speech, admitted)
            context.task = asyncio.create_task(self._speak(context))
        else:
            if context.closing:
                raise ApiError(
                    400, f"Context {context_id!r} is closing: start a new context_id",
                    param="context_id",
                )  # fmt: skip
            for name in SETTINGS:
                if name in message and not self._same(context.speech, name, message[name]):
                    raise ApiError(
                        400, f"'{name}' is fixed by a context's first message: open a new "
                        "context_id to change it", param=name,
                    )  # fmt: skip
        if text:
            await self.gateway.charge(self.tenant, len(text))
        context.buffer += text
        self._feed(context)

    def _feed(self, context: Context, *, everything: bool = False) -> None:
        ready, context.buffer = sentences(context.buffer, everything=everything)
        for sentence in ready:
            context.characters += len(sentence)
            if any(ch.isalnum() for ch in sentence):  # "...": nothing to say
                context.queue.put_nowait(sentence)

    # ---- speaking -----------------------------------------------------------------------

    async def _speak(self, context: Context) -> None:
        """Speak the context's sentences in order; then `done`."""
        gateway = self.gateway
        reason = "completed"
        try:
            while (item := await context.queue.get()) is not _CLOSE:
                if isinstance(item, _Flush):
                    if context.queue.empty() and context.pipeline is not None:
                        await self._audio(context, context.pipeline.drain())
                    continue
                assert isinstance(item, str)
                opened = await gateway.connect(
                    dataclasses.replace(context.speech, text=item), admitted=context.samples > 0
                )
                try:
                    if context.pipeline is None:
                        context.sample_rate = opened.sample_rate
                        context.pipeline = context.speech.pipeline(opened.sample_rate)
                    async for samples in opened.audio():
                        context.samples += samples.size
                        await self._audio(context, context.pipeline.feed(samples))
                finally:
                    await opened.close()
            if context.pipeline is not None:
                await self._audio(context, context.pipeline.finish())
        except ApiError as err:
            reason = "failed"
            await self._error(context.id, err)
        except Exception as err:  # a replica failing mid-sentence
            reason = "failed"
            log.warning("context %s failed: %s", context.id, err)
            await self._error(
                context.id, ApiError(502, f"Synthesis failed: {err}", kind="server_error",
                                     code="upstream_error"),
            )  # fmt: skip
        self._forget(context, reason)
        await self._send(context, context.done(reason))

    async def _stop(self, context: Context, reason: str) -> None:
        """Barge-in or disconnect: drop the context's unsent audio, cancel its replica
        stream (the task's `finally` closes it) and say `done` at once."""
        context.cancelled = True
        self._forget(context, reason)
        if context.task is not None and not context.task.done():
            context.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await context.task
        if reason == "cancelled":
            await self._send(None, context.done(reason))  # not dropped: None, not the context

    def _same(self, speech: Speech, name: str, value: Any) -> bool:
        """Whether a later message's setting `name` is the context's (any name of the
        same route's model or voice is)."""
        if name == "model":
            return value in speech.route.models
        if name == "voice":
            voice = value.get("id") if isinstance(value, dict) else value
            return voice in self.gateway.voices(speech.route)
        if name == "response_format":
            return bool(value == speech.response_format)
        return isinstance(value, int | float) and float(value) == speech.speed

    def _forget(self, context: Context, reason: str) -> None:
        if self.contexts.get(context.id) is context:
            del self.contexts[context.id]
            release = asyncio.ensure_future(context.admitted.release())
            self.releases.add(release)
            release.add_done_callback(self.releases.discard)
            fleet = context.speech.route.fleet.key
            self.gateway.metrics.contexts.labels(fleet, reason).inc()

    async def _audio(self, context: Context, data: bytes) -> None:
        if not data:
            return
        encoded = base64.b64encode(data).decode()
        message = {"type": "audio", "context_id": context.id, "sequence": context.sequence,
                   "audio": encoded}  # fmt: skip
        context.sequence += 1
        await self._send(context, message)

    # ---- writing ------------------------------------------------------------------------

    async def _error(self, context_id: str | None, err: ApiError) -> None:
        await self._send(None, {"type": "error", "context_id": context_id, "error": err.body()})

    async def _send(self, context: Context | None, message: dict[str, Any]) -> None:
        await self.outbox.put((context, message))

    async def _drain(self) -> None:
        """Wait until the writer has sent everything queued (before a close)."""
        deadline = time.monotonic() + 2.0
        while not self.outbox.empty() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0)

    async def _write(self) -> None:
        """The only sender: a cancelled context's queued messages are dropped here."""
        while True:
            context, message = await self.outbox.get()
            if context is not None and context.cancelled:
                continue
            if self.socket.application_state != WebSocketState.CONNECTED:
                continue
            try:
                await self.socket.send_text(json.dumps(message, separators=(",", ":")))
            except (WebSocketDisconnect, RuntimeError, OSError):
                continue  # the client left; the reader sees it and cleans up


def _context_id(message: Any) -> str | None:
    value = message.get("context_id") if isinstance(message, dict) else None
    return value if isinstance(value, str) else None
