"""Floors under the autoscaler: scheduled (time windows in a time zone) and predicted. Pure.

A floor is the fewest replicas the fleet keeps whatever the signals say, so that
capacity is there before a known rise instead of after the queue shows it.

- Scheduled: `spec.scaling.schedules`, each a weekly window (days, start, end) in an
  IANA time zone with its `minReplicas`. A window whose end is before its start
  crosses midnight and belongs to the day it starts. The largest active floor wins.
- Predicted: `spec.scaling.predictive`. For each of the last `periods` days (or
  weeks), the peak of the fleet's open streams in the window that starts at this
  time of day (in its `timeZone`) one period ago and lasts `lookaheadMinutes`; the
  floor is the largest of those peaks, plus `headroomPercent`, over
  `streamsPerReplica`. The peaks come from Prometheus range queries (see
  `metrics.PrometheusSource.peaks`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from fractions import Fraction
from zoneinfo import ZoneInfo

from ttsfleet.api.v1alpha1 import PredictiveSpec, ScheduleSpec

DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


@dataclass(frozen=True)
class Floor:
    replicas: int
    reason: str


NONE = Floor(0, "")


def _clock(text: str) -> time:
    hours, minutes = text.split(":")
    return time(int(hours), int(minutes))


def schedule_active(schedule: ScheduleSpec, now: datetime) -> bool:
    """Whether `now` (aware) falls in the schedule's weekly window, in its time zone."""
    local = now.astimezone(ZoneInfo(schedule.time_zone))
    start, end = _clock(schedule.start), _clock(schedule.end)
    days: Sequence[str] = schedule.days or DAYS
    today, yesterday = DAYS[local.weekday()], DAYS[(local.weekday() - 1) % 7]
    clock = local.time().replace(tzinfo=None)
    if start < end:
        return today in days and start <= clock < end
    # Crosses midnight: the evening part today, or the early part of a window begun yesterday.
    return (today in days and clock >= start) or (yesterday in days and clock < end)


def scheduled_floor(schedules: Sequence[ScheduleSpec], now: datetime) -> Floor:
    """The largest `minReplicas` of the schedules active at `now`."""
    active = [s for s in schedules if schedule_active(s, now)]
    if not active:
        return NONE
    top = max(active, key=lambda s: s.min_replicas)
    days = ",".join(top.days) if top.days else "daily"
    return Floor(
        top.min_replicas,
        f"schedule {top.name or days} {top.start}-{top.end} {top.time_zone}: "
        f"at least {top.min_replicas}",
    )


def history_windows(predictive: PredictiveSpec, now: datetime) -> list[tuple[datetime, datetime]]:
    """The past windows whose peaks predict the next `lookaheadMinutes` (oldest last)."""
    period = timedelta(days=7 if predictive.period == "week" else 1)
    ahead = timedelta(minutes=predictive.lookahead_minutes)
    # Arithmetic on an aware local time is wall-clock arithmetic: "the same time of
    # day" stays the same across a daylight-saving change.
    local = now.astimezone(ZoneInfo(predictive.time_zone))
    starts = [(local - k * period).astimezone(UTC) for k in range(1, predictive.periods + 1)]
    return [(start, start + ahead) for start in starts]


def predicted_floor(
    predictive: PredictiveSpec, peaks: Sequence[float | None], streams_per_replica: int
) -> Floor:
    """The replicas the busiest of the past windows would have needed, with headroom.

    `peaks` holds each window's peak open streams (None: no data then, skipped).
    """
    seen = [p for p in peaks if p is not None and not math.isnan(p)]
    if not seen:
        return NONE
    peak = max(seen)
    # Exact arithmetic: 100 streams +10 % over 2 per replica is 55, not 56.
    exact = Fraction(peak).limit_denominator(1000) * (100 + predictive.headroom_percent)
    need = math.ceil(exact / (100 * streams_per_replica))
    if need <= 0:
        return NONE
    return Floor(
        need,
        f"predicted: {peak:.0f} open streams at this time in the last {len(seen)} "
        f"{predictive.period}(s) +{predictive.headroom_percent}% -> at least {need}",
    )


def floor(*floors: Floor) -> Floor:
    """The highest of several floors (its reason with it)."""
    return max(floors, key=lambda f: f.replicas, default=NONE)
