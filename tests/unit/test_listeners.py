"""How the serving bench's listeners count underruns, and the stories they ask for."""

from __future__ import annotations

import random

import pytest

from ttsfleet import listeners


def test_audio_that_comes_before_the_buffer_runs_dry_is_no_underrun() -> None:
    # 1 s of audio at t=0, then chunks that arrive while the first is still playing.
    assert listeners.play([(0.0, 1.0), (0.9, 1.0), (1.5, 2.0)]) == (0, 0.0)
    assert listeners.play([]) == (0, 0.0)


def test_a_chunk_after_the_buffer_ran_dry_is_an_underrun_and_playback_resumes_then() -> None:
    # Dry at 1.0, the next comes at 1.4 (0.4 s stall); playback resumes: dry at 1.9.
    count, stalled = listeners.play([(0.0, 1.0), (1.4, 0.5), (1.8, 1.0), (3.5, 1.0)])
    assert count == 2
    assert stalled == pytest.approx(0.4 + (3.5 - 2.9))


def test_stories_are_long_enough_and_the_same_for_the_same_seed() -> None:
    one, again = listeners.story(random.Random(3)), listeners.story(random.Random(3))
    assert one == again and len(one) >= listeners.CHARACTERS_PER_STORY


def test_the_summary_gives_percentiles_and_counts_errors_apart() -> None:
    heard = [listeners.Heard(0.05 * n, 15.0, n % 2, 0.1 * (n % 2)) for n in range(1, 21)]
    heard.append(listeners.Heard(0.0, 0.0, 0, 0.0, "UNAVAILABLE"))
    result = listeners.summary(4, heard)
    assert result["streams"] == 21 and result["errors"] == 1
    assert result["ttfa_ms"]["p50"] == 500.0 and result["ttfa_ms"]["p95"] == 950.0
    assert result["underruns"] == 10 and result["streams_with_underruns"] == 10
