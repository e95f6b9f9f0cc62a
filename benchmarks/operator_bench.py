"""Measure the operator: create -> all children applied, and 1,000 objects at scale.

    python benchmarks/operator_bench.py [--latency-objects 100] [--scale-objects 1000]
                                        [--out benchmarks/results/operator.json]

Starts its own local cluster (--nodes GPU nodes), installs the CRD, runs
`ttsfleet operator` as a process (`harness.OperatorProcess`, one replica with
`--no-leader-election`: this measures one operator's reconciling, not an election)
and:
1. creates `--latency-objects` TtsDeployments one after another and times, for
   each, from the create call's return to the moment its last child (the
   PodDisruptionBudget) is seen on a watch: p50/p95/p99 (nearest rank,
   `harness.percentile`);
2. creates `--scale-objects` more at once and times until every one is Ready,
   with the operator's CPU seconds and peak memory, and the apiserver's request
   rate (from its own apiserver_request_total) over that window.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from kubernetes import client, watch

from ttsfleet import harness, kube
from ttsfleet.cluster import local, toolchain
from ttsfleet.cluster.pool import load_pool_file, scale_gpu_pools

REPO = Path(__file__).resolve().parent.parent
CLUSTER = "bench-operator"


def tts(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "ttsfleet.io/v1alpha1",
        "kind": "TtsDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"voice": "en_US-joe-medium", "precision": "fp16"},
            "placement": {"mode": "mig", "profile": "1g.10gb"},
            "minReplicas": 1,
            "maxReplicas": 8,
        },
    }


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def process_memory_mib(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    out = {}
    for key in ("VmRSS", "VmHWM"):
        match = re.search(rf"{key}:\s+(\d+) kB", status)
        if match:
            out[key] = round(int(match[1]) / 1024, 1)
    return out


def apiserver_requests(api: client.ApiClient) -> Counter[str]:
    """apiserver_request_total summed by resource."""
    response = api.call_api("GET", f"{api.configuration.host}/metrics")
    text = response.read().decode()
    totals: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{"):
            labels, value = line.rsplit(" ", 1)
            resource = re.search(r'resource="([^"]*)"', labels)
            totals[resource[1] if resource else ""] += float(value)
    return totals


class ChildWatch:
    """Records when each PodDisruptionBudget (the last child applied) first appears."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(api, namespace), daemon=True)
        self._thread.start()

    def _run(self, api: client.ApiClient, namespace: str) -> None:
        policy = client.PolicyV1Api(api)
        while not self._stop.is_set():
            try:
                for event in watch.Watch().stream(
                    policy.list_namespaced_pod_disruption_budget, namespace, timeout_seconds=5
                ):
                    name = event["object"].metadata.name
                    self.seen.setdefault(name, time.monotonic())
            except Exception:  # a watch the server ended early: start another
                time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()


def ready_count(api: client.ApiClient, namespace: str) -> int:
    custom: Any = client.CustomObjectsApi(api)
    response = custom.list_namespaced_custom_object(
        "ttsfleet.io", "v1alpha1", namespace, "ttsdeployments", _preload_content=False
    )
    count = 0
    for item in json.loads(response.data)["items"]:
        for cond in (item.get("status") or {}).get("conditions") or []:
            if cond["type"] == "Ready" and cond["status"] == "True":
                count += 1
    return count


def measure_latency(api: client.ApiClient, objects: int) -> dict[str, float]:
    """Create objects one after another; time each until its last child is seen."""
    custom: Any = client.CustomObjectsApi(api)
    watcher = ChildWatch(api, "latency")
    time.sleep(1)
    latencies = []
    for i in range(objects):
        name = f"lat-{i}"
        custom.create_namespaced_custom_object(
            "ttsfleet.io", "v1alpha1", "latency", "ttsdeployments", tts(name)
        )
        created = time.monotonic()
        harness.wait_for(f"children of {name}", lambda n=name: n in watcher.seen, 30, every=0.002)
        latencies.append(watcher.seen[name] - created)
    watcher.stop()
    return {
        "objects": len(latencies),
        "p50": round(harness.percentile(latencies, 0.50), 4),
        "p95": round(harness.percentile(latencies, 0.95), 4),
        "p99": round(harness.percentile(latencies, 0.99), 4),
        "max": round(max(latencies), 4),
        "mean": round(statistics.fmean(latencies), 4),
    }


def measure_scale(api: client.ApiClient, operator_pid: int, objects: int) -> dict[str, Any]:
    """Create many objects at once; time until every one is Ready."""
    custom: Any = client.CustomObjectsApi(api)
    cpu0 = process_cpu_seconds(operator_pid)
    requests0 = apiserver_requests(api)
    start = time.monotonic()
    for i in range(objects):
        custom.create_namespaced_custom_object(
            "ttsfleet.io", "v1alpha1", "scale", "ttsdeployments", tts(f"s-{i}")
        )
    created = time.monotonic() - start
    harness.wait_for(
        "every TtsDeployment Ready", lambda: ready_count(api, "scale") >= objects, 1800, 2.0
    )
    elapsed = time.monotonic() - start
    requests1 = apiserver_requests(api)
    by_resource = {k: round((requests1[k] - requests0[k]) / elapsed, 1) for k in requests1}
    top = dict(sorted(by_resource.items(), key=lambda kv: -kv[1])[:10])
    return {
        "objects": objects,
        "create_calls_seconds": round(created, 1),
        "all_ready_seconds": round(elapsed, 1),
        "operator_cpu_seconds": round(process_cpu_seconds(operator_pid) - cpu0, 1),
        "operator_memory_mib": process_memory_mib(operator_pid),
        "apiserver_requests_per_second": round(sum(by_resource.values()), 1),
        "apiserver_requests_per_second_by_resource": top,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--latency-objects", type=int, default=100)
    parser.add_argument("--scale-objects", type=int, default=1000)
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "operator.json"
    )
    args = parser.parse_args()

    if local.load(CLUSTER):
        local.down(CLUSTER)
    pools = scale_gpu_pools(load_pool_file(None), args.nodes)
    record = local.up(CLUSTER, pools).record
    report: dict[str, Any] = {"nodes": args.nodes}  # the machine: in its provenance
    log = Path(tempfile.mkdtemp(prefix="ttsfleet-bench-")) / "operator.log"
    operator = harness.OperatorProcess(
        record.kubeconfig, log, local.free_port(), local.free_port(), leader_election=False
    )
    try:
        kubectl = str(toolchain.binary("kubectl"))
        subprocess.run(
            [kubectl, "--kubeconfig", str(record.kubeconfig), "apply", "--server-side",
             "-f", str(REPO / "crds")], check=True, capture_output=True,
        )  # fmt: skip
        api = kube.api_client(record.kubeconfig)
        harness.wait_established(api, "ttsdeployments.ttsfleet.io")
        core = client.CoreV1Api(api)
        for ns in ("latency", "scale"):
            core.create_namespace({"metadata": {"name": ns}})
        operator.start()
        harness.wait_for("the operator's handlers", operator.ready, timeout=60)

        report["create_to_applied_seconds"] = measure_latency(api, args.latency_objects)
        print(json.dumps(report["create_to_applied_seconds"]), flush=True)
        report["scale"] = measure_scale(api, operator.pid, args.scale_objects)
        print(json.dumps(report["scale"]), flush=True)
    finally:
        operator.stop()
        local.down(CLUSTER)
    harness.write_results(args.out, report)
    print(f"written to {args.out}; operator log: {log}")


if __name__ == "__main__":
    main()
