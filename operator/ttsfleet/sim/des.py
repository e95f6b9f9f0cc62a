"""Per-request discrete-event simulation of a fleet of FIFO replicas behind a balancer.

Every request is an event: it arrives (a Poisson process on the given rate, seeded),
the balancer picks a Ready replica, the replica serves its requests one at a time in
arrival order (the service model's single server), and the request's time to first
audio is its wait plus its own first-audio time. Service and first-audio times are
drawn together from the calibrated text-length distribution (`ServiceModel.samples`).

Two uses:
- the yardstick of the service model's closed forms (`ServiceModel.within` per
  balancer): `steady` runs a fixed fleet at a fixed utilisation;
- the replay of a CSV trace (`Replay`, one tick at a time inside `engine.simulate`):
  a trace read from real traffic already carries its per-second noise, and a
  steady-state formula per second would count that noise twice (a one-second blip
  to rho 0.95 would get the whole steady-state wait of rho 0.95, which takes minutes
  to build); per-request arrivals build queues only as fast as they really do.

Balancers (`service.BALANCERS`): `random` (what a Kubernetes Service's kube-proxy does),
`round-robin`, `p2c` (power of two choices on outstanding requests: what the ttsfleet
gateway does) and `jsq` (to the replica whose queue empties first: with FIFO replicas
this is exactly one central queue in front of all replicas, the bound no balancer
beats).
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections import deque
from dataclasses import dataclass

from ttsfleet.sim.service import check_balancer

# The TTFA histogram's bucket bounds, as the model exports it (serving/backend.py).
TTFA_BUCKETS = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)


@dataclass(frozen=True)
class Tick:
    """What a replayed tick did, counted as Triton and the model export it."""

    arrivals: int
    within: int  # of them, with TTFA under the SLO
    served: int  # requests completed within the tick
    in_system: int  # requests arrived and not completed, at its end
    queued: int  # of those, not yet started (Triton's pending count)
    waited_s: float  # queue time of the tick's arrivals, summed
    busy_s: float  # service time of the tick's arrivals, summed
    buckets: tuple[int, ...]  # TTFA counts per TTFA_BUCKETS bound (the last: above all)


def histogram_quantile(q: float, buckets: list[float] | tuple[float, ...]) -> float | None:
    """Prometheus' histogram_quantile over non-cumulative bucket counts (TTFA_BUCKETS,
    then +Inf): linear within the bucket, the highest finite bound past it."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank, below = q * total, 0.0
    for i, count in enumerate(buckets):
        if below + count >= rank and count > 0:
            if i == len(TTFA_BUCKETS):
                return TTFA_BUCKETS[-1]
            lower = TTFA_BUCKETS[i - 1] if i else 0.0
            return lower + (TTFA_BUCKETS[i] - lower) * (rank - below) / count
        below += count
    return TTFA_BUCKETS[-1]


@dataclass(frozen=True)
class Served:
    """What one stretch of arrivals did (see `Replay.run`)."""

    arrivals: int
    within: int  # of them, with TTFA under the SLO
    waited_s: float  # their queue time, summed
    busy_s: float  # their service time, summed
    buckets: tuple[int, ...]  # their TTFAs per TTFA_BUCKETS bound (the last: above all)
    ttfa_s: list[float]  # their TTFAs, when asked for (`run(keep=True)`)


class Replay:
    """The fleet, request by request: replicas come and go between calls of `run`.
    Completions and service starts are counted per tick of `tick_s` as they are
    scheduled, so a tick's served and queued counts cost nothing per replica."""

    def __init__(
        self,
        samples: tuple[tuple[float, float], ...],
        balancer: str,
        seed: int = 3,
        slo_s: float = 0.3,
        tick_s: float = 1.0,
    ) -> None:
        if not samples:
            raise ValueError("a replay needs (service, first-audio) samples")
        self.service = [s for s, _ in samples]
        self.first = [f for _, f in samples]
        self.balancer = check_balancer(balancer)
        self.rng = random.Random(seed)  # noqa: S311 - a seeded model, not secrets
        self.slo_s, self.tick_s = slo_s, tick_s
        self.free: list[float] = []  # per Ready replica: when its last request finishes
        self.done: list[deque[float]] = []  # p2c: completion times still ahead, per replica
        self.heap: list[tuple[float, int]] = []  # jsq: (free at, replica)
        self.turn = 0
        self.finishing: dict[int, int] = {}  # completions per tick index
        self.starting: dict[int, int] = {}  # service starts per tick index
        self.arrived = self.completed = self.started = 0

    def resize(self, ready: int, now: float) -> None:
        """`ready` replicas from `now` on: new ones start idle, removed ones (the last
        added first) finish what they hold and take nothing more."""
        if ready == len(self.free):
            return
        del self.free[ready:], self.done[ready:]
        while len(self.free) < ready:
            self.free.append(now)
            self.done.append(deque())
        if self.balancer == "jsq":
            self.heap = [(f, i) for i, f in enumerate(self.free)]
            heapq.heapify(self.heap)

    def run(  # noqa: PLR0915 - one hot loop, inlined for speed
        self, rate: float, start: float, seconds: float, keep: bool = False
    ) -> Served:
        """Poisson arrivals at `rate` per second over [start, start + seconds) (a fresh
        draw from `start` is the same process: the exponential forgets)."""
        n = len(self.free)
        if not n:
            raise ValueError("no Ready replica: the simulator keeps at least one")
        end, dt, slo = start + seconds, self.tick_s, self.slo_s
        free, done, heap, service, first = self.free, self.done, self.heap, self.service, self.first
        finishing, starting = self.finishing, self.starting
        draw, uniform = self.rng.expovariate, self.rng.random
        count, balancer, bounds = len(service), self.balancer, TTFA_BUCKETS
        buckets = [0] * (len(bounds) + 1)
        ttfa_s: list[float] = []
        arrivals = within = 0
        waited = busy = 0.0
        t = start
        while rate > 0:
            t += draw(rate)
            if t >= end:
                break
            if balancer == "random":
                i = int(uniform() * n)
            elif balancer == "round-robin":
                i = self.turn = (self.turn + 1) % n
            elif balancer == "p2c":
                a, b = int(uniform() * n), int(uniform() * n)
                da, db = done[a], done[b]
                while da and da[0] <= t:
                    da.popleft()
                while db and db[0] <= t:
                    db.popleft()
                i = a if len(da) <= len(db) else b
            else:
                i = heapq.heappop(heap)[1]
            k = int(uniform() * count)
            begin = free[i] if free[i] > t else t
            finish = free[i] = begin + service[k]
            if balancer == "p2c":
                done[i].append(finish)
            elif balancer == "jsq":
                heapq.heappush(heap, (finish, i))
            ttfa = begin - t + first[k]
            arrivals += 1
            within += ttfa <= slo
            waited += begin - t
            busy += service[k]
            buckets[bisect.bisect_left(bounds, ttfa)] += 1
            if keep:
                ttfa_s.append(ttfa)
            at = int(finish / dt)
            finishing[at] = finishing.get(at, 0) + 1
            at = int(begin / dt)
            starting[at] = starting.get(at, 0) + 1
        self.arrived += arrivals
        return Served(arrivals, within, waited, busy, tuple(buckets), ttfa_s)

    def tick(self, rate: float, ready: int, start: float) -> Tick:
        """One tick of a replayed trace: `ready` replicas, Poisson arrivals at `rate`."""
        self.resize(ready, start)
        out = self.run(rate, start, self.tick_s)
        index = round(start / self.tick_s)
        served = self.finishing.pop(index, 0)
        self.completed += served
        self.started += self.starting.pop(index, 0)
        return Tick(
            out.arrivals, out.within, served, self.arrived - self.completed,
            self.arrived - self.started, out.waited_s, out.busy_s, out.buckets,
        )  # fmt: skip


def steady(
    samples: tuple[tuple[float, float], ...],
    balancer: str,
    replicas: int,
    rho: float,
    requests: int = 100_000,
    seed: int = 3,
) -> list[float]:
    """TTFAs (seconds) of `requests` requests through a fixed fleet at utilisation
    `rho`, after a warm-up of a tenth as many (not returned)."""
    mean = sum(s for s, _ in samples) / len(samples)
    rate = rho * replicas / mean
    warm = requests // 10
    span = (requests + warm) / rate
    replay = Replay(samples, balancer, seed, tick_s=span)
    replay.resize(replicas, 0.0)
    out = replay.run(rate, 0.0, span, keep=True).ttfa_s
    return out[warm : warm + requests]


def share_within(ttfa: list[float], slo_s: float) -> float:
    ordered = sorted(ttfa)
    return bisect.bisect_right(ordered, slo_s) / len(ordered) if ordered else math.nan
