"""Measure the local cluster: builds, start, memory, 1,000 nodes and 1,000 pods.

    python benchmarks/cluster_bench.py [--cold-build] [--nodes 1000] [--pods 1000]
                                       [--out benchmarks/results/cluster.json]

For each setting of the components' client QPS limits (kwokctl's defaults, and
`--disable-qps-limits`, which `ttsfleet cluster up` uses unless told otherwise) it
starts a cluster with the default pool, then creates `--nodes` simulated GPU
nodes and a Deployment of `--pods` MIG pods, timing each until Ready/Running.
`--cold-build` also builds every binary from nothing in a scratch cache.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from kubernetes import client

from ttsfleet import harness, kube
from ttsfleet.cluster import local, toolchain
from ttsfleet.cluster import nodes as cluster_nodes
from ttsfleet.cluster.pool import load_pool_file, render_nodes, scale_gpu_pools

REPO = Path(__file__).resolve().parent.parent


def build_tools(cache: Path | None) -> dict[str, Any]:
    """Run hack/tools.sh; with `cache`, from nothing in that scratch directory."""
    env = dict(os.environ)
    if cache is not None:
        env |= {"TTSFLEET_CACHE": str(cache), "GOMODCACHE": "", "GOCACHE": ""}
        env.pop("GOMODCACHE")
        env.pop("GOCACHE")
    start = time.monotonic()
    result = subprocess.run(
        ["bash", str(REPO / "hack" / "tools.sh"), "build"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    seconds = time.monotonic() - start
    parts = {m[1]: int(m[2]) for m in re.finditer(r">> built (\S+) \S+ in (\d+)s", result.stderr)}
    return {"seconds": round(seconds, 1), "components_seconds": parts}


def rss_mib(name: str) -> dict[str, float]:
    """Resident memory of each control-plane process of cluster `name`."""
    out: dict[str, float] = {}
    for pid in local.processes(name):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            exe = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        if match:
            component = Path(exe).name
            out[component] = round(out.get(component, 0) + int(match[1]) / 1024, 1)
    return out


def running_pods(api: client.ApiClient, namespace: str) -> int:
    core: Any = client.CoreV1Api(api)
    response = core.list_namespaced_pod(
        namespace, field_selector="status.phase=Running", _preload_content=False
    )
    return len(json.loads(response.data)["items"])


def deployment(replicas: int) -> dict[str, Any]:
    labels = {"app": "bench"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "bench"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                    "containers": [
                        {
                            "name": "triton",
                            "image": "nvcr.io/nvidia/tritonserver:24.10-py3",
                            "resources": {"limits": {"nvidia.com/mig-1g.10gb": "1"}},
                        }
                    ],
                },
            },
        },
    }


def run_scale(qps_limits: bool, nodes: int, pods: int) -> dict[str, Any]:
    name = "bench-qps" if qps_limits else "bench-noqps"
    pools = load_pool_file(None)
    if local.load(name):
        local.down(name)
    result = local.up(name, pools, qps_limits=qps_limits)
    out: dict[str, Any] = {
        "warm_start_seconds": round(result.seconds, 2),
        "idle_memory_mib": rss_mib(name),
    }
    try:
        api = kube.api_client(result.record.kubeconfig, pool_size=32)
        gpu_nodes = [
            n for n in render_nodes(scale_gpu_pools(pools, nodes), toolchain.kubernetes_version())
            if "nvidia.com/gpu.present" in n["metadata"]["labels"]
        ]  # fmt: skip
        start = time.monotonic()
        cluster_nodes.create_nodes(api, gpu_nodes)
        out["nodes_created_seconds"] = round(time.monotonic() - start, 2)
        names = {n["metadata"]["name"] for n in gpu_nodes}
        harness.wait_for("nodes Ready", lambda: names <= cluster_nodes.ready_nodes(api), 300, 0.5)
        out["nodes_ready_seconds"] = round(time.monotonic() - start, 2)
        out["nodes"] = len(names)

        core = client.CoreV1Api(api)
        core.create_namespace({"metadata": {"name": "bench"}})
        harness.wait_for(
            "the default ServiceAccount",
            lambda: core.list_namespaced_service_account("bench").items,
            60,
            0.5,
        )
        start = time.monotonic()
        client.AppsV1Api(api).create_namespaced_deployment("bench", deployment(pods))
        harness.wait_for("pods Running", lambda: running_pods(api, "bench") >= pods, 600, 1.0)
        out["pods_running_seconds"] = round(time.monotonic() - start, 2)
        out["pods"] = pods
        out["loaded_memory_mib"] = rss_mib(name)
        out["loaded_memory_total_mib"] = round(sum(out["loaded_memory_mib"].values()), 1)
    finally:
        local.down(name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold-build", action="store_true")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "cluster.json"
    )
    args = parser.parse_args()

    report: dict[str, Any] = {"versions": toolchain.versions()}  # the machine: in its provenance
    if args.cold_build:
        with tempfile.TemporaryDirectory(prefix="ttsfleet-cold-") as scratch:
            report["cold_build"] = build_tools(Path(scratch))
            subprocess.run(["chmod", "-R", "u+w", scratch], check=False)
    report["warm_build"] = build_tools(None)
    report["qps_limits_default"] = run_scale(True, args.nodes, args.pods)
    report["qps_limits_disabled"] = run_scale(False, args.nodes, args.pods)
    harness.write_results(args.out, report)
    print(json.dumps(report, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
