"""A circuit breaker per fleet, as the gateway runs it. Pure.

Closed: requests go to the fleet, and their outcomes are counted in one-second
buckets over the last `window_seconds`: a failure (a replica failed or none answered
before the first audio) or a slow answer (its first audio took longer than
`slow_seconds`: the queue the request waited in, as the gateway sees it). Once the
window holds `min_requests`, a share of failures at or over `error_rate`, or of slow
answers at or over `slow_rate`, opens the breaker.

Open: requests go to the route's fallback fleet (or get 503 with Retry-After) for
`open_seconds`, doubled each time a trial fails, at most `max_open_seconds`.

Half-open: `probes` requests at a time are let through as trials; that many good
answers in a row close the breaker (the window starts empty, the open time goes back
to `open_seconds`); one bad answer opens it again.

`Breaker` is immutable: `allow` and `record` return the next state; `now` is seconds
on any monotonic clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class Outcome(StrEnum):
    OK = "ok"
    SLOW = "slow"
    FAILED = "failed"


@dataclass(frozen=True)
class Policy:
    window_seconds: int = 10
    min_requests: int = 5
    error_rate: float = 0.5
    slow_seconds: float = 2.0
    slow_rate: float = 0.8
    open_seconds: float = 2.0
    max_open_seconds: float = 8.0
    probes: int = 3

    def outcome(self, ok: bool, seconds: float) -> Outcome:
        """What an answer (or a failure) after `seconds` counts as."""
        if not ok:
            return Outcome.FAILED
        return Outcome.SLOW if seconds > self.slow_seconds else Outcome.OK


@dataclass(frozen=True)
class Bucket:
    second: int
    requests: int = 0
    failed: int = 0
    slow: int = 0


@dataclass(frozen=True)
class Breaker:
    policy: Policy = field(default_factory=Policy)
    state: State = State.CLOSED
    buckets: tuple[Bucket, ...] = ()
    opened_at: float = 0.0
    open_for: float = 0.0
    trials: int = 0  # trials let through in this half-open period
    passed: int = 0  # good answers in a row in this half-open period

    def current(self, now: float) -> State:
        """The state at `now`: an open breaker whose time is over is half-open."""
        if self.state is State.OPEN and now >= self.opened_at + self.open_for:
            return State.HALF_OPEN
        return self.state

    def retry_after(self, now: float) -> float:
        """Seconds until the breaker lets a trial through (0 unless open)."""
        if self.current(now) is not State.OPEN:
            return 0.0
        return self.opened_at + self.open_for - now

    def allow(self, now: float) -> tuple[Breaker, bool]:
        """Whether a request may go to the fleet now, and the state after it does."""
        state = self.current(now)
        if state is State.CLOSED:
            return self, True
        if state is State.OPEN:
            return self, False
        me = self if self.state is State.HALF_OPEN else self._half_open()
        if me.trials - me.passed >= self.policy.probes:  # as many trials out as allowed
            return me, False
        return replace(me, trials=me.trials + 1), True

    def record(self, now: float, outcome: Outcome) -> Breaker:
        """An answer from the fleet (or its failure) at `now`."""
        state = self.current(now)
        if state is State.OPEN:
            return self  # a request from before it opened: already counted as the reason
        if state is State.HALF_OPEN:
            me = self if self.state is State.HALF_OPEN else self._half_open()
            if outcome is not Outcome.OK:
                return me._open(now, min(me.open_for * 2, self.policy.max_open_seconds))
            if me.passed + 1 >= self.policy.probes:
                return Breaker(self.policy)
            return replace(me, passed=me.passed + 1)
        buckets = self._count(now, outcome)
        me = replace(self, buckets=buckets)
        return me._open(now, self.policy.open_seconds) if me._tripped() else me

    def counts(self) -> tuple[int, int, int]:
        """Requests, failures and slow answers in the window (as last recorded)."""
        return (
            sum(b.requests for b in self.buckets),
            sum(b.failed for b in self.buckets),
            sum(b.slow for b in self.buckets),
        )

    def _count(self, now: float, outcome: Outcome) -> tuple[Bucket, ...]:
        second = int(now)
        oldest = second - self.policy.window_seconds + 1
        kept = [b for b in self.buckets if b.second >= oldest]
        last = kept.pop() if kept and kept[-1].second == second else Bucket(second)
        kept.append(
            Bucket(
                second,
                last.requests + 1,
                last.failed + (outcome is Outcome.FAILED),
                last.slow + (outcome is Outcome.SLOW),
            )
        )
        return tuple(kept)

    def _tripped(self) -> bool:
        requests, failed, slow = self.counts()
        if requests < self.policy.min_requests:
            return False
        policy = self.policy
        return failed >= policy.error_rate * requests or slow >= policy.slow_rate * requests

    def _open(self, now: float, seconds: float) -> Breaker:
        return Breaker(self.policy, State.OPEN, (), now, seconds)

    def _half_open(self) -> Breaker:
        return replace(self, state=State.HALF_OPEN, trials=0, passed=0)
