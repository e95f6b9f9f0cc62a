"""Routing decisions with a synthetic clock and a seeded random source."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ttsfleet.gateway.fleet import Fleet
from ttsfleet.routing.balance import Load, choose, peak_ewma, round_robin
from ttsfleet.routing.outliers import Outliers, Policy

REPLICAS = ["10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001", "10.0.0.4:8001"]


# ---- power of two choices -----------------------------------------------------------------


@given(
    loads=st.lists(st.integers(0, 10_000), min_size=2, max_size=8),
    seed=st.integers(0, 2**32),
)
def test_of_the_two_it_samples_it_takes_the_one_with_less_outstanding_work(
    loads: list[int], seed: int
) -> None:
    replicas = [f"r{i}" for i in range(len(loads))]
    load = {r: Load(c) for r, c in zip(replicas, loads, strict=True)}
    picked = choose(replicas, load, random.Random(seed))
    first, second = random.Random(seed).sample(replicas, 2)
    assert picked in (first, second)
    assert load[picked].characters == min(load[first].characters, load[second].characters)


def test_the_busiest_replica_is_never_picked_and_the_idlest_most_often() -> None:
    load = {r: Load(c) for r, c in zip(REPLICAS, (0, 100, 2000, 9000), strict=True)}
    rng = random.Random(7)
    picks = Counter(choose(REPLICAS, load, rng) for _ in range(6000))
    assert picks[REPLICAS[3]] == 0  # it loses every pair it is in
    # The idlest wins each of the 3 pairs of 6 it is in: half of all picks.
    assert 0.45 < picks[REPLICAS[0]] / 6000 < 0.55
    assert picks[REPLICAS[0]] > picks[REPLICAS[1]] > picks[REPLICAS[2]]


def test_open_streams_break_a_tie_in_characters() -> None:
    load = {"a": Load(100, streams=5), "b": Load(100, streams=1)}
    assert {choose(["a", "b"], load, random.Random(s)) for s in range(20)} == {"b"}


def test_nothing_to_choose_from_and_the_excluded_replica() -> None:
    rng = random.Random(1)
    assert choose([], {}, rng) is None
    assert choose(["a"], {}, rng, exclude=frozenset({"a"})) is None
    assert choose(["a", "b"], {}, rng, exclude=frozenset({"a"})) == "b"  # a retry elsewhere


def test_a_simulated_fleet_with_one_slow_replica_queues_less_than_round_robin() -> None:
    """Four replicas, one serving at a quarter of the speed: with p2c on outstanding
    characters the work queued on the slow one stays far below round robin's."""
    speeds = {REPLICAS[0]: 25, **{r: 100 for r in REPLICAS[1:]}}  # characters per tick

    def worst_queue(pick: str) -> int:
        outstanding = dict.fromkeys(REPLICAS, 0)
        rng, worst = random.Random(3), 0
        for tick in range(2000):
            request = rng.randint(20, 300)
            if pick == "p2c":
                load = {r: Load(c) for r, c in outstanding.items()}
                target = choose(REPLICAS, load, rng)
            else:
                target = round_robin(REPLICAS, tick)
            assert target is not None
            outstanding[target] += request
            for replica, speed in speeds.items():
                outstanding[replica] = max(0, outstanding[replica] - speed)
            worst = max(worst, outstanding[REPLICAS[0]])
        return worst

    assert worst_queue("p2c") * 10 < worst_queue("round robin")


# ---- session affinity ---------------------------------------------------------------------


def test_a_session_stays_on_one_replica_and_only_a_leaving_replicas_sessions_move() -> None:
    rng = random.Random(0)
    sessions = [f"call-{i}" for i in range(400)]
    home = {s: choose(REPLICAS, {}, rng, session=s) for s in sessions}
    assert home == {s: choose(REPLICAS, {}, rng, session=s) for s in sessions}
    spread = Counter(home.values())
    assert len(spread) == 4 and min(spread.values()) > 60  # rendezvous spreads them
    fewer = REPLICAS[:3]
    moved = [s for s in sessions if choose(fewer, {}, rng, session=s) != home[s]]
    assert moved and all(home[s] == REPLICAS[3] for s in moved)


def test_a_session_leaves_its_replica_only_when_that_one_is_far_above_the_mean() -> None:
    rng = random.Random(0)
    home = choose(REPLICAS, {}, rng, session="call-1")
    assert home is not None
    busy = {r: Load(1000) for r in REPLICAS} | {home: Load(1200)}
    assert choose(REPLICAS, busy, rng, session="call-1", request_characters=100) == home
    hot = {r: Load(100) for r in REPLICAS} | {home: Load(5000)}
    picks = {choose(REPLICAS, hot, random.Random(s), session="call-1") for s in range(30)}
    assert home not in picks  # p2c among the others wins over the overloaded home


# ---- outlier ejection ---------------------------------------------------------------------


def fail(state: Outliers, address: str, times: int, now: float) -> Outliers:
    for _ in range(times):
        state = state.record(address, ok=False, now=now, fleet_size=len(REPLICAS))
    return state


def test_consecutive_failures_eject_and_the_replica_comes_back_by_itself() -> None:
    state = fail(Outliers(Policy(consecutive=3, base_seconds=5)), "a", 2, now=0)
    assert "a" not in state.ejected(0)
    state = state.record("a", ok=True, now=1, fleet_size=4)  # a success resets the run
    state = fail(state, "a", 2, now=2)
    assert "a" not in state.ejected(2)
    state = fail(state, "a", 1, now=3)
    assert state.ejected(3) == {"a"} and state.ejected(7.9) == {"a"}
    assert "a" not in state.ejected(8.0)  # 5 s later, back


def test_each_ejection_doubles_the_time_out_and_health_earns_it_back() -> None:
    state = Outliers(Policy(consecutive=1, base_seconds=5, max_seconds=60))
    out_for = []
    now = 0.0
    for _ in range(6):
        state = fail(state, "a", 1, now)
        until = state.health["a"].ejected_until
        out_for.append(until - now)
        now = until  # fails again the moment it is back
    assert out_for == [5, 10, 20, 40, 60, 60]  # doubling, capped
    # Healthy for 50 s (10 x base) after the last time out: one ejection forgotten.
    state = state.record("a", ok=True, now=now + 50, fleet_size=4)
    assert state.health["a"].ejections == 5
    state = fail(state, "a", 1, now + 51)
    assert state.health["a"].ejected_until - (now + 51) == 60  # 5 * 2**5 = 160, capped


def test_never_more_than_the_share_and_never_the_only_replica() -> None:
    state = Outliers(Policy(consecutive=1, max_ejected_share=0.5))
    for address in REPLICAS:
        state = fail(state, address, 1, now=0)
    assert len(state.ejected(0)) == 2  # half of four
    alone = Outliers(Policy(consecutive=1))
    for _ in range(5):
        alone = alone.record("only", ok=False, now=0, fleet_size=1)
    assert alone.ejected(0) == frozenset()


def test_usable_leaves_out_the_ejected_but_never_everyone() -> None:
    state = fail(Outliers(Policy(consecutive=1, max_ejected_share=1.0)), REPLICAS[0], 1, 0)
    assert state.usable(REPLICAS, 0) == REPLICAS[1:]
    both = fail(state, REPLICAS[1], 1, 0)
    assert both.usable(REPLICAS[:2], 0) == REPLICAS[:2]  # all ejected: all of them


def test_replicas_that_left_are_forgotten_and_states_are_immutable() -> None:
    start = Outliers()
    state = fail(start, "a", 1, 0).record("b", ok=True, now=0, fleet_size=2)
    assert start.health == {}
    assert set(state.forget(["b"]).health) == {"b"}


def test_outstanding_work_is_weighed_by_how_fast_each_replica_has_been() -> None:
    # The same text queued at both: the one answering ten times slower costs more.
    load = {"slow": Load(300, 1, latency=1.0), "fast": Load(300, 1, latency=0.1)}
    assert {choose(["slow", "fast"], load, random.Random(s)) for s in range(20)} == {"fast"}
    # Unless the fast one has far more queued than the slow one.
    load = {"slow": Load(0, 0, latency=1.0), "fast": Load(5000, 9, latency=0.1)}
    assert choose(["slow", "fast"], load, random.Random(1), request_characters=100) == "slow"
    # Unmeasured replicas count at the mean of the measured ones.
    load = {
        "new": Load(300, 1),
        "slow": Load(300, 1, latency=2.0),
        "fast": Load(300, 1, latency=0.2),
    }
    picks = {choose(["new", "slow"], load, random.Random(s)) for s in range(20)}
    assert picks == {"new"}


def test_peak_ewma_jumps_up_and_comes_down_slowly() -> None:
    assert peak_ewma(0.0, 0.3, 0.0, 5.0) == 0.3  # first sample
    assert peak_ewma(0.1, 2.0, 0.0, 5.0) == 2.0  # slower: at once
    halfway = peak_ewma(2.0, 0.1, 5.0, 5.0)
    assert 0.1 < halfway < 2.0 and halfway == pytest.approx(0.1 + 1.9 / math.e)
    assert peak_ewma(2.0, 0.1, 500.0, 5.0) == pytest.approx(0.1)


def test_a_fleet_avoids_a_replica_that_answered_slowly_then_tries_it_again() -> None:
    now = [0.0]
    fleet = Fleet("ns/f", seed=3, clock=lambda: now[0])
    fleet.set_addresses(["slow:1", "fast:1"])
    fleet.observe("slow:1", 3.0)
    fleet.observe("fast:1", 0.1)
    fleet.begin("fast:1", 200)  # the fast one is busier, still it wins
    assert {fleet.pick(100) for _ in range(20)} == {"fast:1"}
    now[0] = 600.0  # long unmeasured: the slow one's estimate has faded
    fleet.observe("fast:1", 0.1)
    assert "slow:1" in {fleet.pick(100) for _ in range(20)}
