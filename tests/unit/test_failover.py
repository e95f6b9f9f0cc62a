"""Regions, pure parts: observers and the quorum, failback, priorities, capacity, residency."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from ttsfleet.api.v1alpha1 import (
    RegionDetection,
    RegionFailback,
    RegionState,
    ResidencySet,
    TtsRegionSpec,
)
from ttsfleet.cluster.local import free_port
from ttsfleet.failover import residency, traffic
from ttsfleet.failover.agent import Agent, Target
from ttsfleet.failover.failback import Failback
from ttsfleet.failover.health import WITNESS, Observer, Probe, Vote, quorum

RULES = RegionDetection()  # 3 failures to go down, 5 good probes to come back


def run(observer: Observer, outcomes: str, start: float = 0.0) -> list[bool]:
    """Feed probes every 2 s: '+' a good one, '-' no audio, 's' audio but too slow."""
    seen = []
    for i, c in enumerate(outcomes):
        probe = Probe(start + 2 * i, ok=c != "-", ttfa_ms=5000 if c == "s" else 80)
        seen.append(observer.observe(probe))
    return seen


def test_an_observer_votes_down_after_three_failures_and_up_after_five_good_probes() -> None:
    observer = Observer(RULES)
    assert run(observer, "--+--s") == [True, True, True, True, True, False]
    assert "first audio after 5000 ms" in observer.reason
    assert run(observer, "++++-+++++") == [False] * 9 + [True]


def test_a_gateway_failing_half_its_requests_fails_the_probe_even_with_audio() -> None:
    observer = Observer(RegionDetection(failures_to_down=1, recover_after=1))
    assert not observer.observe(Probe(0, ok=True, ttfa_ms=90, error_rate=0.6))
    assert "60% of requests failed" in observer.reason


def votes(region: str, down_by: list[str], up_by: list[str], at: float = 0.0) -> dict[str, Vote]:
    out = {o: Vote(o, region, False, at) for o in down_by}
    return out | {o: Vote(o, region, True, at) for o in up_by}


def test_three_regions_need_two_other_observers_to_agree() -> None:
    # One broken link: eu sees us down, ap still reaches it. No failover.
    cut = quorum("us", 3, votes("us", ["eu"], ["ap"]), now=1, stale_after=10)
    assert not cut.down and cut.suspect and cut.down_votes == ["eu"]
    lost = quorum("us", 3, votes("us", ["eu", "ap"], []), now=1, stale_after=10)
    assert lost.down
    # The region's own vote, or the witness's, is not an observer in another region.
    assert not quorum("us", 3, votes("us", ["us", "eu", WITNESS], []), 1, 10).down


def test_two_regions_need_the_witness_to_break_the_tie() -> None:
    assert not quorum("us", 2, votes("us", ["eu"], [WITNESS]), 1, 10).down  # the link is cut
    assert quorum("us", 2, votes("us", ["eu", WITNESS], []), 1, 10).down


def test_a_stale_vote_neither_fails_a_region_over_nor_holds_it_down() -> None:
    old = votes("us", ["eu", "ap"], [], at=0.0)
    assert not quorum("us", 3, old, now=30, stale_after=10).down
    assert quorum("us", 3, old, now=5, stale_after=10).down


FAILBACK = RegionFailback(stabilisation_seconds=60, steps=[10, 25, 50, 100], step_seconds=30)


def drive(
    fb: Failback, timeline: list[tuple[float, bool]], until: float
) -> list[tuple[float, int]]:
    """Feed the quorum's verdict every second; returns (time, percent) at each change."""
    changes: list[tuple[float, int]] = []
    marks = dict(timeline)
    down = False
    for t in range(int(until)):
        down = marks.get(t, down)
        before = fb.percent
        fb.update(down, False, float(t))
        if fb.percent != before or not changes:
            changes.append((float(t), fb.percent))
    return changes


def test_a_returning_region_stabilises_then_ramps_10_25_50_100() -> None:
    fb = Failback(FAILBACK)
    changes = drive(fb, [(10, True), (20, False)], until=400)
    assert changes == [(0, 100), (10, 0), (80, 10), (110, 25), (140, 50), (170, 100)]
    assert fb.state is RegionState.HEALTHY


def test_a_region_flapping_every_20_seconds_never_takes_traffic_back() -> None:
    fb = Failback(FAILBACK)
    flaps = [(t, (t // 20) % 2 == 0) for t in range(0, 300, 20)]
    changes = drive(fb, flaps, until=300)
    assert changes == [(0, 0)]  # down at once, and never back while it flaps
    assert fb.window > 60  # each failure during failback lengthened the window


def test_failing_soon_after_returning_doubles_the_window_and_a_calm_spell_resets_it() -> None:
    fb = Failback(FAILBACK)
    drive(fb, [(0, True), (1, False)], until=200)
    assert fb.state is RegionState.HEALTHY and fb.window == 60
    fb.update(True, False, 300)  # 130 s after its return: within maxWindowSeconds
    assert fb.window == 120
    fb.update(False, False, 301)
    fb.update(False, False, 420)
    assert fb.state is RegionState.STABILISING  # 119 s of its 120 s window
    fb.update(False, False, 421)
    assert fb.state is RegionState.RAMPING and fb.percent == 10
    for t in range(422, 600):
        fb.update(False, False, t)
    fb.update(True, False, 600 + 1800 + 1)  # long after its return: the base window
    assert fb.window == 60


def test_suspect_keeps_all_traffic() -> None:
    fb = Failback(FAILBACK)
    assert fb.update(False, True, 1) is RegionState.SUSPECT and fb.percent == 100


ORDER = ["eu", "us", "ap"]  # for clients in eu: eu, then us, then ap


def test_priorities_are_nearest_first_and_leave_out_regions_not_taking_traffic() -> None:
    full = {"eu": 100, "us": 100, "ap": 100}
    assert traffic.priorities(ORDER, full) == [[("eu", 100)], [("us", 100)], [("ap", 100)]]
    assert traffic.priorities(ORDER, full | {"eu": 0}) == [[("us", 100)], [("ap", 100)]]
    assert traffic.priorities(ORDER, {"eu": 0, "us": 0, "ap": 0}) == []


def test_a_ramping_region_shares_level_0_with_the_nearest_full_region() -> None:
    levels = traffic.priorities(ORDER, {"eu": 25, "us": 100, "ap": 100})
    assert levels == [[("eu", 25), ("us", 75)], [("ap", 100)]]


def test_standby_regions_come_after_every_active_one() -> None:
    levels = traffic.priorities(ORDER, {"eu": 100, "us": 100, "ap": 100}, frozenset({"us"}))
    assert levels == [[("eu", 100)], [("ap", 100)], [("us", 100)]]


def test_published_weights_follow_the_share_and_wake_a_standby_only_when_needed() -> None:
    weights = {"eu": 100, "us": 200, "ap": 50}
    assert traffic.published_weights(weights, {"eu": 25, "us": 100, "ap": 100}) == {
        "eu": 25,
        "us": 200,
        "ap": 50,
    }
    standby = frozenset({"ap"})
    assert traffic.published_weights(weights, {"eu": 100, "us": 0, "ap": 100}, standby) == {
        "eu": 100,
        "us": 0,
        "ap": 0,
    }
    assert traffic.published_weights(weights, {"eu": 0, "us": 0, "ap": 100}, standby)["ap"] == 50


def test_static_stability_reserves_n_over_n_minus_1() -> None:
    assert traffic.reserve(90, {"us": 90, "ap": 90}) == pytest.approx(135)  # 90 * 3 / 2
    assert traffic.reserve(100, {"us": 100}) == pytest.approx(200)  # two regions: 2x
    assert traffic.reserve(90, {"us": 90, "ap": 90}, share=0) == 90
    # Unequal regions: the largest peer's load, split over the other survivors.
    assert traffic.reserve(50, {"us": 200, "ap": 10}) == pytest.approx(150)


def test_a_lost_region_is_split_over_survivors_by_free_capacity() -> None:
    split = traffic.takeover(60, {"us": (100, 40), "ap": (100, 80)})
    assert split == pytest.approx({"us": 45, "ap": 15})
    short = traffic.takeover(200, {"us": (100, 40), "ap": (100, 80)})
    assert sum(short.values()) == pytest.approx(200)
    assert short["us"] > short["ap"]
    assert traffic.floor(45, 4, "peer eu lost").replicas == 12


EU = ResidencySet(name="eu", tenants=["acme-eu"], regions=["eu-west", "eu-central"])


def test_a_pinned_tenant_is_refused_outside_its_set_and_told_where_to_go() -> None:
    sets = [EU]
    assert residency.decide("acme-eu", "eu-west", sets, ["eu-west"]).allowed
    assert residency.decide("anyone", "us-east", sets, []).allowed
    misrouted = residency.decide("acme-eu", "us-east", sets, ["us-east", "eu-central"])
    assert (misrouted.allowed, misrouted.status) == (False, 421)
    assert "'eu-central'" in misrouted.message and "eu-west, eu-central" in misrouted.message


def test_a_pinned_tenant_whose_regions_are_all_down_gets_503_naming_its_set() -> None:
    refused = residency.decide("acme-eu", "us-east", [EU], ["us-east", "ap-south"])
    assert (refused.allowed, refused.status) == (False, 503)
    assert "residency set 'eu' (eu-west, eu-central)" in refused.message
    assert "not served outside them" in refused.message


def view(**regions: tuple[int, float]) -> list[dict[str, object]]:
    """An agent's status.regions: name=(trafficPercent, streams)."""
    return [{"name": n, "trafficPercent": p, "streams": s} for n, (p, s) in regions.items()]


def test_a_region_reserves_for_a_peer_and_takes_its_share_of_a_lost_one() -> None:
    steady = traffic.needs("eu", view(eu=(100, 60), us=(100, 60), ap=(100, 60)))
    assert (steady.own, steady.reserve, steady.takeover) == (60, 30, 0)  # 60 * 3/2 in all
    lost = traffic.needs("eu", view(eu=(100, 60), us=(0, 60), ap=(100, 60)))
    assert lost.lost == ("us",) and lost.takeover == pytest.approx(30)  # half of us's 60
    assert lost.reserve == 30  # the steady reserve: what absorbs the loss
    assert traffic.needs("us", view(eu=(100, 60), us=(0, 60))).takeover == 0  # it is lost


def test_each_fleet_floor_is_its_part_of_the_regions_needs() -> None:
    lost = traffic.needs("eu", view(eu=(100, 60), us=(0, 60), ap=(100, 60)))
    steady = traffic.needs("eu", view(eu=(100, 60), us=(100, 60), ap=(100, 60)))
    assert traffic.fleet_floor(steady, 1.0, 1.0, 4).replicas == 23  # (60 + 30) / 4
    assert traffic.fleet_floor(steady, 0.0, 1.0, 4).replicas == 0  # no reserve asked
    # The loss of us: the reserve already there absorbs eu's half, no replica more.
    assert traffic.fleet_floor(lost, 1.0, 1.0, 4).replicas == 23
    # Without a reserve the takeover raises the floor at once; a fleet carrying 45 of
    # the 60 streams open on eu's fleets holds 3/4 of it: 3/4 * (60 + 30) / 4 -> 17.
    parts = traffic.fleet_parts({"joe": 45.0, "ann": 15.0})
    assert parts == {"joe": 0.75, "ann": 0.25}
    made = traffic.fleet_floor(lost, 0.0, parts["joe"], 4)
    assert made.replicas == 17 and made.reason == "region eu takes over from us"
    # An idle region's fleets split a takeover evenly.
    idle = traffic.needs("eu", view(eu=(100, 0), us=(0, 40), ap=(100, 0)))
    assert traffic.fleet_parts({"joe": 0.0, "ann": 0.0}) == {"joe": 0.5, "ann": 0.5}
    assert traffic.fleet_floor(idle, 1.0, 0.5, 4).replicas == 3  # max(20, 20) each / 4
    # A region's load is its 5-minute peak; its one fleet, idle this very second, still
    # holds the region's whole need (it used to hold none of it).
    assert (
        traffic.fleet_floor(steady, 1.0, traffic.fleet_parts({"joe": 0.0})["joe"], 4).replicas == 23
    )


def test_a_restarted_agent_takes_up_its_peers_view_and_never_skips_a_failback() -> None:
    agent = Agent(
        "eu",
        [Target("eu", "http://eu"), Target("us", "http://us"), Target("ap", "http://ap")],
        RULES,
        FAILBACK,
        clock=lambda: 1000.0,
    )
    agent.heard = {
        "us": [
            {"name": "eu", "state": "Ramping", "percent": 25},
            {"name": "ap", "state": "Healthy", "percent": 100},
        ],
        "ap": [{"name": "eu", "state": "Stabilising", "percent": 0}],
    }
    agent.join(1000.0)
    # The lowest share any peer holds: eu starts stabilising (its full window), ap healthy.
    assert agent.failbacks["eu"].state is RegionState.STABILISING
    assert agent.failbacks["ap"].state is RegionState.HEALTHY
    fb = Failback(FAILBACK)
    fb.resume(RegionState.RAMPING, 30, 0.0)
    assert (fb.state, fb.percent) == (RegionState.RAMPING, 25)


def test_an_edited_spec_is_taken_up_and_keeps_what_the_agent_knows() -> None:
    def spec(peers: list[dict[str, str]], window: int = 60) -> TtsRegionSpec:
        return TtsRegionSpec.model_validate(
            {"region": "eu", "gateway": "speech", "peers": peers,
             "failback": {"stabilisationSeconds": window}}
        )  # fmt: skip

    us = {"name": "us", "gatewayUrl": "http://us-old"}
    ap = {"name": "ap", "gatewayUrl": "http://ap", "statusUrl": "http://ap/status"}
    agent = Agent.for_region(spec([us, ap]), "http://eu", clock=lambda: 100.0)
    agent.failbacks["ap"].update(True, False, 100.0)  # ap is down in this agent's eyes
    agent.votes[("ap", "us")] = Vote("ap", "us", True, 99.0)
    agent.votes[("eu", "ap")] = Vote("eu", "ap", False, 99.0)

    # GitOps moves us to a new address and adds in; the failback window changes.
    moved = {"name": "us", "gatewayUrl": "http://us-new", "statusUrl": "http://us/status"}
    new = {"name": "in", "gatewayUrl": "http://in"}
    agent.reconfigure(spec([moved, ap, new], window=120), "http://eu")
    assert [(t.name, t.gateway_url, t.status_url) for t in agent.targets] == [
        ("eu", "http://eu", None), ("us", "http://us-new", "http://us/status"),
        ("ap", "http://ap", "http://ap/status"), ("in", "http://in", None),
    ]  # fmt: skip
    assert agent.failbacks["ap"].state is RegionState.DOWN  # not forgotten
    assert agent.failbacks["ap"].rules.stabilisation_seconds == 120
    assert agent.failbacks["in"].state is RegionState.HEALTHY
    assert set(agent.observers) == {"eu", "us", "ap", "in"}

    # ap removed: its votes (as observer and as region) and its state go with it.
    agent.reconfigure(spec([moved, new]), "http://eu")
    assert agent.regions == ["eu", "us", "in"]
    assert "ap" not in agent.failbacks and not any("ap" in key for key in agent.votes)


@contextlib.asynccontextmanager
async def ap_sees_us_down(us_url: str = "http://us") -> AsyncIterator[str]:
    """ap's agent, voting us down, serving its /status on loopback: its URL."""
    ap = Agent("ap", [Target("ap", "http://ap"), Target("us", us_url)], RULES,
               clock=lambda: 100.0)  # fmt: skip
    ap.votes[("ap", "us")] = Vote("ap", "us", False, 99.5)
    runner = web.AppRunner(ap.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/status"
    finally:
        await runner.cleanup()


def eu_suspecting_us(gateway: str, ap_status: str) -> Agent:
    """eu's agent, which votes us down and has not heard ap yet (every gateway at
    `gateway`)."""
    eu = Agent("eu", [Target("eu", gateway), Target("us", gateway),
                      Target("ap", gateway, ap_status)], RULES, FAILBACK,
               clock=lambda: 100.0)  # fmt: skip
    eu.joined = True
    eu.votes[("eu", "us")] = Vote("eu", "us", False, 99.8)
    return eu


def test_a_suspect_region_hears_its_peers_between_rounds_and_goes_down_at_once() -> None:
    """eu sees us down and waits for the quorum: listen() reads ap's votes over HTTP (no
    probes), and us is Down without waiting for eu's next round."""

    async def scenario() -> tuple[bool, str]:
        async with ap_sees_us_down() as ap_status:
            eu = eu_suspecting_us("http://gateway", ap_status)
            eu.decide(100.0)
            suspect = eu.suspect()
            async with aiohttp.ClientSession() as session:
                await eu.listen(session)
            return suspect, eu.state("us").value

    suspect, state = asyncio.run(scenario())
    assert suspect and state == "Down"


def test_a_peers_vote_counts_before_a_hanging_probe_of_the_lost_region_ends() -> None:
    """A probe of a region that is gone waits its whole timeout; the quorum does not."""

    async def scenario() -> tuple[str, bool]:
        with socket.socket() as hang:  # accepts connections (its backlog), never answers
            hang.bind(("127.0.0.1", 0))
            hang.listen(16)
            gone = f"http://127.0.0.1:{hang.getsockname()[1]}"
            async with ap_sees_us_down(gone) as ap_status:
                eu = eu_suspecting_us(gone, ap_status)
                async with aiohttp.ClientSession() as session:
                    round_ = asyncio.ensure_future(eu.tick(session))
                    await asyncio.sleep(0.5)  # probes time out after 1.5 s
                    state, probing = eu.state("us").value, not round_.done()
                    await round_
                return state, probing

    state, probing = asyncio.run(scenario())
    assert probing and state == "Down"


def test_a_regions_load_is_its_peak_over_five_minutes_and_a_lost_one_keeps_it() -> None:
    now = [0.0]
    three = [Target("eu", "http://eu"), Target("us", "http://us"), Target("ap", "http://ap")]
    agent = Agent("eu", three, RULES, FAILBACK, clock=lambda: now[0])
    for t, streams in [(0, 6.0), (2, 1.0), (100, 0.0), (250, 2.0)]:
        agent.note_load("us", streams, float(t))
    assert agent.load["us"] == 6.0  # the burst at t=0 still counts: reserve for the peak
    agent.note_load("us", 1.0, 301.0)
    assert agent.load["us"] == 2.0  # five minutes on, the burst has left the window
    now[0] = 302.0
    agent.votes = {(o, "us"): Vote(o, "us", False, 301.5) for o in ("eu", "ap")}
    agent.decide(302.0)
    assert agent.state("us") is RegionState.DOWN
    assert agent.streams("us", 0) == 2.0  # what survivors take over: the same peak


def test_an_observer_cut_off_from_every_other_region_says_nothing_of_them() -> None:
    """eu's node loses its link: its probes of us and ap fail, its own gateway answers.
    It must not come back holding down votes on both (one flaky vote from ap on us
    would then make a false quorum): its votes on them go stale instead."""
    agent = Agent("eu", [Target("eu", "http://eu"), Target("us", "http://us"),
                         Target("ap", "http://ap")], RULES, FAILBACK)  # fmt: skip
    ok, gone = Probe(0, ok=True, ttfa_ms=80), Probe(0, ok=False, why="no route to host")
    agent.observe_round([ok, ok, ok], 0.0)
    for t in range(1, 6):  # five rounds cut off, more than failuresToDown
        agent.observe_round([ok, gone, gone], 2.0 * t)
    assert agent.isolated
    assert agent.votes[("eu", "us")].up and agent.votes[("eu", "us")].at == 0.0  # stale
    assert agent.votes[("eu", "eu")].at == 10.0  # its own region: still observed
    # ap votes us down (a slow probe, say): with eu's stale vote that is no quorum.
    agent.votes[("ap", "us")] = Vote("ap", "us", False, 10.0)
    agent.decide(10.5)
    assert agent.state("us") is not RegionState.DOWN
    # One region unreachable is not isolation: that is how a loss looks.
    agent.observe_round([ok, gone, ok], 12.0)
    assert not agent.isolated and agent.votes[("eu", "us")].at == 12.0
