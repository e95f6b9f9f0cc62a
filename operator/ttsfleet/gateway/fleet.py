"""One fleet as a gateway sees it: its ready replicas, the work outstanding at each,
their health, and the fleet's circuit breaker. The decisions are `routing`'s; this
keeps the state they read.

Not thread-safe: the gateway's event loop owns it.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

from ttsfleet.routing import balance, breaker, outliers
from ttsfleet.routing.balance import Load

LATENCY_DECAY_SECONDS = 5.0  # a faster answer pulls the estimate down this fast
LATENCY_IDLE_SECONDS = 30.0  # an unmeasured replica's estimate fades to unknown


class Fleet:
    def __init__(
        self, key: str, *, round_robin: bool = False, seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        policy: outliers.Policy | None = None,
    ) -> None:  # fmt: skip
        self.key = key
        self.round_robin = round_robin
        self.addresses: tuple[str, ...] = ()
        self.load: dict[str, Load] = {}
        self.health = outliers.Outliers(policy or outliers.Policy())
        self.sample_rate = 22_050  # until a replica says otherwise
        # Each replica's peak-EWMA time to first audio and when it was last measured.
        self.latency: dict[str, tuple[float, float]] = {}
        self._rng = random.Random(seed)  # noqa: S311 - load spreading, not secrets
        self._clock = clock
        self._turn = 0
        self.breaker = breaker.Breaker()
        self.max_streams: int | None = None  # a replica's queue limit (streams open)
        self.on_breaker: Callable[[breaker.State], None] | None = None

    def set_breaker_policy(self, policy: breaker.Policy) -> None:
        if policy != self.breaker.policy:
            self.breaker = breaker.Breaker(policy)

    def breaker_allows(self) -> bool:
        """Whether the breaker lets a request through now (counting a half-open trial)."""
        now = self._clock()
        before = self.breaker.current(now)
        self.breaker, allowed = self.breaker.allow(now)
        self._breaker_moved(before, now)
        return allowed

    def breaker_record(self, ok: bool, seconds: float) -> None:
        """An answer (first audio after `seconds`) or a failure, for the breaker."""
        now = self._clock()
        before = self.breaker.current(now)
        self.breaker = self.breaker.record(now, self.breaker.policy.outcome(ok, seconds))
        self._breaker_moved(before, now)

    def breaker_retry_after(self) -> float:
        """Seconds until the breaker lets a trial through (0 unless open)."""
        return self.breaker.retry_after(self._clock())

    def _breaker_moved(self, before: breaker.State, now: float) -> None:
        after = self.breaker.current(now)
        if after is not before and self.on_breaker is not None:
            self.on_breaker(after)

    def overloaded(self) -> bool:
        """Whether every usable replica is at its queue limit (no limit: never)."""
        if self.max_streams is None or not self.addresses:
            return False
        usable = self.health.usable(self.addresses, self._clock())
        return all(self.load.get(a, balance.IDLE).streams >= self.max_streams for a in usable)

    def set_addresses(self, addresses: Iterable[str]) -> None:
        """The fleet's ready replicas now; work outstanding at one that left stays
        counted until it ends (its streams are still open)."""
        self.addresses = tuple(sorted(set(addresses)))
        self.health = self.health.forget(self.addresses)
        self.latency = {a: v for a, v in self.latency.items() if a in self.addresses}

    def pick(
        self, characters: int, exclude: frozenset[str] = frozenset(), session: str | None = None
    ) -> str | None:
        """The replica for a request of `characters`, not one in `exclude`; None if none."""
        usable = self.health.usable(self.addresses, self._clock())
        if self.round_robin:
            pool = [a for a in usable if a not in exclude]
            self._turn += 1
            return balance.round_robin(pool, self._turn)
        return balance.choose(
            usable, self._weighed(usable), self._rng, session=session, exclude=exclude,
            request_characters=characters,
        )  # fmt: skip

    def _weighed(self, usable: list[str]) -> dict[str, Load]:
        """Outstanding work with each replica's latency, faded towards unknown (the
        mean of the others) while it goes unmeasured, so a replica once slow is tried
        again in time."""
        now = self._clock()
        out = {}
        for address in usable:
            load = self.load.get(address, balance.IDLE)
            latency, at = self.latency.get(address, (0.0, now))
            fade = math.exp(-(now - at) / LATENCY_IDLE_SECONDS)
            out[address] = replace(load, latency=latency * fade)
        return out

    def observe(self, address: str, seconds: float) -> None:
        """A replica's time to first audio (or, for a failure, the time it was given)."""
        now = self._clock()
        current, at = self.latency.get(address, (0.0, now))
        value = balance.peak_ewma(current, seconds, now - at, LATENCY_DECAY_SECONDS)
        self.latency[address] = (value, now)

    def begin(self, address: str, characters: int) -> None:
        now = self.load.get(address, balance.IDLE)
        self.load[address] = Load(now.characters + characters, now.streams + 1)

    def end(self, address: str, characters: int) -> None:
        now = self.load.get(address, balance.IDLE)
        left = replace(now, characters=now.characters - characters, streams=now.streams - 1)
        if left.streams <= 0 and address not in self.addresses:
            self.load.pop(address, None)
        else:
            self.load[address] = left

    def record(self, address: str, ok: bool) -> None:
        """`address` answered (first audio) or failed before it."""
        if address in self.addresses:
            self.health = self.health.record(address, ok, self._clock(), len(self.addresses))

    @property
    def queued_characters(self) -> int:
        return sum(load.characters for load in self.load.values())

    @property
    def streams(self) -> int:
        return sum(load.streams for load in self.load.values())
