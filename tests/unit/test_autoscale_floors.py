"""Scheduled and predicted floors: time windows in a time zone, peaks of past days."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from ttsfleet.api.v1alpha1 import PredictiveSpec, ScheduleSpec, TtsDeploymentSpec
from ttsfleet.autoscale import floors

BUSINESS = ScheduleSpec.model_validate(
    {
        "name": "business-hours",
        "days": ["Mon", "Tue", "Wed", "Thu", "Fri"],
        "start": "08:00",
        "end": "18:00",
        "timeZone": "Europe/Berlin",
        "minReplicas": 6,
    }
)
LATE_SHOW = ScheduleSpec.model_validate(
    {"days": ["Fri"], "start": "22:00", "end": "02:00", "timeZone": "UTC", "minReplicas": 3}
)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("when", "active"),
    [
        ("2026-11-25T07:30", True),  # Wednesday 08:30 in Berlin (CET, UTC+1)
        ("2026-11-25T06:59", False),  # 07:59 in Berlin
        ("2026-11-25T17:00", False),  # 18:00 in Berlin: the end is exclusive
        ("2026-11-28T10:00", False),  # Saturday
        ("2026-07-01T06:30", True),  # 08:30 in Berlin in summer time (UTC+2)
        ("2026-07-01T16:30", False),  # 18:30 in Berlin in summer time
    ],
)
def test_a_schedule_follows_its_time_zone_and_days(when: str, active: bool) -> None:
    assert floors.schedule_active(BUSINESS, utc(when)) is active


@pytest.mark.parametrize(
    ("when", "active"),
    [
        ("2026-11-27T23:00", True),  # Friday evening
        ("2026-11-28T01:30", True),  # Saturday small hours: the window began on Friday
        ("2026-11-28T02:00", False),
        ("2026-11-27T01:30", False),  # Friday small hours belong to a Thursday window
    ],
)
def test_a_window_that_crosses_midnight_belongs_to_the_day_it_starts(
    when: str, active: bool
) -> None:
    assert floors.schedule_active(LATE_SHOW, utc(when)) is active


def test_the_highest_active_schedule_wins_and_is_named() -> None:
    low = BUSINESS.model_copy(update={"min_replicas": 2, "name": "low"})
    floor = floors.scheduled_floor([low, BUSINESS], utc("2026-11-25T09:00"))
    assert floor.replicas == 6
    assert floor.reason == "schedule business-hours 08:00-18:00 Europe/Berlin: at least 6"
    assert floors.scheduled_floor([BUSINESS], utc("2026-11-28T09:00")) == floors.NONE


def test_an_unknown_time_zone_names_the_field_and_the_fix() -> None:
    spec = {"scaling": {"schedules": [{"start": "08:00", "end": "18:00", "minReplicas": 1,
            "timeZone": "Europe/Berln"}]}}  # fmt: skip
    with pytest.raises(ValidationError) as err:
        TtsDeploymentSpec.model_validate(spec)
    (error,) = err.value.errors()
    assert error["loc"] == ("scaling", "schedules", 0, "timeZone")
    assert (
        "unknown time zone 'Europe/Berln': use an IANA name such as Europe/Berlin" in (error["msg"])
    )


def test_history_windows_look_ahead_from_the_same_time_of_past_periods() -> None:
    now = utc("2026-11-25T09:00")
    daily = floors.history_windows(PredictiveSpec(periods=3, lookahead_minutes=20), now)
    assert daily == [
        (now - timedelta(days=k), now - timedelta(days=k) + timedelta(minutes=20))
        for k in (1, 2, 3)
    ]
    weekly = floors.history_windows(PredictiveSpec(period="week", periods=2), now)
    assert [start for start, _ in weekly] == [now - timedelta(days=7), now - timedelta(days=14)]


def test_the_predicted_floor_covers_the_busiest_past_window_with_headroom() -> None:
    spec = PredictiveSpec(headroom_percent=10)
    floor = floors.predicted_floor(spec, [30.0, None, 50.0], streams_per_replica=16)
    assert floor.replicas == 4  # 50 streams + 10 % = 55 -> 4 replicas of 16
    assert "50 open streams at this time in the last 2 day(s)" in floor.reason
    assert floors.predicted_floor(spec, [None, float("nan")], 16) == floors.NONE
    assert floors.predicted_floor(spec, [0.0], 16) == floors.NONE


def test_the_higher_floor_wins() -> None:
    a, b = floors.Floor(2, "a"), floors.Floor(5, "b")
    assert floors.floor(a, b) == b
    assert floors.floor() == floors.NONE


def test_past_windows_keep_the_local_time_of_day_across_daylight_saving() -> None:
    # Monday 30 March 2026, 08:00 in Berlin (CEST, UTC+2); the clocks went forward on the 29th.
    now = utc("2026-03-30T06:00")
    spec = PredictiveSpec(periods=2, time_zone="Europe/Berlin")
    (yesterday, _), (before, _) = floors.history_windows(spec, now)
    assert yesterday == utc("2026-03-29T06:00")  # Sunday 08:00 CEST
    assert before == utc("2026-03-28T07:00")  # Saturday 08:00 CET, an hour later in UTC


def test_the_predicted_floor_rounds_exactly() -> None:
    spec = PredictiveSpec(headroom_percent=10)
    assert floors.predicted_floor(spec, [100.0], streams_per_replica=2).replicas == 55
    assert floors.predicted_floor(spec, [100.0], streams_per_replica=1).replicas == 110
