"""The real apiserver enforces the TtsDeployment schema and its CEL rules."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from kubernetes.client.exceptions import ApiException

from tests.conftest import Cluster
from tests.helpers import REPO, load_example
from tests.unit.test_resources import tts, valid_specs
from ttsfleet import kube
from ttsfleet.resources import PlacementError, build_children

pytestmark = pytest.mark.usefixtures("crd")

MINIMAL = load_example(REPO / "examples" / "joe-mig.yaml")


def resource(cluster: Cluster) -> Any:
    return kube.dynamic_client(cluster.api).resources.get(
        api_version="ttsfleet.io/v1alpha1", kind="TtsDeployment"
    )


def with_spec(**changes: Any) -> dict[str, Any]:
    """The minimal manifest with spec fields changed (None removes one); dotted keys nest."""
    doc = copy.deepcopy(MINIMAL)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = doc["spec"]
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return doc


def test_the_minimal_manifest_is_accepted_exactly_as_written(
    cluster: Cluster, namespace: str
) -> None:
    created = resource(cluster).create(body=MINIMAL, namespace=namespace).to_dict()
    spec = created["spec"]
    for key, value in MINIMAL["spec"].items():
        if isinstance(value, dict):
            assert value.items() <= spec[key].items()
        else:
            assert spec[key] == value
    # Defaults the apiserver fills in from the schema.
    assert spec["streaming"] is True
    assert spec["scaling"]["mode"] == "builtin"
    assert spec["runtime"]["gracefulDrainSeconds"] == 30


INVALID: list[tuple[str, dict[str, Any], str]] = [
    (
        "min above max",
        with_spec(minReplicas=9),
        "spec.minReplicas must not exceed spec.maxReplicas",
    ),
    ("replicas above max", with_spec(replicas=9), "spec.replicas must lie between"),
    ("replicas below min", with_spec(replicas=0, minReplicas=1), "spec.replicas must lie between"),
    ("negative min", with_spec(minReplicas=-1), "spec.minReplicas"),
    ("max zero", with_spec(maxReplicas=0), "spec.maxReplicas"),
    ("max too large", with_spec(maxReplicas=5000), "spec.maxReplicas"),
    ("replicas as text", with_spec(replicas="two"), "spec.replicas"),
    ("unknown precision", with_spec(model__precision="fp8"), "spec.model.precision"),
    (
        "int8 on a mig slice",
        with_spec(model__precision="int8"),
        "spec.model.precision int8 runs on CPU only: set precision fp16",
    ),
    (
        "int8 on the sentence engine",
        with_spec(model__precision="int8", placement={"mode": "cpu"}, runtime__engine="sentence"),
        "int8 is served by the chunked engine only",
    ),
    (
        "int8 on whole gpus",
        with_spec(model__precision="int8", placement={"mode": "whole"}),
        "set precision fp16 for GPU placements",
    ),
    ("bad voice name", with_spec(model__voice="joe"), "spec.model.voice"),
    ("unknown placement mode", with_spec(placement__mode="tpu"), "spec.placement.mode"),
    ("unknown MIG profile", with_spec(placement__profile="1g.11gb"), "spec.placement.profile"),
    (
        "mig without profile",
        with_spec(placement__profile=None),
        "spec.placement.profile is required",
    ),
    (
        "profile without mig",
        with_spec(placement__mode="whole"),
        "spec.placement.profile applies only to mode mig",
    ),
    (
        "migStrategy without mig",
        with_spec(placement={"mode": "cpu", "migStrategy": "mixed"}),
        "spec.placement.migStrategy applies only to mode mig",
    ),
    ("bad migStrategy", with_spec(placement__migStrategy="none"), "spec.placement.migStrategy"),
    (
        "gpus without whole",
        with_spec(placement__gpus=2),
        "spec.placement.gpus applies only to mode whole",
    ),
    ("too many gpus", with_spec(placement={"mode": "whole", "gpus": 9}), "spec.placement.gpus"),
    (
        "product with mig",
        with_spec(placement__product="NVIDIA-L4"),
        "spec.placement.product applies only to modes whole and shared",
    ),
    (
        "bad product",
        with_spec(placement={"mode": "whole", "product": "L4 GPU"}),
        "spec.placement.product",
    ),
    ("streams zero", with_spec(placement__streamsPerReplica=0), "spec.placement.streamsPerReplica"),
    (
        "bad toleration effect",
        with_spec(placement__tolerations=[{"key": "a", "effect": "Sometimes"}]),
        "spec.placement.tolerations[0].effect",
    ),
    (
        "batching while streaming",
        with_spec(batching={"maxBatchSize": 8}),
        "spec.batching applies only when spec.streaming is false",
    ),
    (
        "cache while streaming",
        with_spec(cache={"sizeMiB": 64}),
        "spec.cache applies only when spec.streaming is false",
    ),
    (
        "batch size zero",
        with_spec(streaming=False, batching={"maxBatchSize": 0}),
        "spec.batching.maxBatchSize",
    ),
    (
        "queue delay too long",
        with_spec(streaming=False, batching={"maxQueueDelayMicroseconds": 5_000_000}),
        "spec.batching.maxQueueDelayMicroseconds",
    ),
    ("cache zero", with_spec(streaming=False, cache={"sizeMiB": 0}), "spec.cache.sizeMiB"),
    ("streaming as text", with_spec(streaming="yes"), "spec.streaming"),
    ("empty image", with_spec(runtime__image=""), "spec.runtime.image"),
    ("instances zero", with_spec(runtime__instances=0), "spec.runtime.instances"),
    (
        "drain too long",
        with_spec(runtime__gracefulDrainSeconds=7200),
        "spec.runtime.gracefulDrainSeconds",
    ),
    (
        "extra args set a port",
        with_spec(runtime__extraArgs=["--http-port=9000"]),
        "spec.runtime.extraArgs must not set --model-repository or the ports",
    ),
    (
        "GPU in runtime resources",
        with_spec(runtime__resources={"limits": {"nvidia.com/gpu": 1}}),
        "spec.runtime.resources must not name nvidia.com/ resources",
    ),
    ("unknown scaling mode", with_spec(scaling__mode="auto"), "spec.scaling.mode"),
    (
        "queue target zero",
        with_spec(scaling__targets={"queueDepthPerReplica": 0}),
        "spec.scaling.targets.queueDepthPerReplica",
    ),
    (
        "ttfa target too small",
        with_spec(scaling__targets={"timeToFirstAudioMs": 1}),
        "spec.scaling.targets.timeToFirstAudioMs",
    ),
    (
        "schedule of zero length",
        with_spec(scaling__schedules=[{"start": "08:00", "end": "08:00", "minReplicas": 2}]),
        "spec.scaling.schedules[].end must differ from start",
    ),
    (
        "schedule clock out of range",
        with_spec(scaling__schedules=[{"start": "25:00", "end": "08:00", "minReplicas": 2}]),
        "spec.scaling.schedules[0].start",
    ),
    (
        "schedule day spelled out",
        with_spec(
            scaling__schedules=[
                {"days": ["Monday"], "start": "08:00", "end": "18:00", "minReplicas": 2}
            ]
        ),
        "spec.scaling.schedules[0].days[0]",
    ),
    (
        "predictive over eight periods",
        with_spec(scaling__predictive={"periods": 9}),
        "spec.scaling.predictive.periods",
    ),
    ("unknown field", with_spec(replicaCount=3), 'unknown field "spec.replicaCount"'),
    (
        "unknown nested field",
        with_spec(model__language="en"),
        'unknown field "spec.model.language"',
    ),
    ("no spec", {k: v for k, v in MINIMAL.items() if k != "spec"}, "spec"),
    (
        "name too long",
        {**MINIMAL, "metadata": {"name": "a" * 41}},
        "metadata.name must be at most 40 characters",
    ),
]


@pytest.mark.parametrize(("case", "body", "expected"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_objects_are_rejected_with_a_message_naming_the_field(
    cluster: Cluster, namespace: str, case: str, body: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ApiException) as rejected:
        # kubectl validates strictly by default; so do we, so unknown fields are errors too.
        resource(cluster).create(
            body=body, namespace=namespace, query_params=[("fieldValidation", "Strict")]
        )
    assert rejected.value.status in (400, 422), case
    message = json.loads(rejected.value.body)["message"]
    assert expected in message, message


def test_there_are_at_least_thirty_invalid_cases() -> None:
    assert len(INVALID) >= 30


def test_scaling_past_the_bounds_is_refused_through_the_scale_subresource(
    cluster: Cluster, namespace: str
) -> None:
    resource(cluster).create(body=MINIMAL, namespace=namespace)
    assert "scaled" in cluster.kubectl("scale", "-n", namespace, "ttsd/joe", "--replicas=3")
    with pytest.raises(AssertionError, match=r"spec\.replicas must lie between"):
        cluster.kubectl("scale", "-n", namespace, "ttsd/joe", "--replicas=30")


@given(spec=valid_specs)
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_children_of_any_valid_spec_pass_server_side_dry_run(
    cluster: Cluster, spec: dict[str, Any]
) -> None:
    dyn = kube.dynamic_client(cluster.api)
    try:
        children = build_children(
            tts(spec | {"minReplicas": 1, "maxReplicas": max(1, spec["maxReplicas"])})
        )
    except PlacementError:
        assume(False)  # a slice too small: refused before anything is applied (unit-tested)
        return
    for built in children:
        child = copy.deepcopy(built)
        child["metadata"]["namespace"] = "default"
        child["metadata"].pop("ownerReferences")
        api = dyn.resources.get(api_version=child["apiVersion"], kind=child["kind"])
        api.server_side_apply(
            body=child, namespace="default", field_manager="ttsfleet-test", dry_run="All"
        )


# ---- TtsGateway: limits, breaker and fallback ------------------------------------------------

GATEWAY = load_example(REPO / "examples" / "local-gateway.yaml")
TIER = {"name": "free", "requestsPerSecond": 10, "requestBurst": 20}


def gateway_with(**spec: Any) -> dict[str, Any]:
    doc = copy.deepcopy(GATEWAY)
    doc["spec"] |= spec
    return doc


GATEWAY_INVALID = [
    (
        "fallback is the fleet",
        gateway_with(routes=[{"models": ["tts-1"], "fleet": "joe", "fallback": "joe"}]),
        "fallback names the route's own fleet",
    ),
    (
        "default tier unknown",
        gateway_with(rateLimits={"tiers": [TIER], "defaultTier": "gold"}),
        "spec.rateLimits.defaultTier names no tier",
    ),
    (
        "tenant's tier unknown",
        gateway_with(
            rateLimits={"tiers": [TIER], "defaultTier": "free", "tenants": {"acme": "gold"}}
        ),
        "a tenant's tier names no tier",
    ),
    (
        "two tiers one name",
        gateway_with(rateLimits={"tiers": [TIER, TIER], "defaultTier": "free"}),
        "two tiers share a name",
    ),
    (
        "character burst below the longest input",
        gateway_with(
            rateLimits={
                "defaultTier": "free",
                "tiers": [TIER | {"charactersPerSecond": 100, "characterBurst": 1000}],
            }
        ),
        "characterBurst is below spec.maxInputCharacters",
    ),
    (
        "characters rate without a burst",
        gateway_with(
            rateLimits={"defaultTier": "free", "tiers": [TIER | {"charactersPerSecond": 100}]}
        ),
        "give both charactersPerSecond and characterBurst",
    ),
    (
        "redis url not redis",
        gateway_with(
            rateLimits={"tiers": [TIER], "defaultTier": "free", "redisUrl": "http://redis:6379"}
        ),
        "spec.rateLimits.redisUrl",
    ),
    (
        "a redis url and a managed redis",
        gateway_with(
            rateLimits={
                "tiers": [TIER],
                "defaultTier": "free",
                "redisUrl": "redis://redis:6379",
                "managedRedis": {},
            }
        ),
        "give redisUrl (a Redis you run) or managedRedis (one the operator runs), not both",
    ),
    ("error rate over 1", gateway_with(breaker={"errorRate": 1.5}), "spec.breaker.errorRate"),
]


@pytest.mark.parametrize(
    ("case", "body", "expected"), GATEWAY_INVALID, ids=[c[0] for c in GATEWAY_INVALID]
)
def test_invalid_gateways_are_rejected_with_a_message_naming_the_field(
    cluster: Cluster, namespace: str, case: str, body: dict[str, Any], expected: str
) -> None:
    gateways = kube.dynamic_client(cluster.api).resources.get(
        api_version="ttsfleet.io/v1alpha1", kind="TtsGateway"
    )
    with pytest.raises(ApiException) as rejected:
        gateways.create(
            body=body, namespace=namespace, query_params=[("fieldValidation", "Strict")]
        )
    assert rejected.value.status in (400, 422), case
    message = json.loads(rejected.value.body)["message"]
    assert expected in message, message


def test_the_example_gateway_with_its_limits_is_accepted(cluster: Cluster, namespace: str) -> None:
    gateways = kube.dynamic_client(cluster.api).resources.get(
        api_version="ttsfleet.io/v1alpha1", kind="TtsGateway"
    )
    made = gateways.create(body=GATEWAY, namespace=namespace, query_params=[("dryRun", "All")])
    tier = made.spec.rateLimits.tiers[0]
    assert (tier.requestBurst, tier.requestsPerSecond) == (20, 10)
