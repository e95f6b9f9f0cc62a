"""The closed loop on real metrics: load raises the queue signal, a replica is added and
serves, load stops and the fleet shrinks after the delay; a scale-down removes the idle
replica, not the one with an open stream, and cuts no stream. (Prometheus killed: test_chaos.py.)"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from tests.conftest import Cluster, wait_for
from tests.helpers import REPO, load_example
from ttsfleet import bench, client, kube
from ttsfleet.autoscale.metrics import PrometheusSource
from ttsfleet.cluster import local
from ttsfleet.resources.common import DEPLOYMENT_LABEL
from ttsfleet.triton import contract

pytestmark = pytest.mark.usefixtures("operator")


def manifest() -> dict[str, Any]:
    doc = load_example(REPO / "examples" / "local-cpu.yaml")
    doc["metadata"]["name"] = "scaled"
    doc["spec"]["maxReplicas"] = 2
    doc["spec"]["runtime"]["resources"]["requests"]["cpu"] = "100m"
    doc["spec"]["scaling"] = {
        "mode": "builtin",
        # The chunked engine hands each request to its scheduler at once, so Triton's
        # pending count stays 0: time to first audio is the signal that load raises.
        "targets": {"queueDepthPerReplica": 1, "timeToFirstAudioMs": 50},
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


# A short first sentence (first audio at once, whatever the load), then about a minute
# and a half of speech: a few seconds of synthesis, one stream after another.
LONG_TEXT = "Hello. " + " ".join(bench.TEXTS * 6)
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


def pods(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    return kube.list_pods(cluster.api, namespace, f"{DEPLOYMENT_LABEL}=scaled")


def test_scale_down_removes_the_idle_replica_and_cuts_no_stream(
    cluster: Cluster, namespace: str
) -> None:
    doc = manifest()
    # Only the floor moves the size here; the latency targets stay out of the way.
    doc["spec"]["scaling"]["targets"]["timeToFirstAudioMs"] = 60000
    doc["spec"]["scaling"]["scaleDownDelaySeconds"] = 2
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))
    wait_for("one ready endpoint", lambda: len(endpoints(cluster, namespace)) == 1, timeout=120)
    # A second replica, well after the first: without deletion costs the ReplicaSet
    # controller removes the replica that has been ready for less time, this one.
    cluster.kubectl(
        "patch", "-n", namespace, "ttsd", "scaled", "--type=merge",
        "-p", json.dumps({"spec": {"minReplicas": 2, "replicas": 2}}),
    )  # fmt: skip
    wait_for("two ready endpoints", lambda: len(endpoints(cluster, namespace)) == 2, timeout=120)
    newest, oldest = sorted(
        pods(cluster, namespace), key=lambda p: p["metadata"]["creationTimestamp"], reverse=True
    )
    busy, idle = newest["metadata"]["name"], oldest["metadata"]["name"]
    address = f"{newest['status']['podIP']}:{contract.GRPC_PORT}"

    # One stream after another to the newest replica: one is always open there.
    streams: list[tuple[float, float, client.Result | Exception]] = []
    stop = threading.Event()

    def speak() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                outcome: client.Result | Exception = client.stream(address, LONG_TEXT)
            except Exception as err:  # a cut stream is a result to report
                outcome = err
            streams.append((started, time.monotonic(), outcome))

    speaker = threading.Thread(target=speak)
    speaker.start()
    try:

        def costs() -> dict[str, str]:
            return {
                p["metadata"]["name"]: (p["metadata"].get("annotations") or {}).get(
                    DELETION_COST, ""
                )
                for p in pods(cluster, namespace)
            }

        record = local.load(cluster.name)
        assert record is not None
        source = PrometheusSource(local.prometheus_url(record))

        def seen_busy() -> bool:
            open_streams = source.pod_streams().get((namespace, "scaled"), {})
            return open_streams.get(busy) == 1 and open_streams.get(idle) == 0

        wait_for("Prometheus to see the open stream", seen_busy, timeout=60)
        assert set(costs().values()) == {""}  # costs are written only to shrink
        cluster.kubectl(
            "patch", "-n", namespace, "ttsd", "scaled", "--type=merge",
            "-p", json.dumps({"spec": {"minReplicas": 1}}),
        )  # fmt: skip

        def deleting() -> list[str]:
            return [p["metadata"]["name"] for p in pods(cluster, namespace)
                    if p["metadata"].get("deletionTimestamp")]  # fmt: skip

        assert wait_for("a replica to be removed", deleting, timeout=60) == [idle]
        removed_at = time.monotonic()
        assert costs() == {busy: "1", idle: "0"}  # written just before the scale write
        wait_for("the idle replica gone", lambda: costs().keys() == {busy}, timeout=60)
    finally:
        stop.set()
        speaker.join(timeout=300)
    assert obj(cluster, namespace)["spec"]["replicas"] == 1
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", "reason=Scaled")
    assert "Scaled from 2 to 1" in events
    errors = [o for _, _, o in streams if isinstance(o, Exception)]
    assert not errors, errors
    # The stream open when the idle replica went finished, with all its audio: every
    # stream of this text gives the same audio (the voice is deterministic).
    assert any(start < removed_at < end for start, end, _ in streams)
    lengths = {len(o.audio) for _, _, o in streams if isinstance(o, client.Result)}
    assert len(lengths) == 1 and lengths.pop() > 0


def test_a_scheduled_window_keeps_a_floor_and_the_fleet_returns_after_it(
    cluster: Cluster, namespace: str
) -> None:
    """A window open now, in a time zone east of UTC, lifts the fleet to its floor; the
    same window closed lets it shrink back after the delay (kwok replicas: the floor
    holds with no metrics at all)."""
    now = datetime.now(ZoneInfo("Asia/Kolkata"))  # UTC+05:30: the zone is really applied
    start, end = (
        (now - timedelta(hours=1)).strftime("%H:%M"),
        (now + timedelta(hours=1)).strftime("%H:%M"),
    )
    doc = load_example(REPO / "examples" / "joe-mig.yaml")
    doc["metadata"]["name"] = "scaled"
    doc["spec"]["scaling"] = {
        "mode": "builtin",
        "scaleDownDelaySeconds": 0,
        "stableWindowSeconds": 4,
        "panicWindowSeconds": 2,
        "schedules": [
            {"name": "rush", "start": start, "end": end, "timeZone": "Asia/Kolkata",
             "minReplicas": 3},
        ],
    }  # fmt: skip
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))
    wait_for("the floor of 3", lambda: obj(cluster, namespace)["spec"].get("replicas") == 3)
    reason = f"schedule rush {start}-{end} Asia/Kolkata: at least 3"

    def scaled_event() -> bool:
        selector = ("--field-selector", "reason=Scaled")
        return reason in cluster.kubectl("get", "events", "-n", namespace, *selector)

    wait_for("a Scaled event naming the schedule", scaled_event)
    floor = obj(cluster, namespace)["status"]["autoscaling"]["floor"]
    assert floor == {
        "replicas": 3,
        "reason": f"schedule rush {start}-{end} Asia/Kolkata: at least 3",
    }
    # The same window read in UTC is not open now (5:30 away): the floor goes. These
    # replicas run on kwok nodes, so no metrics say the fleet is idle: it keeps its size
    # rather than shrink blind (the real-metrics scale-down is the tests above).
    doc["spec"]["scaling"]["schedules"][0]["timeZone"] = "UTC"
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))

    def no_floor() -> bool:
        autoscaling = obj(cluster, namespace)["status"]["autoscaling"]
        return bool(autoscaling["floor"]["replicas"] == 0)

    wait_for("the floor to be gone", no_floor)
    scaled = obj(cluster, namespace)
    assert scaled["spec"]["replicas"] == 3
    assert condition(scaled, "MetricsUnavailable")["status"] == "True"
