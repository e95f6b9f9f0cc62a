"""recommend() on a synthetic clock: windows, panic, rate limits, delay, bounds, reasons."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttsfleet.api.v1alpha1 import TtsDeploymentSpec
from ttsfleet.autoscale.loop import policy_for
from ttsfleet.autoscale.policy import (
    Policy,
    Recommendation,
    Snapshot,
    State,
    arrival_rate,
    recommend,
)

POLICY = Policy(min_replicas=1, max_replicas=20, queue_depth_per_replica=4, stable_window=60,
                panic_window=6, scale_down_delay=120)  # fmt: skip


def run(
    pending: list[float], start: int = 1, policy: Policy = POLICY, every: float = 2.0
) -> list[Recommendation]:
    """Feed one pending-request reading per tick; the fleet follows each recommendation."""
    state, replicas, out = State(), start, []
    for i, value in enumerate(pending):
        rec = recommend(Snapshot(replicas, pending_requests=value), policy, state, now=i * every)
        state, replicas = rec.state, rec.replicas
        out.append(rec)
    return out


def test_steady_load_asks_for_pending_over_the_target() -> None:
    last = run([16.0] * 40, start=4)[-1]
    assert last.replicas == 4
    assert "queue_depth asks for 4.0 replicas" in last.reason
    assert last.signals == {"queue_depth": 4.0}


def test_a_steady_rise_scales_up_through_the_stable_window() -> None:
    recs = run([4.0] * 5 + [24.0] * 60, start=1)
    assert recs[-1].replicas == 6
    assert not recs[-1].panic


def test_a_burst_panics_and_scales_at_once_to_what_the_newest_reading_asks() -> None:
    recs = run([4.0] * 30 + [40.0] * 3, start=1)
    burst = recs[30]
    assert burst.panic and burst.reason.startswith("panic: queue_depth asks for 10.0 replicas")
    assert "(3.2 over the last 6s)" in burst.reason  # what the window's mean would have said
    assert burst.replicas == 10  # no x2 limit in a panic (Knative's default: 1000x)
    assert [r.replicas for r in recs[31:]] == [10, 10]


def test_outside_a_panic_scale_up_is_limited_to_x2_per_decision() -> None:
    calm = replace(POLICY, panic_threshold=100.0, stable_window=2.0)  # never panics
    recs = run([4.0] * 3 + [40.0] * 6, start=1, policy=calm)
    assert not any(r.panic for r in recs)
    assert [r.replicas for r in recs[3:]] == [2, 4, 8, 10, 10, 10]
    assert "scale-up limited to 4" in recs[4].reason


def test_no_scale_down_while_panicking_or_within_the_delay() -> None:
    recs = run([40.0] * 10 + [0.0] * 100, start=10)
    after_drop = [r.replicas for r in recs[10:40]]
    assert min(after_drop) == 10  # the panic window, then the scale-down delay, hold it
    assert "scale-down delay" in recs[45].reason or recs[45].panic
    # Then down one replica per decision, to minReplicas.
    tail = [r.replicas for r in recs[80:]]
    assert all(a - b in (0, 1) for a, b in itertools.pairwise(tail))
    assert recs[-1].replicas < 10


def test_missing_metrics_hold_the_size_and_say_so() -> None:
    rec = recommend(Snapshot(ready_replicas=7), POLICY, State(), now=0.0)
    assert rec.replicas == 7
    assert "metrics unavailable" in rec.reason and "never scaling down blind" in rec.reason


def test_the_largest_signal_wins_and_is_named() -> None:
    snap = Snapshot(4, pending_requests=4.0, ttfa_p95_seconds=0.6, open_streams=16.0)
    rec = recommend(snap, POLICY, State(), now=0.0)
    assert rec.signals == {"queue_depth": 1.0, "ttfa_p95": 8.0, "open_streams": 1.0}
    assert "ttfa_p95" in rec.reason
    assert rec.replicas == 8  # a panic (8 >= 2 x 4): straight to what TTFA asks for


def test_bounds_and_floors() -> None:
    low = recommend(Snapshot(1, pending_requests=0.0), POLICY, State(), now=0.0)
    assert low.replicas == 1 and "minReplicas 1" in low.reason
    floored = recommend(
        Snapshot(3, pending_requests=0.0), Policy(floor=3, scale_down_delay=0), State(), now=0.0
    )
    assert floored.replicas == 3 and "floor 3" in floored.reason
    capped = recommend(
        Snapshot(8, pending_requests=400.0), Policy(max_replicas=10), State(), now=0.0
    )
    assert capped.replicas == 10 and "maxReplicas 10" in capped.reason


def test_pure_same_inputs_same_answer() -> None:
    snap, state = Snapshot(2, pending_requests=12.0), State()
    assert recommend(snap, POLICY, state, 5.0) == recommend(snap, POLICY, state, 5.0)
    assert state == State()


@given(
    readings=st.lists(st.one_of(st.none(), st.floats(0, 500)), min_size=1, max_size=80),
    start=st.integers(1, 20),
)
@settings(max_examples=200)
def test_every_decision_stays_in_bounds_and_moves_within_the_rate_limits(
    readings: list[float | None], start: int
) -> None:
    state, replicas = State(), start
    for i, value in enumerate(readings):
        rec = recommend(Snapshot(replicas, pending_requests=value), POLICY, state, now=i * 2.0)
        assert POLICY.min_replicas <= rec.replicas <= POLICY.max_replicas
        assert rec.replicas >= min(replicas, POLICY.max_replicas) - POLICY.max_scale_down_step
        if rec.panic:  # up at once to what the newest reading asks for, no further
            assert rec.replicas <= max(replicas, math.ceil((value or 0) / 4), POLICY.min_replicas)
        else:
            assert rec.replicas <= max(replicas + 1, 2 * replicas)
        if value is None:
            assert rec.replicas >= min(replicas, POLICY.max_replicas)  # never down blind
        assert rec.reason
        state, replicas = rec.state, rec.replicas


def test_noise_within_ten_percent_is_held_but_not_streams_beyond_capacity() -> None:
    policy = Policy(min_replicas=1, max_replicas=200, streams_per_replica=16)
    # 100 replicas asked for 105 by the queue: within 10 %, noise.
    queue = recommend(Snapshot(100, pending_requests=420.0), policy, State(), now=0.0)
    assert queue.replicas == 100 and "within 10% of 100: holding" in queue.reason
    # 1,750 open streams need 110 replicas of 16: each replica must hold its streams.
    streams = recommend(Snapshot(100, open_streams=1750.0), policy, State(), now=0.0)
    assert streams.replicas == 110


def test_arrivals_are_completions_plus_the_growth_of_the_requests_in_the_fleet() -> None:
    history: tuple[tuple[float, float], ...] = ()
    rate, history = arrival_rate(Snapshot(4, pending_requests=10, completed_per_second=40.0),
                                 history, 0.0)  # fmt: skip
    assert rate == 40.0  # nothing to compare with yet
    rate, history = arrival_rate(Snapshot(4, pending_requests=110, completed_per_second=40.0),
                                 history, 5.0)  # fmt: skip
    assert rate == 40.0 + 100 / 5  # the queue grew by 20 a second: they arrived too
    assert arrival_rate(Snapshot(4, pending_requests=3), history, 6.0) == (None, ())


def test_arrivals_size_a_step_once_a_replicas_rate_is_learned() -> None:
    """Near its targets the fleet learns what a replica carries (10/s here: 4 replicas
    at 40/s ask for 4). A step to 400/s then asks for 40 replicas from the arrivals,
    while the queue time it reads (seconds of backlog) asks for thousands."""
    policy = replace(POLICY, max_replicas=1000)
    state, replicas = State(), 4
    for i in range(40):  # steady: queue time at its target, 40 requests/s
        snap = Snapshot(replicas, pending_requests=4, queue_seconds_per_request=0.1,
                        completed_per_second=40.0, serving_replicas=replicas)  # fmt: skip
        rec = recommend(snap, policy, state, now=i * 2.0)
        state, replicas = rec.state, rec.replicas
    assert replicas == 4 and state.replica_rate == 10.0
    pending = 4.0
    for i in range(40, 46):  # the step: completions capped at 40/s, the queue grows
        pending += (400 - 40) * 2.0
        snap = Snapshot(replicas, pending_requests=pending, queue_seconds_per_request=pending / 40,
                        completed_per_second=40.0, serving_replicas=4)  # fmt: skip
        rec = recommend(snap, policy, state, now=i * 2.0)
        state, replicas = rec.state, rec.replicas
    assert rec.panic and rec.reason.startswith("panic: arrivals asks for")
    assert 36 <= replicas <= 44  # ~400 / 10, not the queue time's thousands
    assert rec.signals["queue_time"] > 1000 and 36 <= rec.signals["arrivals"] <= 44


def test_a_rate_learned_too_high_gives_way_when_the_queue_grows_over_the_targets() -> None:
    """A latency read as if it grew in proportion to the load can teach a rate above
    what a replica completes (here 12/s learned; the 5 replicas complete 9.6/s each).
    With the fleet over its targets and the queue growing for a stable window (60 s:
    not a burst's backlog), the arrivals then ask for more than the fleet has, instead
    of holding it short for good."""
    learned = State(replica_rate=12.0)
    snap = Snapshot(5, pending_requests=60, ttfa_p95_seconds=2.0, completed_per_second=48.0,
                    serving_replicas=5)  # fmt: skip
    state = learned
    for i in range(75):  # the queue grows by 2 a second: 50 arrive, 48 complete
        snap = replace(snap, pending_requests=60 + 4.0 * i)
        rec = recommend(snap, replace(POLICY, max_replicas=100), state, now=i * 2.0)
        state = rec.state
        if i * 2.0 < 60:
            assert state.replica_rate == 12.0, i  # a burst's backlog teaches nothing
    assert state.replica_rate == pytest.approx(0.8 * 48.0 / 5)  # SATURATED_SHARE of it
    assert rec.replicas >= 6 and rec.signals["arrivals"] > 5
    # The same reading while the queue drains (arrivals below completions) keeps it.
    draining = replace(snap, pending_requests=20.0)
    kept = recommend(draining, replace(POLICY, max_replicas=100), learned, now=100.0).state
    assert kept.replica_rate == 12.0


def _asking(replicas: float, state: State, now: float = 1000.0) -> Recommendation:
    """10 replicas whose queue asks for `replicas`."""
    snap = Snapshot(10, pending_requests=replicas * 4, serving_replicas=10)
    return recommend(snap, replace(POLICY, max_replicas=100), state, now)


def test_a_move_up_against_a_descent_waits_out_a_burst() -> None:
    """Going back up during a descent is a turn, and a burst (seconds to tens of
    seconds, gone before a new replica is Ready) would be followed by a turn down: a
    flap. The move waits until the fleet has been short for 45 s; a step (4x the
    fleet at once) goes at once."""
    descending = State(direction=-1, turned_at=0.0)
    held = _asking(13, descending)
    assert held.replicas == 10 and "against the descent" in held.reason
    assert held.state.wanting_since == 1000.0
    still = _asking(13, held.state, now=1030.0)
    assert still.replicas == 10  # short for 30 s
    assert _asking(13, still.state, now=1046.0).replicas == 13  # 46 s: not a burst
    # Back within the fleet's size, the clock starts again.
    calm = _asking(9.5, still.state, now=1032.0)
    assert calm.state.wanting_since is None
    assert _asking(40, descending).replicas == 40  # a step: a panic, at once
    # A move that is no turn (the same way as the last) is not held.
    rising = State(direction=1, turned_at=0.0)
    up = _asking(13, rising)
    assert up.replicas == 13 and up.state.turned_at == 0.0


def test_a_move_down_against_a_rise_waits_for_the_reversal_window() -> None:
    """Two turns within 600 s are a flap: soon after turning up, nothing goes down."""
    turned_up = State(direction=1, turned_at=900.0)  # 100 s ago
    held = _asking(6, turned_up)
    assert held.replicas == 10 and "within 600s of the last turn" in held.reason
    later = _asking(6, replace(turned_up, turned_at=300.0))  # 700 s ago
    assert later.replicas < 10  # at the scale-down pace
    # Every change that reverses the last one is remembered as a turn.
    assert later.state.direction == -1 and later.state.turned_at == 1000.0


def test_nothing_goes_down_during_a_lull_and_a_retry_surge_is_sized_as_before_it() -> None:
    """Arrivals far below what the fleet carried (an upstream outage) shrink nothing
    for 120 s after, and the surge of retries when it ends is sized from what the
    fleet needed before it, not from its own rate (it drains requests held back)."""
    policy = replace(POLICY, max_replicas=1000)
    state = State(replica_rate=4.0)
    snap = Snapshot(50, pending_requests=0.0, completed_per_second=200.0, serving_replicas=50)
    for i in range(40):  # 200/s on 50 replicas of 4/s: on target
        state = recommend(snap, policy, state, now=i * 2.0).state
    quiet = replace(snap, completed_per_second=10.0)
    reasons = []
    for i in range(40, 120):  # an outage: 5 % of the traffic for 160 s
        rec = recommend(quiet, policy, state, now=i * 2.0)
        state = rec.state
        reasons.append(rec.reason)
        assert rec.replicas == 50, rec.reason
    # Past the scale-down delay (120 s), the lull holds it.
    assert "arrivals fell away" in reasons[-1]
    surge = replace(snap, completed_per_second=600.0)  # its retries, three times the rate
    for now in (240.0, 242.0, 244.0):
        rec = recommend(surge, policy, state, now=now)
        state = rec.state
    assert rec.panic and rec.replicas == 50  # sized as before the lull: the fleet it kept
    assert "after a lull" in rec.reason
    # Without the lull before it, the same surge is a step.
    fresh = State(replica_rate=4.0)
    assert recommend(surge, policy, fresh, now=0.0).replicas == 150


def test_gaps_between_bursts_are_no_lull() -> None:
    """Production traffic comes in bursts with gaps of seconds between them: arrivals
    fall away again and again, which is the traffic's shape, not an outage. No lull
    begins without a stable window of steady arrivals before it, so a burst's panic is
    trimmed once it is over instead of held while the gaps go on (a lull renewed by
    every gap held 2,731 replicas for 36 minutes on a production trace scaled up)."""
    policy = replace(POLICY, max_replicas=1000, reversal_window=0)
    state, replicas = State(replica_rate=4.0), 20
    for tick in range(300):  # 2 s ticks: 4 with nothing, 1 at 400/s; one big burst early
        burst = 20 <= tick < 24
        rate = 4000.0 if burst else (400.0 if tick % 5 == 4 else 0.0)
        seen = Snapshot(replicas, pending_requests=0.0, completed_per_second=rate,
                        serving_replicas=replicas)  # fmt: skip
        rec = recommend(seen, policy, state, now=2.0 * tick)
        state, replicas = rec.state, rec.replicas
        if burst:
            assert rec.panic
        assert "arrivals fell away" not in rec.reason
    assert state.lull_at is None
    assert replicas <= 30  # the 80/s the bursts carry: 20 replicas at 4/s, not the panic's 1,000
    # After a stable window of steady arrivals, the same gap begins a lull.
    steady = State(replica_rate=4.0)
    snap = Snapshot(50, pending_requests=0.0, completed_per_second=200.0, serving_replicas=50)
    for tick in range(35):
        steady = recommend(snap, policy, steady, now=2.0 * tick).state
    gap = recommend(replace(snap, completed_per_second=0.0), policy, steady, now=70.0)
    assert gap.state.lull_at == 70.0 and gap.replicas == 50


def test_no_scale_down_below_where_a_rise_goes_within_the_reversal_window() -> None:
    """On a rise, trimming a burst's overshoot stops where the rise will be in 600 s:
    going back up sooner would be a flap. The slope is the median of the pairwise
    slopes of the stable ask, which one burst among the readings does not tilt."""
    rising = tuple((t, 10.0 + t / 60) for t in range(0, 600, 30))  # 1 replica a minute
    state = State(direction=1, turned_at=-1000.0, trend=rising)
    policy = replace(POLICY, max_replicas=100, max_scale_down_fraction=0.5)
    snap = Snapshot(40, pending_requests=80.0, serving_replicas=40)  # asks for 20
    held = recommend(snap, policy, state, now=600.0)
    assert held.replicas == 30 and "not below 30" in held.reason  # 20 + 1 a minute x 10
    flat = tuple((t, 20.0) for t, _ in rising)
    assert recommend(snap, policy, replace(state, trend=flat), now=600.0).replicas == 20
    burst = (*rising[:-1], (570.0, 80.0))  # one burst among the readings
    assert recommend(snap, policy, replace(state, trend=burst), now=600.0).replicas == 30


def test_a_time_signal_multiplies_the_fleet_by_at_most_four_before_a_rate_is_known() -> None:
    """Queue time explodes under a backlog; before the rate a replica carries is learned,
    a panic on it grows the fleet at most 4x (panic_threshold squared) a decision."""
    snap = Snapshot(10, queue_seconds_per_request=30.0, serving_replicas=10)
    rec = recommend(snap, replace(POLICY, max_replicas=10_000), State(), now=10.0)
    assert rec.panic and rec.replicas == 40 and "until a replica's rate is known" in rec.reason


def test_a_queue_growing_for_a_stable_window_is_never_held_back() -> None:
    """Hysteresis holds a small move back up soon after a turn, but not when the fleet
    has been over its targets with its queue growing for a whole stable window."""
    policy = replace(POLICY, max_replicas=100)
    snap = Snapshot(10, pending_requests=46, completed_per_second=40.0, serving_replicas=10)
    turned = State(direction=-1, turned_at=900.0)
    assert recommend(snap, policy, turned, now=1000.0).replicas == 10  # held
    short = replace(turned, short_since=880.0, short_from=10.0)  # 120 s short, queue 10 -> 46
    # 40/s over 10 saturated replicas: sized at 80 % of their 4/s each (40 / 3.2)
    assert recommend(snap, policy, short, now=1000.0).replicas == 13
    drained = replace(short, short_from=60.0)  # the queue fell below where it was: not short
    assert recommend(snap, policy, drained, now=1000.0).replicas == 10


def test_a_reversal_window_of_zero_turns_the_flap_guard_off() -> None:
    """`spec.scaling.reversalWindowSeconds: 0`: the fleet follows every move at once."""
    off = replace(POLICY, max_replicas=100, reversal_window=0.0)
    snap = Snapshot(10, pending_requests=13 * 4, serving_replicas=10)
    assert recommend(snap, off, State(direction=-1, turned_at=999.0), now=1000.0).replicas == 13
    down = replace(snap, pending_requests=6 * 4)
    assert recommend(down, off, State(direction=1, turned_at=999.0), now=1000.0).replicas < 10


def test_the_operator_builds_the_flap_guard_from_the_spec() -> None:
    spec = TtsDeploymentSpec.model_validate(
        {"scaling": {"reversalWindowSeconds": 0, "stableWindowSeconds": 20}}
    )
    policy = policy_for(spec)
    assert policy.reversal_window == 0 and policy.short_seconds == 15
    assert policy_for(TtsDeploymentSpec()).reversal_window == 600


def test_a_rise_is_met_where_it_will_be_a_minute_on_and_a_step_is_no_rise() -> None:
    """The stable window's mean lags a rise by half the window and a new replica takes
    its cold start: on a steady rise (the median slope between neighbouring readings of
    the stable ask) the fleet is sized `lead_seconds` (60 s) ahead. A step moves two or
    three of those slopes, not their median."""
    policy = replace(POLICY, max_replicas=100, tolerance=0.0)
    rising = tuple((t, 10.0 + t / 60) for t in range(0, 600, 30))  # 1 replica a minute
    snap = Snapshot(19, pending_requests=20 * 4, serving_replicas=19)  # asks for 20
    rec = recommend(snap, policy, State(trend=rising), now=600.0)
    assert rec.replicas == 21 and "rising 1.0 a minute: 21 in 60s" in rec.reason
    step = tuple((t, 10.0 if t < 510 else 20.0) for t in range(0, 600, 30))
    assert recommend(snap, policy, State(trend=step), now=600.0).replicas == 20
    few = rising[-5:]  # under MIN_TREND readings: no trend yet
    assert recommend(snap, policy, State(trend=few), now=600.0).replicas == 20


def test_on_a_fall_the_scale_down_delay_holds_less_the_fall() -> None:
    """The scale-down delay is against dips: on a steady fall it holds what it held,
    less the fall over the delay (a fleet falling with the load, not 2 minutes behind)."""
    policy = replace(POLICY, max_replicas=100, max_scale_down_fraction=0.5)
    falling = tuple((t, 40.0 - t / 60) for t in range(0, 600, 30))  # 1 replica a minute less
    held_at = ((500.0, 34),)  # what the stable window asked 100 s ago
    snap = Snapshot(40, pending_requests=29 * 4, serving_replicas=40)  # asks for 29 now
    flat = State(trend=tuple((t, 34.0) for t, _ in falling), recommendations=held_at)
    assert recommend(snap, policy, flat, now=600.0).replicas == 34  # the delay holds 34
    fall = State(trend=falling, recommendations=held_at)
    assert recommend(snap, policy, fall, now=600.0).replicas == 32  # 34 less 2 minutes


def test_a_replica_rate_is_learned_only_near_the_targets() -> None:
    """A latency well under its target says little about the rate at the target (behind
    a power-of-two-choices balancer it stays flat, then turns steep): the rate a replica
    carries is learned while the signals ask for 0.9-1.3 of the replicas serving."""
    snap = Snapshot(
        10, pending_requests=0.0, ttfa_p95_seconds=0.21, completed_per_second=40.0,
        serving_replicas=10,
    )  # fmt: skip
    assert recommend(snap, POLICY, State(), now=0.0).state.replica_rate is None  # 0.7
    near = replace(snap, ttfa_p95_seconds=0.285)  # 0.95 of the 300 ms target
    assert recommend(near, POLICY, State(), now=0.0).state.replica_rate == pytest.approx(40 / 9.5)
