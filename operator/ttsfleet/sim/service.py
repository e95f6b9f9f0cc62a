"""The service model of one replica, calibrated from benchmarks/results/serving.json.

One replica is one Triton instance of `tts_stream` (decoupled, unbatched): it
synthesizes one request at a time, first sentence first. The benchmark shows exactly
that: closed-loop throughput stays at ~10 req/s from concurrency 1 to 8 while TTFA
grows by one service time per request ahead (52 -> 335 -> 758 ms at c = 1, 4, 8).
So a replica is a FIFO single server, and a fleet behind a round-robin balancer is
`n` of them, each an M/G/1 queue at utilisation rho = lambda * E[S] / n.

Text length (characters per request) is lognormal, median 65, sigma 0.5, clipped to
2..5,000 (the contract's limit); the first sentence is lognormal, median 30, sigma 0.5,
and never longer than the text. Service time S = a + b * chars and first-audio time
F = a + b * first-sentence chars, with a and b solved so that E[S] matches the measured
1 / 9.66 req/s and the median of F matches the measured TTFA p50 at concurrency 1.
TTFA = F + W + D, where W is the M/G/1 wait (probability rho of waiting, then an
exponential tail with the Pollaczek-Khinchine mean: Kingman's approximation) and D the
fluid backlog's delay when the fleet is overloaded.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

# From benchmarks/results/serving.json (tts_stream, one instance, closed loop).
MEASURED_C1_REQUESTS_PER_S = 9.66
MEASURED_C1_TTFA_P50_S = 0.05205
MEASURED_C1_TTFA_P95_S = 0.09947
MEASURED_TTFA_P50_S = {1: 0.05205, 4: 0.33467, 8: 0.75769}
MEASURED_BATCHED_OVER_UNBATCHED = 0.87  # dynamic batching on CPU: no gain, so none is modelled

TEXT_MEDIAN_CHARS = 65.0
TEXT_SIGMA = 0.5
FIRST_SENTENCE_MEDIAN_CHARS = 30.0
FIRST_SENTENCE_SIGMA = 0.5
MAX_CHARS = 5000
RHO_MAX = 0.98  # the stochastic wait is capped here; beyond, the fluid backlog takes over
FIRST_AUDIO_POINTS = 8  # F is carried as this many equally likely quantiles


def text_lengths(n: int, seed: int = 7) -> list[tuple[int, int]]:
    """(characters, first-sentence characters) of n requests, seeded."""
    rng = random.Random(seed)  # noqa: S311 - a seeded model, not secrets
    out = []
    for _ in range(n):
        chars = min(
            MAX_CHARS, max(2, round(rng.lognormvariate(math.log(TEXT_MEDIAN_CHARS), TEXT_SIGMA)))
        )
        first = min(
            chars,
            max(
                2,
                round(
                    rng.lognormvariate(math.log(FIRST_SENTENCE_MEDIAN_CHARS), FIRST_SENTENCE_SIGMA)
                ),
            ),
        )
        out.append((chars, first))
    return out


@dataclass(frozen=True)
class ServiceModel:
    mean_service_s: float
    service_scv: float  # squared coefficient of variation of the service time
    first_audio_s: tuple[float, ...]  # equally likely quantiles of F
    batching_efficiency: float = 1.0  # throughput multiplier of a replica (1: unbatched)

    @property
    def replica_rate(self) -> float:
        """Requests per second one replica completes when busy."""
        return self.batching_efficiency / self.mean_service_s

    def wait_tail(self, rho: float) -> tuple[float, float]:
        """(P(wait > 0), mean of the wait given it waits) at utilisation rho."""
        rho = min(max(rho, 0.0), RHO_MAX)
        s = 1 / self.replica_rate
        return rho, s * (1 + self.service_scv) / (2 * (1 - rho))

    def mean_wait(self, rho: float) -> float:
        p, theta = self.wait_tail(rho)
        return p * theta

    def within(self, x: float, rho: float, delay: float = 0.0) -> float:
        """P(TTFA <= x) at utilisation rho with a backlog delay."""
        p, theta = self.wait_tail(rho)
        total = 0.0
        for f in self.first_audio_s:
            slack = x - f - delay
            if slack >= 0:
                total += 1 - p * math.exp(-slack / theta)
        return total / len(self.first_audio_s)

    def quantile(self, q: float, rho: float, delay: float = 0.0) -> float:
        """TTFA quantile q at utilisation rho with a backlog delay (bisection, 1 ms)."""
        return self.quantile_mixed(q, ((1.0, rho, delay),))

    def quantile_mixed(self, q: float, parts: tuple[tuple[float, float, float], ...]) -> float:
        """TTFA quantile of a mixture of (weight, rho, delay) parts, as a histogram sees it."""
        weight = sum(w for w, _, _ in parts)
        if weight <= 0:
            return math.nan
        lo, hi = 0.0, max(d for _, _, d in parts) + max(self.first_audio_s)
        hi += 50 * self.wait_tail(max(r for _, r, _ in parts))[1] + 0.001
        while hi - lo > 0.001:
            mid = (lo + hi) / 2
            ok = sum(w * self.within(mid, r, d) for w, r, d in parts) / weight
            lo, hi = (mid, hi) if ok < q else (lo, mid)
        return hi

    def utilisation_for(self, slo_s: float, attainment: float = 0.95) -> float:
        """The highest utilisation at which a share `attainment` of TTFAs is under slo_s."""
        lo, hi = 0.0, RHO_MAX
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.within(slo_s, mid) >= attainment else (lo, mid)
        return lo

    def closed_loop_ttfa_p50(self, concurrency: int) -> float:
        """TTFA p50 of a closed loop at this concurrency on one replica (for calibration)."""
        f = sorted(self.first_audio_s)
        return (concurrency - 1) * self.mean_service_s + (f[len(f) // 2 - 1] + f[len(f) // 2]) / 2


def calibrated(
    samples: int = 20_000, seed: int = 7, batching_efficiency: float = 1.0
) -> ServiceModel:
    """The service model fitted to the serving benchmark (see the module docstring)."""
    lengths = text_lengths(samples, seed)
    mean_chars = sum(c for c, _ in lengths) / samples
    firsts = sorted(f for _, f in lengths)
    median_first = firsts[samples // 2]
    mean_service = 1 / MEASURED_C1_REQUESTS_PER_S
    # a + b * mean_chars = mean_service; a + b * median_first = TTFA p50 at c = 1
    b = (mean_service - MEASURED_C1_TTFA_P50_S) / (mean_chars - median_first)
    a = mean_service - b * mean_chars
    services = [a + b * c for c, _ in lengths]
    var = sum((s - mean_service) ** 2 for s in services) / samples
    points = tuple(
        a + b * firsts[int((i + 0.5) * samples / FIRST_AUDIO_POINTS)]
        for i in range(FIRST_AUDIO_POINTS)
    )
    return ServiceModel(mean_service, var / mean_service**2, points, batching_efficiency)
