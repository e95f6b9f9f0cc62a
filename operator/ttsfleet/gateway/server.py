"""`ttsfleet gateway`: the speech API on uvicorn, kept current in the background.

Background work, never on a request's path:
- the config file (a mounted ConfigMap) is re-read when it changes: routes, fleets and
  auth apply to the next request; a bad new config is logged and the last good one
  stays;
- the JWKS (a mounted Secret, or a URL) is re-read on change or every
  `auth.refreshSeconds`; a failed fetch keeps the keys already loaded;
- each fleet's EndpointSlices are watched (`kube.EndpointWatch`), unless the config
  fixes its endpoints, and so are those of the rate limits' Redis Service (the Redis the
  operator runs for the gateway): limits follow its pod to a new address;
- the leases of the tenants' stream slots this replica holds in Redis are renewed.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import functools
import logging
import resource
import signal
import ssl
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from ttsfleet.gateway import config as gateway_config
from ttsfleet.gateway.app import Gateway, build
from ttsfleet.gateway.auth import ConfigError, KeySet

log = logging.getLogger("ttsfleet.gateway")

POLL_SECONDS = 1.0


def _stamp(path: Path) -> tuple[float, int] | None:
    """What changes when a file (or the symlink a ConfigMap volume swaps) changes."""
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_mtime, info.st_ino)


def tls_stamps(tls: gateway_config.Tls) -> tuple[Any, ...]:
    return (_stamp(Path(tls.cert_file)), _stamp(Path(tls.key_file)))


def read_keys(auth: gateway_config.Auth) -> KeySet:
    """The JWKS the auth config names (blocking: run it in a thread)."""
    if auth.jwks_file is not None:
        return KeySet.from_jwks(Path(auth.jwks_file).read_text())
    assert auth.jwks_url is not None
    with urllib.request.urlopen(auth.jwks_url, timeout=10) as response:  # noqa: S310 - configured
        return KeySet.from_jwks(response.read().decode())


REDIS_WATCH = "redis"  # the key of the Redis Service's watch


class Background:
    """The loops that keep a `Gateway` current."""

    def __init__(self, gateway: Gateway, config_path: Path, api: Any | None) -> None:
        self.gateway = gateway
        self.path = config_path
        self.api = api  # a Kubernetes ApiClient, when fleets are watched
        self.watches: dict[str, Any] = {}
        self.ssl: ssl.SSLContext | None = None  # the listener's, when it serves HTTPS
        self.tls_loaded: tuple[Any, ...] | None = None  # the stamps of the files it holds

    async def run(self) -> None:
        await asyncio.gather(
            self._config_loop(), self._keys_loop(), self._leases_loop(), self._tls_loop()
        )

    async def _tls_loop(self) -> None:
        """Load a renewed certificate into the listener's context: new connections get
        it, open ones keep theirs. A pair that does not load is logged and the last good
        one kept (a Secret's two files may change a moment apart)."""
        while True:
            await asyncio.sleep(POLL_SECONDS)
            tls = self.gateway.config.tls
            if self.ssl is None or tls is None:
                continue
            now = tls_stamps(tls)
            if now == self.tls_loaded:
                continue
            try:
                # A pair that loads alone goes live (a live context given a certificate
                # without its key would refuse handshakes until the key came).
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(tls.cert_file, tls.key_file)
                self.ssl.load_cert_chain(tls.cert_file, tls.key_file)
            except (OSError, ssl.SSLError) as err:
                log.error("kept the last good certificate: %s", err)
                continue
            self.tls_loaded = now
            log.info("loaded the renewed certificate %s", tls.cert_file)

    async def _leases_loop(self) -> None:
        while True:
            limiter = self.gateway.limiter
            await asyncio.sleep(
                limiter.config.stream_lease_seconds / 3 if limiter else POLL_SECONDS
            )
            if self.gateway.limiter is not None:
                await self.gateway.limiter.renew()

    async def _config_loop(self) -> None:
        seen = _stamp(self.path)
        self._watch_fleets()
        while True:
            await asyncio.sleep(POLL_SECONDS)
            now = _stamp(self.path)
            if now == seen or now is None:
                continue
            seen = now
            try:
                new = gateway_config.load(self.path)
            except ConfigError as err:
                log.error("kept the last good config: %s", err)
                continue
            self.gateway.apply(new)
            self._watch_fleets()
            log.info("config reloaded: %d routes", len(new.routes))

    def _watch_fleets(self) -> None:
        """Watch the EndpointSlices of every fleet without fixed endpoints, and of the
        rate limits' Redis Service when there is one."""
        from ttsfleet import kube  # noqa: PLC0415 - only a watching gateway needs it

        loop = asyncio.get_running_loop()
        gateway = self.gateway
        wanted: dict[str, tuple[tuple[str, str, str], Callable[[list[str]], None]]] = {
            key: (
                (fleet.namespace, fleet.service or fleet.name, fleet.port),
                functools.partial(gateway.set_endpoints, key),
            )
            for key, fleet in gateway.config.fleets().items()
            if fleet.endpoints is None
        }
        limits = gateway.config.rate_limits
        if limits is not None and limits.redis_service is not None:
            redis = limits.redis_service
            # No fleet's key: theirs are namespace/name.
            wanted[REDIS_WATCH] = ((redis.namespace, redis.name, redis.port), gateway.set_redis)
        else:
            gateway.redis_address = None  # no Redis Service in the config any more
        for key in [k for k in self.watches if k not in wanted]:
            self.watches.pop(key).stop()
        for key, (spec, apply) in wanted.items():
            old = self.watches.get(key)
            if old is not None and (old.namespace, old.service, old.port) == spec:
                apply(old.addresses())
                continue
            if old is not None:
                old.stop()
            if self.api is None:
                log.error("%s has no fixed endpoints and no Kubernetes API to watch", key)
                continue
            watch = kube.EndpointWatch(self.api, *spec)
            watch.on_change = functools.partial(self._changed, loop, key, watch, apply)
            self.watches[key] = watch.start()

    def _changed(
        self, loop: asyncio.AbstractEventLoop, key: str, watch: Any,
        apply: Callable[[list[str]], None], addresses: list[str],
    ) -> None:  # fmt: skip
        """From `watch`'s thread: its Service's addresses, applied on the loop unless a
        newer watch of that Service replaced it meanwhile (a late word from a stopped
        watch must not undo what the new one said)."""

        def applied() -> None:
            if self.watches.get(key) is watch:
                apply(addresses)

        loop.call_soon_threadsafe(applied)

    async def _keys_loop(self) -> None:
        last_source: tuple[str | None, str | None] | None = None
        stamp: tuple[float, int] | None = None
        waited = 0.0
        while True:
            auth = self.gateway.config.auth
            if auth is None:
                await asyncio.sleep(POLL_SECONDS)
                continue
            source = (auth.jwks_file, auth.jwks_url)
            due = source != last_source or not self.gateway.keys_loaded
            if auth.jwks_file is not None:
                now = _stamp(Path(auth.jwks_file))
                due = due or now != stamp
            else:
                now = None
                due = due or waited >= auth.refresh_seconds
            if due:
                try:
                    keys = await asyncio.to_thread(read_keys, auth)
                except (OSError, ConfigError, ValueError) as err:
                    log.error("could not load the JWKS (kept the keys loaded before): %s", err)
                else:
                    self.gateway.use_keys(keys)
                    last_source, stamp, waited = source, now, 0.0
            await asyncio.sleep(POLL_SECONDS)
            waited += POLL_SECONDS

    def stop(self) -> None:
        for watch in self.watches.values():
            watch.stop()


REQUEST_SECONDS = 10.0  # a request (line, headers and body) must arrive within this


def guarded_http() -> type:
    """uvicorn's httptools protocol, but a connection whose request (line, headers and
    body) has not arrived within REQUEST_SECONDS of it opening (or of the previous
    response, on a kept-alive one) is closed: idle or trickling connections (a flood,
    slowloris, a body sent a byte at a time) cannot pile up. uvicorn itself times out
    only idle kept-alive connections. A WebSocket is on its own once upgraded."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # noqa: PLC0415

    class Guarded(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_headers_complete(self) -> None:
            if self.parser.should_upgrade():
                self._disarm()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request, on this kept-alive connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(REQUEST_SECONDS, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            self.transport.close()

    return Guarded


def raise_open_files() -> None:
    """Every connection is a file: take the hard limit (a flood of connections then
    meets the request deadline, not EMFILE on accept)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(config_path: Path, host: str, port: int, api: Any | None = None) -> None:
    """Run the gateway until SIGINT/SIGTERM."""
    import uvicorn  # noqa: PLC0415

    # `kill -USR1` prints every thread's stack to the log: where a stuck watch waits.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    gateway = Gateway(gateway_config.load(config_path))
    background = Background(gateway, config_path, api)
    tls = gateway.config.tls
    raise_open_files()

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        task = asyncio.create_task(background.run())
        try:
            yield
        finally:
            task.cancel()
            background.stop()
            await gateway.channels.close()
            if gateway.limiter is not None:
                await gateway.limiter.close()

    config = uvicorn.Config(
        build(gateway, lifespan), host=host, port=port, log_level="warning", access_log=False,
        loop="uvloop", http=guarded_http(), timeout_graceful_shutdown=10,
        # WebSockets: protocol pings every 20 s find dead peers (browsers answer them
        # too); a message is at most 256 KiB (text, not audio, comes in).
        ws="websockets-sansio", ws_ping_interval=20.0, ws_ping_timeout=20.0,
        ws_max_size=256 * 1024,
        ssl_certfile=tls.cert_file if tls else None, ssl_keyfile=tls.key_file if tls else None,
    )  # fmt: skip
    if tls is not None:
        background.tls_loaded = tls_stamps(tls)  # before loading: a change after is seen
    config.load()
    background.ssl = config.ssl  # renewed certificates go into the listener's context
    uvicorn.Server(config).run()
