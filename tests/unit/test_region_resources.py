"""What the operator renders for a TtsRegion, and what its gateway learns from it."""

from __future__ import annotations

import json
from typing import Any

from ttsfleet.api import v1alpha1 as api
from ttsfleet.resources import gateway as gw
from ttsfleet.resources import region as rg

SPEC: dict[str, Any] = {
    "region": "eu-west",
    "gateway": "speech",
    "peers": [
        {"name": "us-east", "gatewayUrl": "https://us-east.speech.example",
         "statusUrl": "https://us-east.speech.example:8090/status"},
        {"name": "ap-south", "gatewayUrl": "https://ap-south.speech.example"},
    ],
    "detection": {"probeTokenSecretRef": {"name": "probe"}},
    "residency": [{"name": "eu", "tenants": ["acme-eu"], "regions": ["eu-west"]}],
}  # fmt: skip


def body(spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None) -> Any:
    meta = {"name": "here", "namespace": "speech", "uid": "u-1", "generation": 1}
    return {"apiVersion": api.API_VERSION, "kind": api.REGION_KIND, "metadata": meta,
            "spec": spec or SPEC, "status": status or {}}  # fmt: skip


def by_kind(children: list[Any]) -> dict[str, Any]:
    return {c["kind"]: c for c in children}


def test_the_agent_may_patch_its_own_regions_status_and_nothing_else() -> None:
    made = by_kind(rg.children(rg.Region.from_body(body()), "http://speech-gateway.speech.svc"))
    assert made["Role"]["rules"] == [
        {"apiGroups": ["ttsfleet.io"], "resources": ["ttsregions/status"],
         "resourceNames": ["here"], "verbs": ["patch"]}
    ]  # fmt: skip
    assert made["RoleBinding"]["subjects"][0]["name"] == "here-region"
    for child in made.values():
        assert child["metadata"]["ownerReferences"][0]["kind"] == "TtsRegion"


def test_the_agent_reads_its_spec_and_probe_token_from_volumes_and_writes_its_status() -> None:
    made = by_kind(rg.children(rg.Region.from_body(body()), "http://speech-gateway.speech.svc"))
    pod = made["Deployment"]["spec"]["template"]["spec"]
    (agent,) = pod["containers"]  # no Envoy unless spec.envoy asks for one
    assert agent["args"][0] == "region"
    assert "--gateway-url=http://speech-gateway.speech.svc" in agent["args"]
    assert "--status-to=speech/here" in agent["args"]
    assert "--token-file=/etc/ttsfleet/probe/token" in agent["args"]
    assert {"name": "probe-token", "secret": {"secretName": "probe"}} in pod["volumes"]
    spec = json.loads(made["ConfigMap"]["data"]["region.json"])["spec"]
    assert api.TtsRegionSpec.model_validate(spec) == api.TtsRegionSpec.model_validate(SPEC)
    assert [p["name"] for p in made["Service"]["spec"]["ports"]] == ["status"]


def test_the_agent_runs_on_the_nodes_its_region_names() -> None:
    placed = SPEC | {
        "nodeSelector": {"topology.kubernetes.io/zone": "eu-west-1a"},
        "tolerations": [{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}],
    }
    made = by_kind(rg.children(rg.Region.from_body(body(placed)), "http://gw"))
    pod = made["Deployment"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"topology.kubernetes.io/zone": "eu-west-1a"}
    assert pod["tolerations"] == [{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}]
    unplaced = by_kind(rg.children(rg.Region.from_body(body()), "http://gw"))
    assert "nodeSelector" not in unplaced["Deployment"]["spec"]["template"]["spec"]


def test_with_spec_envoy_the_region_pod_runs_envoy_fed_by_the_agents_eds_file() -> None:
    spec = SPEC | {"envoy": {}}
    made = by_kind(rg.children(rg.Region.from_body(body(spec)), "http://gw"))
    pod = made["Deployment"]["spec"]["template"]["spec"]
    agent, envoy = pod["containers"]
    assert "--eds=/var/run/ttsfleet/xds/eds.json" in agent["args"]
    assert envoy["image"] == "envoyproxy/envoy:v1.40.0"
    boot = json.loads(made["ConfigMap"]["data"]["envoy.json"])
    (cluster,) = boot["static_resources"]["clusters"]
    eds = cluster["eds_cluster_config"]["eds_config"]["path_config_source"]["path"]
    assert eds == "/var/run/ttsfleet/xds/eds.json"
    assert cluster["outlier_detection"]["max_ejection_percent"] == 100
    assert {"name": "speech", "port": 10000, "targetPort": "speech"} in (
        made["Service"]["spec"]["ports"]
    )


def _trusted_ca(boot: dict[str, Any]) -> str:
    (cluster,) = boot["static_resources"]["clusters"]
    (match,) = cluster["transport_socket_matches"]
    tls = match["transport_socket"]["typed_config"]["common_tls_context"]
    return str(tls["validation_context"]["trusted_ca"]["filename"])


def test_envoy_trusts_a_private_ca_from_a_configmap_for_https_gateways() -> None:
    public = by_kind(rg.children(rg.Region.from_body(body(SPEC | {"envoy": {}})), "http://gw"))
    assert _trusted_ca(json.loads(public["ConfigMap"]["data"]["envoy.json"])) == (
        "/etc/ssl/certs/ca-certificates.crt"
    )
    spec = SPEC | {"envoy": {"caConfigMapRef": {"name": "speech-ca", "key": "bundle.pem"}}}
    made = by_kind(rg.children(rg.Region.from_body(body(spec)), "http://gw"))
    pod = made["Deployment"]["spec"]["template"]["spec"]
    assert {"name": "upstream-ca", "configMap": {"name": "speech-ca"}} in pod["volumes"]
    _, proxy = pod["containers"]
    mount = next(m for m in proxy["volumeMounts"] if m["name"] == "upstream-ca")
    assert mount["readOnly"] is True
    boot = json.loads(made["ConfigMap"]["data"]["envoy.json"])
    assert _trusted_ca(boot) == f"{mount['mountPath']}/bundle.pem"


def test_degraded_names_each_region_that_is_not_healthy_with_its_votes() -> None:
    regions = [
        {"name": "eu-west", "state": "Healthy", "trafficPercent": 100, "downVotes": []},
        {"name": "us-east", "state": "Down", "trafficPercent": 0,
         "downVotes": ["ap-south", "eu-west"]},
        {"name": "ap-south", "state": "Ramping", "trafficPercent": 25, "downVotes": []},
    ]  # fmt: skip
    conditions = rg.conditions(body(status={"regions": regions}), None)
    degraded = next(c for c in conditions if c["type"] == "Degraded")
    assert degraded["status"] == "True"
    assert degraded["message"] == (
        "us-east Down at 0% (down votes: ap-south, eu-west); ap-south Ramping at 25%"
    )
    ready = next(c for c in conditions if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "AgentStarting")


def test_the_gateway_learns_its_region_residency_and_who_takes_traffic() -> None:
    block = gw.region_block(body())
    assert block["name"] == "eu-west"
    assert block["healthy"] == ["eu-west", "us-east", "ap-south"]  # before the agent spoke
    assert block["residency"] == [{"name": "eu", "tenants": ["acme-eu"], "regions": ["eu-west"]}]
    seen = [{"name": "eu-west", "trafficPercent": 100}, {"name": "us-east", "trafficPercent": 0},
            {"name": "ap-south", "trafficPercent": 10}]  # fmt: skip
    assert gw.region_block(body(status={"regions": seen}))["healthy"] == ["eu-west", "ap-south"]


PUBLISHED = SPEC | {
    "gatewayUrl": "https://eu-west.speech.example",
    "peers": [
        {"name": "us-east", "gatewayUrl": "https://us-east.speech.example", "weight": 200},
        {"name": "ap-south", "gatewayUrl": "http://203.0.113.7:8080", "standby": True},
    ],
    "publish": {"hostname": "speech.example", "httpRouteParents": [{"name": "edge"}]},
}


def test_published_records_weigh_each_region_and_drop_one_at_zero() -> None:
    made = {
        c["kind"]: c
        for c in rg.published(
            rg.Region.from_body(body(PUBLISHED)), body(PUBLISHED), "speech-gateway", 80
        )
    }
    records = made["DNSEndpoint"]["spec"]["endpoints"]
    # The standby (ap-south) gets no record while active regions take traffic.
    assert [
        (r["setIdentifier"], r["recordType"], r["targets"], r["providerSpecific"][0]["value"])
        for r in records
    ] == [
        ("eu-west", "CNAME", ["eu-west.speech.example"], "100"),
        ("us-east", "CNAME", ["us-east.speech.example"], "200"),
    ]
    assert {r["dnsName"] for r in records} == {"speech.example"}
    route = made["HTTPRoute"]["spec"]
    assert route["parentRefs"] == [{"name": "edge"}] and route["hostnames"] == ["speech.example"]
    assert [(b["name"], b["weight"]) for b in route["rules"][0]["backendRefs"]] == [
        ("speech-gateway", 100),
        ("here-region-peer-us-east", 200),
        ("here-region-peer-ap-south", 0),
    ]
    peer = made["Service"]  # the last ExternalName Service: ap-south, by address
    assert peer["spec"]["externalName"] == "203.0.113.7"
    # us-east lost, eu-west ramping at 25 %: its record weighs a quarter, us-east has none.
    seen = [{"name": "eu-west", "trafficPercent": 25}, {"name": "us-east", "trafficPercent": 0}]
    made = {
        c["kind"]: c
        for c in rg.published(
            rg.Region.from_body(body(PUBLISHED)), body(PUBLISHED, {"regions": seen}), "gw", 80
        )
    }
    records = made["DNSEndpoint"]["spec"]["endpoints"]
    assert [(r["setIdentifier"], r["providerSpecific"][0]["value"]) for r in records] == [
        ("eu-west", "25"),
    ]
