"""Measures of audio that need no model: is a stream's audio what was sent?

`join_energy`: how sharply audio breaks at given sample positions (where chunks were
joined), against how sharply the same audio breaks anywhere else. A join that lost or
repeated samples, or where the level jumped, is a click: a burst of curvature (energy
in the second difference) far above the curvature around it. Voiced speech has bursts
like that of its own (a glottal closure is one), so a join is judged against the
sharpest the signal is elsewhere, not against a fixed threshold, and the measure works
on any rate and any codec's output (decoded), at any level.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

CENTRE_S = 0.00005  # half of the span a click's curvature is summed over (one sample at 22 kHz)
FLOOR = 1e-3  # curvature below this share of the signal's mean is silence, not a context


def click_strength(
    samples: npt.ArrayLike, sample_rate: int, window_s: float = 0.002
) -> npt.NDArray[np.float64]:
    """At each sample: the second difference's energy per sample over ~0.1 ms centred
    there, over its energy per sample in the `window_s` on either side (the centre left
    out). Smooth audio and steady noise are about 1 however loud; a step, a gap or an
    impulse is far above 1. Contexts quieter than a thousandth of the signal's mean
    curvature count as that much, so that a step out of silence is a click while the
    rounding noise of silence is not."""
    signal = np.asarray(samples, dtype=np.float64).reshape(-1)
    count = len(signal)
    energy = np.zeros(count)
    energy[1:-1] = (signal[2:] - 2 * signal[1:-1] + signal[:-2]) ** 2
    total = np.concatenate([[0.0], np.cumsum(energy)])
    at = np.arange(count)
    span = max(1, round(sample_rate * CENTRE_S))
    window = max(1, round(sample_rate * window_s))
    low, high = np.clip(at - span, 0, count), np.clip(at + span + 1, 0, count)
    outer_low = np.clip(at - span - window, 0, count)
    outer_high = np.clip(at + span + 1 + window, 0, count)
    centre = total[high] - total[low]
    around = total[outer_high] - total[outer_low] - centre
    around_count = np.maximum(outer_high - outer_low - (high - low), 1)
    floor = max(float(energy.mean()) * FLOOR, 1e-30)
    strength: npt.NDArray[np.float64] = (centre / (high - low)) / np.maximum(
        around / around_count, floor
    )
    return strength


def join_energy(
    samples: npt.ArrayLike, joins: Sequence[int] | npt.ArrayLike, sample_rate: int, *,
    reach_s: float = 0.0, window_s: float = 0.002, percentile: float = 100.0,
) -> float:  # fmt: skip
    """How loud the loudest click at `joins` (sample positions) is, against the signal's
    own: the largest `click_strength` within `reach_s` of a join, over the `percentile`
    of `click_strength` at every sample farther from the joins (by default the largest:
    the sharpest the audio is anywhere else). Above 1: a join breaks the audio more
    sharply than anything the voice itself does; untouched speech is about 0.3.

    `reach_s` allows for joins that are only known to within that much (in decoded
    lossy audio, after a codec's delay was measured)."""
    strength = click_strength(samples, sample_rate, window_s)
    positions = np.asarray(joins, dtype=np.int64).reshape(-1)
    if not len(positions):
        return 0.0
    if positions.min() < 0 or positions.max() >= len(strength):
        raise ValueError(f"joins must lie in the signal's {len(strength)} samples")
    reach = round(reach_s * sample_rate)
    guard = reach + round(window_s * sample_rate) + 1  # a click lifts its neighbours' figure
    near = np.zeros(len(strength), dtype=bool)
    loudest = 0.0
    for join in positions:
        near[max(join - guard, 0) : join + guard + 1] = True
        loudest = max(loudest, float(strength[max(join - reach, 0) : join + reach + 1].max()))
    if near.all():
        raise ValueError("no samples away from the joins to compare them with")
    reference = float(np.percentile(strength[~near], percentile))
    if reference <= 0:
        return 0.0 if loudest <= 0 else float("inf")
    return loudest / reference
