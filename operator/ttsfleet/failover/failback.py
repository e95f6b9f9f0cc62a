"""A region's place in the traffic, from the quorum's verdicts over time.

    Healthy --down--> Down --up--> Stabilising --window--> Ramping 10 → 25 → 50 → 100 --> Healthy
                        ^               |                      |
                        +------down-----+---------down---------+

A region takes no traffic of its own while Down or Stabilising, its step's share
while Ramping (each step held `stepSeconds`, healthy throughout), and all of it when
Healthy. Each time it fails again during failback, or within `maxWindowSeconds` of
its last return, the stabilisation window is multiplied by `backoff` (capped at
`maxWindowSeconds`); a region that stays healthy that long gets the base window back.
So a region flapping faster than its window never takes traffic back: 0 oscillations.
"""

from __future__ import annotations

from dataclasses import dataclass

from ttsfleet.api.v1alpha1 import RegionFailback, RegionState


@dataclass
class Failback:
    rules: RegionFailback
    state: RegionState = RegionState.HEALTHY
    since: float = 0.0
    step: int = 0
    window: float = -1.0
    returned_at: float | None = None
    failures: int = 0

    def __post_init__(self) -> None:
        if self.window < 0:
            self.window = float(self.rules.stabilisation_seconds)

    @property
    def percent(self) -> int:
        """The share (%) of its own clients' traffic the region takes now."""
        if self.state in (RegionState.HEALTHY, RegionState.SUSPECT):
            return 100
        if self.state == RegionState.RAMPING:
            return self.rules.steps[self.step]
        return 0

    def _enter(self, state: RegionState, now: float) -> None:
        self.state, self.since = state, now

    def update(self, down: bool, suspect: bool, now: float) -> RegionState:
        """Take the quorum's verdict at `now`; returns the state after it."""
        rules = self.rules
        if down:
            if self.state != RegionState.DOWN:
                back = self.returned_at
                recent = back is not None and now - back < rules.max_window_seconds
                base = float(rules.stabilisation_seconds)
                if self.state in (RegionState.STABILISING, RegionState.RAMPING) or recent:
                    grown = min(self.window * rules.backoff, float(rules.max_window_seconds))
                    self.window = max(grown, base)
                else:
                    self.window = base
                self.failures += 1
                self._enter(RegionState.DOWN, now)
            return self.state
        if self.state == RegionState.DOWN:
            self._enter(RegionState.STABILISING, now)
        if self.state == RegionState.STABILISING and now - self.since >= self.window:
            self.step = 0
            self._enter(RegionState.RAMPING, now)
            if self.rules.steps[0] >= 100:
                self._returned(now)
        elif self.state == RegionState.RAMPING and now - self.since >= rules.step_seconds:
            if self.step + 1 < len(rules.steps):
                self.step += 1
                self._enter(RegionState.RAMPING, now)
                if rules.steps[self.step] >= 100:
                    self._returned(now)
            else:
                self._returned(now)
        if self.state in (RegionState.HEALTHY, RegionState.SUSPECT):
            self._enter_keep(RegionState.SUSPECT if suspect else RegionState.HEALTHY, now)
        return self.state

    def _returned(self, now: float) -> None:
        self.returned_at = now
        self._enter(RegionState.HEALTHY, now)

    def _enter_keep(self, state: RegionState, now: float) -> None:
        if state != self.state:
            self._enter(state, now)

    def resume(self, state: RegionState, percent: int, now: float) -> None:
        """Take up where a peer is (an agent that starts adopts its peers' view): Down or
        Stabilising from now, or Ramping at the step that gives `percent`."""
        if state == RegionState.DOWN or (percent <= 0 and state != RegionState.STABILISING):
            self._enter(RegionState.DOWN, now)
        elif state == RegionState.STABILISING:
            self._enter(RegionState.STABILISING, now)
        elif state == RegionState.RAMPING:
            below = [i for i, step in enumerate(self.rules.steps) if step <= percent]
            self.step = below[-1] if below else 0
            self._enter(RegionState.RAMPING, now)
