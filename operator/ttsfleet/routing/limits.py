"""Rate limits with bursts: the generic cell rate algorithm (GCRA). Pure.

A limit is a sustained rate and a burst: `burst` units may go at once, and the
allowance refills at `per_second`. GCRA keeps one number per key, the theoretical
arrival time (TAT): when the key's allowance would be full again. A request of `cost`
units is admitted when, after it, the TAT is at most `burst` intervals ahead of now;
otherwise it is refused, and nothing is spent. This is the algorithm the gateway's
Redis script runs (`ttsfleet.gateway.limits`); `Local` here is what each gateway
replica runs on its own when Redis cannot be reached.

The clock is a parameter: `now` in seconds, from any monotonic or shared origin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

EPSILON = 1e-9


@dataclass(frozen=True)
class Rate:
    per_second: float
    burst: float  # units admitted at once from a full allowance

    @property
    def interval(self) -> float:
        """Seconds one unit takes to come back."""
        return 1.0 / self.per_second

    @property
    def window(self) -> float:
        """Seconds an empty allowance takes to fill: the RateLimit-Policy's `w`."""
        return self.burst / self.per_second

    def scaled(self, share: float) -> Rate:
        """This rate at `share` of its size (a replica's part when it runs alone)."""
        return Rate(self.per_second * share, max(1.0, self.burst * share))


@dataclass(frozen=True)
class Verdict:
    """One limit's answer to one request."""

    allowed: bool
    remaining: int  # units left after this request (before it, when refused)
    reset: float  # seconds until the allowance is full again
    retry_after: float = 0.0  # seconds until this request would be admitted (refused only)


def gcra(tat: float | None, now: float, rate: Rate, cost: float) -> tuple[float | None, Verdict]:
    """The key's next TAT and the verdict for a request of `cost` units; the TAT is
    unchanged when the request is refused (None: the key was never seen or is full)."""
    base = now if tat is None else max(tat, now)
    after = base + cost * rate.interval
    over = after - now - rate.window
    if over > EPSILON:
        used = base - now
        left = math.floor((rate.window - used) / rate.interval + EPSILON)
        return tat, Verdict(False, max(0, left), used, over)
    left = math.floor((rate.window - (after - now)) / rate.interval + EPSILON)
    return after, Verdict(True, max(0, left), after - now)


@dataclass(frozen=True)
class Charge:
    """`cost` units against the limit `rate` kept under `key`."""

    key: str
    rate: Rate
    cost: float


@dataclass
class Local:
    """GCRA state kept in this process: a request is admitted when every one of its
    charges is (all or nothing), and concurrent streams are counted per key.
    Keys whose allowance is full again are dropped once there are `max_keys`."""

    max_keys: int = 100_000
    tats: dict[str, float] = field(default_factory=dict)
    streams: dict[str, int] = field(default_factory=dict)

    def admit(self, charges: Sequence[Charge], now: float) -> list[Verdict]:
        verdicts = []
        nexts = []
        for charge in charges:
            tat, verdict = gcra(self.tats.get(charge.key), now, charge.rate, charge.cost)
            verdicts.append(verdict)
            nexts.append(tat)
        if all(v.allowed for v in verdicts):
            for charge, tat in zip(charges, nexts, strict=True):
                if tat is not None:
                    self.tats[charge.key] = tat
            if len(self.tats) > self.max_keys:
                self.prune(now)
        return verdicts

    def prune(self, now: float) -> None:
        self.tats = {k: tat for k, tat in self.tats.items() if tat > now}

    def open_stream(self, key: str) -> int:
        """One more stream open for `key` (the caller checked its cap): how many now."""
        count = self.streams[key] = self.streams.get(key, 0) + 1
        return count

    def close_stream(self, key: str) -> None:
        count = self.streams.get(key, 0) - 1
        if count > 0:
            self.streams[key] = count
        else:
            self.streams.pop(key, None)
