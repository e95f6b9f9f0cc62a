"""The pure builders: golden files for each child, placement mapping, no mutation."""

from __future__ import annotations

import copy
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tests.helpers import EXAMPLES, REPO, dump_yaml, load_example
from ttsfleet.api.v1alpha1 import MIG_PROFILES, TtsDeploymentSpec
from ttsfleet.cluster.pool import parse_pool_file, render_nodes
from ttsfleet.gpu.planner import Option, options_from_nodes
from ttsfleet.resources import PlacementError, TtsObject, build_children, resolve_placement
from ttsfleet.resources.common import HASH_ANNOTATION, drifted
from ttsfleet.resources.placement import GPU_TOLERATION, Placement

GOLDEN = Path(__file__).parent / "golden"
DEFAULT_POOL = (REPO / "operator/ttsfleet/cluster/pools/default.yaml").read_text()


def tts(spec: dict[str, Any], name: str = "joe") -> TtsObject:
    return TtsObject(name, "voices", "0000-uid", TtsDeploymentSpec.model_validate(spec))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_children_match_the_golden_files(example: Path) -> None:
    """Regenerate with UPDATE_GOLDEN=1 after a deliberate change, and review the diff."""
    doc = load_example(example)
    # Examples with placement.mode auto are planned against the default local cluster.
    tts_object = replace(tts(doc["spec"], doc["metadata"]["name"]), offers=offers())
    rendered = dump_yaml(build_children(tts_object))
    golden = GOLDEN / f"{example.stem}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert rendered == golden.read_text()


def by_kind(children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["kind"]: c for c in children}


MINIMAL = {
    "model": {"voice": "en_US-joe-medium", "precision": "fp16"},
    "placement": {"mode": "mig", "profile": "1g.10gb"},
    "minReplicas": 1,
    "maxReplicas": 8,
}


def test_the_minimal_manifest_builds_a_triton_workload_on_a_mig_slice() -> None:
    children = by_kind(build_children(tts(MINIMAL)))
    assert set(children) == {
        "ConfigMap", "Service", "Deployment", "PodDisruptionBudget", "NetworkPolicy",
    }  # fmt: skip
    dep = children["Deployment"]
    assert dep["spec"]["replicas"] == 1  # replicas default to minReplicas
    pod = dep["spec"]["template"]
    assert pod["metadata"]["labels"]["ttsfleet.io/deployment"] == "joe"
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/mig-1g.10gb"] == "1"
    assert "--metrics-config=histogram_latencies=true" in container["args"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    assert pod["spec"]["terminationGracePeriodSeconds"] > 30  # the drain time plus margins
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    owner = dep["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "TtsDeployment" and owner["controller"] is True
    assert 'string_value: "fp16"' in children["ConfigMap"]["data"]["config.pbtxt"]
    assert "decoupled: true" in children["ConfigMap"]["data"]["config.pbtxt"]
    # The chunked engine unless the spec asks for the sentence one.
    assert (
        'key: "engine" value: { string_value: "chunked" }'
        in (children["ConfigMap"]["data"]["config.pbtxt"])
    )
    old = by_kind(build_children(tts(MINIMAL | {"runtime": {"engine": "sentence"}})))
    assert 'string_value: "sentence"' in old["ConfigMap"]["data"]["config.pbtxt"]


@pytest.mark.parametrize(
    ("placement", "resource", "summary"),
    [
        ({"mode": "mig", "profile": "3g.40gb"}, {"nvidia.com/mig-3g.40gb": "1"}, "mig-3g.40gb"),
        (
            {"mode": "mig", "profile": "1g.10gb", "migStrategy": "single"},
            {"nvidia.com/gpu": "1"},
            "mig-1g.10gb",
        ),
        (
            {"mode": "whole", "gpus": 2, "product": "NVIDIA-L4"},
            {"nvidia.com/gpu": "2"},
            "2xNVIDIA-L4",
        ),
        ({"mode": "shared"}, {"nvidia.com/gpu": "1"}, "shared"),
        ({"mode": "cpu"}, {}, "cpu"),
    ],
)
def test_placement_sets_the_device_plugins_resources(
    placement: dict[str, Any], resource: dict[str, str], summary: str
) -> None:
    resolved = resolve_placement(tts({"placement": placement}).spec)
    assert resolved.resources == resource
    assert resolved.summary == summary
    assert (placement["mode"] != "cpu") == resolved.gpu


def test_single_strategy_selects_nodes_whose_gpus_are_sliced_that_way() -> None:
    resolved = resolve_placement(
        tts({"placement": {"mode": "mig", "profile": "1g.10gb", "migStrategy": "single"}}).spec
    )
    assert resolved.affinity is not None
    term = resolved.affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ][0]["matchExpressions"][0]
    assert "NVIDIA-H100-80GB-HBM3-MIG-1g.10gb" in term["values"]


def test_triton_instances_follow_the_slice_unless_set() -> None:
    assert (
        resolve_placement(tts({"placement": {"mode": "mig", "profile": "3g.40gb"}}).spec).instances
        == 3
    )
    explicit = {"placement": {"mode": "mig", "profile": "3g.40gb"}, "runtime": {"instances": 5}}
    assert resolve_placement(tts(explicit).spec).instances == 5


def offers(pool: str = DEFAULT_POOL) -> tuple[Option, ...]:
    nodes = render_nodes(parse_pool_file(pool), "v1.34.2")
    return tuple(options_from_nodes(nodes))


def planned(spec: dict[str, Any], pool: str = DEFAULT_POOL) -> Placement:
    return resolve_placement(tts(spec).spec, offers(pool))


def test_auto_places_a_default_voice_on_the_smallest_mig_slice_the_cluster_has() -> None:
    resolved = planned({"placement": {"mode": "auto"}})
    assert resolved.resources == {"nvidia.com/mig-1g.10gb": "1"}
    assert resolved.summary == "mig-1g.10gb"
    assert resolved.instances == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
        resolved.tolerations
    )
    # The builders emit the choice: the Deployment's limits and Triton's instance_group.
    children = by_kind(
        build_children(replace(tts({"placement": {"mode": "auto"}}), offers=offers()))
    )
    container = children["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/mig-1g.10gb"] == "1"
    assert "count: 1" in children["ConfigMap"]["data"]["config.pbtxt"]


def test_auto_places_int8_on_cpu_even_where_gpu_slices_are_offered() -> None:
    spec = {"placement": {"mode": "auto", "streamsPerReplica": 100}}
    fp16 = planned(spec | {"model": {"precision": "fp16"}})
    int8 = planned(spec | {"model": {"precision": "int8"}})
    assert fp16.summary == "mig-2g.20gb" and fp16.instances == 2 and fp16.gpu
    assert int8.summary == "cpu" and not int8.gpu
    assert int8.resources == {}
    assert GPU_TOLERATION not in int8.tolerations


def test_int8_on_the_sentence_engine_is_refused_naming_the_chunked_engine() -> None:
    spec = {"model": {"precision": "int8"}, "placement": {"mode": "cpu"},
            "runtime": {"engine": "sentence"}}  # fmt: skip
    with pytest.raises(ValidationError, match=r"set spec\.runtime\.engine to chunked"):
        tts(spec)


def test_int8_on_an_explicit_gpu_placement_is_refused_naming_fp16() -> None:
    for mode in ({"mode": "whole"}, {"mode": "shared"}, {"mode": "mig", "profile": "1g.10gb"}):
        with pytest.raises(ValidationError, match="int8 runs on CPU only: set precision fp16"):
            tts({"model": {"precision": "int8"}, "placement": mode})


def test_auto_on_whole_gpus_selects_the_product() -> None:
    pool = "pools:\n  - name: l4\n    count: 1\n    gpu: {product: L4, count: 4}\n"
    resolved = planned({"placement": {"mode": "auto"}}, pool)
    assert resolved.resources == {"nvidia.com/gpu": "1"}
    assert resolved.node_selector["nvidia.com/gpu.product"] == "NVIDIA-L4"
    assert resolved.instances == 4  # four Triton instances per whole GPU (measured knee)


def test_auto_with_no_gpu_in_the_cluster_says_what_to_do() -> None:
    with pytest.raises(
        PlacementError, match=r"mode auto: no GPU .* set spec\.placement\.mode to cpu"
    ):
        build_children(tts({"placement": {"mode": "auto"}}))


def test_auto_refuses_what_no_slice_holds_with_the_numbers() -> None:
    spec = {
        "model": {"precision": "fp32"},
        "placement": {"mode": "auto", "streamsPerReplica": 1000},
    }
    with pytest.raises(PlacementError, match=r"1000 streams .* need [0-9.]+ GiB per replica"):
        planned(spec)


def test_an_explicit_profile_too_small_is_refused_with_the_numbers() -> None:
    spec = {"placement": {"mode": "mig", "profile": "1g.10gb", "streamsPerReplica": 500}}
    with pytest.raises(
        PlacementError, match=r"spec\.placement\.profile: mig-1g\.10gb .* has 9\.5 GiB"
    ):
        build_children(tts(spec))


def test_a_new_model_config_rolls_the_pods_and_hashes_track_content() -> None:
    one = by_kind(build_children(tts(MINIMAL)))
    two = by_kind(build_children(tts(MINIMAL | {"model": {"precision": "fp32"}})))
    pods = [c["Deployment"]["spec"]["template"]["metadata"]["annotations"] for c in (one, two)]
    assert pods[0] != pods[1]
    assert one["Service"]["metadata"]["annotations"] == two["Service"]["metadata"]["annotations"]
    assert (
        one["ConfigMap"]["metadata"]["annotations"][HASH_ANNOTATION]
        != (two["ConfigMap"]["metadata"]["annotations"][HASH_ANNOTATION])
    )


def test_builders_never_mutate_their_input() -> None:
    obj = tts(MINIMAL)
    before = copy.deepcopy(obj.spec.model_dump())
    children = build_children(obj)
    children[2]["spec"]["template"]["spec"]["containers"][0]["args"].append("--x")
    assert obj.spec.model_dump() == before
    assert "--x" not in build_children(obj)[2]["spec"]["template"]["spec"]["containers"][0]["args"]


# Valid specs, as the CRD accepts them.
valid_specs = st.builds(
    lambda mode, profile, gpus, precision, streaming, low, extra, instances, drain: (
        {
            "model": {"precision": "fp16" if precision == "int8" and mode != "cpu" else precision},
            "streaming": streaming,
            "placement": {"mode": mode}
            | ({"profile": profile} if mode == "mig" else {})
            | ({"gpus": gpus} if mode == "whole" else {}),
            "minReplicas": low,
            "maxReplicas": max(1, low + extra),
            "runtime": {"gracefulDrainSeconds": drain}
            | ({"instances": instances} if instances else {}),
        }
        | ({} if streaming else {"batching": {"maxBatchSize": 4}, "cache": {"sizeMiB": 64}})
    ),
    mode=st.sampled_from(["whole", "mig", "shared", "cpu"]),
    profile=st.sampled_from(MIG_PROFILES),
    gpus=st.integers(1, 8),
    precision=st.sampled_from(["fp32", "fp16", "int8"]),
    streaming=st.booleans(),
    low=st.integers(0, 50),
    extra=st.integers(0, 50),
    instances=st.none() | st.integers(1, 64),
    drain=st.integers(0, 3600),
)


@given(spec=valid_specs)
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_any_valid_spec_builds_or_names_the_slice_too_small(spec: dict[str, Any]) -> None:
    try:
        children = build_children(tts(spec))
    except PlacementError as err:
        # Only an explicit MIG slice too small for the request is refused, with the numbers.
        assert spec["placement"]["mode"] == "mig"
        assert re.match(r"spec\.placement\.profile: mig-\S+ on \S+ has [0-9.]+ GiB but", str(err))
        return
    assert [c["kind"] for c in children] == [
        "ConfigMap",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ]
    assert children[2]["spec"]["replicas"] == spec["minReplicas"]


def test_drift_is_a_field_we_set_that_no_longer_holds() -> None:
    desired = by_kind(build_children(tts(MINIMAL)))["Deployment"]
    live = copy.deepcopy(desired)
    live["metadata"]["resourceVersion"] = "42"  # what the apiserver adds is not drift
    live["spec"]["template"]["spec"]["dnsPolicy"] = "ClusterFirst"
    live["status"] = {"readyReplicas": 1}
    assert not drifted(desired, live)
    edited = copy.deepcopy(live)
    edited["spec"]["template"]["spec"]["containers"][0]["image"] = "someone/else:1"
    assert drifted(desired, edited)
    scaled = copy.deepcopy(live)
    scaled["spec"]["replicas"] = 5
    assert drifted(desired, scaled)
    lost_port = copy.deepcopy(live)
    lost_port["spec"]["template"]["spec"]["containers"][0]["ports"].pop()
    assert drifted(desired, lost_port)


def test_a_chunked_batch_fleet_loads_the_stream_model_whose_scheduler_it_uses() -> None:
    spec = {
        "model": {"precision": "fp32"}, "placement": {"mode": "cpu"}, "streaming": False,
        "runtime": {"engine": "chunked"}, "minReplicas": 1, "maxReplicas": 2,
    }  # fmt: skip
    children = by_kind(build_children(tts(spec)))
    data = children["ConfigMap"]["data"]
    assert 'name: "tts_batch"' in data["config.pbtxt"]
    assert (
        'name: "tts_stream"' in data["stream.pbtxt"] and "decoupled: true" in data["stream.pbtxt"]
    )
    assert all('string_value: "chunked"' in text for text in data.values())
    container = children["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert [a for a in container["args"] if a.startswith("--load-model")] == [
        "--load-model=tts_batch", "--load-model=tts_stream",
    ]  # fmt: skip
    mounts = {m["mountPath"]: m.get("subPath") for m in container["volumeMounts"]}
    assert mounts["/models/tts_stream/config.pbtxt"] == "stream.pbtxt"
    # With the sentence engine a batch fleet loads its own model only.
    spec["runtime"] = {"engine": "sentence"}
    children = by_kind(build_children(tts(spec)))
    assert set(children["ConfigMap"]["data"]) == {"config.pbtxt"}
