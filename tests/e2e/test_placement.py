"""`placement.mode: auto` on the local cluster's simulated H100 (MIG mixed), L4 and CPU nodes:
the planner's slice is what the pods request and where they run, and what cannot be placed
or scheduled says so in status."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.conftest import Cluster, ttsfleet, wait_for
from tests.e2e.test_operator import apply, condition, get, wait_ready
from tests.helpers import REPO, load_example

pytestmark = pytest.mark.usefixtures("operator")


def voice(name: str, precision: str, streams: int, replicas: int = 1) -> dict[str, Any]:
    doc = load_example(REPO / "examples" / "joe-mig.yaml")
    doc["metadata"]["name"] = name
    doc["spec"]["model"]["precision"] = precision
    doc["spec"]["placement"] = {"mode": "auto", "streamsPerReplica": streams}
    doc["spec"]["scaling"] = {"mode": "manual"}
    doc["spec"]["replicas"] = replicas
    doc["spec"]["minReplicas"] = min(replicas, 1)
    doc["spec"]["maxReplicas"] = max(replicas, 1)
    return doc


def requested(cluster: Cluster, namespace: str, name: str) -> dict[str, str]:
    dep = get(cluster, namespace, "deploy", name)
    limits: dict[str, str] = dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    return {k: v for k, v in limits.items() if k.startswith("nvidia.com/")}


def nodes_of(cluster: Cluster, namespace: str, name: str) -> set[str]:
    pods = cluster.kubectl(
        "get", "pods", "-n", namespace, "-l", f"ttsfleet.io/deployment={name}",
        "-o", "jsonpath={.items[*].spec.nodeName}",
    )  # fmt: skip
    return set(pods.split())


def test_an_fp16_voice_on_auto_lands_on_the_smallest_mig_slice(
    cluster: Cluster, namespace: str
) -> None:
    apply(cluster, namespace, voice("joe", "fp16", 16))
    obj = wait_ready(cluster, namespace, "joe")
    assert obj["status"]["placement"] == "mig-1g.10gb"
    assert requested(cluster, namespace, "joe") == {"nvidia.com/mig-1g.10gb": "1"}
    assert all("h100" in node for node in nodes_of(cluster, namespace, "joe"))
    config = get(cluster, namespace, "cm", "joe-triton")["data"]["config.pbtxt"]
    assert "instance_group [ { count: 1 kind: KIND_GPU } ]" in config


def test_where_fp16_needs_a_bigger_slice_int8_is_placed_on_cpu_not_on_a_gpu(
    cluster: Cluster, namespace: str
) -> None:
    """INT8 runs on CPU kernels only: auto never gives it a GPU slice, even one it fits."""
    apply(cluster, namespace, voice("big16", "fp16", 100))
    apply(cluster, namespace, voice("big8", "int8", 100, replicas=0))  # its placement, no pod
    assert wait_ready(cluster, namespace, "big16")["status"]["placement"] == "mig-2g.20gb"
    assert requested(cluster, namespace, "big16") == {"nvidia.com/mig-2g.20gb": "1"}
    wait_for(
        "big8 placed",
        lambda: (
            (get(cluster, namespace, "ttsd", "big8").get("status") or {}).get("placement") == "cpu"
        ),
    )
    assert requested(cluster, namespace, "big8") == {}
    config = get(cluster, namespace, "cm", "big8-triton")["data"]["config.pbtxt"]
    assert "kind: KIND_CPU" in config and 'string_value: "int8"' in config


def test_a_request_no_slice_holds_is_reported_in_status(cluster: Cluster, namespace: str) -> None:
    apply(cluster, namespace, voice("huge", "fp32", 1000))

    def stalled() -> dict[str, Any]:
        cond = condition(get(cluster, namespace, "ttsd", "huge"), "Stalled")
        return cond if cond.get("status") == "True" else {}

    cond = wait_for("Stalled", stalled)
    assert cond["reason"] == "PlacementUnavailable"
    assert re.search(r"1000 streams of en_US-joe-medium in fp32 need [0-9.]+ GiB", cond["message"])
    assert "lower spec.placement.streamsPerReplica" in cond["message"]
    assert "huge" not in cluster.kubectl("get", "-n", namespace, "deploy", "-o", "name")


def test_scaling_past_capacity_says_how_many_slices_are_missing(
    cluster: Cluster, namespace: str
) -> None:
    # 200 FP16 streams need a 3g.40gb here; two H100 nodes have 16 of them.
    apply(cluster, namespace, voice("wide", "fp16", 200, replicas=20))

    def exhausted() -> dict[str, Any]:
        cond = condition(get(cluster, namespace, "ttsd", "wide"), "CapacityExhausted")
        return cond if cond.get("status") == "True" else {}

    cond = wait_for("CapacityExhausted", exhausted, timeout=90)
    assert get(cluster, namespace, "ttsd", "wide")["status"]["placement"] == "mig-3g.40gb"
    assert cond["reason"] == "InsufficientCapacity"
    match = re.match(
        r"no capacity for (\d+) replicas of mig-3g\.40gb: 2 nodes have 16, (\d+) in use, 0 free",
        cond["message"],
    )
    assert match, cond["message"]
    assert int(match[1]) >= 4 and int(match[2]) >= 16


def test_plan_against_the_cluster_says_whether_and_where_replicas_fit(cluster: Cluster) -> None:
    argv = ["plan", "--precision", "fp16", "--concurrency", "200", "--cluster", cluster.name]
    result = ttsfleet(*argv, "--replicas", "2", "--json")
    assert result.returncode in (0, 1), result.stderr
    out = json.loads(result.stdout)
    assert out["profile"] == "3g.40gb"  # what the nodes offer: no 1g.20gb here
    have = out["cluster"]
    assert have["allocatable"] == 16
    assert have["free"] == 16 - have["in_use"] == sum(have["free_by_node"].values())
    assert all(name.startswith("h100-") for name in have["free_by_node"])
    assert have["fits"] == (have["free"] >= 2) == (result.returncode == 0)
    too_many = ttsfleet(*argv, "--replicas", "17")
    assert too_many.returncode == 1
    assert "17 replica(s) do NOT fit" in too_many.stdout
