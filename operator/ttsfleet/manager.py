"""The operator process: leader election, and one `Controller` per term of leadership.

controller-runtime's Manager in small. The main thread runs the election loop. While
this replica holds the Lease it runs a term: a fresh `Controller` (its background
loops) and kopf (watches and handlers, in a thread of its own), both writing through
a client fenced by the Lease. A term ends when the Lease is lost (not renewed within
the renew deadline, or taken by another replica), when kopf stops by itself, or on
SIGTERM/SIGINT; the fence drops first, so nothing is written from that instant on,
then the threads are stopped, and the replica stands by again in the same process
(after a signal it releases the Lease so a standby takes over at once, and exits).

Both roles serve `/healthz` (the election loop is alive; never the apiserver's health,
so an apiserver outage restarts no pod) and `/readyz` (a standby is ready to take
over; a leader while its kopf runs) on the health port, and /metrics with
`ttsfleet_operator_is_leader` on the metrics port.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kopf
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector, start_http_server

# handlers registers kopf's handlers: imported here, before any term starts, so a
# standby that takes over loses no time loading them.
from ttsfleet import __version__, handlers, kube  # noqa: F401
from ttsfleet.controller import Controller, OperatorMetrics
from ttsfleet.leader import Elector, Leadership, LeaseConfig
from ttsfleet.resources.gateway import NODE_READER

log = logging.getLogger("ttsfleet.manager")

# How long a term's threads get to finish what they were doing when it ends.
STOP_SECONDS = 10.0


class PortError(OSError):
    """A port of the operator's endpoints is taken; the message names the flag."""


@dataclass(frozen=True)
class Options:
    kubeconfig: Path | None
    namespaces: list[str]
    metrics_port: int
    health_port: int
    prometheus_url: str | None
    identity: str
    lease: LeaseConfig | None  # None: no leader election (one process acts alone)
    # The ClusterRole gateways are bound to, to read Nodes (the chart names its own).
    gateway_node_reader: str = NODE_READER


class _Term:
    """One term of leadership: a Controller and kopf, started and stopped together.

    The term's client is its own, fenced by the Lease *and* by the term: once the term
    has ended, a thread of it that outlived `stop` (blocked on a hung apiserver, say)
    writes nothing, even after this replica leads again in a later term.
    """

    def __init__(self, options: Options, leadership: Leadership | None, metrics: OperatorMetrics):
        self.options = options
        self.ended = threading.Event()

        def fence() -> bool:
            return not self.ended.is_set() and (leadership is None or leadership.held())

        api = kube.api_client(options.kubeconfig, fence=fence, user_agent=user_agent(options))
        self.controller = Controller(
            api, metrics, prometheus_url=options.prometheus_url, namespaces=options.namespaces,
            gateway_node_reader=options.gateway_node_reader,
        )  # fmt: skip
        self.kopf_stop = threading.Event()
        self.thread = threading.Thread(target=self._kopf, name="kopf", daemon=True)

    def start(self) -> None:
        self.controller.start()
        self.thread.start()

    def _kopf(self) -> None:
        namespaces = self.options.namespaces
        try:
            asyncio.run(
                kopf.operator(
                    standalone=True,  # no kopf peering: the Lease says who acts
                    clusterwide=not namespaces,
                    namespaces=namespaces,
                    memo=kopf.Memo(controller=self.controller),
                    stop_flag=self.kopf_stop,
                )
            )
        except Exception:
            log.exception("kopf stopped with an error")

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        self.ended.set()
        self.kopf_stop.set()
        self.controller.stop(timeout)
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive():
            log.warning("kopf did not stop within %.0fs; its writes are refused", timeout)


def user_agent(options: Options) -> str:
    """What the apiserver's audit log shows for this replica's requests."""
    return f"ttsfleet-operator/{__version__} ({options.identity})"


class Manager:
    """Runs the operator until `stop()` (or SIGTERM/SIGINT through `install_signals`)."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.metrics = OperatorMetrics()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.metrics.registry)
        lease = options.lease
        self.leadership = Leadership(lease.renew_deadline if lease else 0.0)
        agent = user_agent(options)
        # The Lease is read and written unfenced: it is how the fence is lifted.
        self.api = kube.api_client(options.kubeconfig, user_agent=agent)
        self.elector = Elector(self.api, lease, self.leadership) if lease else None
        self.term: _Term | None = None
        self._stopping = threading.Event()
        self._tick = time.monotonic()
        self._servers: list[Any] = []
        self._holder = ""
        self.metrics.is_leader.set(0)

    # ---- probes ----------------------------------------------------------------------
    def healthy(self) -> bool:
        """The election loop went round recently (it never waits on the apiserver for
        longer than a request timeout)."""
        bound = max(30.0, 5 * (self.options.lease.retry_period if self.options.lease else 2))
        return time.monotonic() - self._tick < bound

    def ready(self) -> bool:
        """A standby is ready to take over; a leader while its kopf runs (not only once
        kopf says it started: a leader that just took over must not flap to not-ready
        for the second kopf takes to start, or a rollout would wait on it)."""
        term = self.term
        return self.healthy() and (term is None or term.alive)

    @property
    def leading(self) -> bool:
        return self.term is not None

    # ---- running ---------------------------------------------------------------------
    def serve(self) -> None:
        """Start the metrics and health endpoints; `PortError` if a port is taken."""
        port = self.options.metrics_port
        try:
            server, _ = start_http_server(port, registry=self.metrics.registry)
        except OSError as err:
            raise PortError(f"cannot serve metrics on port {port} ({err.strerror}): "
                            "pick another --metrics-port") from err  # fmt: skip
        self._servers.append(server)
        port = self.options.health_port
        try:
            health = ThreadingHTTPServer(("0.0.0.0", port), _probe_handler(self))  # noqa: S104
        except OSError as err:
            raise PortError(f"cannot serve /healthz on port {port} ({err.strerror}): "
                            "pick another --health-port") from err  # fmt: skip
        threading.Thread(target=health.serve_forever, name="health", daemon=True).start()
        self._servers.append(health)

    def install_signals(self) -> None:
        """SIGTERM and SIGINT stop the manager. The handler only starts a thread that
        does it: setting the Event from the handler itself could deadlock on its lock,
        held by the very wait the signal interrupted."""

        def handle(*_: Any) -> None:
            threading.Thread(target=self.stop, name="stop", daemon=True).start()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handle)

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        """The election loop (in the calling thread) until `stop()`."""
        try:
            if self.elector is None:
                self._begin_term()
                while not self._stopping.wait(1.0):
                    self._tick = time.monotonic()
                    if self.term is not None and not self.term.alive:
                        log.error("kopf stopped; starting it again")
                        self._end_term("kopf stopped")
                        self._begin_term()
            else:
                self._elect(self.elector)
        finally:
            # Fence down, the term's threads stopped, and only then the Lease released:
            # nothing of this replica can land after a standby takes over. Released
            # also when a signal came between taking the Lease and starting the term
            # (release() gives it up only while it is ours).
            self.leadership.revoke()
            self._end_term("the operator is stopping")
            if self.elector is not None:
                self.elector.release()
            for server in self._servers:
                server.shutdown()

    def _elect(self, elector: Elector) -> None:
        lease = elector.config
        while not self._stopping.is_set():
            self._tick = time.monotonic()
            if self.term is None:
                acquired = elector.try_acquire_or_renew()
                self._show_holder(elector.holder)
                if acquired and not self._stopping.is_set():
                    self._begin_term()
                    continue
                wait = elector.next_look()
            else:
                # A fence that lapsed, even for a moment, ends the term (client-go's
                # rule: a leader past its renew deadline stops), whatever a later
                # renewal says: what the term was doing may have been refused half-way.
                # Still holding the record, the replica starts a fresh term at once.
                lapsed = not self.leadership.held()
                renewed = not lapsed and elector.try_acquire_or_renew()
                self._show_holder(elector.holder)
                taken = elector.holder not in ("", lease.identity)
                if taken:
                    self.leadership.revoke()  # another replica holds it: stop at once
                if lapsed or taken or (not renewed and not self.leadership.held()):
                    late = f"Lease not renewed within {lease.renew_deadline:g}s"
                    self._end_term(f"Lease held by {elector.holder}" if taken else late)
                elif not self.term.alive:
                    log.error("kopf stopped; giving up the Lease")
                    elector.release()
                    self._end_term("kopf stopped")
                wait = lease.retry_period
            self._stopping.wait(wait)

    def _show_holder(self, holder: str) -> None:
        if holder != self._holder:
            self.metrics.leader.clear()
            if holder:
                self.metrics.leader.labels(holder).set(1)
            self._holder = holder

    def _begin_term(self) -> None:
        options = self.options
        leadership = self.leadership if self.elector is not None else None
        self.term = _Term(options, leadership, self.metrics)
        self.metrics.is_leader.set(1)
        self.metrics.leader_transitions.labels("leader").inc()
        if self.elector is not None:
            lease = self.elector.config
            log.info("Became leader: %s holds Lease %s/%s", options.identity, lease.namespace,
                     lease.name)  # fmt: skip
            # On a thread of its own: a slow apiserver must not hold the election loop.
            threading.Thread(
                target=self._leader_event, args=(self.term, f"{options.identity} became leader"),
                name="leader-event", daemon=True,
            ).start()  # fmt: skip
        self.term.start()

    def _end_term(self, why: str) -> None:
        term, self.term = self.term, None
        if term is None:
            return
        self.leadership.revoke()
        self.metrics.is_leader.set(0)
        log.warning("Stopped leading (%s): standing by", why)
        term.stop()
        # Counted once kopf and the loops have stopped: nothing of the term runs after.
        self.metrics.leader_transitions.labels("standby").inc()

    def _leader_event(self, term: _Term, message: str) -> None:
        """An Event on the Lease, as client-go's leader election records one (written
        through the term's fenced client)."""
        assert self.elector is not None
        lease = self.elector.config
        api = term.controller.api
        try:
            found = kube.read_lease(api, lease.namespace, lease.name, lease.request_timeout)
            if found is not None:
                kube.post_event(api, found, "Normal", "LeaderElection", message)
        except Exception as err:  # an Event is worth no more than a log line here
            log.warning("Could not record the leader Event: %s", err)


def _probe_handler(manager: Manager) -> type[BaseHTTPRequestHandler]:
    class Probe(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the name http.server calls
            checks = {"/healthz": manager.healthy, "/readyz": manager.ready}
            check = checks.get(self.path.split("?", 1)[0])
            if check is None:
                self.send_error(404)
                return
            ok = check()
            role = "leader" if manager.leading else "standby"
            body = f"{'ok' if ok else 'not ok'} ({role})\n".encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:  # probes every few seconds: not logged
            return

    return Probe
