"""Only a gateway reaches a fleet's Triton: the fleet's NetworkPolicy."""

from __future__ import annotations

from ttsfleet.resources import build_children, networkpolicy

from .test_resources import MINIMAL, tts


def test_a_fleet_admits_inference_only_from_gateways_and_labelled_tools() -> None:
    made = {c["kind"]: c for c in build_children(tts(MINIMAL))}
    policy = made["NetworkPolicy"]
    spec = policy["spec"]
    assert spec["podSelector"] == made["Deployment"]["spec"]["selector"]
    assert spec["policyTypes"] == ["Ingress"]  # egress stays open (nothing to call)
    inference, metrics = spec["ingress"]
    # No namespaceSelector: gateways and tools of the fleet's own namespace only.
    assert inference["from"] == [
        {"podSelector": {"matchExpressions": [
            {"key": "ttsfleet.io/gateway", "operator": "Exists"}]}},
        {"podSelector": {"matchLabels": {networkpolicy.DIRECT_ACCESS_LABEL: "true"}}},
    ]  # fmt: skip
    assert {p["port"] for p in inference["ports"]} == {"grpc", "http"}
    assert metrics["ports"] == [{"protocol": "TCP", "port": "metrics"}]
    assert [peer["podSelector"]["matchLabels"] for peer in metrics["from"]] == [
        {"app.kubernetes.io/name": "prometheus"}, {"app.kubernetes.io/name": "tts-operator"},
    ]  # fmt: skip
    assert all(peer["namespaceSelector"] == {} for peer in metrics["from"])
    # Named ports: each must be a port of the pod template.
    container = made["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    names = {p["name"] for p in container["ports"]}
    assert {p["port"] for rule in spec["ingress"] for p in rule["ports"]} <= names
    assert policy["metadata"]["ownerReferences"][0]["kind"] == "TtsDeployment"
