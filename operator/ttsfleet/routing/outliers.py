"""Outlier ejection, as Envoy's consecutive-errors detector does it. Pure.

A replica that fails `consecutive` requests in a row (errors or timeouts before its
first audio) is ejected for `base_seconds` x 2^(times ejected before), at most
`max_seconds`; it comes back by itself when that time is over. A success resets its
run of failures, and each `base_seconds` x 10 of ejection-free time forgets one past
ejection, so a replica that recovered is not punished for ever. At most
`max_ejected_share` of the replicas (but always at least one, if there are two or
more) are out at once: a fleet-wide problem is not made worse by ejecting everyone.

`Outliers` is immutable: `record` returns the next state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType


@dataclass(frozen=True)
class Policy:
    consecutive: int = 3
    base_seconds: float = 5.0
    max_seconds: float = 300.0
    max_ejected_share: float = 0.5


@dataclass(frozen=True)
class Health:
    """One replica's record."""

    failures: int = 0  # in a row
    ejections: int = 0  # how many times it was ejected (decays while healthy)
    ejected_until: float = -math.inf
    last_change: float = 0.0  # when `ejections` last rose or decayed


EMPTY: Mapping[str, Health] = MappingProxyType({})


@dataclass(frozen=True)
class Outliers:
    policy: Policy = field(default_factory=Policy)
    health: Mapping[str, Health] = field(default_factory=lambda: EMPTY)

    def ejected(self, now: float) -> frozenset[str]:
        """Replicas out at `now`."""
        return frozenset(a for a, h in self.health.items() if h.ejected_until > now)

    def usable(self, addresses: Iterable[str], now: float) -> list[str]:
        """`addresses` without the ejected ones; all of them if that would leave none
        (better a replica that failed than no answer at all)."""
        candidates = list(addresses)
        out = self.ejected(now)
        kept = [a for a in candidates if a not in out]
        return kept or candidates

    def record(self, address: str, ok: bool, now: float, fleet_size: int) -> Outliers:
        """The state after `address` answered (`ok`) or failed, at `now`, in a fleet of
        `fleet_size` replicas."""
        policy = self.policy
        health = _decayed(self.health.get(address, Health(last_change=now)), policy, now)
        if ok:
            health = replace(health, failures=0)
        else:
            health = replace(health, failures=health.failures + 1)
            already_out = self.ejected(now)
            room = max(1, math.floor(policy.max_ejected_share * fleet_size))
            if (
                health.failures >= policy.consecutive
                and health.ejected_until <= now
                and fleet_size >= 2
                and len(already_out - {address}) < room
            ):
                seconds = min(policy.base_seconds * 2**health.ejections, policy.max_seconds)
                health = Health(0, health.ejections + 1, now + seconds, now)
        merged = dict(self.health)
        merged[address] = health
        return replace(self, health=MappingProxyType(merged))

    def forget(self, keep: Iterable[str]) -> Outliers:
        """Only the replicas in `keep` (the others left the fleet)."""
        wanted = set(keep)
        kept = {a: h for a, h in self.health.items() if a in wanted}
        return replace(self, health=MappingProxyType(kept))


def _decayed(health: Health, policy: Policy, now: float) -> Health:
    """One past ejection forgotten per `base_seconds` x 10 spent not ejected."""
    if health.ejections == 0 or health.ejected_until > now:
        return health
    since = max(health.last_change, health.ejected_until)
    steps = int((now - since) // (policy.base_seconds * 10))
    if steps <= 0:
        return health
    forgotten = min(steps, health.ejections)
    return replace(health, ejections=health.ejections - forgotten, last_change=now)
