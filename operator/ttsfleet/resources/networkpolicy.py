"""NetworkPolicies: nothing reaches a fleet's Triton around the gateway's authentication.

A fleet's pods admit inference (gRPC, HTTP) only from the gateway pods of their own
namespace, and from pods that carry `DIRECT_ACCESS_LABEL` (tools that call Triton
themselves, such as `ttsfleet say` or a benchmark run in a pod); their metrics port
only from Prometheus and the operator (pods labelled as the usual charts label them).
A gateway's pods admit anyone on their listener, and reach only their fleets' gRPC
port, DNS, and TCP 443/6443 (the apiserver and JWKS endpoints, which no pod selector
names) and the port of their Redis. A Redis the operator runs for a gateway admits only
that gateway's pods.

Policies are enforced by the cluster's CNI; without one that enforces them (as in the
local cluster here) they are accepted and have no effect.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from ttsfleet.resources.common import Manifest, TtsObject, child, selector_labels
from ttsfleet.triton import contract

DIRECT_ACCESS_LABEL = "ttsfleet.io/direct-access"
GATEWAY_LABEL = "ttsfleet.io/gateway"
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}
OPERATOR = {"app.kubernetes.io/name": "tts-operator"}
ANY_NAMESPACE: Manifest = {"namespaceSelector": {}}
REDIS_PORT = 6379


def _tcp(*ports: int | str) -> list[Manifest]:
    return [{"protocol": "TCP", "port": port} for port in ports]


def build_fleet_policy(tts: TtsObject) -> Manifest:
    inference = {
        "from": [
            {"podSelector": {"matchExpressions": [{"key": GATEWAY_LABEL, "operator": "Exists"}]}},
            {"podSelector": {"matchLabels": {DIRECT_ACCESS_LABEL: "true"}}},
        ],
        "ports": _tcp("grpc", "http"),
    }
    metrics = {
        "from": [
            ANY_NAMESPACE | {"podSelector": {"matchLabels": PROMETHEUS}},
            ANY_NAMESPACE | {"podSelector": {"matchLabels": OPERATOR}},
        ],
        "ports": _tcp("metrics"),
    }
    spec = {
        "podSelector": {"matchLabels": selector_labels(tts)},
        "policyTypes": ["Ingress"],
        "ingress": [inference, metrics],
    }
    return child(tts, "networking.k8s.io/v1", "NetworkPolicy", tts.name, {"spec": spec})


def gateway_policy_spec(
    pods: dict[str, str], port: str, fleets: list[dict[str, str]], redis_url: str | None,
    redis_pods: dict[str, str] | None = None,
) -> Manifest:  # fmt: skip
    """A gateway's policy: `pods` its pod labels, `port` its listener's name, `fleets`
    the selector labels of the fleets it routes to, `redis_pods` those of the Redis the
    operator runs for it."""
    dns = [{"protocol": proto, "port": 53} for proto in ("UDP", "TCP")]
    egress: list[Manifest] = [
        {"to": [{"podSelector": {"matchLabels": fleet}} for fleet in fleets],
         "ports": _tcp(contract.GRPC_PORT)},
        {"ports": dns},
        {"ports": _tcp(443, 6443)},  # the apiserver, a JWKS URL
    ]  # fmt: skip
    if redis_url:
        egress.append({"ports": _tcp(urlsplit(redis_url).port or REDIS_PORT)})
    if redis_pods:
        egress.append({"to": [{"podSelector": {"matchLabels": redis_pods}}],
                       "ports": _tcp(REDIS_PORT)})  # fmt: skip
    return {
        "podSelector": {"matchLabels": pods},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"ports": _tcp(port)}],
        "egress": egress,
    }


def redis_policy_spec(pods: dict[str, str], gateway_pods: dict[str, str]) -> Manifest:
    """The policy of a Redis the operator runs for a gateway: only that gateway's pods
    reach it, and it reaches nothing."""
    return {
        "podSelector": {"matchLabels": pods},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": gateway_pods}}],
                     "ports": _tcp(REDIS_PORT)}],
        "egress": [],
    }  # fmt: skip
