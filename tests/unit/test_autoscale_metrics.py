"""Parsing Prometheus vectors into per-fleet signals (pure)."""

from __future__ import annotations

from ttsfleet.autoscale.metrics import (
    POD_STREAMS,
    QUERIES,
    Signals,
    parse,
    parse_peaks,
    parse_pod_streams,
)


def sample(ns: str, name: str, value: str) -> dict[str, object]:
    return {"metric": {"namespace": ns, "deployment": name}, "value": [1.0, value]}


def test_signals_are_grouped_per_fleet_and_missing_ones_stay_none() -> None:
    got = parse(
        {
            "pending_requests": [sample("a", "joe", "6"), sample("b", "joe", "0")],
            "ttfa_p95_seconds": [sample("a", "joe", "0.25"), sample("b", "joe", "NaN")],
            "open_streams": [sample("a", "joe", "3")],
        }
    )
    assert got[("a", "joe")] == Signals(
        pending_requests=6.0, ttfa_p95_seconds=0.25, open_streams=3.0
    )
    # NaN (no requests in the window) is "not measured", not a number to act on.
    assert got[("b", "joe")] == Signals(pending_requests=0.0)


def test_every_query_groups_by_the_labels_the_scrape_config_sets() -> None:
    for query in QUERIES.values():
        assert "namespace, deployment" in query


def test_open_streams_per_pod_are_grouped_per_fleet() -> None:
    def pod(ns: str, name: str, pod: str, value: str) -> dict[str, object]:
        return {"metric": {"namespace": ns, "deployment": name, "pod": pod}, "value": [1.0, value]}

    got = parse_pod_streams(
        [pod("a", "joe", "joe-1", "2"), pod("a", "joe", "joe-2", "0"), pod("b", "joe", "x", "NaN")]
    )
    assert got == {("a", "joe"): {"joe-1": 2.0, "joe-2": 0.0}}
    assert "namespace, deployment, pod" in POD_STREAMS


def test_peaks_are_each_fleets_highest_sample_in_the_range() -> None:
    matrix = [
        {"metric": {"namespace": "ns", "deployment": "a"},
         "values": [[1.0, "3"], [31.0, "7"], [61.0, "NaN"]]},
        {"metric": {"namespace": "ns", "deployment": "b"}, "values": [[1.0, "NaN"]]},
        {"metric": {"namespace": "ns"}, "values": [[1.0, "9"]]},
    ]  # fmt: skip
    assert parse_peaks(matrix) == {("ns", "a"): 7.0}
