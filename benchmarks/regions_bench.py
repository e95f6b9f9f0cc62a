"""Regions on this machine: a region lost and brought back, a region flapping, and one
observer link cut, with real Tritons, gateways, region agents and Envoys.

    make bench-regions            (three local clusters; root)
    python benchmarks/regions_bench.py [--level clusters|processes]
        [--out benchmarks/results/regions.json] [--parts loss,flap,cut]
        [--flap-seconds 300] [--window 60] [--step 30]

**`--level clusters`** (the default): each region (eu, us, ap) is a local cluster of its
own (`ttsfleet.multiregion`): its control plane, Prometheus and operator, the fleet (a
real tritonserver pod, autoscaled by the operator: 1-2 replicas, `regionReserve` 1), the
TtsGateway and the TtsRegion whose pod runs the agent and that region's clients' Envoy,
all on the cluster's local node (a network namespace per cluster node; the runner
routes between them). A load generator per client region sends to its region's Envoy
and, as a client whose DNS answer holds every region, retries once after 200 ms at the
next region's Envoy when its own cannot be reached. Losing eu cuts its node's link (its
gateway, Triton, agent and Envoy gone for everyone, and they reach nothing); the flap
cuts and restores it every 10 s; the cut blocks eu's node and ap's node from each
other (both ways) and nothing else.

**`--level processes`** (`make bench-regions-processes`, in a network namespace of its
own, hack/in-netns.sh): each region is a tritonserver, a `ttsfleet gateway` and a
`ttsfleet region` agent on its own loopback address (127.0.1.1-3), so that one `ip rule`
cuts exactly one link; each client region has its Envoy (programmed by its agent) and
its load generator. Losing eu kills its Triton, gateway and agent (eu's clients' Envoy
stays); the flap kills and restarts eu's gateway every 10 s; the cut is an `ip rule`
each way between the observers eu and ap.

Both: 2 short speech requests a second per client region (open loop, one retry after
200 ms), tenant acme-eu (pinned to eu) sent from us at 0.5 a second.

Scenarios (`scenarios` in the results, each with the keys of issue 19):
- `loss`: eu lost after a warm-up, held down 30 s, then back, watched to Healthy.
- `flap`: eu lost and back every 20 s (10 s each) for `--flap-seconds`.
- `cut`: the link between the observers eu and ap is cut both ways for 40 s.

Figures: `detection_s` (loss -> both other agents say Down), `traffic_shift_s` (loss ->
the last eu client request that failed or was served by eu), `capacity_takeover_s`
(loss -> every survivor's fleet has as many ready replicas as its region floor asks:
its own load, its reserve for a lost peer and what it takes over, each region's load
being the peak of its open streams over 5 minutes; clusters only, null at process
level; `survivor_replicas` gives the floors, what the autoscalers asked for any reason,
and the floors' reasons), `slo_restored_s` (loss -> the start of the first
10 s in which every eu client request succeeded within the SLO: 1.5x the warm-up's TTFA
p95, at least 500 ms), `failed_during_pct` (failed after the client's retry, every
client, loss -> SLO restored), `failed_after` (from then to the end), `failback_s` (eu
back -> us's agent says Healthy), `ramp_steps` (eu's shares in us's view on the way),
`oscillations` (eu put back into an Envoy's EDS and taken out again: eu's own Envoy at
process level, us's at cluster level, where eu's own is cut with it),
`failovers_from_cut_link` (any region Down in any agent's view during the cut),
`residency_violations` (gateway access-log lines where acme-eu got audio outside eu),
`requests`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import mkdtemp
from typing import Any

import httpx2
import yaml

from ttsfleet import harness, multiregion
from ttsfleet.cluster import local, tokens
from ttsfleet.failover import envoy, traffic
from ttsfleet.gateway import auth
from ttsfleet.resources.region import STATUS_PORT

ADDRESSES = {"eu": "127.0.1.1", "us": "127.0.1.2", "ap": "127.0.1.3"}
NEAREST = {"eu": ["us", "ap"], "us": ["eu", "ap"], "ap": ["us", "eu"]}
ISSUER, AUDIENCE = "https://issuer.ttsfleet.bench", "ttsfleet-gateway"
PINNED = {"name": "eu", "tenants": ["acme-eu"], "regions": ["eu"]}
TEXT = "Your call is important to us."


@dataclass
class Region:
    name: str
    tmp: Path
    jwks: Path
    token: Path
    window: int
    step: int
    max_window: int
    triton: harness.TritonProcess = field(init=False)
    gateway: harness.GatewayProcess = field(init=False)
    agent: harness.RegionAgentProcess = field(init=False)
    envoy: harness.EnvoyProcess = field(init=False)
    envoy_port: int = 10000

    def __post_init__(self) -> None:
        ip = ADDRESSES[self.name]
        self.triton = harness.TritonProcess(
            local.free_port(), local.free_port(), local.free_port(),
            self.tmp / f"{self.name}-triton.log", models=("tts_stream",),
        )  # fmt: skip
        self.gateway = harness.GatewayProcess(
            self.tmp / f"{self.name}-gateway.json",
            8080,
            self.tmp / f"{self.name}-gateway.log",
            host=ip,
        )
        self.eds = self.tmp / f"{self.name}-xds" / "eds.json"

    def configure(self, agents: dict[str, str]) -> None:
        ip = ADDRESSES[self.name]
        self.gateway.configure(
            harness.regional_gateway_config(
                self.name,
                self.triton.grpc_address,
                self.jwks,
                ISSUER,
                AUDIENCE,
                list(ADDRESSES),
                [PINNED],
            )
        )
        spec = {
            "region": self.name,
            "gateway": "speech",
            "peers": [
                {"name": p, "gatewayUrl": f"http://{ADDRESSES[p]}:8080", "statusUrl": agents[p]}
                for p in NEAREST[self.name]
            ],
            "failback": {
                "stabilisationSeconds": self.window,
                "stepSeconds": self.step,
                "maxWindowSeconds": self.max_window,
            },
        }
        manifest = self.tmp / f"{self.name}-region.yaml"
        manifest.write_text(yaml.safe_dump({"kind": "TtsRegion", "spec": spec}))
        self.agent = harness.RegionAgentProcess(
            manifest,
            self.gateway.url,
            ip,
            8090,
            self.tmp / f"{self.name}-agent.log",
            token_file=self.token,
            eds=self.eds,
        )
        order = [self.name, *NEAREST[self.name]]
        upstreams = {r: envoy.upstream(f"http://{ADDRESSES[r]}:8080") for r in order}
        envoy.write_atomic(
            self.eds,
            envoy.load_assignment(
                traffic.priorities(order, dict.fromkeys(order, 100)), upstreams, "0"
            ),
        )
        boot = self.tmp / f"{self.name}-envoy.json"
        admin = local.free_port()
        envoy.write_atomic(
            boot, envoy.bootstrap(self.name, self.envoy_port, admin, self.eds, host=ip)
        )
        self.envoy = harness.EnvoyProcess(boot, admin, self.tmp / f"{self.name}-envoy.log")

    @property
    def edge(self) -> str:
        return f"http://{ADDRESSES[self.name]}:{self.envoy_port}"

    def processes(self) -> list[Any]:
        return [self.triton, self.gateway, self.agent, self.envoy]

    def kill(self, *parts: Any) -> None:
        for part in parts:
            if part.process is not None:
                part.process.kill()
                part.process.wait()
                part.process = None


View = dict[str, dict[str, Any]]  # region -> {"state", "percent", "window"}


@dataclass(frozen=True)
class Capacity:
    """A survivor's fleet at one moment."""

    floor: int  # replicas its region floor asks (own + reserve or takeover)
    desired: int  # replicas its autoscaler asks, for any reason
    ready: int
    reason: str  # the floor's


class Processes:
    """The process level: each region's Triton, gateway and agent on its own address."""

    name = "processes in one network namespace"

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        key = auth.new_signing_key()
        jwks = tmp / "jwks.json"
        auth.write_jwks(jwks, [key])
        self.tokens = {
            t: auth.sign(
                key, issuer=ISSUER, audience=AUDIENCE, subject="bench", tenant=t,
                ttl_seconds=7200,
            )
            for t in ("acme", "acme-eu", "probe")
        }  # fmt: skip
        token = tmp / "probe-token"
        token.write_text(self.tokens["probe"])
        self.regions = {
            n: Region(n, tmp, jwks, token, args.window, args.step, args.max_window)
            for n in ADDRESSES
        }  # fmt: skip
        agents = {n: f"http://{ip}:8090/status" for n, ip in ADDRESSES.items()}
        for region in self.regions.values():
            region.configure(agents)

    def start(self) -> None:
        for region in self.regions.values():
            region.triton.start(timeout=300)
        for region in self.regions.values():
            region.gateway.start()
            region.envoy.start()
        for region in self.regions.values():
            region.agent.start()

    def close(self) -> None:
        for region in self.regions.values():
            for part in region.processes():
                part.stop()

    def edges(self, client: str) -> list[str]:
        return [self.regions[client].edge]  # the client region's Envoy outlives its region

    def views(self) -> dict[str, View]:
        out: dict[str, View] = {}
        for name, region in self.regions.items():
            if region.agent.process is not None:
                out[name] = {r["name"]: r for r in region.agent.status().get("regions", [])}
        return out

    def eu_in_envoy(self) -> bool | None:
        """Whether eu's clients' Envoy has eu in its EDS file."""
        return _in_eds(self.regions["eu"].eds, "eu")

    def access_logs(self) -> list[Path]:
        return [r.gateway.log for r in self.regions.values()]

    def lose(self) -> None:
        eu = self.regions["eu"]
        eu.kill(eu.agent, eu.gateway, eu.triton)

    def back(self) -> None:
        eu = self.regions["eu"]
        eu.triton.start()
        eu.gateway.start()
        eu.agent.start()

    def flap_down(self) -> None:
        self.regions["eu"].kill(self.regions["eu"].gateway)

    def flap_up(self) -> None:
        self.regions["eu"].gateway.start()

    def cut(self, on: bool) -> None:
        verb = "add" if on else "del"
        for src, dst in (("127.0.1.1", "127.0.1.3"), ("127.0.1.3", "127.0.1.1")):
            subprocess.run(
                ["ip", "rule", verb, "from", src, "to", dst, "prohibit", "pref", "10"], check=True
            )

    def capacity(self) -> dict[str, Capacity]:
        return {}  # no autoscaler at this level


class Clusters:
    """The cluster level: each region a local cluster (`ttsfleet.multiregion`)."""

    name = "three local clusters (operator, Prometheus, Triton pods, gateway, agent + Envoy)"

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        self.stack = contextlib.ExitStack()
        self.regions: dict[str, multiregion.RegionCluster] = {}
        self.tokens: dict[str, str] = {}
        self.shares: dict[str, int] = {}
        self.status_urls: dict[str, str] = {}
        self.edge: dict[str, str] = {}
        self.us_eds: Path | None = None
        self.reader = ThreadPoolExecutor(max_workers=len(ADDRESSES))

    def start(self) -> None:
        args = self.args
        self.regions = self.stack.enter_context(
            multiregion.regions_up(
                list(ADDRESSES), self.tmp, prefix="bench", nearest=NEAREST,
                detection={}, residency=[PINNED],
                failback={"stabilisationSeconds": args.window, "stepSeconds": args.step,
                          "maxWindowSeconds": args.max_window},
                scaling={"mode": "builtin", "regionReserve": 1},
            )
        )  # fmt: skip
        idp = self.regions["eu"].cluster
        self.tokens = {
            t: tokens.token(idp, tenant=t, ttl_seconds=7200) for t in ("acme", "acme-eu")
        }
        self.edge = {n: f"http://{rc.edge_address()}" for n, rc in self.regions.items()}
        self.us_eds = self.regions["us"].eds_file()
        self.status_urls = {
            n: f"http://{rc.agent_ip()}:{STATUS_PORT}/status" for n, rc in self.regions.items()
        }

    def close(self) -> None:
        self.reader.shutdown(wait=True)
        self.stack.close()

    def edges(self, client: str) -> list[str]:
        """The Envoys a client of `client` tries, nearest first: the DNS answer the
        regions publish (a region at 0 % in the other regions' views is left out, TTL
        not modelled), its own region's first."""
        order = [client, *NEAREST[client]]
        listed = [r for r in order if self.shares.get(r, 100) > 0] or order
        return [self.edge[r] for r in listed]

    def views(self) -> dict[str, View]:
        """Each agent's own view, from its /status (as at process level: the TtsRegion
        status it writes lags it by a write); an agent out of reach is left out."""
        out: dict[str, View] = {}
        docs = self.reader.map(_status, self.status_urls.values())
        for name, doc in zip(self.status_urls, docs, strict=True):
            if doc is not None:
                out[name] = {r["name"]: r for r in doc.get("regions", [])}
        # What the regions publish for each (the DNS weights): the lowest share any
        # other region's agent gives it.
        self.shares = {
            r: min((int(v[r]["percent"]) for o, v in out.items() if o != r and r in v),
                   default=100)
            for r in ADDRESSES
        }  # fmt: skip
        return out

    def eu_in_envoy(self) -> bool | None:
        """Whether us's Envoy has eu in its EDS file (eu's own Envoy is cut with eu)."""
        return None if self.us_eds is None else _in_eds(self.us_eds, "eu")

    def access_logs(self) -> list[Path]:
        return [log for rc in self.regions.values() for log in rc.gateway_logs()]

    def lose(self) -> None:
        self.regions["eu"].cut()

    def back(self) -> None:
        self.regions["eu"].restore()

    flap_down, flap_up = lose, back

    def cut(self, on: bool) -> None:
        """eu's node and ap's node cannot reach each other (each blocks the other's pod
        range), and nothing else changes."""
        eu, ap = self.regions["eu"], self.regions["ap"]
        verb = "add" if on else "del"
        for rc, other in ((eu, ap), (ap, eu)):
            subprocess.run(["ip", "-n", rc.netns(), "route", verb, "prohibit", other.node_cidr()],
                           check=True)  # fmt: skip

    def capacity(self) -> dict[str, Capacity]:
        """Each survivor's fleet: its region floor (its own load, its reserve for a lost
        peer, what it takes over: the autoscaler's `floor`), the replicas the autoscaler
        asks for (any reason), the ready ones, and the floor's reason."""
        out = {}
        for name in ("us", "ap"):
            rc = self.regions[name]
            scaling, fleet = rc.autoscaling(), rc.fleet()
            floor = scaling.get("floor") or {}
            out[name] = Capacity(
                int(floor.get("replicas") or 0),
                int((fleet.get("spec") or {}).get("replicas") or 0),
                int((fleet.get("status") or {}).get("readyReplicas") or 0),
                str(floor.get("reason") or ""),
            )
        return out


def _status(url: str) -> dict[str, Any] | None:
    """An agent's /status, or None when it cannot be read within half a second."""
    try:
        doc: dict[str, Any] = httpx2.get(url, timeout=0.5).json()
    except (httpx2.HTTPError, ValueError):
        return None
    return doc


def _in_eds(path: Path, region: str) -> bool | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return any(e["locality"]["region"] == region for e in doc["resources"][0]["endpoints"])


Level = Processes | Clusters


@dataclass
class Sample:
    client: str
    tenant: str
    at: float
    ok: bool
    region: str
    ttfa: float | None


class Load:
    """A load generator per client region: open loop, one retry after 200 ms."""

    def __init__(self, level: Level, rate: float = 2.0):
        self.level, self.tokens, self.rate = level, level.tokens, rate
        self.samples: list[Sample] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=32)
        self.threads = [
            threading.Thread(target=self._run, args=(c, "acme", rate)) for c in ADDRESSES
        ]
        self.threads.append(threading.Thread(target=self._run, args=("us", "acme-eu", 0.5)))

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()
        self.pool.shutdown(wait=True)

    def _run(self, client: str, tenant: str, rate: float) -> None:
        while not self.stop.wait(1 / rate):
            try:
                self.pool.submit(self._request, client, tenant)
            except RuntimeError:  # the interpreter is exiting (a SIGTERM): stop sending
                return

    def _once(
        self, edge: str, tenant: str, started: float
    ) -> tuple[bool | None, str, float | None]:
        """(True when served, False when refused or broken, None when `edge` could not
        be reached), the region that answered, and the time to first audio since the
        request began (`started`, perf_counter: a retry's includes the failed try)."""
        headers = {"authorization": f"Bearer {self.tokens[tenant]}"}
        body = {"model": "tts-1", "voice": "alloy", "input": TEXT, "response_format": "pcm"}
        try:
            with httpx2.stream(
                "POST",
                f"{edge}/v1/audio/speech",
                json=body,
                headers=headers,
                timeout=httpx2.Timeout(15, connect=1),
            ) as reply:
                if reply.status_code != 200:
                    return False, reply.headers.get("x-ttsfleet-region", "-"), None
                ttfa = None
                for chunk in reply.iter_bytes():
                    if chunk and ttfa is None:
                        ttfa = time.perf_counter() - started
                return True, reply.headers.get("x-ttsfleet-region", "-"), ttfa
        except (httpx2.ConnectError, httpx2.ConnectTimeout):
            return None, "-", None
        except httpx2.HTTPError:
            return False, "-", None

    def _request(self, client: str, tenant: str) -> None:
        """One request, and one retry after 200 ms: at the same edge, or at the next
        region's when this one could not be reached."""
        at, started = time.monotonic(), time.perf_counter()
        edges = self.level.edges(client)
        ok, region, ttfa = self._once(edges[0], tenant, started)
        if not ok:
            time.sleep(0.2)
            retry_at = edges[1] if ok is None and len(edges) > 1 else edges[0]
            ok, region, ttfa = self._once(retry_at, tenant, started)
        with self.lock:
            self.samples.append(Sample(client, tenant, at, bool(ok), region, ttfa))

    def between(self, start: float, end: float, tenant: str = "acme") -> list[Sample]:
        with self.lock:
            return [s for s in self.samples if start <= s.at < end and s.tenant == tenant]


class Watch:
    """Samples every agent's view (and an Envoy's EDS file) every 200 ms, on an Event."""

    def __init__(self, level: Level) -> None:
        self.level = level
        self.seen: list[tuple[float, str, dict[str, Any]]] = []
        self.eu_in_envoy: list[tuple[float, bool]] = []
        self.capacity: list[tuple[float, dict[str, Capacity]]] = []
        self.stop = threading.Event()
        # The fleets are read through the apiservers, more slowly: apart, so that the
        # views are sampled every 200 ms whatever an apiserver takes.
        self.threads = [threading.Thread(target=self._run),
                        threading.Thread(target=self._run_capacity)]  # fmt: skip
        for thread in self.threads:
            thread.start()

    def _run_capacity(self) -> None:
        while not self.stop.wait(1.0):
            self.capacity.append((time.monotonic(), self.level.capacity()))

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            now = time.monotonic()
            for name, view in self.level.views().items():
                self.seen.append((now, name, view))
            present = self.level.eu_in_envoy()
            if present is None:
                continue
            if not self.eu_in_envoy or self.eu_in_envoy[-1][1] != present:
                self.eu_in_envoy.append((now, present))

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def view(self, observer: str, region: str) -> dict[str, Any]:
        """`region` in `observer`'s last view ({} before any)."""
        for _, name, view in reversed(self.seen):
            if name == observer:
                found: dict[str, Any] = view.get(region, {})
                return found
        return {}

    def state(self, observer: str, region: str) -> str:
        return str(self.view(observer, region).get("state", ""))

    def percents(self, observer: str, region: str, since: float) -> list[int]:
        out: list[int] = []
        for at, name, view in self.seen:
            if name == observer and at >= since and region in view:
                pct = int(view[region].get("percent", 0))
                if not out or out[-1] != pct:
                    out.append(pct)
        return out

    def downs(self, since: float, until: float) -> list[tuple[str, str]]:
        return sorted(
            {
                (name, r)
                for at, name, view in self.seen
                if since <= at < until
                for r, v in view.items()
                if v.get("state") == "Down"
            }
        )

    def short_of_capacity(self, since: float, until: float) -> float | None:
        """Seconds from `since` to the end of the last sample in which a survivor had
        fewer ready replicas than its region floor asked (0: never short); None without
        an autoscaler."""
        samples = [(at, seen) for at, seen in self.capacity if since <= at < until and seen]
        if not samples:
            return None
        short = [at for at, seen in samples if any(c.ready < c.floor for c in seen.values())]
        return round(max(short) + 1.0 - since, 1) if short else 0.0

    def replicas(self, since: float, until: float) -> dict[str, dict[str, Any]]:
        """Each survivor between the two times: the highest floor, desired and ready
        replicas, and the floor's reasons."""
        out: dict[str, dict[str, Any]] = {}
        for at, seen in self.capacity:
            if not since <= at < until:
                continue
            for name, c in seen.items():
                row = out.setdefault(name, {"floor": 0, "desired": 0, "ready": 0, "reasons": []})
                row["floor"] = max(row["floor"], c.floor)
                row["desired"] = max(row["desired"], c.desired)
                row["ready"] = max(row["ready"], c.ready)
                if c.reason and c.reason not in row["reasons"]:
                    row["reasons"].append(c.reason)
        return out

    def reentries(self, since: float, until: float) -> int:
        """eu taken out of the Envoy and put back, then out again: one oscillation each."""
        flips = [p for at, p in self.eu_in_envoy if since <= at < until]
        backs = sum(1 for a, b in itertools.pairwise(flips) if not a and b)
        return max(0, backs - (1 if flips and flips[-1] else 0))


def cpu_seconds() -> tuple[float, float]:
    """CPU time so far of the whole machine, busy (from /proc/stat: nothing else runs
    during the benchmark; processes killed and their orphans are counted too), and of
    this process (the clients and the watcher)."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    times = os.times()
    return busy, times.user + times.system


def residency_violations(level: Level) -> int:
    """Access-log lines where the pinned tenant got audio from a gateway outside eu."""
    pattern = re.compile(r"speech status=200 tenant=acme-eu region=(\w+)")
    bad = 0
    for log in level.access_logs():
        text = log.read_text(errors="replace") if log.exists() else ""
        bad += sum(1 for m in pattern.finditer(text) if m.group(1) != "eu")
    return bad


def p95(samples: list[Sample]) -> float:
    values = [s.ttfa for s in samples if s.ok and s.ttfa is not None]
    return harness.percentile(values, 0.95) if values else float("nan")


def slo_restored(load: Load, client: str, t0: float, slo: float, end: float) -> float | None:
    """The start of the first 10 s after t0 in which every `client` request succeeded
    within `slo` seconds of first audio."""
    mine = [s for s in load.between(t0, end) if s.client == client]
    for i, first in enumerate(mine):
        window = [s for s in mine[i:] if s.at < first.at + 10]
        if window[-1].at < first.at + 8:  # not 10 s of requests left
            return None
        if all(s.ok and s.ttfa is not None and s.ttfa <= slo for s in window):
            return first.at - t0
    return None


def failed_pct(samples: list[Sample]) -> float:
    return round(100 * sum(not s.ok for s in samples) / len(samples), 3) if samples else 0.0


def until(what: str, probe: Callable[[], bool], timeout: float) -> float:
    """Seconds until `probe` holds (polled every 100 ms)."""
    start = time.monotonic()
    harness.wait_for(what, probe, timeout=timeout, every=0.1)
    return round(time.monotonic() - start, 2)


def loss(
    level: Level, load: Load, watch: Watch, slo: float, args: argparse.Namespace
) -> dict[str, Any]:
    start = t0 = time.monotonic()
    level.lose()
    detection = until(
        "us and ap to see eu down",
        lambda: watch.state("us", "eu") == "Down" and watch.state("ap", "eu") == "Down",
        timeout=60,
    )
    time.sleep(max(0.0, 30 - (time.monotonic() - t0)))
    t_back = time.monotonic()
    level.back()
    back = until(
        "eu healthy again",
        lambda: watch.state("us", "eu") == "Healthy",
        timeout=args.window * 3 + args.step * 8 + 120,
    )
    end = time.monotonic()
    restored = slo_restored(load, "eu", t0, slo, t_back)
    doc = scenario(level, load, watch, start, t0, end, detection, restored, t_back, back)
    doc["capacity_takeover_s"] = watch.short_of_capacity(t0, t_back)
    doc["survivor_replicas"] = {"before": watch.replicas(start - 30, t0),
                                "during": watch.replicas(t0, t_back)}  # fmt: skip
    return doc


def flap(
    level: Level, load: Load, watch: Watch, slo: float, args: argparse.Namespace
) -> dict[str, Any]:
    start = t0 = time.monotonic()
    detection = None
    for cycle in range(max(1, int(args.flap_seconds // 20))):  # down 10 s, up 10 s
        level.flap_down()
        if detection is None:
            detection = until("eu down", lambda: watch.state("us", "eu") == "Down", timeout=60)
        time.sleep(max(0.0, t0 + 20 * cycle + 10 - time.monotonic()))
        level.flap_up()
        time.sleep(max(0.0, t0 + 20 * (cycle + 1) - time.monotonic()))
    t_back = time.monotonic()
    held = watch.view("us", "eu").get("window")  # the window the flapping earned it
    back = until(
        "eu healthy after the flap",
        lambda: watch.state("us", "eu") == "Healthy",
        timeout=args.max_window + args.step * 8 + 180,
    )
    end = time.monotonic()
    restored = slo_restored(load, "eu", t0, slo, end)
    doc = scenario(level, load, watch, start, t0, end, detection, restored, t_back, back)
    doc["window_after_flap_s"] = held
    return doc


def cut(
    level: Level, load: Load, watch: Watch, slo: float, args: argparse.Namespace
) -> dict[str, Any]:
    start = t0 = time.monotonic()
    level.cut(True)
    try:
        time.sleep(40)
    finally:
        level.cut(False)
    end = time.monotonic() + 10
    time.sleep(10)
    doc = scenario(level, load, watch, start, t0, end, None, None, None, None)
    suspects = {
        (n, r)
        for at, n, view in watch.seen
        if t0 <= at < end
        for r, v in view.items()
        if v.get("state") == "Suspect"
    }
    doc["suspect_views"] = sorted(f"{n} sees {r}" for n, r in suspects)
    return doc


def scenario(
    level: Level,
    load: Load,
    watch: Watch,
    start: float,
    t0: float,
    end: float,
    detection: float | None,
    restored: float | None,
    t_back: float | None,
    back: float | None,
) -> dict[str, Any]:
    # Until eu came back (or the flap ended): the last eu client request that failed or
    # still went to eu.
    eu_samples = [s for s in load.between(t0, t_back or end) if s.client == "eu"]
    shift = max((s.at - t0 for s in eu_samples if not s.ok or s.region == "eu"), default=0.0)
    during_end = t0 + (restored if restored is not None else 0.0)
    failed_after = [s for s in load.between(during_end, end) if not s.ok]
    downs = watch.downs(t0, end)
    return {
        "detection_s": detection,
        "traffic_shift_s": round(shift, 2) if detection is not None else None,
        "capacity_takeover_s": None,
        "slo_restored_s": None if restored is None else round(restored, 2),
        "failed_during_pct": failed_pct(load.between(t0, max(during_end, t0 + 1))),
        "failed_after": len(failed_after),
        "failback_s": back,
        "ramp_steps": watch.percents("us", "eu", t_back) if t_back is not None else [],
        "oscillations": watch.reentries(t0, end),
        "failovers_from_cut_link": sum(1 for _, r in downs if r != "eu"),
        "residency_violations": residency_violations(level),
        "requests": len(load.between(start, end)) + len(load.between(start, end, "acme-eu")),
        "failed": sum(not s.ok for s in load.between(start, end)),
        "down_views": [f"{n} sees {r}" for n, r in downs],
        "seconds": round(end - start, 1),
    }


def _stop(*_: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(143)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=None,
        help="default: benchmarks/results/regions.json (clusters), regions_processes.json",
    )  # fmt: skip
    parser.add_argument("--level", choices=("clusters", "processes"), default="clusters")
    parser.add_argument("--parts", default="loss,flap,cut")
    parser.add_argument("--flap-seconds", type=float, default=300)
    parser.add_argument("--window", type=int, default=60)
    parser.add_argument("--step", type=int, default=30)
    parser.add_argument("--max-window", type=int, default=600)
    args = parser.parse_args()
    # Stopped (SIGTERM), the run still stops every process it started: once (`timeout`
    # passes its own SIGTERM on too, and a second one must not cut the clean-up short).
    signal.signal(signal.SIGTERM, _stop)
    tmp = Path(mkdtemp(prefix="ttsfleet-regions-"))
    level: Level = Clusters(args, tmp) if args.level == "clusters" else Processes(args, tmp)
    results: dict[str, Any] = {
        "scenarios": {},
        "setup": {
            "level": level.name,
            "regions": list(ADDRESSES),
            "client_rate_per_region": 2.0,
            "pinned_tenant_rate": 0.5,
            "failback": {
                "stabilisation_seconds": args.window,
                "step_seconds": args.step,
                "max_window_seconds": args.max_window,
            },
        },
    }
    load: Load | None = None
    watch: Watch | None = None
    try:
        set_up = time.monotonic()
        level.start()
        results["setup"]["set_up_s"] = round(time.monotonic() - set_up, 1)
        watch = Watch(level)
        until(
            "every agent to see every region healthy",
            lambda: all(watch.state(o, r) == "Healthy" for o in ADDRESSES for r in ADDRESSES),
            120,
        )
        load = Load(level)
        load.start()
        warm = time.monotonic()
        time.sleep(20)
        base = p95([s for s in load.between(warm, time.monotonic()) if s.client == "eu"])
        slo = max(0.5, 1.5 * base)
        results["setup"] |= {"warmup_ttfa_p95_ms": round(base * 1000), "slo_ms": round(slo * 1000)}
        for part in args.parts.split(","):
            (servers0, clients0), t = cpu_seconds(), time.monotonic()
            doc = {"loss": loss, "flap": flap, "cut": cut}[part](level, load, watch, slo, args)
            (servers, clients), took = cpu_seconds(), time.monotonic() - t
            doc["cpu_cores"] = {
                "machine": round((servers - servers0) / took, 2),
                "clients": round((clients - clients0) / took, 2),
            }
            results["scenarios"][part] = doc
            print(part, json.dumps(doc), flush=True)
            time.sleep(10)
    finally:
        for closing in (load, watch):
            if closing is not None:
                closing.close()
        level.close()
    name = "regions.json" if args.level == "clusters" else "regions_processes.json"
    harness.write_results(args.out or Path("benchmarks/results") / name, results)


if __name__ == "__main__":
    main()
