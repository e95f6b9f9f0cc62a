"""What the operator makes of a TtsGateway: children, the config its pods read, status."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from pydantic import ValidationError

from ttsfleet.api import v1alpha1 as api
from ttsfleet.gateway import config as gateway_config
from ttsfleet.resources import gateway as gw

Manifest = dict[str, Any]


def body(**spec: Any) -> Manifest:
    base: Manifest = {
        "routes": [
            {"models": ["tts-1", "tts-1-hd"], "fleet": "joe", "voices": ["alloy", "nova"]},
        ],
        "auth": {"issuer": "https://i.test", "audiences": ["gw"],
                 "jwksSecretRef": {"name": "keys"}},
    }  # fmt: skip
    return {
        "apiVersion": api.API_VERSION, "kind": api.GATEWAY_KIND,
        "metadata": {"name": "speech", "namespace": "voice", "uid": "u-1", "generation": 3},
        "spec": base | spec,
    }  # fmt: skip


FLEET = {"metadata": {"name": "joe"}, "spec": {"model": {"voice": "en_US-joe-medium"}}}


def kinds(children: list[Manifest]) -> dict[str, Manifest]:
    return {c["kind"]: c for c in children}


def test_children_cover_identity_config_pods_service_and_budget() -> None:
    made = kinds(gw.children(gw.Gateway.from_body(body()), {"joe": FLEET}))
    assert set(made) == {
        "ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding",
        "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy",
    }  # fmt: skip
    deployment = made["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "speech-gateway"
    assert deployment["spec"]["replicas"] == 2
    assert {v["name"]: v for v in pod["volumes"]}["jwks"]["secret"]["secretName"] == "keys"
    # Namespaced children are owned; the cluster-scoped ones cannot be.
    for kind in ("ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service"):
        assert made[kind]["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert "ownerReferences" not in made["ClusterRoleBinding"]["metadata"]
    assert made["ClusterRoleBinding"]["metadata"]["name"] == "ttsfleet-gateway-voice-speech"
    assert made["ClusterRole"]["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}
    ]
    assert made["Role"]["rules"][0]["resources"] == ["endpointslices"]


def test_the_config_it_writes_is_one_the_gateway_accepts() -> None:
    gateway = gw.Gateway.from_body(body(maxInputCharacters=1000, balancer="round-robin"))
    document = gw.config(gateway, {"joe": FLEET})
    parsed = gateway_config.parse(document)
    route = parsed.route("tts-1-hd")
    assert route is not None
    assert route.fleet.key == "voice/joe" and route.fleet.service == "joe"
    assert route.fleet.voice == "en_US-joe-medium" and route.fleet.endpoints is None
    # The fleet's model goes into the reply cache's key: a new precision is a new key.
    assert route.fleet.version == f"{api.DEFAULT_IMAGE} fp16"
    fp32 = FLEET | {"spec": {"model": {"voice": "en_US-joe-medium", "precision": "fp32"}}}
    other = gateway_config.parse(gw.config(gateway, {"joe": fp32})).route("tts-1")
    assert other is not None and other.fleet.version.endswith(" fp32")
    assert parsed.max_input_characters == 1000 and parsed.balancer == "round-robin"
    assert parsed.auth is not None
    assert parsed.auth.jwks_file == f"{gw.JWKS_DIR}/jwks.json"
    assert parsed.auth.ticket_key_file == f"{gw.TICKETS_DIR}/{gw.TICKET_KEY}"


TIERS = {
    "tiers": [{"name": "free", "requestsPerSecond": 10, "requestBurst": 20,
               "charactersPerSecond": 1000, "characterBurst": 8192, "concurrentStreams": 8},
              {"name": "gold", "requestsPerSecond": 100, "requestBurst": 200}],
    "defaultTier": "free", "tenants": {"acme": "gold"}, "redisUrl": "redis://redis.voice:6379",
}  # fmt: skip


def test_limits_breaker_and_fallback_reach_the_gateway() -> None:
    routes = [{"models": ["tts-1"], "fleet": "joe", "fallback": "joe-cpu",
               "maxStreamsPerReplica": 6}]  # fmt: skip
    gateway = gw.Gateway.from_body(
        body(routes=routes, replicas=4, rateLimits=TIERS, breaker={"openSeconds": 3})
    )
    cpu = {"metadata": {"name": "joe-cpu"}, "spec": {"model": {"voice": "en_US-lessac-low"}}}
    parsed = gateway_config.parse(gw.config(gateway, {"joe": FLEET, "joe-cpu": cpu}))
    route = parsed.route("tts-1")
    assert route is not None and route.fallback is not None
    assert route.fallback.key == "voice/joe-cpu" and route.fallback.voice == "en_US-lessac-low"
    assert route.fleet.max_streams_per_replica == 6
    limits = parsed.rate_limits
    assert limits is not None and limits.redis_url == "redis://redis.voice:6379"
    assert limits.tier_of("acme").requests.burst == 200
    assert limits.tier_of("someone").concurrent_streams == 8
    assert limits.local_share == 0.25  # 4 replicas alone still admit at most each limit
    assert parsed.breaker.open_seconds == 3 and parsed.breaker.min_requests == 5
    # The fallback is a fleet of the gateway's too: a missing one is reported by name.
    conditions = {
        c["type"]: c for c in gw.conditions(gateway, None, {"joe": FLEET, "joe-cpu": None})
    }
    assert "spec.routes[0].fallback" in conditions["Stalled"]["message"]
    assert gateway.spec.fleet_names() == ["joe", "joe-cpu"]


def test_replicas_share_one_ticket_key_from_a_secret_the_gateway_owns() -> None:
    gateway = gw.Gateway.from_body(body())
    secret = gw.ticket_secret(gateway, b"k" * 32)
    assert secret["metadata"]["name"] == "speech-gateway-tickets"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert base64.b64decode(secret["data"][gw.TICKET_KEY]) == b"k" * 32
    pod = kinds(gw.children(gateway, {"joe": FLEET}))["Deployment"]["spec"]["template"]["spec"]
    volume = {v["name"]: v for v in pod["volumes"]}["tickets"]
    assert volume["secret"]["secretName"] == "speech-gateway-tickets"
    mount = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}["tickets"]
    assert mount["mountPath"] == gw.TICKETS_DIR and mount["readOnly"]
    # Without auth there are no tickets, and no Secret to mount.
    open_pod = kinds(gw.children(gw.Gateway.from_body(body(auth=None)), {"joe": FLEET}))
    volumes = open_pod["Deployment"]["spec"]["template"]["spec"]["volumes"]
    assert "tickets" not in {v["name"] for v in volumes}


def test_a_route_change_changes_the_configmap_but_not_the_pod_template() -> None:
    before = kinds(gw.children(gw.Gateway.from_body(body()), {"joe": FLEET}))
    routes = [{"models": ["tts-1", "gpt-4o-mini-tts"], "fleet": "joe"}]
    after = kinds(gw.children(gw.Gateway.from_body(body(routes=routes)), {"joe": FLEET}))
    assert before["ConfigMap"]["data"] != after["ConfigMap"]["data"]
    assert before["Deployment"]["spec"]["template"] == after["Deployment"]["spec"]["template"]


def test_a_missing_fleet_is_reported_naming_the_route() -> None:
    gateway = gw.Gateway.from_body(body())
    conditions = {c["type"]: c for c in gw.conditions(gateway, None, {"joe": None})}
    assert conditions["Ready"]["status"] == "False"
    assert conditions["Stalled"]["status"] == "True"
    assert "spec.routes[0].fleet" in conditions["Stalled"]["message"]


def test_ready_once_every_replica_is() -> None:
    gateway = gw.Gateway.from_body(body())
    deployment = {"status": {"readyReplicas": 2, "updatedReplicas": 2, "replicas": 2}}
    ready = {c["type"]: c["status"] for c in gw.conditions(gateway, deployment, {"joe": FLEET})}
    assert ready == {"Ready": "True", "Reconciling": "False", "Stalled": "False"}
    half = {"status": {"readyReplicas": 1, "updatedReplicas": 2}}
    assert gw.conditions(gateway, half, {"joe": FLEET})[0]["status"] == "False"


@pytest.mark.parametrize(
    ("spec", "where"),
    [
        ({"routes": []}, "routes"),
        ({"routes": [{"models": ["tts-1"], "fleet": "Not_A_Name"}]}, "fleet"),
        ({"routes": [{"models": ["bad name"], "fleet": "joe"}]}, "models"),
        ({"maxInputCharacters": 5000}, "maxInputCharacters"),
        ({"auth": {"issuer": "x", "audiences": []}}, "audiences"),
    ],
)
def test_the_models_refuse_what_the_schema_refuses(spec: Manifest, where: str) -> None:
    with pytest.raises(ValidationError, match=where):
        gw.Gateway.from_body(body(**spec))


def test_a_model_routed_twice_is_found() -> None:
    routes = [{"models": ["tts-1"], "fleet": "a"}, {"models": ["x", "tts-1"], "fleet": "b"}]
    spec = api.TtsGatewaySpec.model_validate({"routes": routes})
    assert spec.duplicate_model() == (1, "tts-1")


def test_tls_mounts_the_secret_and_serves_https_on_443() -> None:
    gateway = gw.Gateway.from_body(body(tls={"secretName": "speech-cert"}))
    made = kinds(gw.children(gateway, {"joe": FLEET}))
    pod = made["Deployment"]["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["tls"]["secret"]["secretName"] == "speech-cert"
    container = pod["containers"][0]
    assert container["ports"] == [{"name": "https", "containerPort": gw.PORT, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert made["Service"]["spec"]["ports"][0] | {} == {
        "name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"
    }  # fmt: skip
    parsed = gateway_config.parse(gw.config(gateway, {"joe": FLEET}))
    assert parsed.tls is not None and parsed.tls.cert_file == f"{gw.TLS_DIR}/tls.crt"
    assert gateway.url.startswith("https://speech-gateway.voice.svc")
    plain = kinds(gw.children(gw.Gateway.from_body(body()), {"joe": FLEET}))
    assert plain["Service"]["spec"]["ports"][0]["port"] == 80


def test_the_gateways_network_policy_opens_its_listener_and_reaches_only_what_it_needs() -> None:
    routes = [{"models": ["tts-1"], "fleet": "joe", "fallback": "joe-cpu"}]
    gateway = gw.Gateway.from_body(body(routes=routes, rateLimits=TIERS))
    policy = kinds(gw.children(gateway, {"joe": FLEET}))["NetworkPolicy"]["spec"]
    assert policy["podSelector"] == {"matchLabels": {gw.GATEWAY_LABEL: "speech"}}
    assert policy["ingress"] == [{"ports": [{"protocol": "TCP", "port": "http"}]}]
    fleets, dns, apiserver, redis = policy["egress"]
    assert fleets["to"] == [
        {"podSelector": {"matchLabels": {"ttsfleet.io/deployment": name}}}
        for name in ("joe", "joe-cpu")
    ]
    assert fleets["ports"] == [{"protocol": "TCP", "port": 8001}]
    assert {p["port"] for p in dns["ports"]} == {53} and "to" not in dns
    assert redis["ports"] == [{"protocol": "TCP", "port": 6379}]
    assert {p["port"] for p in apiserver["ports"]} == {443, 6443}


def test_a_managed_redis_is_one_pod_only_the_gateway_reaches_and_the_config_finds() -> None:
    limits = {"tiers": TIERS["tiers"], "defaultTier": "free", "managedRedis": {}}
    gateway = gw.Gateway.from_body(
        body(rateLimits=limits, replicas=3, nodeSelector={"pool": "edge"})
    )
    children = gw.children(gateway, {"joe": FLEET})
    redis = {c["kind"]: c for c in children if c["metadata"]["name"] == "speech-gateway-redis"}
    assert set(redis) == {"Deployment", "Service", "NetworkPolicy"}
    deployment = redis["Deployment"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["image"] == api.DEFAULT_REDIS_IMAGE and container["command"] == [
        "redis-server"
    ]
    args = container["args"]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
    assert args[args.index("--maxmemory") + 1] == "64mb"
    assert container["readinessProbe"]["tcpSocket"] == {"port": "redis"}
    assert pod["spec"]["nodeSelector"] == {"pool": "edge"}  # where the gateway runs
    # The gateway's own selectors must not catch the Redis pod (its Service, its budget,
    # the fleets' policies admit pods by GATEWAY_LABEL).
    assert gw.GATEWAY_LABEL not in pod["metadata"]["labels"]
    assert redis["Service"]["spec"]["selector"] == {gw.REDIS_LABEL: "speech"}
    assert redis["Service"]["spec"]["ports"][0]["port"] == 6379
    policy = redis["NetworkPolicy"]["spec"]
    assert policy["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": {gw.GATEWAY_LABEL: "speech"}}}],
         "ports": [{"protocol": "TCP", "port": 6379}]}
    ]  # fmt: skip
    assert policy["egress"] == [] and policy["policyTypes"] == ["Ingress", "Egress"]
    # The gateway may reach it, and finds it through its Service's EndpointSlices.
    gateway_policy = next(
        c for c in children if c["kind"] == "NetworkPolicy" and c is not redis["NetworkPolicy"]
    )
    to_redis = {"to": [{"podSelector": {"matchLabels": {gw.REDIS_LABEL: "speech"}}}],
                "ports": [{"protocol": "TCP", "port": 6379}]}  # fmt: skip
    assert to_redis in gateway_policy["spec"]["egress"]
    parsed = gateway_config.parse(gw.config(gateway, {"joe": FLEET}))
    assert parsed.rate_limits is not None and parsed.rate_limits.redis_url is None
    assert parsed.rate_limits.redis_service == gateway_config.ServiceRef(
        namespace="voice", name="speech-gateway-redis", port="redis"
    )
    assert parsed.rate_limits.local_share == pytest.approx(1 / 3)
    # Without managedRedis there is none.
    plain = gw.Gateway.from_body(body(rateLimits=TIERS))
    assert not [c for c in gw.children(plain, {"joe": FLEET}) if "redis" in c["metadata"]["name"]]
