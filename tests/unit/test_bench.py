"""The load generator's arithmetic (pure)."""

from __future__ import annotations

from ttsfleet import harness
from ttsfleet.bench import Sample, percentiles, summarize


def test_percentiles_pick_from_the_sorted_values() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentiles(values) == {"p50": 50.0, "p95": 95.0, "p99": 99.0}


def test_percentiles_are_the_harness_nearest_rank() -> None:
    # Nearest rank: the 2nd of 4 is the median, where rounding the index 1.5 gives the 3rd.
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentiles(values)["p50"] == harness.percentile(values, 0.5) == 2.0


def test_no_values_give_no_figures_rather_than_zeros() -> None:
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None}


def test_a_summary_counts_errors_apart_and_rates_over_the_level() -> None:
    good = [Sample(0.0, 0.05, 0.2, 2.0) for _ in range(9)]
    bad = [Sample(0.0, error="deadline exceeded")]
    result = summarize("c=2", good + bad, seconds=3.0, concurrency=2, rate=None)
    assert (result.requests, result.errors) == (10, 1)
    assert result.ttfa_ms["p99"] == 50.0
    assert result.rtf_mean == 0.1
    assert result.requests_per_second == 3.0
    assert result.audio_seconds_per_second == 6.0
    assert result.error_examples == ["deadline exceeded"]


def test_a_level_where_every_request_failed_has_no_latency_figures() -> None:
    result = summarize("c=1", [Sample(0.0, error="refused")] * 3, 1.0, 1, None)
    assert result.errors == 3
    assert result.ttfa_ms == result.latency_ms == {"p50": None, "p95": None, "p99": None}
    assert result.rtf_mean is None
