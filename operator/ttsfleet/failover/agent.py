"""A region's observer: probes every region's gateway, trades votes with its peers, and
keeps its own region's traffic (Envoy's EDS file, the gateways' healthy list) and
takeover capacity in line with the quorum.

Every `probeIntervalSeconds` an agent
1. sends a tiny real synthesis through each region's gateway (its own included) and
   reads the gateway's /metrics (5xx share since the last probe, open streams);
2. reads each peer's (and the witness's) votes from its `/status`;
3. takes the quorum for every region, steps each region's failback, and when the
   priority levels change, rewrites its Envoy's EDS file (renamed into place).

Votes are exchanged with their age, not their time, so clocks need not agree. The
witness (`ttsfleet witness`) is an agent that only votes: it keeps no traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from ttsfleet.api.v1alpha1 import RegionDetection, RegionFailback, RegionState, TtsRegionSpec
from ttsfleet.failover import envoy, traffic
from ttsfleet.failover.failback import Failback
from ttsfleet.failover.health import WITNESS, Observer, Probe, Verdict, Vote, quorum
from ttsfleet.triton import contract

log = logging.getLogger("ttsfleet.failover")

PROBE_TEXT = "Hi."
LISTEN_SECONDS = 0.5  # between rounds, while a region is suspect: the peers' votes
LOAD_PEAK_SECONDS = 300.0  # a region's load: the peak of its open streams over this


@dataclass(frozen=True)
class Target:
    """A region as an observer reaches it."""

    name: str
    gateway_url: str
    status_url: str | None = None


@dataclass
class Counts:
    """What a gateway's /metrics said last: requests by outcome, streams open."""

    errors: float = 0.0
    total: float = 0.0
    streams: float | None = None


@dataclass
class Agent:
    name: str
    targets: Sequence[Target]
    rules: RegionDetection
    failback: RegionFailback | None = None  # None: a witness, which keeps no traffic
    token: str | None = None
    eds: Path | None = None
    standby: frozenset[str] = frozenset()
    witness: Target | None = None
    clock: Callable[[], float] = time.monotonic
    on_change: Callable[[Agent], None] | None = None
    before_tick: Callable[[Agent], None] | None = None  # e.g. take up an edited spec
    source: str | None = None  # the address its probes and reads leave from
    observers: dict[str, Observer] = field(init=False)
    failbacks: dict[str, Failback] = field(init=False)
    votes: dict[tuple[str, str], Vote] = field(init=False, default_factory=dict)
    verdicts: dict[str, Verdict] = field(init=False, default_factory=dict)
    counts: dict[str, Counts] = field(init=False, default_factory=dict)
    load: dict[str, float] = field(init=False, default_factory=dict)
    lost_load: dict[str, float] = field(init=False, default_factory=dict)
    load_seen: dict[str, deque[tuple[float, float]]] = field(init=False, default_factory=dict)
    levels: list[traffic.Level] | None = field(init=False, default=None)
    version: int = field(init=False, default=0)
    heard: dict[str, list[dict[str, Any]]] = field(init=False, default_factory=dict)
    joined: bool = field(init=False, default=False)
    ticks: int = field(init=False, default=0)
    isolated: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.observers = {t.name: Observer(self.rules) for t in self.targets}
        rules = self.failback
        now = self.clock()
        self.failbacks = {t.name: Failback(rules, since=now) for t in self.targets} if rules else {}

    @classmethod
    def for_region(cls, spec: TtsRegionSpec, gateway_url: str, **kwargs: Any) -> Agent:
        """The agent of `spec.region`: its own gateway first, then its peers nearest first."""
        targets = [Target(spec.region, gateway_url)] + [
            Target(p.name, p.gateway_url, p.status_url) for p in spec.peers
        ]
        witness = spec.detection.witness_url
        return cls(
            spec.region, targets, spec.detection, spec.failback,
            standby=frozenset(p.name for p in spec.peers if p.standby),
            witness=Target(WITNESS, "", witness) if witness else None, **kwargs,
        )  # fmt: skip

    def reconfigure(self, spec: TtsRegionSpec, gateway_url: str) -> None:
        """Take up an edited spec (a GitOps change reaching the mounted file): the peers'
        URLs, peers added or removed, standby, the detection and failback rules. What it
        knows of each region that stays (votes, verdict, failback state) is kept."""
        fresh = Agent.for_region(spec, gateway_url, clock=self.clock)
        now = self.clock()
        self.targets, self.rules, self.failback = fresh.targets, fresh.rules, fresh.failback
        self.standby, self.witness = fresh.standby, fresh.witness
        names = set(fresh.regions)
        self.observers = {r: self.observers.get(r) or fresh.observers[r] for r in fresh.regions}
        for observer in self.observers.values():
            observer.rules = self.rules
        if self.failback is None:
            self.failbacks = {}
        else:
            kept = {r: fb for r, fb in self.failbacks.items() if r in names}
            for fb in kept.values():
                fb.rules = self.failback
                fb.step = min(fb.step, len(self.failback.steps) - 1)
            self.failbacks = {r: kept.get(r) or Failback(self.failback, since=now)
                              for r in fresh.regions}  # fmt: skip
        voters = names | ({WITNESS} if self.witness else set())
        for key in [k for k in self.votes if k[1] not in names or k[0] not in voters]:
            del self.votes[key]
        for known in (self.verdicts, self.counts, self.load, self.lost_load, self.heard,
                      self.load_seen):  # fmt: skip
            for region in [r for r in known if r not in names]:
                del known[region]
        self.levels = None  # written again at the next decision, with the new URLs
        log.info("took up the edited spec: regions %s", ", ".join(fresh.regions))

    # ---- what it knows -----------------------------------------------------------------

    @property
    def regions(self) -> list[str]:
        return [t.name for t in self.targets]

    def percent(self) -> dict[str, int]:
        """Each region's share of its own traffic now (100 for all, for a witness)."""
        if not self.failbacks:
            return {r: 0 if self.verdict(r).down else 100 for r in self.regions}
        return {r: fb.percent for r, fb in self.failbacks.items()}

    def verdict(self, region: str) -> Verdict:
        return self.verdicts.get(region) or Verdict(False)

    def state(self, region: str) -> RegionState:
        if region in self.failbacks:
            return self.failbacks[region].state
        verdict = self.verdict(region)
        if verdict.down:
            return RegionState.DOWN
        return RegionState.SUSPECT if verdict.suspect else RegionState.HEALTHY

    def streams(self, region: str, share: int) -> float | None:
        """A region's open streams: the last read, or for a lost one (`share` 0), the last
        before it was lost."""
        if share == 0 and region in self.lost_load:
            return self.lost_load[region]
        return self.load.get(region)

    def status(self) -> dict[str, Any]:
        """What `/status` serves: this observer's votes (with their age) and its view."""
        now = self.clock()
        mine = [
            {"region": v.region, "up": v.up, "age": round(now - v.at, 3),
             "reason": self.observers[v.region].reason}
            for (o, _), v in self.votes.items() if o == self.name
        ]  # fmt: skip
        shares = self.percent()
        view = [
            {"name": r, "state": self.state(r).value, "percent": shares.get(r, 0),
             "downVotes": self.verdict(r).down_votes, "streams": self.streams(r, shares.get(r, 0)),
             "window": self.failbacks[r].window if r in self.failbacks else None}
            for r in self.regions
        ]  # fmt: skip
        return {"observer": self.name, "votes": mine, "regions": view}

    # ---- one round ---------------------------------------------------------------------

    def _peers(self) -> list[Target]:
        return [t for t in [*self.targets, *([self.witness] if self.witness else [])]
                if t.status_url and t.name != self.name]  # fmt: skip

    async def hear(self, session: aiohttp.ClientSession, peers: Sequence[Target]) -> None:
        """Read `peers`' votes, and decide on them at once (once joined)."""
        for got in await asyncio.gather(*(self.fetch(session, t) for t in peers)):
            for vote in got:
                self.votes[(vote.observer, vote.region)] = vote
        if self.joined:
            self.decide(self.clock())

    def suspect(self) -> bool:
        """Whether some region is seen down without a quorum yet (a loss starting, or a
        cut link): then the peers' votes are worth hearing between rounds."""
        return any(v.suspect for v in self.verdicts.values())

    async def tick(self, session: aiohttp.ClientSession) -> None:
        """One round: probe every region and read every peer's votes, at once. The
        peers' votes count as soon as they are read (a probe of a region that is gone
        takes its whole timeout, and a quorum need not wait for it)."""
        probing = asyncio.gather(*(self.probe(session, t) for t in self.targets))
        await self.hear(session, self._peers())
        probes = await probing
        now = self.clock()
        self.observe_round(probes, now)
        self.ticks += 1
        if not self.joined and (self.heard or self.ticks >= 3):
            self.join(now)
        self.decide(now)

    def observe_round(self, probes: Sequence[Probe], now: float) -> None:
        """This observer's votes from one round of probes (one per target, in order).

        An observer that reached none of two or more other regions is most likely cut
        off itself: it says nothing of them this round (their votes are not renewed, and
        go stale), so that a region coming back from its own isolation does not bring
        down votes on every healthy peer, which one flaky vote elsewhere would turn
        into a false quorum. With one other region the witness breaks that tie."""
        others = [p for t, p in zip(self.targets, probes, strict=True) if t.name != self.name]
        isolated = len(others) >= 2 and not any(p.ok for p in others)
        if isolated != self.isolated:
            log.warning("%s: reached none of the other regions; saying nothing of them"
                        if isolated else "%s: reaches other regions again", self.name)  # fmt: skip
        self.isolated = isolated
        for target, probe in zip(self.targets, probes, strict=True):
            if isolated and target.name != self.name:
                continue
            up = self.observers[target.name].observe(probe)
            self.votes[(self.name, target.name)] = Vote(self.name, target.name, up, now)

    async def listen(self, session: aiohttp.ClientSession) -> None:
        """Only the peers' votes, then a decision (no probes): while a region is suspect,
        a quorum is heard within LISTEN_SECONDS of its last vote, not a whole round. The
        suspect regions' own agents are not asked (likely gone with them: their reads
        would hold the round for a whole timeout)."""
        await self.hear(session, [t for t in self._peers() if not self.verdict(t.name).suspect])

    def join(self, now: float) -> None:
        """A starting agent takes up its peers' view: a region that some peer holds Down,
        Stabilising or Ramping (a restart during a loss or a failback: this region's own,
        often) starts there, not Healthy, so a restart never skips the failback. Until
        then (a peer heard, or three rounds) it writes nothing into its Envoy."""
        self.joined = True
        for region, fb in self.failbacks.items():
            seen = [v for view in self.heard.values() for v in view if v.get("name") == region]
            if not seen:
                continue
            low = min(seen, key=lambda v: int(v.get("percent", 100)))
            if int(low.get("percent", 100)) < 100:
                fb.resume(RegionState(low["state"]), int(low["percent"]), now)
                log.info("joined: %s starts %s at %s%%", region, low["state"], low["percent"])

    def snapshot(self) -> list[tuple[str, str, int]]:
        shares = self.percent()
        return [(r, self.state(r).value, shares.get(r, 0)) for r in self.regions]

    def decide(self, now: float) -> None:
        stale = 3 * self.rules.probe_interval_seconds + self.rules.probe_timeout_ms / 1000
        before = self.snapshot() if self.verdicts else None
        for region in self.regions:
            votes = {o: v for (o, r), v in self.votes.items() if r == region}
            verdict = self.verdicts[region] = quorum(region, len(self.regions), votes, now, stale)
            was_down = region in self.failbacks and self.failbacks[region].percent == 0
            if region in self.failbacks:
                self.failbacks[region].update(verdict.down, verdict.suspect, now)
            if verdict.down and not was_down:
                self.lost_load[region] = self.load.get(region, 0.0)
                log.warning("region %s is down (%s)", region, ", ".join(verdict.down_votes))
        self.program()
        if self.on_change is not None and self.snapshot() != before:
            self.on_change(self)

    def program(self) -> None:
        """Rewrite the EDS file when the priority levels change."""
        if self.eds is None or not self.failbacks or not self.joined:
            return
        levels = traffic.priorities(self.regions, self.percent(), self.standby)
        if levels == self.levels:
            return
        self.version += 1
        upstreams = {t.name: envoy.upstream(t.gateway_url) for t in self.targets}
        envoy.write_atomic(self.eds, envoy.load_assignment(levels, upstreams, str(self.version)))
        log.info("envoy levels v%d: %s", self.version, levels)
        self.levels = levels

    # ---- the wire ----------------------------------------------------------------------

    async def probe(self, session: aiohttp.ClientSession, target: Target) -> Probe:
        """A tiny real synthesis through the gateway, then its /metrics."""
        started = time.perf_counter()
        at = self.clock()
        timeout = aiohttp.ClientTimeout(total=self.rules.probe_timeout_ms / 1000)
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        body = {"model": self.rules.probe_model, "voice": self.rules.probe_voice,
                "input": PROBE_TEXT, "response_format": "pcm"}  # fmt: skip
        url = target.gateway_url.rstrip("/")
        try:
            async with session.post(
                f"{url}/v1/audio/speech", json=body, headers=headers, timeout=timeout
            ) as reply:
                if reply.status != 200:
                    text = (await reply.text())[:200]
                    return Probe(at, ok=False, why=f"HTTP {reply.status}: {text}")
                first = await reply.content.readany()
                ttfa = (time.perf_counter() - started) * 1000
                await reply.read()
                if not first:
                    return Probe(at, ok=False, why="no audio in the reply")
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            return Probe(at, ok=False, why=f"{type(err).__name__}: {err}".rstrip(": "))
        return Probe(at, ok=True, ttfa_ms=ttfa, error_rate=await self.errors(session, target))

    async def errors(self, session: aiohttp.ClientSession, target: Target) -> float | None:
        """The gateway's 5xx share since the last probe (and its open streams, kept)."""
        timeout = aiohttp.ClientTimeout(total=self.rules.probe_timeout_ms / 1000)
        try:
            url = f"{target.gateway_url.rstrip('/')}/metrics"
            async with session.get(url, timeout=timeout) as reply:
                text = await reply.text() if reply.status == 200 else ""
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None
        now = gateway_counts(text)
        if now.streams is not None:
            self.note_load(target.name, now.streams, self.clock())
        last = self.counts.get(target.name)
        self.counts[target.name] = now
        if last is None or now.total <= last.total:
            return None
        return max(now.errors - last.errors, 0.0) / (now.total - last.total)

    def note_load(self, region: str, streams: float, now: float) -> None:
        """A region's open streams as its gateway reports them: its load is the peak of
        the last LOAD_PEAK_SECONDS (static stability provisions for the peak, and a
        lost region's load is the same peak: a sample read between two requests would
        make the reserve and the takeover disagree, and floors move with that noise)."""
        seen = self.load_seen.setdefault(region, deque())
        seen.append((now, streams))
        while seen[0][0] < now - LOAD_PEAK_SECONDS:
            seen.popleft()
        self.load[region] = max(v for _, v in seen)

    async def fetch(self, session: aiohttp.ClientSession, target: Target) -> list[Vote]:
        """A peer's own votes (not those it heard), aged on this agent's clock."""
        assert target.status_url is not None
        timeout = aiohttp.ClientTimeout(total=self.rules.probe_timeout_ms / 1000)
        try:
            async with session.get(target.status_url, timeout=timeout) as reply:
                doc = await reply.json() if reply.status == 200 else {}
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            return []
        now = self.clock()
        observer = str(doc.get("observer", target.name))
        if observer != WITNESS and isinstance(doc.get("regions"), list):
            self.heard[observer] = doc["regions"]
        for region in doc.get("regions", []):
            if region.get("streams") is not None and region["name"] not in self.load:
                self.load[region["name"]] = float(region["streams"])
        return [
            Vote(observer, str(v["region"]), bool(v["up"]), now - float(v["age"]))
            for v in doc.get("votes", [])
            if v.get("region") in self.observers
        ]

    async def run(self, stop: asyncio.Event, host: str = "127.0.0.1", port: int = 0) -> None:
        """Probe and decide every interval, serving /status on host:port, until `stop`."""
        runner = web.AppRunner(self.app())
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        try:
            local = (self.source, 0) if self.source else None
            connector = aiohttp.TCPConnector(local_addr=local, force_close=True)
            async with aiohttp.ClientSession(connector=connector) as session:
                while not stop.is_set():
                    started = self.clock()
                    if self.before_tick is not None:
                        self.before_tick(self)
                    await self.tick(session)
                    while not stop.is_set():
                        left = self.rules.probe_interval_seconds - (self.clock() - started)
                        pause = min(left, LISTEN_SECONDS) if self.suspect() else left
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), max(pause, 0.05))
                        if pause >= left - 0.05:
                            break
                        await self.listen(session)
        finally:
            await runner.cleanup()

    def app(self) -> web.Application:
        async def status(_: web.Request) -> web.Response:
            return web.json_response(self.status())

        async def healthz(_: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        made = web.Application()
        made.add_routes([web.get("/status", status), web.get("/healthz", healthz)])
        return made


class StatusWriter:
    """Writes an agent's view into its TtsRegion's status.regions, the latest view only,
    from a thread of its own (the agent's loop never waits on the apiserver)."""

    def __init__(self, write: Callable[[list[dict[str, Any]]], None]) -> None:
        self.write = write
        self.latest: list[dict[str, Any]] | None = None
        self.lock = threading.Lock()
        self.wake = threading.Event()
        threading.Thread(target=self._run, name="region-status", daemon=True).start()

    def __call__(self, agent: Agent) -> None:
        now = datetime.now(UTC)
        view = []
        for region in agent.status()["regions"]:
            fb = agent.failbacks.get(region["name"])
            since = now - timedelta(seconds=agent.clock() - fb.since) if fb else now
            view.append(
                {"name": region["name"], "state": region["state"],
                 "trafficPercent": region["percent"], "downVotes": region["downVotes"],
                 "streams": region["streams"],
                 "since": since.isoformat(timespec="seconds").replace("+00:00", "Z")}
            )  # fmt: skip
        with self.lock:
            self.latest = view
        self.wake.set()

    def _run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            with self.lock:
                view, self.latest = self.latest, None
            if view is None:
                continue
            try:
                self.write(view)
            except Exception:
                log.exception("writing the region status failed; the next change retries")


def gateway_counts(text: str) -> Counts:
    """Requests (all, and 5xx) and open streams from a gateway's /metrics page."""
    counts = Counts()
    requests = contract.GATEWAY_REQUESTS.removesuffix("_total")
    for family in text_string_to_metric_families(text):
        if family.name == requests:
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts.total += sample.value
                    if sample.labels.get("code", "").startswith("5"):
                        counts.errors += sample.value
        elif family.name == contract.GATEWAY_INFLIGHT_STREAMS:
            counts.streams = sum(s.value for s in family.samples)
    return counts
