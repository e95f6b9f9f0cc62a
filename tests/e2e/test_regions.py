"""Three regions as three local clusters, end to end: each with its operator, a real
tritonserver pod, the TtsGateway and the TtsRegion whose agent (a pod the operator
runs) probes the other regions' gateways across clusters. One region lost (its node's
link cut) goes Down by the other two's votes in both their clusters, its pinned tenant
gets 503 naming its residency set while the others are served by the survivors, and it
comes back stabilised and ramped; a region that flaps never takes traffic back while it
flaps. (`make bench-regions` runs the long scenarios.)"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ttsfleet import multiregion
from ttsfleet.cluster import tokens
from ttsfleet.harness import wait_for
from ttsfleet.multiregion import RegionCluster

REGIONS = ["eu", "us", "ap"]
# 2 s probes, down after 2 failures, back after 3 good ones; a 30 s window, two steps.
DETECTION = {"probeIntervalSeconds": 2, "probeTimeoutMs": 1500, "failuresToDown": 2,
             "recoverAfter": 3}  # fmt: skip
FAILBACK = {"stabilisationSeconds": 30, "steps": [50, 100], "stepSeconds": 4}
RESIDENCY = [{"name": "eu", "tenants": ["acme-eu"], "regions": ["eu"]}]


@pytest.fixture(scope="module")
def regions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RegionCluster]]:
    workdir = tmp_path_factory.mktemp("regions")
    with multiregion.regions_up(
        REGIONS, workdir, detection=DETECTION, failback=FAILBACK, residency=RESIDENCY,
        prefix=f"rg{Path(workdir).name[-4:]}",
    ) as made:  # fmt: skip
        yield made


def token(regions: dict[str, RegionCluster], tenant: str) -> str:
    return tokens.token(regions["eu"].cluster, tenant=tenant)


def changes(probe: Callable[[], str], seen: list[str]) -> Callable[[], str]:
    """`probe`, noting each new value in `seen`."""

    def note() -> str:
        value = probe()
        if value and (not seen or seen[-1] != value):
            seen.append(value)
        return value

    return note


def test_a_lost_region_goes_down_by_quorum_in_every_cluster_and_comes_back_ramped(
    regions: dict[str, RegionCluster],
) -> None:
    eu, us, ap = (regions[r] for r in REGIONS)
    us_gateway = f"http://{us.gateway_address()}"
    # Across clusters, before the loss: us's gateway serves, and sends eu's pinned tenant
    # to eu (421 naming it) rather than serve it outside its set.
    status, served_by = multiregion.speak(us_gateway, token(regions, "acme"))
    assert (status, served_by) == (200, "us"), served_by
    status, message = multiregion.speak(us_gateway, token(regions, "acme-eu"))
    assert status == 421 and "eu" in message, (status, message)

    # Each region's clients' Envoy (in its agent's pod) sends them to their own region.
    edges = {r: f"http://{regions[r].edge_address()}" for r in REGIONS}
    for region, edge in edges.items():
        assert multiregion.speak(edge, token(regions, "acme")) == (200, region)

    eu.cut()
    try:
        for observer in (us, ap):
            wait_for(f"{observer.region} to hold eu down",
                     lambda o=observer: o.states().get("eu") == "Down", timeout=30)  # fmt: skip
        assert sorted(us.view()["eu"]["downVotes"]) == ["ap", "us"], us.view()
        assert ap.view()["eu"]["trafficPercent"] == 0
        # One cut region never fails the others over: us and ap stay healthy everywhere.
        assert us.states() | {"eu": "Healthy"} == dict.fromkeys(REGIONS, "Healthy")
        assert multiregion.speak(us_gateway, token(regions, "acme")) == (200, "us")
        for region in ("us", "ap"):  # their clients' Envoys keep serving them at home
            assert multiregion.speak(edges[region], token(regions, "acme")) == (200, region)

        def refused() -> str:  # once us's gateway has re-read its config
            status, message = multiregion.speak(us_gateway, token(regions, "acme-eu"))
            return message if status == 503 else ""

        message = wait_for("the pinned tenant refused with its set", refused, timeout=30)
        assert "residency set 'eu' (eu)" in message, message
    finally:
        eu.restore()

    seen: list[str] = []
    watch = changes(lambda: ap.states().get("eu", ""), seen)
    wait_for("eu back at 100 % in ap's view", lambda: watch() == "Healthy", timeout=120,
             every=0.25)  # fmt: skip
    assert seen[-3:] == ["Stabilising", "Ramping", "Healthy"], seen
    wait_for("us to see eu healthy", lambda: us.states().get("eu") == "Healthy", timeout=30)
    assert multiregion.speak(us_gateway, token(regions, "acme-eu"))[0] == 421  # eu serves it


def test_a_flapping_region_never_takes_traffic_back_while_it_flaps(
    regions: dict[str, RegionCluster],
) -> None:
    eu, us = regions["eu"], regions["us"]
    wait_for("eu healthy", lambda: us.states().get("eu") == "Healthy", timeout=120)
    percents: list[str] = []
    watch = changes(lambda: str(us.view().get("eu", {}).get("trafficPercent", "")), percents)
    try:
        for _ in range(3):  # cut ~8 s, back ~8 s: never healthy for a whole 30 s window
            eu.cut()
            _hold(watch, 8)
            eu.restore()
            _hold(watch, 8)
        eu.cut()
        wait_for("eu out", lambda: us.states().get("eu") == "Down", timeout=30)
        watch()
    finally:
        eu.restore()
    # Out once (100 -> 0), never back in while it flapped: no oscillation.
    assert percents == ["100", "0"], percents


def _hold(watch: Callable[[], str], seconds: float) -> None:
    """Keep watching for `seconds`."""
    end = time.monotonic() + seconds
    wait_for("the spell", lambda: (watch(), time.monotonic() >= end)[1], timeout=seconds + 5,
             every=0.25)  # fmt: skip
