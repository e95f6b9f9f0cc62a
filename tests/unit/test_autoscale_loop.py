"""One autoscaler tick over the objects: which fleets, what the condition says (pure)."""

from __future__ import annotations

from typing import Any

from ttsfleet.autoscale.loop import Autoscaler
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
