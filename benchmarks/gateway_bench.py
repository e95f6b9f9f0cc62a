"""Measure the speech gateway on this machine: what it adds, what auth costs, and how
balancing on outstanding work beats round robin when one replica is slow.

    python benchmarks/gateway_bench.py [--seconds 20] [--out benchmarks/results/gateway.json]

Everything runs on loopback: real tritonservers (`harness.TritonProcess`, the streaming
model) and real `ttsfleet gateway` processes (`harness.GatewayProcess`) with fixed
endpoints. Each figure has its baseline from the same run:

1. `added_ttfa_ms` at concurrency 1, 4, 8: for each request through the gateway, the
   client's time to the first audio byte (`pcm`, so no header precedes the samples)
   minus the replica's time to first audio for that same request, which the gateway
   reports in its `Server-Timing: upstream` header: a per-request pairing that leaves
   out the replica's own queueing. Direct-to-Triton TTFA at the same concurrency,
   alternating with the gateway's, is reported beside it (`direct_ttfa_ms`,
   `gateway_ttfa_ms`).
2. `auth_rps_per_core`: `GET /v1/voices` with a bearer token (authentication and
   routing, no synthesis) from wrk pinned to one core, the gateway pinned to the other;
   requests answered per CPU-second the gateway used (/proc). Baseline: the same
   without auth.
3. `p2c_vs_round_robin_ttfa_p95`: three replicas, one held to a quarter of a core (a
   cgroup's CFS quota); the same open-loop Poisson load (sentences of 1 to 4 sentences)
   through a least-outstanding gateway and a round-robin one; the ratio of their TTFA
   p95s (below 0.7 means at least 30 % lower).

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
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2

from ttsfleet import harness
from ttsfleet.cluster import local
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


async def gateway_ttfa(
    client: httpx2.AsyncClient, url: str, token: str, text: str
) -> tuple[float, float]:
    """(client TTFA, the replica's TTFA from Server-Timing), seconds."""
    body = {"model": "tts-1", "voice": "alloy", "input": text, "response_format": "pcm"}
    start = time.perf_counter()
    async with client.stream(
        "POST", f"{url}/v1/audio/speech", json=body, headers={"authorization": f"Bearer {token}"}
    ) as response:
        response.raise_for_status()
        first = None
        async for chunk in response.aiter_raw():
            if chunk and first is None:
                first = time.perf_counter() - start
        timing = response.headers["server-timing"]
    match = re.search(r"upstream;dur=([0-9.]+)", timing)
    assert match is not None and first is not None
    return first, float(match.group(1)) / 1000


async def direct_ttfa(channels: aio.Channels, address: str, text: str) -> float:
    start = time.perf_counter()
    first = None
    async for _ in aio.stream(channels.stub(address), text, voice=VOICE):
        if first is None:
            first = time.perf_counter() - start
    assert first is not None
    return first


async def added_latency(
    url: str, token: str, address: str, concurrency: int, seconds: float
) -> dict[str, Any]:
    added: list[float] = []
    through: list[float] = []
    direct: list[float] = []
    channels = aio.Channels()
    deadline = time.monotonic() + seconds
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx2.AsyncClient(timeout=60, limits=limits, trust_env=False) as client:
        await gateway_ttfa(client, url, token, SHORT)  # warm the connection and the caches

        async def worker(seed: int) -> None:
            rng = random.Random(seed)  # noqa: S311 - load shapes, not secrets
            while time.monotonic() < deadline:
                order = [True, False]
                rng.shuffle(order)
                for via_gateway in order:
                    if via_gateway:
                        ttfa, upstream = await gateway_ttfa(client, url, token, SHORT)
                        through.append(ttfa)
                        added.append(ttfa - upstream)
                    else:
                        direct.append(await direct_ttfa(channels, address, SHORT))

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    await channels.close()
    return {
        "concurrency": concurrency,
        "requests": len(through) + len(direct),
        "added_ttfa_ms": ms(added),
        "gateway_ttfa_ms": ms(through),
        "direct_ttfa_ms": ms(direct),
    }


def ms(values: list[float]) -> dict[str, float]:
    return {f"p{q}": round(harness.percentile(values, q) * 1000, 2) for q in (50, 95, 99)} | {
        "n": len(values)
    }


# ---- 2. authenticated requests per core -----------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def requests_per_core(
    gateway: harness.GatewayProcess, token: str | None, seconds: float
) -> dict[str, Any]:
    assert gateway.process is not None
    pid = gateway.process.pid
    os.sched_setaffinity(pid, {0})
    for task in Path(f"/proc/{pid}/task").iterdir():  # every thread of it
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task.name), {0})
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


@contextlib.contextmanager
def cpu_share(pid: int, share: float) -> Iterator[None]:
    """Hold `pid` (and every thread it starts after) to `share` of one core."""
    CGROUP.mkdir(exist_ok=True)
    (CGROUP / "cpu.cfs_period_us").write_text("100000")
    (CGROUP / "cpu.cfs_quota_us").write_text(str(int(100000 * share)))
    for task in Path(f"/proc/{pid}/task").iterdir():
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
    failures = 0
    limits = httpx2.Limits(max_connections=256, max_keepalive_connections=64)
    async with httpx2.AsyncClient(timeout=120, limits=limits, trust_env=False) as client:

        async def one(text: str) -> None:
            nonlocal failures
            try:
                ttfa, _ = await gateway_ttfa(client, url, token, text)
                ttfas.append(ttfa)
            except (httpx2.HTTPError, AssertionError):
                failures += 1

        tasks = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            text = " ".join(rng.sample(SENTENCES, rng.randint(1, 4)))
            tasks.append(asyncio.create_task(one(text)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    return {"requests": len(tasks), "failures": failures, "ttfa_ms": ms(ttfas)}


# ---- the run --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=4.0, help="Requests/s in part 3.")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/gateway.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ttsfleet-gateway-bench-"))
    setup = Setup(work)
    results: dict[str, Any] = {}
    with tritons(work, 3) as servers:
        addresses = [s.grpc_address for s in servers]
        one = setup.gateway("one", addresses[:1])
        try:
            levels = []
            for concurrency in (1, 4, 8):
                level = asyncio.run(
                    added_latency(one.url, setup.token, addresses[0], concurrency, args.seconds)
                )
                print(json.dumps(level))
                levels.append(level)
            results["added_latency"] = levels
            results["added_ttfa_ms"] = {
                str(level["concurrency"]): {k: level["added_ttfa_ms"][k] for k in ("p50", "p99")}
                for level in levels
            }
            authed = requests_per_core(one, setup.token, args.seconds)
        finally:
            one.stop()
        open_gateway = setup.gateway("open", addresses[:1], authenticated=False)
        try:
            unauthed = requests_per_core(open_gateway, None, args.seconds)
        finally:
            open_gateway.stop()
        results["auth"] = {"with_auth": authed, "baseline_without_auth": unauthed}
        results["auth_rps_per_core"] = authed["requests_per_cpu_second"]
        print(json.dumps(results["auth"]))

        slow = servers[2]
        assert slow.process is not None
        balanced: dict[str, Any] = {}
        with cpu_share(slow.process.pid, 0.25):
            for balancer in ("least-outstanding", "round-robin"):
                gateway = setup.gateway(balancer, addresses, balancer=balancer)
                try:
                    balanced[balancer] = asyncio.run(
                        open_loop(gateway.url, setup.token, args.rate, args.seconds * 2, seed=7)
                    )
                finally:
                    gateway.stop()
                print(balancer, json.dumps(balanced[balancer]))
        results["balancing"] = balanced | {
            "slow_replica_cpu_share": 0.25, "rate_per_second": args.rate, "replicas": 3,
        }  # fmt: skip
        p2c = balanced["least-outstanding"]["ttfa_ms"]["p95"]
        rr = balanced["round-robin"]["ttfa_ms"]["p95"]
        results["p2c_vs_round_robin_ttfa_p95"] = round(p2c / rr, 3)
    goals = {
        "added_ttfa_p50_under_2ms": all(v["p50"] < 2 for v in results["added_ttfa_ms"].values()),
        "added_ttfa_p99_under_10ms": all(v["p99"] < 10 for v in results["added_ttfa_ms"].values()),
        "auth_rps_per_core_at_least_2000": results["auth_rps_per_core"] >= 2000,
        "p2c_p95_at_least_30pct_lower": results["p2c_vs_round_robin_ttfa_p95"] <= 0.7,
    }
    results["goals"] = goals
    harness.write_results(args.out, results)
    print(
        json.dumps(
            {
                k: results[k]
                for k in (
                    "added_ttfa_ms",
                    "auth_rps_per_core",
                    "p2c_vs_round_robin_ttfa_p95",
                    "goals",
                )
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
