"""The gateway's config: what it refuses, naming the field, and how fleets balance."""

from __future__ import annotations

from typing import Any

import pytest

from ttsfleet.gateway import config
from ttsfleet.gateway.auth import ConfigError
from ttsfleet.gateway.cache import ReplyCache, normalise
from ttsfleet.gateway.fleet import Fleet

ROUTE = {"models": ["tts-1"], "fleet": {"name": "joe", "voice": "en_US-joe-medium"}}
AUTH = {"issuer": "https://i.test", "audiences": ["gw"], "jwksFile": "/keys/jwks.json"}


def test_a_minimal_config_routes_by_model_and_defaults_like_openai() -> None:
    parsed = config.parse({"routes": [ROUTE], "auth": AUTH})
    assert parsed.route("tts-1") is not None and parsed.route("tts-1-hd") is None
    assert parsed.max_input_characters == 4096
    assert parsed.balancer == "least-outstanding"
    assert list(parsed.fleets()) == ["default/joe"]
    assert parsed.auth is not None and parsed.auth.required_scopes == ("speech",)


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"routes": []}, "routes"),
        ({"routes": [ROUTE, ROUTE]}, "routes[1].models"),
        ({"routes": [ROUTE | {"models": []}]}, "routes.0.models"),
        ({"routes": [ROUTE], "auth": AUTH | {"algorithms": ["none"]}}, "auth.algorithms"),
        ({"routes": [ROUTE], "auth": AUTH | {"algorithms": ["HS256", "RS256"]}}, "HS"),
        ({"routes": [ROUTE], "auth": {k: v for k, v in AUTH.items() if k != "jwksFile"}}, "jwks"),
        ({"routes": [ROUTE], "maxInputCharacters": 5000}, "maxInputCharacters"),
        ({"routes": [ROUTE], "balancer": "random"}, "balancer"),
        ({"routes": [ROUTE], "surprise": 1}, "surprise"),
    ],
)
def test_bad_configs_are_refused_naming_the_field(document: Any, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        config.parse(document)


def test_fleet_balances_on_outstanding_characters_and_forgets_departed_replicas() -> None:
    fleet = Fleet("ns/f", seed=1)
    fleet.set_addresses(["a:1", "b:1"])
    fleet.begin("a:1", 3000)
    assert all(fleet.pick(10) == "b:1" for _ in range(20))  # two replicas: both sampled
    assert fleet.pick(10, exclude=frozenset({"b:1"})) == "a:1"
    fleet.set_addresses(["b:1"])
    assert fleet.queued_characters == 3000  # its stream is still open
    fleet.end("a:1", 3000)
    assert "a:1" not in fleet.load
    assert fleet.queued_characters == 0 and fleet.streams == 0


def test_fleet_ejects_a_failing_replica_then_takes_it_back() -> None:
    now = [0.0]
    fleet = Fleet("ns/f", seed=2, clock=lambda: now[0])
    fleet.set_addresses(["a:1", "b:1"])
    for _ in range(3):
        fleet.record("a:1", ok=False)
    assert {fleet.pick(1) for _ in range(20)} == {"b:1"}
    now[0] = 6.0  # past the first ejection (5 s)
    assert {fleet.pick(1) for _ in range(50)} == {"a:1", "b:1"}


def test_round_robin_takes_turns_whatever_the_load() -> None:
    fleet = Fleet("ns/f", round_robin=True)
    fleet.set_addresses(["a:1", "b:1", "c:1"])
    fleet.begin("a:1", 10_000)
    assert sorted(fleet.pick(1) or "" for _ in range(6)) == ["a:1"] * 2 + ["b:1"] * 2 + ["c:1"] * 2


def test_the_reply_cache_keeps_whole_replies_within_its_bound_least_recent_out() -> None:
    cache = ReplyCache(max_bytes=800)
    assert cache.put(("a",), [b"x" * 50, b"y" * 50])
    assert cache.put(("b",), [b"z" * 100])
    assert cache.get(("a",)) == b"x" * 50 + b"y" * 50  # a is now the most recent
    assert not cache.put(("big",), [b"q" * 101])  # over an eighth of the bound
    for i in range(7):  # 900 bytes asked for: the least recent (b) goes
        cache.put((f"c{i}",), [b"w" * 100])
    assert cache.size <= 800
    assert cache.get(("b",)) is None and cache.get(("a",)) is not None
    assert normalise("  Hello \n  world ") == "Hello world"
