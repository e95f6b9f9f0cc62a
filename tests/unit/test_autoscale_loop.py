"""One autoscaler tick over the objects: which fleets, what the condition says (pure)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

from ttsfleet.api.v1alpha1 import TtsDeploymentSpec
from ttsfleet.autoscale.loop import (
    Autoscaler,
    RegionView,
    deletion_cost,
    history_windows,
    predicted_floors,
    region_floors,
)
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
    assert a.metrics[0] is False and a.scale and a.recommendation.replicas == 6  # 12 / 2, a panic


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
    values = (0.0, 2.4, 2.6, -1.0, 1e12, math.inf, -math.inf, math.nan)
    assert [deletion_cost(v) for v in values] == [0, 2, 3, 0, 2**31 - 1, 2**31 - 1, 0, 0]


def test_deletion_costs_are_written_just_before_a_scale_down_and_only_if_changed() -> None:
    scaler = Autoscaler()
    busy = {("ns", "a"): Signals(pending_requests=4.0, open_streams=1.0)}  # asks for 2 of 2
    streams = {("ns", "a"): {"a-1": 1.0, "a-2": 0.0}}
    (steady,) = scaler.decide([fleet("a")], busy, None, now=0.0, pod_streams=streams)
    assert not steady.scale and steady.deletion_costs == {}  # no scale-down: no writes
    # Idle long enough (the default delays): shrinking, so the costs go first.
    idle = {("ns", "a"): Signals(pending_requests=0.0, open_streams=1.0)}
    (down,) = scaler.decide([fleet("a")], idle, None, now=1000.0, pod_streams=streams)
    assert down.scale_down and down.deletion_costs == {"a-1": 1, "a-2": 0}
    scaler.annotated(("ns", "a"), down.deletion_costs)
    moved = {("ns", "a"): {"a-1": 1.0, "a-2": 3.0}}
    (again,) = scaler.decide([fleet("a", replicas=3)], idle, None, now=1300.0, pod_streams=moved)
    assert again.scale_down and again.deletion_costs == {"a-2": 3}  # a-1's is on it already


def test_no_pod_streams_means_no_costs_and_gone_pods_and_fleets_are_forgotten() -> None:
    scaler = Autoscaler()
    (blind,) = scaler.decide([fleet("a")], {("ns", "a"): Signals(0.0)}, None, now=0.0)
    assert blind.deletion_costs == {}
    scaler.annotated(("ns", "a"), {"a-1": 0, "a-2": 2})
    scaler.decide([fleet("a")], {}, None, now=2.0, pod_streams={("ns", "a"): {"a-2": 2.0}})
    assert scaler.costs == {("ns", "a"): {"a-2": 2}}
    scaler.decide([], {}, None, now=4.0, pod_streams={})
    assert scaler.costs == {}


OFFICE = {
    "days": ["Wed"],
    "start": "08:00",
    "end": "18:00",
    "timeZone": "Europe/Berlin",
    "minReplicas": 5,
    "name": "office",
}
WEDNESDAY_MORNING = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)  # 10:00 in Berlin
SATURDAY = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)


def scheduled(replicas: int = 2) -> dict[str, Any]:
    obj = fleet("a", replicas=replicas)
    obj["spec"]["scaling"]["schedules"] = [OFFICE]
    return obj


def test_a_scheduled_floor_raises_the_fleet_and_the_decision_names_it() -> None:
    quiet = {("ns", "a"): Signals(pending_requests=0.0)}
    (d,) = Autoscaler().decide([scheduled()], quiet, None, now=0.0, wall=WEDNESDAY_MORNING)
    assert d.recommendation.replicas == 4  # x2 per decision on the way to 5
    assert "schedule office 08:00-18:00 Europe/Berlin: at least 5" in d.recommendation.reason
    assert d.floor.replicas == 5
    (off,) = Autoscaler().decide([scheduled()], quiet, None, now=0.0, wall=SATURDAY)
    assert off.floor.replicas == 0 and off.recommendation.replicas <= 2


def test_a_scheduled_floor_holds_even_without_metrics() -> None:
    (d,) = Autoscaler().decide(
        [scheduled(replicas=1)], None, "Prometheus down", now=0.0, wall=WEDNESDAY_MORNING
    )
    assert d.recommendation.replicas == 5
    assert d.recommendation.reason == (
        "metrics unavailable: schedule office 08:00-18:00 Europe/Berlin: at least 5"
        " (never scaling down blind)"
    )


def test_predicted_floors_come_from_the_peaks_of_each_fleets_past_windows() -> None:
    obj = fleet("a")
    obj["spec"]["placement"]["streamsPerReplica"] = 10
    obj["spec"]["scaling"]["predictive"] = {"periods": 2, "lookaheadMinutes": 15}
    other = fleet("b")  # no predictive floor: needs no history
    windows = history_windows([obj, other], WEDNESDAY_MORNING)
    assert len(windows) == 2 and all(keys == {("ns", "a")} for keys in windows.values())
    yesterday, before = sorted(windows, reverse=True)
    assert yesterday[0] == WEDNESDAY_MORNING - timedelta(days=1)
    peaks = {yesterday: {("ns", "a"): 25.0}, before: {("ns", "a"): 41.0}}
    floor = predicted_floors([obj, other], WEDNESDAY_MORNING, peaks)[("ns", "a")]
    assert floor.replicas == 5  # 41 streams +10 % over 10 per replica
    quiet = {("ns", "a"): Signals(pending_requests=0.0)}
    (d,) = Autoscaler().decide(
        [obj], quiet, None, now=0.0, wall=WEDNESDAY_MORNING, predicted={("ns", "a"): floor}
    )
    assert (
        d.recommendation.replicas == 4 and "predicted: 41 open streams" in d.recommendation.reason
    )


def test_proportional_signals_scale_from_the_ready_replicas_not_those_starting() -> None:
    obj = fleet("a", replicas=4)
    obj["status"] = {"readyReplicas": 2}
    # Queue time twice the 0.1 s target, measured on the 2 replicas that serve.
    slow = {("ns", "a"): Signals(queue_seconds_per_request=0.2)}
    (d,) = Autoscaler().decide([obj], slow, None, now=0.0)
    assert d.recommendation.signals["queue_time"] == 4.0  # 2 x 2, not 4 x 2
    assert not d.scale


def test_fleets_behind_a_region_get_floors_from_its_agents_view() -> None:
    objects = [fleet("joe"), fleet("other")]
    seen = [
        {"name": "eu", "trafficPercent": 100, "streams": 40},
        {"name": "us", "trafficPercent": 0, "streams": 40},
    ]
    regions = [RegionView("eu", seen, frozenset({("ns", "joe")}))]
    signals = {("ns", "joe"): Signals(open_streams=40)}
    made = region_floors(objects, signals, regions)
    assert set(made) == {("ns", "joe")}  # only the fleets behind the region's gateway
    spr = TtsDeploymentSpec.model_validate(objects[0]["spec"]).placement.streams_per_replica
    # Its own 40 and us's 40 now (the 40 its reserve held for it).
    assert made[("ns", "joe")].replicas == math.ceil((40 + 40) / spr)
    assert made[("ns", "joe")].reason == "region eu takes over from us"
    # The decision carries the floor (capped by maxReplicas, as every floor).
    (joe,) = [
        d
        for d in Autoscaler().decide(objects, signals, None, 0.0, predicted=made)
        if d.key == ("ns", "joe")
    ]
    assert joe.floor.reason == "region eu takes over from us"
