"""Measure the speech gateway on this machine: what it adds, what auth costs, and how
balancing on outstanding work beats round robin when one replica is slow.

    python benchmarks/gateway_bench.py [--seconds 20] [--out benchmarks/results/gateway.json]

Everything runs on loopback: real tritonservers (`harness.TritonProcess`, the streaming
model) and real `ttsfleet gateway` processes (`harness.GatewayProcess`) with fixed
endpoints. Each figure has its baseline from the same run:

1. `added_ttfa_ms` at concurrency 1, 4, 8: for each request through the gateway, the
   client's time to the first audio bytes minus the replica's time to first audio for
   that same request, which the gateway reports in its `Server-Timing: upstream`
   header: a per-request pairing that leaves out the replica's own queueing. The
   figure is for `wav`, the replica's own samples behind a header (like for like with
   a direct client); `pcm` (resampled to 24 kHz) and `mp3` (encoded) at concurrency 1
   say what encoding adds. The replica runs on one core, the gateway and the
   client on the other (as a gateway has a node's CPU of its own in a cluster); the
   client is a minimal keep-alive HTTP client (httpx costs about a millisecond more
   per response). Direct-to-Triton TTFA at the same concurrency,
   alternating with the gateway's, is reported beside it (`direct_ttfa_ms`,
   `gateway_ttfa_ms`).
2. `auth_rps_per_core`: `GET /v1/voices` with a bearer token (authentication and
   routing, no synthesis) from wrk pinned to one core, the gateway pinned to the other;
   requests answered per CPU-second the gateway used (/proc). Baseline: the same
   without auth.
3. `p2c_vs_round_robin_ttfa_p95`: three replicas, one held to a tenth of a core (a
   cgroup's CFS quota); the same open-loop Poisson load (texts of 1 to 4 sentences)
   through a least-outstanding gateway and a round-robin one; the ratio of their TTFA
   p95s (below 0.7 means at least 30 % lower).
4. `replica_kill_failed_pct`: on the local cluster (`bench-gateway`, made and removed
   here), a TtsGateway in front of two real replicas, closed-loop load of 4 streams;
   a third of the way in, one replica's tritonserver is killed (SIGKILL). Failed
   requests (an error status, or a stream cut short) in percent, and how many of them
   started after the replica's endpoint left its EndpointSlice (a watch here records
   when).

The load generator shares the 2 cores with the servers: figures are for this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ttsfleet import harness, kube
from ttsfleet.api import crd
from ttsfleet.cluster import images, local, tokens
from ttsfleet.cluster.pool import load_pool_file
from ttsfleet.gateway import auth
from ttsfleet.triton import aio

REPO = Path(__file__).resolve().parent.parent
ISSUER, AUDIENCE = "https://bench.ttsfleet.test", "bench"
VOICE = "en_US-joe-medium"
SHORT = "Hello there, thanks for calling."
SENTENCES = [
    "Thanks for calling, how can I help you today?",
    "Your order shipped this morning and should arrive on Thursday.",
    "I can move your appointment to any weekday after three.",
    "Please hold while I look that up for you.",
]
CGROUP = Path("/sys/fs/cgroup/cpu/ttsfleet-bench-slow")
# The slow replica's CPU: a tenth of a core serves fewer requests than round robin
# sends it at the default rate (a third of 2/s), as a replica on a sick node would.
SLOW_SHARE = 0.1


class Setup:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.key = auth.new_signing_key()
        self.jwks = work / "jwks.json"
        auth.write_jwks(self.jwks, [self.key])
        self.token = auth.sign(
            self.key, issuer=ISSUER, audience=AUDIENCE, subject="bench", ttl_seconds=7200
        )

    def gateway(
        self, name: str, endpoints: list[str], *, balancer: str = "least-outstanding",
        authenticated: bool = True,
    ) -> harness.GatewayProcess:  # fmt: skip
        config: dict[str, Any] = {
            "routes": [{"models": ["tts-1"], "voices": ["alloy"],
                        "fleet": {"name": "bench", "voice": VOICE, "endpoints": endpoints}}],
            "balancer": balancer,
            "cacheBytes": 0,  # every request to a replica: the bench repeats its texts
        }  # fmt: skip
        if authenticated:
            config["auth"] = {
                "issuer": ISSUER, "audiences": [AUDIENCE], "jwksFile": str(self.jwks)
            }  # fmt: skip
        path = self.work / f"{name}.json"
        gateway = harness.GatewayProcess(path, local.free_port(), self.work / f"{name}.log")
        gateway.configure(config)
        gateway.start()
        return gateway


@contextlib.contextmanager
def tritons(work: Path, count: int) -> Iterator[list[harness.TritonProcess]]:
    servers = [
        harness.TritonProcess(
            local.free_port(),
            local.free_port(),
            local.free_port(),
            work / f"triton-{i}.log",
            models=("tts_stream",),
        )
        for i in range(count)
    ]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


# ---- 1. added latency -----------------------------------------------------------------------


class Connection:
    """A minimal HTTP/1.1 keep-alive client for the speech endpoint: a load generator,
    like wrk, that costs the measurement little (httpx adds about a millisecond per
    response in Python). Reads the chunked body and notes when its first byte came."""

    def __init__(self, url: str, token: str, fmt: str = "wav") -> None:
        parts = url.removeprefix("http://").split(":")
        self.host, self.port = parts[0], int(parts[1])
        self.token = token
        self.format = fmt
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def speak(self, text: str) -> tuple[float, float]:
        """(time to the first audio byte, the replica's TTFA from Server-Timing), s."""
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        body = json.dumps(
            {"model": "tts-1", "voice": "alloy", "input": text, "response_format": self.format}
        ).encode()
        head = (
            f"POST /v1/audio/speech HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Authorization: Bearer {self.token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        start = time.perf_counter()
        writer.write(head + body)
        headers = (await reader.readuntil(b"\r\n\r\n")).decode()
        if not headers.startswith("HTTP/1.1 200"):
            self.streams = None
            detail = await reader.read(400)  # the error's JSON, as much as came
            writer.close()
            message = re.search(rb'"message":\s*"([^"]{0,120})', detail)
            why = message.group(1).decode() if message else ""
            raise RuntimeError(f"{headers.split(chr(13), 1)[0]}: {why}")
        first = None
        while True:  # chunked: size line, data, CRLF; a zero size ends it
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            await reader.readexactly(size + 2)
            if first is None:
                first = time.perf_counter() - start
        match = re.search(r"upstream;dur=([0-9.]+)", headers)
        assert match is not None and first is not None
        return first, float(match.group(1)) / 1000

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()


async def direct_ttfa(channels: aio.Channels, address: str, text: str) -> float:
    start = time.perf_counter()
    first = None
    async for _ in aio.stream(channels.stub(address), text, voice=VOICE):
        if first is None:
            first = time.perf_counter() - start
    assert first is not None
    return first


async def added_latency(
    url: str, token: str, address: str, concurrency: int, seconds: float, fmt: str = "wav"
) -> dict[str, Any]:
    added: list[float] = []
    through: list[float] = []
    direct: list[float] = []
    channels = aio.Channels()
    deadline = time.monotonic() + seconds

    async def worker(seed: int) -> None:
        rng = random.Random(seed)  # noqa: S311 - load shapes, not secrets
        connection = Connection(url, token, fmt)
        await connection.speak(SHORT)  # warm the connection and the caches
        while time.monotonic() < deadline:
            order = [True, False]
            rng.shuffle(order)
            for via_gateway in order:
                if via_gateway:
                    ttfa, upstream = await connection.speak(SHORT)
                    through.append(ttfa)
                    added.append(ttfa - upstream)
                else:
                    direct.append(await direct_ttfa(channels, address, SHORT))
        connection.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    await channels.close()
    return {
        "concurrency": concurrency,
        "format": fmt,
        "requests": len(through) + len(direct),
        "added_ttfa_ms": ms(added),
        "gateway_ttfa_ms": ms(through),
        "direct_ttfa_ms": ms(direct),
    }


def ms(values: list[float]) -> dict[str, float]:
    return {f"p{q}": round(harness.percentile(values, q / 100) * 1000, 2) for q in (50, 95, 99)} | {
        "n": len(values)
    }


# ---- 2. authenticated requests per core -----------------------------------------------------


ALL_CORES = set(range(os.cpu_count() or 1))


def pin(pid: int, cores: set[int]) -> None:
    """Every thread of `pid` and of its children on `cores`."""
    for process in (pid, *children(pid)):
        for task in Path(f"/proc/{process}/task").iterdir():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(task.name), cores)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def requests_per_core(
    gateway: harness.GatewayProcess, token: str | None, seconds: float
) -> dict[str, Any]:
    assert gateway.process is not None
    pid = gateway.process.pid
    pin(pid, {0})
    header = ["-H", f"Authorization: Bearer {token}"] if token else []
    argv = ["taskset", "-c", "1", "wrk", "-t1", "-c32", f"-d{seconds:.0f}s", "--latency",
            *header, f"{gateway.url}/v1/voices"]  # fmt: skip
    before = cpu_seconds(pid)
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    used = cpu_seconds(pid) - before
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non_2xx:
        raise RuntimeError(f"{non_2xx.group(1)} requests failed:\n{out}")
    return {
        "requests": done,
        "gateway_cpu_seconds": round(used, 2),
        "requests_per_second": round(done / seconds, 1),
        "requests_per_cpu_second": round(done / used, 1),
        "wrk": out.strip().splitlines()[-2:],
    }


# ---- 3. least outstanding vs round robin with a slow replica --------------------------------


def children(pid: int) -> list[int]:
    """Every descendant of `pid`."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry.name))
    found, pending = [], [pid]
    while pending:
        for child in parents.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


@contextlib.contextmanager
def cpu_share(pid: int, share: float) -> Iterator[None]:
    """Hold `pid` and its children (Triton runs each Python model instance in a stub
    process of its own: that is where synthesis happens) to `share` of one core."""
    CGROUP.mkdir(exist_ok=True)
    (CGROUP / "cpu.cfs_period_us").write_text("100000")
    (CGROUP / "cpu.cfs_quota_us").write_text(str(int(100000 * share)))
    for process in (pid, *children(pid)):
        for task in Path(f"/proc/{process}/task").iterdir():
            with contextlib.suppress(OSError):
                (CGROUP / "tasks").write_text(task.name)
    try:
        yield
    finally:
        parent = CGROUP.parent
        for tid in (CGROUP / "tasks").read_text().split():
            with contextlib.suppress(OSError):
                (parent / "tasks").write_text(tid)
        CGROUP.rmdir()


async def open_loop(url: str, token: str, rate: float, seconds: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)  # noqa: S311 - load shapes, not secrets
    ttfas: list[float] = []
    failures: dict[str, int] = {}

    async def one(text: str) -> None:
        # A connection per request: an open loop has no idle connections to reuse that
        # the server might be closing (uvicorn drops keep-alives idle for 5 s).
        connection = Connection(url, token)
        try:
            ttfa, _ = await connection.speak(text)
            ttfas.append(ttfa)
        except (OSError, RuntimeError, asyncio.IncompleteReadError) as err:
            reason = str(err).split("\r\n")[0][:80] or type(err).__name__
            failures[reason] = failures.get(reason, 0) + 1
        finally:
            connection.close()

    tasks = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        text = " ".join(rng.sample(SENTENCES, rng.randint(1, 4)))
        tasks.append(asyncio.create_task(one(text)))
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    return {
        "requests": len(tasks), "failures": sum(failures.values()), "failure_reasons": failures,
        "ttfa_ms": ms(ttfas),
    }  # fmt: skip


# ---- the run --------------------------------------------------------------------------------


def part_added(
    setup: Setup, servers: list[harness.TritonProcess], seconds: float
) -> dict[str, Any]:
    """1. What the gateway adds to the time to first audio, with its auth rate after."""
    replica = servers[0]
    one = setup.gateway("one", [replica.grpc_address])
    assert replica.process is not None and one.process is not None
    try:
        # As in a cluster, where the gateway has a node's CPU of its own: the replica on
        # one core, the gateway and this client on the other.
        pin(replica.process.pid, {1})
        pin(one.process.pid, {0})
        pin(os.getpid(), {0})
        levels = []
        for concurrency in (1, 4, 8):
            level = asyncio.run(
                added_latency(one.url, setup.token, replica.grpc_address, concurrency, seconds)
            )
            print(json.dumps(level))
            levels.append(level)
        # What encoding costs on top: OpenAI's pcm (resampled to 24 kHz) and mp3.
        formats = [
            asyncio.run(added_latency(one.url, setup.token, replica.grpc_address, 1, seconds, fmt))
            for fmt in ("pcm", "mp3")
        ]
        print(json.dumps(formats))
        pin(replica.process.pid, ALL_CORES)
        pin(os.getpid(), ALL_CORES)
        authed = requests_per_core(one, setup.token, seconds)
    finally:
        one.stop()
    open_gateway = setup.gateway("open", [replica.grpc_address], authenticated=False)
    try:
        unauthed = requests_per_core(open_gateway, None, seconds)
    finally:
        open_gateway.stop()
    print(json.dumps({"with_auth": authed, "without": unauthed}))
    return {
        "added_latency": levels,
        "added_latency_other_formats": formats,
        "added_ttfa_ms": {
            str(level["concurrency"]): {k: level["added_ttfa_ms"][k] for k in ("p50", "p99")}
            for level in levels
        },
        "auth": {"with_auth": authed, "baseline_without_auth": unauthed},
        "auth_rps_per_core": authed["requests_per_cpu_second"],
    }


def part_balancing(
    setup: Setup, servers: list[harness.TritonProcess], rate: float, seconds: float
) -> dict[str, Any]:
    """3. Least outstanding vs round robin, one of three replicas slow."""
    addresses = [s.grpc_address for s in servers]
    slow = servers[-1]
    assert slow.process is not None
    balanced: dict[str, Any] = {}
    with cpu_share(slow.process.pid, SLOW_SHARE):
        for balancer in ("least-outstanding", "round-robin"):
            gateway = setup.gateway(balancer, addresses, balancer=balancer)
            try:
                balanced[balancer] = asyncio.run(
                    open_loop(gateway.url, setup.token, rate, seconds, seed=7)
                )
            finally:
                gateway.stop()
            print(balancer, json.dumps(balanced[balancer]))
    p2c = balanced["least-outstanding"]["ttfa_ms"]["p95"]
    rr = balanced["round-robin"]["ttfa_ms"]["p95"]
    return {
        "balancing": balanced | {
            "slow_replica_cpu_share": SLOW_SHARE, "rate_per_second": rate, "replicas": 3,
            "seconds": seconds,
        },
        "p2c_vs_round_robin_ttfa_p95": round(p2c / rr, 3),
    }  # fmt: skip


# ---- 4. a replica killed under load (on the local cluster) ----------------------------------

CLUSTER = "bench-gateway"
NAMESPACE = "gateway-bench"


def cluster_setup(work: Path) -> tuple[Any, str, str]:
    """The local cluster with the operator, a two-replica fleet on the local node and a
    TtsGateway in front of it; (api, the gateway's address, a token)."""
    record = local.up(CLUSTER, load_pool_file(None), reuse=True).record
    api = kube.api_client(record.kubeconfig)
    kube.apply(api, [crd.crd(), crd.gateway_crd()], "bench")
    for plural in ("ttsdeployments", "ttsgateways"):
        harness.wait_established(api, f"{plural}.ttsfleet.io")
    if kube.get(api, "v1", "Namespace", NAMESPACE, None) is None:
        kube.create_namespace(api, NAMESPACE)
    operator = harness.OperatorProcess(
        record.kubeconfig, work / "operator.log", local.free_port(), local.free_port(),
        leader_election=False,
    )  # fmt: skip
    operator.start()
    fleet = yaml.safe_load((REPO / "examples/local-cpu.yaml").read_text())
    fleet["spec"] |= {"replicas": 2, "minReplicas": 2, "maxReplicas": 2}
    fleet["spec"]["runtime"]["resources"]["requests"]["cpu"] = "250m"
    gateway = yaml.safe_load((REPO / "examples/local-gateway.yaml").read_text())
    gateway["spec"]["cacheMiB"] = 0  # every request to a replica: the load repeats texts
    for doc in fleet, gateway:
        doc["metadata"]["namespace"] = NAMESPACE
    kube.apply(api, [fleet, tokens.jwks_secret(CLUSTER, NAMESPACE), gateway], "bench")
    harness.wait_for(
        "two ready replicas",
        lambda: len(kube.ready_endpoints(api, NAMESPACE, "joe-local", "grpc")) == 2,
        timeout=300,
    )
    (address,) = harness.wait_for(
        "the gateway", lambda: kube.ready_endpoints(api, NAMESPACE, "speech-gateway", "http"),
        timeout=180,
    )  # fmt: skip
    return (api, operator), address, tokens.token(CLUSTER)


def server_pid(pod_uid: str) -> int:
    """The tritonserver process the local runner runs for a pod."""
    marker = images.shm_prefix(pod_uid)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if marker in cmdline and "tritonserver" in cmdline.split(" ")[0]:
                    return int(entry.name)
    raise RuntimeError(f"no tritonserver for pod {pod_uid}")


async def killed_under_load(
    api: Any, address: str, token: str, seconds: float, concurrency: int
) -> dict[str, Any]:
    changes: list[tuple[float, list[str]]] = []
    watch = kube.EndpointWatch(
        api, NAMESPACE, "joe-local", "grpc", on_change=lambda a: changes.append((time.time(), a))
    ).start()
    watch.wait_listed(30)
    before = watch.addresses()
    pods = kube.list_pods(api, NAMESPACE, "ttsfleet.io/deployment=joe-local")
    victim = pods[0]
    victim_address = f"{victim['status']['podIP']}:8001"
    outcomes: list[tuple[float, bool, str]] = []  # (started, ok, why)
    deadline = time.monotonic() + seconds
    killed_at = 0.0

    async def worker(seed: int) -> None:
        rng = random.Random(seed)  # noqa: S311 - load shapes, not secrets
        while time.monotonic() < deadline:
            connection = Connection(address, token)
            started = time.time()
            try:
                await connection.speak(" ".join(rng.sample(SENTENCES, rng.randint(1, 2))))
                outcomes.append((started, True, ""))
            except (OSError, RuntimeError, asyncio.IncompleteReadError) as err:
                outcomes.append((started, False, str(err).split("\r\n")[0][:160]))
            finally:
                connection.close()

    async def kill() -> None:
        nonlocal killed_at
        await asyncio.sleep(seconds / 3)
        killed_at = time.time()
        os.kill(server_pid(victim["metadata"]["uid"]), signal.SIGKILL)

    await asyncio.gather(kill(), *(worker(i) for i in range(concurrency)))
    watch.stop()
    left = next((t for t, a in changes if t >= killed_at and victim_address not in a), None)
    failed = [o for o in outcomes if not o[1]]
    after_left = [o for o in failed if left is not None and o[0] >= left]
    return {
        "requests": len(outcomes),
        "failed": len(failed),
        "failed_pct": round(100 * len(failed) / max(len(outcomes), 1), 3),
        "failed_after_endpoint_left": len(after_left),
        "failure_reasons": sorted({why for _, _, why in failed}),
        "replicas_before": len(before),
        "endpoint_left_seconds_after_kill": None if left is None else round(left - killed_at, 2),
        "concurrency": concurrency,
        "seconds": seconds,
        "kill": "SIGKILL of one replica's tritonserver (a crash); the runner restarts it",
    }


def part_replica_kill(work: Path, seconds: float) -> dict[str, Any]:
    (api, operator), address, token = cluster_setup(work)
    try:
        result = asyncio.run(killed_under_load(api, address, token, seconds, concurrency=4))
    finally:
        operator.stop()
        local.down(CLUSTER)
    print(json.dumps(result))
    return {"replica_kill": result, "replica_kill_failed_pct": result["failed_pct"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=2.0, help="Requests/s in part 3.")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/gateway.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ttsfleet-gateway-bench-"))
    setup = Setup(work)
    with tritons(work, 3) as servers:
        results = part_added(setup, servers, args.seconds)
        results |= part_balancing(setup, servers, args.rate, args.seconds * 3)
    results |= part_replica_kill(work, args.seconds * 6)
    added = results["added_ttfa_ms"].values()
    results["goals"] = {
        "added_ttfa_p50_under_2ms": all(v["p50"] < 2 for v in added),
        "added_ttfa_p99_under_10ms": all(v["p99"] < 10 for v in added),
        "auth_rps_per_core_at_least_2000": results["auth_rps_per_core"] >= 2000,
        "p2c_p95_at_least_30pct_lower": results["p2c_vs_round_robin_ttfa_p95"] <= 0.7,
        "replica_kill_under_1pct_failed": results["replica_kill_failed_pct"] < 1,
        "replica_kill_none_failed_after_endpoint_left": (
            results["replica_kill"]["failed_after_endpoint_left"] == 0
        ),
    }
    harness.write_results(args.out, results)
    keys = (
        "added_ttfa_ms", "auth_rps_per_core", "p2c_vs_round_robin_ttfa_p95",
        "replica_kill_failed_pct", "goals",
    )  # fmt: skip
    print(json.dumps({k: results[k] for k in keys}, indent=2))


if __name__ == "__main__":
    main()
