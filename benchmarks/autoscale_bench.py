"""Measure the built-in autoscaler on the real loop: metric breach -> replicas written.

    python benchmarks/autoscale_bench.py [--steps 10] [--concurrency 6]
                                         [--out benchmarks/results/autoscale.json]
                                         [--run-out benchmarks/results/autoscale_run.json]

Starts its own local cluster (kwok nodes plus the `local` node whose pods the runner
runs as real tritonserver processes, and Prometheus scraping them), installs the CRD,
runs `ttsfleet operator --prometheus-url` as a process (`harness.OperatorProcess`, one
replica with `--no-leader-election`: this measures the autoscaler's loop, not an
election) and creates one streaming
TtsDeployment with `scaling.mode: builtin` (1 to 2 replicas; short windows, the flap
guard off: `reversalWindowSeconds: 0`, see `manifest`). Then `--steps` step
loads, each: `--concurrency` streaming clients (closed loop, round robin over the
ready endpoints) until the second replica has been in the endpoints for
`--after-seconds`, then no load until the fleet is back to one replica.

Per step:
- breach -> write: from the first time after the load started that a signal the
  policy reads is over its target (its queue-depth query, Triton's pending count plus
  the chunked engine's `ttsfleet_waiting_streams`, above queueDepthPerReplica per
  replica, or its TTFA p95 query above timeToFirstAudioMs, each evaluated every
  second) to the moment the scale subresource write is seen
  on a watch of the TtsDeployment (spec.replicas 1 -> 2). p50/p95/max (nearest
  rank, `harness.percentile`; None where there is nothing to rank).
- time to first audio from the clients: requests started before the new replica
  entered the endpoints, and after (p50/p95).

Also written: the whole run at 1 s steps (`--run-out`) for the autoscaling
simulator: the policy used and, per second, requests started, replicas written,
ready endpoints and the clients' TTFA p95. Load generator, replicas, Prometheus and
the control plane share this machine's cores: the figures are for this machine.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, watch

from ttsfleet import bench, harness, kube
from ttsfleet import client as tts_client
from ttsfleet.api.v1alpha1 import TtsDeploymentSpec
from ttsfleet.autoscale.loop import policy_for
from ttsfleet.autoscale.metrics import QUERIES, WINDOW
from ttsfleet.cluster import local, toolchain
from ttsfleet.cluster.pool import load_pool_file
from ttsfleet.triton import contract

REPO = Path(__file__).resolve().parent.parent
CLUSTER = "bench-autoscale"
NAMESPACE = "autoscale"
NAME = "bench"
TICK_SECONDS = 2.0  # the operator's autoscaler period (handlers.AUTOSCALE_SECONDS)


def manifest() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "examples" / "local-cpu.yaml").read_text())
    doc["metadata"] = {"name": NAME, "namespace": NAMESPACE}
    doc["spec"]["minReplicas"] = 1
    doc["spec"]["maxReplicas"] = 2
    doc["spec"]["runtime"]["resources"]["requests"]["cpu"] = "100m"
    doc["spec"]["scaling"] = {
        "mode": "builtin",
        "targets": {"queueDepthPerReplica": 1},
        "stableWindowSeconds": 6,
        "panicWindowSeconds": 2,
        "scaleDownDelaySeconds": 10,
        # The steps come every ~40 s: a load that flaps, which the flap guard (by design)
        # follows only after 3/4 of the stable window short. Off, this measures the loop.
        "reversalWindowSeconds": 0,
    }
    return doc


def percentile_or_none(values: list[float], q: float) -> float | None:
    """`harness.percentile`, or None when there is nothing to rank."""
    return harness.percentile(values, q) if values else None


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


@dataclass
class Request:
    started: float  # wall clock (Prometheus and watches use the same clock)
    ttfa: float | None  # None: failed
    error: str = ""


class Recorder:
    """Everything with wall-clock times: requests, replicas written, ready endpoints."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.requests: list[Request] = []
        self.replicas: list[tuple[float, int]] = []  # (seen on the watch, spec.replicas)
        self.ready: list[tuple[float, int]] = []  # (seen, ready endpoints)
        self.load_on = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._watch_replicas, daemon=True),
            threading.Thread(target=self._poll_endpoints, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def endpoints(self) -> list[str]:
        return kube.ready_endpoints(self.api, NAMESPACE, NAME, "grpc")

    def _watch_replicas(self) -> None:
        custom: Any = client.CustomObjectsApi(self.api)
        while not self._stop.is_set():
            try:
                watcher: Any = watch.Watch  # untyped in the kubernetes client
                for event in watcher().stream(
                    custom.list_namespaced_custom_object, "ttsfleet.io", "v1alpha1",
                    NAMESPACE, "ttsdeployments", timeout_seconds=30,
                ):  # fmt: skip
                    seen = time.time()
                    replicas = (event["object"].get("spec") or {}).get("replicas")
                    if replicas is not None and (
                        not self.replicas or self.replicas[-1][1] != replicas
                    ):
                        self.replicas.append((seen, int(replicas)))
                    if self._stop.is_set():
                        return
            except Exception:  # a watch the server ended early: start another
                time.sleep(0.1)

    def _poll_endpoints(self) -> None:
        while not self._stop.is_set():
            try:
                count = len(self.endpoints())
            except Exception:  # the apiserver is busy: try again
                count = self.ready[-1][1] if self.ready else 0
            if not self.ready or self.ready[-1][1] != count:
                self.ready.append((time.time(), count))
            self._stop.wait(0.2)

    def replicas_now(self) -> int:
        return self.replicas[-1][1] if self.replicas else 0

    def ready_now(self) -> int:
        return self.ready[-1][1] if self.ready else 0

    def load(self, concurrency: int) -> None:
        """Closed-loop streaming clients, sending while `load_on` is set."""
        balancer = tts_client.Balancer(self.endpoints, refresh_seconds=1)

        def worker(index: int) -> None:
            texts = (
                bench.TEXTS[index % len(bench.TEXTS) :] + bench.TEXTS[: index % len(bench.TEXTS)]
            )
            i = 0
            while not self._stop.is_set():
                if not self.load_on.wait(0.2):
                    continue
                wall = time.time()
                sample = bench.one(tts_client.stream, balancer, texts[i % len(texts)])
                i += 1
                request = Request(wall, None if sample.error else sample.seconds_to_first_audio,
                                  sample.error)  # fmt: skip
                with self._lock:
                    self.requests.append(request)

        for index in range(concurrency):
            thread = threading.Thread(target=worker, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self.load_on.set()  # wake the workers so that they see the stop


@dataclass
class Step:
    load_on: float
    write: float | None = None  # spec.replicas 1 -> 2 seen
    new_ready: float | None = None  # the second endpoint seen
    load_off: float = 0.0
    down_write: float | None = None  # spec.replicas 2 -> 1 seen
    back: float = 0.0  # one replica, one endpoint
    breach: float | None = None  # first time a signal the policy reads was over target


def run_step(recorder: Recorder, after_seconds: float, timeout: float) -> Step:
    step = Step(load_on=time.time())
    recorder.load_on.set()
    harness.wait_for("the scale-up write", lambda: recorder.replicas_now() == 2, timeout, 0.1)
    step.write = next(t for t, r in reversed(recorder.replicas) if r == 2)
    harness.wait_for(
        "the new replica in the endpoints", lambda: recorder.ready_now() == 2, timeout, 0.1
    )
    step.new_ready = next(t for t, n in reversed(recorder.ready) if n == 2)
    time.sleep(after_seconds)
    recorder.load_on.clear()
    step.load_off = time.time()
    harness.wait_for(
        "the scale-down",
        lambda: recorder.replicas_now() == 1 and recorder.ready_now() == 1,
        timeout,
        0.1,
    )
    step.down_write = next(t for t, r in reversed(recorder.replicas) if r == 1)
    step.back = time.time()
    return step


def prometheus_matrix(url: str, query: str, at: float) -> list[dict[str, Any]]:
    """The raw samples of a range-vector selector, evaluated at `at` (the query API)."""
    params = urllib.parse.urlencode({"query": query, "time": f"{at:.3f}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, no proxy
    with opener.open(f"{url}/api/v1/query?{params}", timeout=30) as response:
        body = json.loads(response.read())
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def first_breach(url: str, step: Step, target: float, ttfa_target: float) -> float | None:
    """The first time after the load started that a signal the policy reads was over
    its target: the requests waiting (the policy's query: Triton's pending count plus
    the chunked engine's live streams before their first audio, evaluated every
    second) above `target` per replica (one replica before the scale-up), or the TTFA
    p95 (the policy's query, every second) above `ttfa_target`."""
    assert step.write is not None
    end = step.write + 5
    span = math.ceil(end - step.load_on) + 2
    labels = f'namespace="{NAMESPACE}",deployment="{NAME}"'
    pending = f"({QUERIES['pending_requests']})[{span}s:1s]"
    ttfa = (
        f"histogram_quantile(0.95, sum by (le) (rate({contract.TIME_TO_FIRST_AUDIO}_bucket"
        f"{{{labels}}}[{WINDOW}])))[{span}s:1s]"
    )
    times = [
        float(ts)
        for query, limit in ((pending, target), (ttfa, ttfa_target))
        for series in prometheus_matrix(url, query, end)
        for ts, value in series["values"]
        if float(ts) >= step.load_on and float(value) > limit
    ]
    return min(times) if times else None


def timeline(recorder: Recorder, start: float, end: float) -> list[dict[str, Any]]:
    """The run at 1 s steps, for the simulator."""
    samples = []
    for second in range(math.ceil(end - start)):
        lo, hi = start + second, start + second + 1
        started = [r for r in recorder.requests if lo <= r.started < hi]
        ttfas = [r.ttfa for r in started if r.ttfa is not None]
        replicas = [n for t, n in recorder.replicas if t < hi]
        ready = [n for t, n in recorder.ready if t < hi]
        samples.append(
            {
                "t_s": float(second),
                "requests_per_s": float(len(started)),
                "replicas": replicas[-1] if replicas else 0,
                "ready_replicas": ready[-1] if ready else 0,
                "ttfa_p95_s": rounded(percentile_or_none(ttfas, 0.95)),
            }
        )
    return samples


def summary(recorder: Recorder, steps: list[Step]) -> dict[str, Any]:
    latencies = [s.write - s.breach for s in steps if s.write is not None and s.breach is not None]
    before: list[float] = []
    after: list[float] = []
    for s in steps:
        assert s.new_ready is not None
        for r in recorder.requests:
            if r.ttfa is None or not s.load_on <= r.started < s.load_off:
                continue
            (before if r.started < s.new_ready else after).append(r.ttfa)

    def stats(values: list[float]) -> dict[str, Any]:
        return {
            "requests": len(values),
            "p50_s": rounded(percentile_or_none(values, 0.5)),
            "p95_s": rounded(percentile_or_none(values, 0.95)),
        }

    origin = steps[0].load_on if steps else 0.0
    return {
        "breach_to_scale_write_s": {
            "steps": len(latencies),
            "p50": rounded(percentile_or_none(latencies, 0.5)),
            "p95": rounded(percentile_or_none(latencies, 0.95)),
            "max": rounded(max(latencies) if latencies else None),
            "goal_p95": 2.0,
        },
        "ttfa_before_new_replica_ready": stats(before),
        "ttfa_after_new_replica_ready": stats(after),
        "requests": len(recorder.requests),
        "errors": sum(1 for r in recorder.requests if r.error),
        "error_examples": sorted({r.error for r in recorder.requests if r.error})[:3],
        "steps": [
            {k: rounded(v - origin if isinstance(v, float) else v) for k, v in asdict(s).items()}
            | {
                "breach_to_write_s": rounded(s.write - s.breach)
                if s.write is not None and s.breach is not None
                else None,
                "write_to_ready_s": rounded(s.new_ready - s.write)
                if s.new_ready is not None and s.write is not None
                else None,
                "load_off_to_down_write_s": rounded(s.down_write - s.load_off)
                if s.down_write is not None
                else None,
            }
            for s in steps
        ],
    }


def start(record: local.ClusterRecord, operator: harness.OperatorProcess) -> client.ApiClient:
    """The CRD, the namespace, the operator (with Prometheus) and the TtsDeployment."""
    kubectl = [str(toolchain.binary("kubectl")), "--kubeconfig", str(record.kubeconfig)]
    subprocess.run([*kubectl, "apply", "--server-side", "-f", str(REPO / "crds")],
                   check=True, capture_output=True)  # fmt: skip
    api = kube.api_client(record.kubeconfig)
    harness.wait_established(api, "ttsdeployments.ttsfleet.io")
    core: Any = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": NAMESPACE}})
    operator.start()
    harness.wait_for("the operator's handlers", operator.ready, timeout=60)
    subprocess.run([*kubectl, "apply", "-f", "-"], input=yaml.safe_dump(manifest()).encode(),
                   check=True, capture_output=True)  # fmt: skip
    return api


def measure(
    recorder: Recorder, prometheus: str, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The step loads; the summary and the run at 1 s steps."""
    spec = TtsDeploymentSpec.model_validate(manifest()["spec"])
    target = float(spec.scaling.targets.queue_depth_per_replica)
    ttfa_target = spec.scaling.targets.time_to_first_audio_ms / 1000
    harness.wait_for("one ready replica", lambda: recorder.ready_now() == 1, 180, 0.1)
    time.sleep(5)  # idle samples in Prometheus before the first step
    recorder.load(args.concurrency)
    run_start = time.time()
    steps = []
    for index in range(args.steps):
        step = run_step(recorder, args.after_seconds, args.step_timeout)
        step.breach = first_breach(prometheus, step, target, ttfa_target)
        steps.append(step)
        print(json.dumps({"step": index} | summary(recorder, [step])["steps"][0]), flush=True)
        time.sleep(2)  # a quiet gap: the next breach starts from an idle queue
    run_end = time.time()
    recorder.stop()
    policy = asdict(policy_for(spec)) | {
        "tick_seconds": TICK_SECONDS,
        "scrape_interval_seconds": 1.0,
        "load": {"kind": "closed-loop streaming", "concurrency": args.concurrency,
                 "after_new_replica_ready_seconds": args.after_seconds},
    }  # fmt: skip
    run = {"policy": policy, "samples": timeline(recorder, run_start, run_end)}
    return summary(recorder, steps), run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--after-seconds", type=float, default=6.0)
    parser.add_argument("--step-timeout", type=float, default=120.0)
    results = REPO / "benchmarks" / "results"
    parser.add_argument("--out", type=Path, default=results / "autoscale.json")
    parser.add_argument("--run-out", type=Path, default=results / "autoscale_run.json")
    args = parser.parse_args()

    if local.load(CLUSTER):
        local.down(CLUSTER)
    began = time.monotonic()
    record = local.up(CLUSTER, load_pool_file(None)).record
    log = Path(tempfile.mkdtemp(prefix="ttsfleet-bench-")) / "operator.log"
    operator = harness.OperatorProcess(
        record.kubeconfig, log, local.free_port(), local.free_port(),
        prometheus_url=local.prometheus_url(record), leader_election=False,
    )  # fmt: skip
    recorder = None
    try:
        api = start(record, operator)
        recorder = Recorder(api)
        summary_, run = measure(recorder, local.prometheus_url(record), args)
    finally:
        if recorder is not None:
            recorder.stop()
        operator.stop()
        local.down(CLUSTER)
    report = {"seconds": round(time.monotonic() - began, 1)} | summary_
    for path, content in ((args.out, report), (args.run_out, run)):
        harness.write_results(path, content)
    print(json.dumps({k: v for k, v in report.items() if k != "steps"}, indent=2))
    print(f"written to {args.out} and {args.run_out}; operator log: {log}")


if __name__ == "__main__":
    main()
