"""The closed loop on real metrics: load raises the queue signal, a replica is added and
serves, load stops and the fleet shrinks after the delay; Prometheus gone, size held."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

import pytest
import yaml

from tests.conftest import Cluster, wait_for
from tests.helpers import REPO, load_example
from ttsfleet import bench, client, kube
from ttsfleet.cluster import local
from ttsfleet.cluster.pool import load_pool_file

pytestmark = pytest.mark.usefixtures("operator")


def manifest() -> dict[str, Any]:
    doc = load_example(REPO / "examples" / "local-cpu.yaml")
    doc["metadata"]["name"] = "scaled"
    doc["spec"]["maxReplicas"] = 2
    doc["spec"]["runtime"]["resources"]["requests"]["cpu"] = "100m"
    doc["spec"]["scaling"] = {
        "mode": "builtin",
        "targets": {"queueDepthPerReplica": 1},
        "stableWindowSeconds": 6,
        "panicWindowSeconds": 2,
        "scaleDownDelaySeconds": 10,
    }
    return doc


def obj(cluster: Cluster, namespace: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(
        cluster.kubectl("get", "-n", namespace, "ttsd", "scaled", "-o", "json")
    )
    return out


def condition(o: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in o.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def endpoints(cluster: Cluster, namespace: str) -> list[str]:
    return kube.ready_endpoints(cluster.api, namespace, "scaled", "grpc")


def test_load_scales_up_a_serving_replica_and_idle_scales_down(
    cluster: Cluster, namespace: str
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest()))
    wait_for("one ready endpoint", lambda: len(endpoints(cluster, namespace)) == 1, timeout=120)
    balancer = client.Balancer(lambda: endpoints(cluster, namespace), refresh_seconds=1)
    served: list[bench.LevelResult] = []
    load = threading.Thread(
        target=lambda: served.append(
            bench.closed_loop(
                client.stream, balancer, concurrency=6, seconds=45, max_requests=10**6
            )
        )
    )
    load.start()
    try:
        wait_for("a second replica", lambda: obj(cluster, namespace)["spec"]["replicas"] == 2, 60)
        wait_for("two ready endpoints", lambda: len(endpoints(cluster, namespace)) == 2, 90)
    finally:
        load.join()
    assert served[0].errors == 0 and served[0].requests > 10
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", "reason=Scaled")
    assert "Scaled from 1 to 2" in events
    scaled = obj(cluster, namespace)
    assert scaled["status"]["autoscaling"]["lastDecision"]
    assert condition(scaled, "MetricsUnavailable")["status"] == "False"
    # Load gone: back to one replica after the scale-down delay.
    wait_for("scale down", lambda: obj(cluster, namespace)["spec"]["replicas"] == 1, timeout=90)


def test_prometheus_down_holds_the_size_and_says_so(cluster: Cluster, namespace: str) -> None:
    pids = [p for p in local.processes(cluster.name) if "/prometheus/" in local.cmdline(p)]
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    try:
        # An idle fleet of two that could shrink at once (no delay), if it could see.
        doc = manifest()
        doc["spec"]["replicas"] = 2
        doc["spec"]["scaling"]["scaleDownDelaySeconds"] = 0
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))

        def unavailable() -> dict[str, Any]:
            cond = condition(obj(cluster, namespace), "MetricsUnavailable")
            return cond if cond.get("status") == "True" else {}

        cond = wait_for("MetricsUnavailable", unavailable, timeout=60)
        assert cond["reason"] == "PrometheusUnavailable" and "Prometheus at" in cond["message"]
        time.sleep(8)  # several autoscaler ticks without metrics (a fixed span, not a timing claim)
        assert obj(cluster, namespace)["spec"]["replicas"] == 2  # not scaled down blind
    finally:
        local.up(cluster.name, load_pool_file(None), reuse=True)  # starts Prometheus again
    wait_for(
        "metrics back",
        lambda: condition(obj(cluster, namespace), "MetricsUnavailable").get("status") == "False",
        timeout=60,
    )
    # Now it sees an idle fleet, and shrinks it.
    wait_for("scale down", lambda: obj(cluster, namespace)["spec"]["replicas"] == 1, timeout=60)
