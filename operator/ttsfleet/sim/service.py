"""The service model of one replica, calibrated from benchmarks/results/serving.json.

One replica is one Triton instance of `tts_stream` (decoupled, unbatched): it
synthesizes one request at a time, first sentence first. The benchmark shows exactly
that: closed-loop throughput stays at ~10 req/s from concurrency 1 to 8 while TTFA
grows by one service time per request ahead (52 -> 335 -> 758 ms at c = 1, 4, 8).
So a replica is a FIFO single server, and a fleet is `n` of them at utilisation
rho = lambda * E[S] / n; how long a request waits depends on the balancer in front
(`BALANCERS`, `ServiceModel.wait`): random routing makes each replica an M/G/1 queue.

Text length (characters per request) is lognormal, median 65, sigma 0.5, clipped to
2..5,000 (the contract's limit); the first sentence is lognormal, median 30, sigma 0.5,
and never longer than the text. Service time S = a + b * chars and first-audio time
F = a + b * first-sentence chars, with a and b solved so that E[S] matches the measured
1 / 9.66 req/s and the median of F matches the measured TTFA p50 at concurrency 1.
TTFA = F + W + D, where W is the queue wait (`Wait`; for random routing probability
rho of waiting, then an exponential tail with the Pollaczek-Khinchine mean: Kingman's
approximation) and D the fluid backlog's delay when the fleet is overloaded.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field, replace

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


BALANCERS = ("random", "round-robin", "p2c", "jsq")


def check_balancer(name: str) -> str:
    if name not in BALANCERS:
        raise ValueError(f"unknown balancer {name!r}: use one of {', '.join(BALANCERS)}")
    return name


# The M/G/1-per-replica model the goals were set on: a Kubernetes Service (kube-proxy)
# balances at random. `p2c` is what the ttsfleet gateway does; `round-robin` what the
# benchmarks' client does (`ttsfleet.client.Balancer`).
DEFAULT_BALANCER = "random"
WAITS_KEPT = 200_000  # waits remembered per model (by utilisation and fleet size)
P2C_TAIL = 1e-7  # the p2c queue-length sum stops where fewer arrivals see that many


@dataclass(frozen=True)
class Wait:
    """The queue wait an arrival meets: 0 with the probability left over, else one of
    `exponential` (probability, mean) or `normal` (probability, mean, sd) parts."""

    exponential: tuple[tuple[float, float], ...] = ()
    normal: tuple[tuple[float, float, float], ...] = ()

    @property
    def mean(self) -> float:
        return sum(p * m for p, m in self.exponential) + sum(p * m for p, m, _ in self.normal)

    @property
    def longest(self) -> float:
        """A wait few arrivals exceed (for quantile brackets)."""
        tails = [50 * m for _, m in self.exponential] + [m + 8 * sd for _, m, sd in self.normal]
        return max(tails, default=0.0)

    def within(self, slack: float) -> float:
        """P(wait <= slack)."""
        if slack < 0:
            return 0.0
        ok = 1.0
        for p, m in self.exponential:
            ok -= p * math.exp(-slack / m)
        for p, m, sd in self.normal:
            ok -= p * (1 - _normal_cdf((slack - m) / sd))
        return ok


def _normal_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _erlang_c(servers: int, load: float) -> float:
    """P(an arrival waits) in M/M/n with `load` = lambda / mu < servers."""
    term = total = 1.0
    for k in range(1, servers):
        term *= load / k
        total += term
    term *= load / servers
    top = term * servers / (servers - load)
    return top / (total + top)


@dataclass(frozen=True, eq=False)
class ServiceModel:
    """One replica's service (a FIFO single server) and the balancer in front of a fleet
    of them. `samples` are (service, first-audio) seconds of the calibration's requests
    (for the per-request simulation, `des`); `balancer` picks the closed form of the
    wait (`wait`), each checked against `des` (tests/unit/test_sim_des.py)."""

    mean_service_s: float
    service_scv: float  # squared coefficient of variation of the service time
    first_audio_s: tuple[float, ...]  # equally likely quantiles of F
    batching_efficiency: float = 1.0  # throughput multiplier of a replica (1: unbatched)
    balancer: str = DEFAULT_BALANCER
    samples: tuple[tuple[float, float], ...] = field(default=(), repr=False)
    _waits: dict[tuple[float, int], Wait] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_balancer(self.balancer)

    @property
    def replica_rate(self) -> float:
        """Requests per second one replica completes when busy."""
        return self.batching_efficiency / self.mean_service_s

    def with_balancer(self, balancer: str) -> ServiceModel:
        return replace(self, balancer=balancer, _waits={})  # its own waits

    def _wait(self, rho: float, replicas: int) -> Wait:
        s, cs2, n = 1 / self.replica_rate, self.service_scv, max(1, replicas)
        if self.balancer == "random":  # each replica an M/G/1 queue (Kingman's tail)
            return Wait(((rho, s * (1 + cs2) / (2 * (1 - rho))),))
        if self.balancer == "round-robin":  # each replica sees Erlang-n gaps: ca^2 = 1/n
            return Wait(((rho, s * (1 / n + cs2) / (2 * (1 - rho))),))
        if self.balancer == "jsq":  # one queue in front of n servers: M/G/n
            return Wait(((_erlang_c(n, rho * n), s * (1 + cs2) / (2 * n * (1 - rho))),))
        return self._p2c(rho, n)

    def _p2c(self, rho: float, n: int) -> Wait:
        """Power of two choices (with replacement) on outstanding requests: the
        mean-field queue lengths (s_k, the share of replicas holding k or more; an
        arrival joins a queue of k or more with g(s_k) = s_k / n + (1 - 1/n) s_k^2, and
        s_k = rho' g(s_{k-1})) at the load rho' at which an M/M/1 queue waits as long as
        this M/G/1 one (the low-variance service keeps queues short); k ahead wait a
        residual service and k - 1 whole ones (a normal)."""
        s, cs2 = 1 / self.replica_rate, self.service_scv
        k = rho / (1 - rho) * (1 + cs2) / 2
        effective = k / (1 + k)

        def joins(share: float) -> float:
            return share / n + (1 - 1 / n) * share * share

        residual = (1 + cs2) / 2
        parts = []
        share = effective * joins(1.0)  # s_1
        seen = joins(share)  # P(an arrival finds one or more ahead)
        ahead = 1
        while seen > P2C_TAIL and ahead < 200:
            share = effective * joins(share)
            more = joins(share)
            mean = (ahead - 1 + residual) * s
            var = ((ahead - 1) * cs2 + (1 + cs2) / 3 - residual**2) * s * s
            parts.append((seen - more, mean, math.sqrt(var)))
            seen, ahead = more, ahead + 1
        return Wait(normal=tuple(parts))

    def wait(self, rho: float, replicas: int) -> Wait:
        """The queue wait at utilisation rho on a fleet of `replicas` (rho is capped at
        RHO_MAX: beyond, the fluid backlog carries the overload)."""
        rho = round(min(max(rho, 0.0), RHO_MAX), 4)
        key = (rho, 1 if self.balancer == "random" else max(1, int(replicas)))
        found = self._waits.get(key)
        if found is None:
            if len(self._waits) > WAITS_KEPT:
                self._waits.clear()
            found = self._waits[key] = self._wait(*key)
        return found

    def mean_wait(self, rho: float, replicas: int = 1) -> float:
        return self.wait(rho, replicas).mean

    def within(self, x: float, rho: float, delay: float = 0.0, replicas: int = 1) -> float:
        """P(TTFA <= x) at utilisation rho with a backlog delay, on `replicas`."""
        wait = self.wait(rho, replicas)
        firsts = self.first_audio_s
        if wait.normal or len(wait.exponential) != 1:
            return sum(wait.within(x - f - delay) for f in firsts) / len(firsts)
        p, mean = wait.exponential[0]  # the common case, inlined: it runs per tick
        total = 0.0
        for f in firsts:
            slack = x - f - delay
            if slack >= 0:
                total += 1 - p * math.exp(-slack / mean)
        return total / len(firsts)

    def quantile(self, q: float, rho: float, delay: float = 0.0, replicas: int = 1) -> float:
        """TTFA quantile q at utilisation rho with a backlog delay (bisection, 1 ms)."""
        return self.quantile_mixed(q, ((1.0, rho, delay),), replicas)

    def quantile_mixed(
        self, q: float, parts: tuple[tuple[float, float, float], ...], replicas: int = 1
    ) -> float:
        """TTFA quantile of a mixture of (weight, rho, delay) parts, as a histogram sees it."""
        weight = sum(w for w, _, _ in parts)
        if weight <= 0:
            return math.nan
        lo, hi = 0.0, max(d for _, _, d in parts) + max(self.first_audio_s)
        hi += max(self.wait(r, replicas).longest for _, r, _ in parts) + 0.001
        while hi - lo > 0.001:
            mid = (lo + hi) / 2
            ok = sum(w * self.within(mid, r, d, replicas) for w, r, d in parts) / weight
            lo, hi = (mid, hi) if ok < q else (lo, mid)
        return hi

    def utilisation_for(self, slo_s: float, attainment: float = 0.95, replicas: int = 1) -> float:
        """The highest utilisation at which a share `attainment` of TTFAs is under slo_s."""
        lo, hi = 0.0, RHO_MAX
        for _ in range(30):
            mid = (lo + hi) / 2
            ok = self.within(slo_s, mid, replicas=replicas) >= attainment
            lo, hi = (mid, hi) if ok else (lo, mid)
        return lo

    @functools.lru_cache(maxsize=65536)  # noqa: B019
    def _need(self, rate: float, slo_s: float, attainment: float) -> int:
        mu = self.replica_rate
        lo = max(1, math.ceil(rate / (mu * RHO_MAX)))  # fewer cannot hold it at all
        if self.within(slo_s, rate / (lo * mu), replicas=lo) >= attainment:
            return lo
        hi = lo * 2
        while self.within(slo_s, rate / (hi * mu), replicas=hi) < attainment:
            hi *= 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            ok = self.within(slo_s, rate / (mid * mu), replicas=mid) >= attainment
            lo, hi = (lo, mid) if ok else (mid, hi)
        return hi

    def need(self, rate: float, slo_s: float, attainment: float = 0.95) -> int:
        """The fewest replicas on which a share `attainment` of TTFAs at `rate` requests
        per second is under slo_s (the yardstick of "need" everywhere in the simulator)."""
        if rate <= 0:
            return 1
        return self._need(float(f"{rate:.4g}"), slo_s, attainment)

    def closed_loop_ttfa_p50(self, concurrency: int) -> float:
        """TTFA p50 of a closed loop at this concurrency on one replica (for calibration)."""
        f = sorted(self.first_audio_s)
        return (concurrency - 1) * self.mean_service_s + (f[len(f) // 2 - 1] + f[len(f) // 2]) / 2


def calibrated(
    samples: int = 20_000,
    seed: int = 7,
    batching_efficiency: float = 1.0,
    balancer: str = DEFAULT_BALANCER,
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
    pairs = tuple((a + b * c, a + b * f) for c, f in lengths)
    return ServiceModel(
        mean_service, var / mean_service**2, points, batching_efficiency, balancer, pairs
    )
