"""Rate limits (GCRA), the circuit breaker and their config: pure, with the clock a
parameter. The Redis side runs against a real redis-server in
tests/integration/test_gateway_limits.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttsfleet.gateway import config
from ttsfleet.gateway.auth import ConfigError
from ttsfleet.routing.breaker import Breaker, Outcome, Policy, State
from ttsfleet.routing.limits import Charge, Local, Rate, gcra

TEN_PER_SECOND = Rate(per_second=10, burst=20)


def run(rate: Rate, times: list[float], cost: float = 1) -> list[bool]:
    tat = None
    out = []
    for now in times:
        tat, verdict = gcra(tat, now, rate, cost)
        out.append(verdict.allowed)
    return out


def test_a_full_burst_goes_at_once_and_the_next_waits_one_interval() -> None:
    assert run(TEN_PER_SECOND, [0.0] * 21) == [True] * 20 + [False]
    tat = None
    for _ in range(20):
        tat, verdict = gcra(tat, 0.0, TEN_PER_SECOND, 1)
    assert verdict.remaining == 0 and verdict.reset == pytest.approx(2.0)
    tat, refused = gcra(tat, 0.0, TEN_PER_SECOND, 1)
    assert not refused.allowed and refused.retry_after == pytest.approx(0.1)
    assert gcra(tat, 0.05, TEN_PER_SECOND, 1)[1].allowed is False
    assert gcra(tat, 0.1, TEN_PER_SECOND, 1)[1].allowed is True


def test_a_refused_request_spends_nothing() -> None:
    tat, _ = gcra(None, 0.0, Rate(1, 1), 1)
    after, verdict = gcra(tat, 0.5, Rate(1, 1), 1)
    assert not verdict.allowed and after == tat


def test_remaining_counts_down_and_refills_at_the_rate() -> None:
    tat = None
    remaining = []
    for _ in range(3):
        tat, verdict = gcra(tat, 0.0, Rate(2, 4), 1)
        remaining.append(verdict.remaining)
    assert remaining == [3, 2, 1]
    assert gcra(tat, 1.0, Rate(2, 4), 1)[1].remaining == 2  # 2 back after 1 s, 1 spent


def test_a_cost_over_the_burst_never_passes() -> None:
    assert run(Rate(100, 50), [0.0, 100.0], cost=51) == [False, False]


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=200),
    per_second=st.floats(min_value=0.5, max_value=50),
    burst=st.integers(min_value=1, max_value=30),
)
def test_no_window_ever_admits_more_than_the_burst_plus_the_rate(
    gaps: list[float], per_second: float, burst: int
) -> None:
    times = []
    now = 0.0
    for gap in gaps:
        now += gap
        times.append(now)
    allowed = [t for t, ok in zip(times, run(Rate(per_second, burst), times), strict=True) if ok]
    for i, start in enumerate(allowed):
        for j in range(i, len(allowed)):
            span = allowed[j] - start
            assert j - i + 1 <= burst + per_second * span + 1e-6


def test_local_limits_are_all_or_nothing_across_charges() -> None:
    local = Local()
    requests = Charge("t:r", Rate(10, 5), 1)
    verdicts = local.admit([requests, Charge("t:c", Rate(100, 100), 80)], 0.0)
    assert all(v.allowed for v in verdicts)
    verdicts = local.admit([requests, Charge("t:c", Rate(100, 100), 80)], 0.0)
    assert [v.allowed for v in verdicts] == [True, False]
    # The refused characters did not spend the request: 4 of 5 are still there.
    assert local.admit([requests], 0.0)[0].remaining == 3


def test_local_limits_forget_full_keys_when_there_are_too_many() -> None:
    local = Local(max_keys=10)
    for i in range(11):
        local.admit([Charge(f"t{i}", Rate(1, 1), 1)], float(i))
    assert len(local.tats) <= 2  # only keys whose allowance is not yet full again


def test_a_replicas_share_of_a_rate_keeps_a_burst_of_at_least_one() -> None:
    assert Rate(10, 20).scaled(0.5) == Rate(5, 10)
    assert Rate(10, 1).scaled(0.25).burst == 1


# ---- the breaker ----------------------------------------------------------------------------

POLICY = Policy(window_seconds=10, min_requests=5, error_rate=0.5, slow_seconds=1.0,
                slow_rate=0.8, open_seconds=5, max_open_seconds=20, probes=2)  # fmt: skip


def record(breaker: Breaker, now: float, *outcomes: Outcome) -> Breaker:
    for outcome in outcomes:
        breaker = breaker.record(now, outcome)
    return breaker


def test_the_breaker_opens_at_the_error_rate_once_the_window_has_enough() -> None:
    breaker = record(Breaker(POLICY), 0.0, Outcome.FAILED, Outcome.FAILED, Outcome.FAILED)
    assert breaker.current(0.0) is State.CLOSED  # 3 requests: under min_requests
    breaker = record(breaker, 1.0, Outcome.OK, Outcome.OK)
    assert breaker.current(1.0) is State.OPEN  # 3 of 5 failed
    assert breaker.allow(2.0)[1] is False
    assert breaker.retry_after(2.0) == pytest.approx(4.0)


def test_slow_answers_open_it_too() -> None:
    assert POLICY.outcome(True, 1.5) is Outcome.SLOW
    assert POLICY.outcome(True, 0.5) is Outcome.OK
    assert POLICY.outcome(False, 0.1) is Outcome.FAILED
    breaker = record(Breaker(POLICY), 0.0, *[Outcome.SLOW] * 4, Outcome.OK)
    assert breaker.current(0.0) is State.OPEN
    breaker = record(Breaker(POLICY), 0.0, *[Outcome.SLOW] * 3, Outcome.OK, Outcome.OK)
    assert breaker.current(0.0) is State.CLOSED


def test_old_failures_leave_the_window() -> None:
    breaker = record(Breaker(POLICY), 0.0, *[Outcome.FAILED] * 4)
    breaker = record(breaker, 10.0, Outcome.FAILED, Outcome.OK, Outcome.OK)
    assert breaker.current(10.0) is State.CLOSED  # the first four are 10 s old
    assert breaker.counts() == (3, 1, 0)


def test_half_open_lets_probes_through_and_closes_after_as_many_good_answers() -> None:
    breaker = record(Breaker(POLICY), 0.0, *[Outcome.FAILED] * 5)
    assert breaker.current(4.9) is State.OPEN
    assert breaker.current(5.0) is State.HALF_OPEN
    breaker, first = breaker.allow(5.0)
    breaker, second = breaker.allow(5.0)
    breaker, third = breaker.allow(5.0)
    assert (first, second, third) == (True, True, False)  # two trials at a time
    breaker = breaker.record(5.1, Outcome.OK)
    assert breaker.current(5.1) is State.HALF_OPEN
    breaker = breaker.record(5.2, Outcome.OK)
    assert breaker.current(5.2) is State.CLOSED
    assert breaker.counts() == (0, 0, 0)


def test_a_failed_probe_opens_it_again_for_twice_as_long_up_to_the_maximum() -> None:
    breaker = record(Breaker(POLICY), 0.0, *[Outcome.FAILED] * 5)
    opened_for = []
    now = 0.0
    for _ in range(4):
        now += breaker.retry_after(now)
        breaker, allowed = breaker.allow(now)
        assert allowed
        breaker = breaker.record(now, Outcome.SLOW)
        opened_for.append(breaker.retry_after(now))
    assert opened_for == [10, 20, 20, 20]
    breaker, _ = breaker.allow(now + 20)
    breaker = record(breaker, now + 20, Outcome.OK, Outcome.OK)
    assert breaker.current(now + 20) is State.CLOSED
    breaker = record(breaker, now + 21, *[Outcome.FAILED] * 5)
    assert breaker.retry_after(now + 21) == 5  # back to the first open time


# ---- the config -----------------------------------------------------------------------------


def document(**extra: object) -> dict[str, object]:
    fleet = {"name": "joe", "voice": "en_US-joe-medium", "endpoints": ["127.0.0.1:1"]}
    return {"routes": [{"models": ["tts-1"], "fleet": fleet}]} | extra


def limits(**tier: object) -> dict[str, object]:
    whole = {"name": "free", "requestsPerSecond": 10, "requestBurst": 20} | tier
    return {"tiers": [whole], "defaultTier": "free"}


def test_tiers_are_read_with_their_rates() -> None:
    parsed = config.parse(document(rateLimits=limits(
        charactersPerSecond=500, characterBurst=4096, concurrentStreams=4,
    ) | {"tenants": {"acme": "free"}}))  # fmt: skip
    assert parsed.rate_limits is not None
    tier = parsed.rate_limits.tier_of("someone")
    assert tier.requests == Rate(10, 20)
    assert tier.characters == Rate(500, 4096)
    assert tier.concurrent_streams == 4


@pytest.mark.parametrize(
    ("limits_doc", "message"),
    [
        (limits(characterBurst=100, charactersPerSecond=10), "characterBurst 100, below"),
        (limits(characterBurst=5000), "give both charactersPerSecond and characterBurst"),
        (limits() | {"defaultTier": "gold"}, "defaultTier: no tier is named 'gold'"),
        (limits() | {"tenants": {"acme": "gold"}}, "tenants.acme: no tier is named 'gold'"),
        (limits(requestBurst=0), "requestBurst"),
        (limits() | {"redisUrl": "http://redis:6379"}, "redisUrl"),
    ],
)
def test_bad_limits_are_refused_naming_the_field(limits_doc: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.parse(document(rateLimits=limits_doc))


def test_a_routes_fallback_is_another_fleet() -> None:
    doc = document()
    route = doc["routes"][0]  # type: ignore[index]
    route["fallback"] = dict(route["fleet"])
    with pytest.raises(ConfigError, match=r"fallback is the route's own fleet"):
        config.parse(doc)
    route["fallback"] |= {"name": "joe-cpu"}
    parsed = config.parse(doc)
    assert set(parsed.fleets()) == {"default/joe", "default/joe-cpu"}


def test_a_full_fleet_sheds_new_requests_but_not_a_context_already_speaking() -> None:
    from ttsfleet.gateway.app import Gateway  # noqa: PLC0415
    from ttsfleet.gateway.fleet import Fleet  # noqa: PLC0415

    fleet = Fleet("speech/joe", seed=1)
    fleet.set_addresses(["10.0.0.1:8001", "10.0.0.2:8001"])
    fleet.max_streams = 2
    for address in fleet.addresses:
        fleet.begin(address, 100)
    assert not fleet.overloaded()  # one stream each: room for one more on either
    fleet.begin("10.0.0.1:8001", 100)
    fleet.begin("10.0.0.2:8001", 100)
    assert fleet.overloaded()
    assert Gateway._refusal(fleet, admitted=False) == "overloaded"
    assert Gateway._refusal(fleet, admitted=True) is None  # a live context's next sentence
    fleet.end("10.0.0.2:8001", 100)
    assert Gateway._refusal(fleet, admitted=False) is None
    fleet.set_addresses([])
    assert Gateway._refusal(fleet, admitted=True) == "unavailable"


def test_a_replica_alone_keeps_its_share_of_a_tenants_streams() -> None:
    """Without Redis (none configured, or down) the stream cap is this replica's share."""
    import asyncio  # noqa: PLC0415

    from ttsfleet.gateway.limits import STREAMS, Limiter  # noqa: PLC0415

    parsed = config.parse(document(rateLimits=limits(concurrentStreams=4) | {"localShare": 0.5}))
    assert parsed.rate_limits is not None
    limiter = Limiter(parsed.rate_limits)

    async def run() -> list[tuple[str | None, int | None]]:
        first = await limiter.admit("acme", 10)
        second = await limiter.admit("acme", 10)
        third = await limiter.admit("acme", 10)
        await limiter.release(first)
        fourth = await limiter.admit("acme", 10)
        return [(a.refused, a.open_streams) for a in (first, second, third, fourth)]

    assert asyncio.run(run()) == [(None, 1), (None, 2), (STREAMS, 2), (None, 2)]
