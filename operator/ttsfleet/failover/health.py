"""Is a region up? Each observer's verdict from its probes, and the quorum over observers.

An observer (a region's operator, or the witness) sends a tiny real synthesis through a
region's gateway every `probeIntervalSeconds` and reads the gateway's 5xx share. It
votes a region down after `failuresToDown` failed probes in a row, and up again after
`recoverAfter` good ones (so a flapping region stays down in its eyes).

A region is down only when a quorum agrees: two observers other than the region itself
(with three or more regions), or, with two regions, the peer and the witness. One
broken link therefore never fails a region over: the observer behind it votes down,
the others do not. A vote older than `stale_after` seconds counts for nothing, so an
observer that can no longer be heard neither fails a region over nor holds it down.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ttsfleet.api.v1alpha1 import RegionDetection

WITNESS = "witness"


@dataclass(frozen=True)
class Probe:
    """One probe's outcome: audio back (and how soon), and the gateway's 5xx share."""

    at: float
    ok: bool
    ttfa_ms: float | None = None
    error_rate: float | None = None
    why: str = ""


def failed(probe: Probe, rules: RegionDetection) -> str:
    """Why the probe counts as a failure, or '' when it does not."""
    if not probe.ok:
        return probe.why or "no audio"
    if probe.ttfa_ms is not None and probe.ttfa_ms > rules.ttfa_threshold_ms:
        return f"first audio after {probe.ttfa_ms:.0f} ms (over {rules.ttfa_threshold_ms} ms)"
    if probe.error_rate is not None and probe.error_rate >= rules.error_rate_threshold:
        return (
            f"{probe.error_rate:.0%} of requests failed"
            f" (threshold {rules.error_rate_threshold:.0%})"
        )
    return ""


@dataclass
class Observer:
    """One observer's running verdict on one region."""

    rules: RegionDetection
    up: bool = True
    failures: int = 0
    successes: int = 0
    last: float | None = None
    reason: str = ""

    def observe(self, probe: Probe) -> bool:
        """Take a probe; returns whether the region is up in this observer's eyes."""
        self.last = probe.at
        why = failed(probe, self.rules)
        if why:
            self.failures, self.successes, self.reason = self.failures + 1, 0, why
            if self.failures >= self.rules.failures_to_down:
                self.up = False
        else:
            self.failures, self.successes = 0, self.successes + 1
            if not self.up and self.successes >= self.rules.recover_after:
                self.up, self.reason = True, ""
        return self.up


@dataclass(frozen=True)
class Vote:
    observer: str
    region: str
    up: bool
    at: float


@dataclass
class Verdict:
    down: bool
    down_votes: list[str] = field(default_factory=list)
    up_votes: list[str] = field(default_factory=list)

    @property
    def suspect(self) -> bool:
        """Someone sees it down, but no quorum (a cut link, or the start of a loss)."""
        return not self.down and bool(self.down_votes)


def quorum(region: str, regions: int, votes: Mapping[str, Vote], now: float,
           stale_after: float) -> Verdict:  # fmt: skip
    """Whether `region` is down, from the latest vote of each observer (keyed by observer).

    `regions` is how many regions there are. The region's own vote never counts.
    """
    fresh = [
        v for v in votes.values()
        if v.region == region and v.observer != region and now - v.at <= stale_after
    ]  # fmt: skip
    down = sorted(v.observer for v in fresh if not v.up)
    up = sorted(v.observer for v in fresh if v.up)
    if regions <= 2:
        # The peer alone could be the one cut off: the witness must agree.
        agreed = WITNESS in down and any(o != WITNESS for o in down)
    else:
        agreed = sum(o != WITNESS for o in down) >= 2
    return Verdict(down=agreed, down_votes=down, up_votes=up)
