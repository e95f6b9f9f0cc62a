"""One autoscaler tick over the objects: which fleets, what the condition says (pure)."""

from __future__ import annotations

from typing import Any

from ttsfleet.autoscale.loop import Autoscaler, deletion_cost
from ttsfleet.autoscale.metrics import Signals


def fleet(name: str, mode: str = "builtin", replicas: int = 2) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "name": name},
        "spec": {
            "placement": {"mode": "cpu"},
            "replicas": replicas,
            "minReplicas": 1,
            "maxReplicas": 8,
            "scaling": {"mode": mode, "targets": {"queueDepthPerReplica": 2}},
        },
    }


def test_only_builtin_fleets_are_decided_and_their_signals_drive_them() -> None:
    objects = [fleet("a"), fleet("b", mode="external"), fleet("c", mode="manual")]
    decisions = Autoscaler().decide(
        objects, {("ns", "a"): Signals(pending_requests=12.0)}, None, now=0.0
    )
    assert [d.key for d in decisions] == [("ns", "a")]
    (a,) = decisions
    assert a.metrics[0] is False and a.scale and a.recommendation.replicas == 4


def test_no_prometheus_or_no_samples_hold_and_say_which() -> None:
    down = Autoscaler().decide([fleet("a")], None, "Prometheus at http://x: refused", now=0.0)
    assert down[0].metrics == (True, "PrometheusUnavailable", "Prometheus at http://x: refused")
    assert not down[0].scale
    empty = Autoscaler().decide([fleet("a")], {}, None, now=0.0)
    assert empty[0].metrics[1] == "NoSamples" and not empty[0].scale


def test_state_is_kept_per_fleet_and_dropped_when_the_fleet_goes() -> None:
    scaler = Autoscaler()
    scaler.decide([fleet("a"), fleet("b")], {}, None, now=0.0)
    assert set(scaler.states) == {("ns", "a"), ("ns", "b")}
    scaler.decide([fleet("a")], {}, None, now=2.0)
    assert set(scaler.states) == {("ns", "a")}


def test_deletion_costs_are_the_open_streams_within_int32() -> None:
    assert [deletion_cost(v) for v in (0.0, 2.4, 2.6, -1.0, 1e12)] == [0, 2, 3, 0, 2**31 - 1]


def test_deletion_costs_are_written_when_they_change_and_all_before_a_scale_down() -> None:
    scaler = Autoscaler()
    busy = {("ns", "a"): Signals(pending_requests=4.0, open_streams=1.0)}  # asks for 2 of 2
    streams = {("ns", "a"): {"a-1": 1.0, "a-2": 0.0}}
    (first,) = scaler.decide([fleet("a")], busy, None, now=0.0, pod_streams=streams)
    assert not first.scale and first.deletion_costs == {"a-1": 1, "a-2": 0}
    scaler.annotated(("ns", "a"), first.deletion_costs)
    (same,) = scaler.decide([fleet("a")], busy, None, now=2.0, pod_streams=streams)
    assert same.deletion_costs == {}  # nothing changed: nothing written
    moved = {("ns", "a"): {"a-1": 1.0, "a-2": 3.0}}
    (changed,) = scaler.decide([fleet("a")], busy, None, now=4.0, pod_streams=moved)
    assert changed.deletion_costs == {"a-2": 3}
    scaler.annotated(("ns", "a"), changed.deletion_costs)
    # Idle long enough (the default delays): shrinking, so every pod's cost goes first.
    idle = {("ns", "a"): Signals(pending_requests=0.0, open_streams=1.0)}
    (down,) = scaler.decide([fleet("a")], idle, None, now=1000.0, pod_streams=moved)
    assert down.scale_down and down.deletion_costs == {"a-1": 1, "a-2": 3}


def test_no_pod_streams_means_no_costs_and_gone_pods_and_fleets_are_forgotten() -> None:
    scaler = Autoscaler()
    (blind,) = scaler.decide([fleet("a")], {("ns", "a"): Signals(0.0)}, None, now=0.0)
    assert blind.deletion_costs == {}
    scaler.annotated(("ns", "a"), {"a-1": 0, "a-2": 2})
    scaler.decide([fleet("a")], {}, None, now=2.0, pod_streams={("ns", "a"): {"a-2": 2.0}})
    assert scaler.costs == {("ns", "a"): {"a-2": 2}}
    scaler.decide([], {}, None, now=4.0, pod_streams={})
    assert scaler.costs == {}
