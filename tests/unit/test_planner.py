"""The GPU planner: memory estimate, cheapest fitting slice, what a cluster offers, capacity."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from tests.helpers import REPO
from ttsfleet.cli import app
from ttsfleet.cluster.pool import parse_pool_file, render_nodes
from ttsfleet.gpu import planner
from ttsfleet.gpu.catalog import GPUS
from ttsfleet.gpu.planner import Option, PlanError

VOICE = "en_US-joe-medium"
H100 = planner.catalogue_options([GPUS["H100-80GB"]])


def pool_nodes(text: str) -> list[dict[str, Any]]:
    return render_nodes(parse_pool_file(text), "v1.34.2")


DEFAULT_POOL = (REPO / "operator/ttsfleet/cluster/pools/default.yaml").read_text()


def test_the_measured_footprint_is_what_the_placement_benchmark_measured() -> None:
    results = json.loads((REPO / "benchmarks/results/placement.json").read_text())
    measured = results["footprint"]
    assert measured["voice"] == planner.MEASURED.voice
    assert measured["weights_mib"] == dict(planner.MEASURED.weights_mib)
    assert (
        measured["activation_mib_per_audio_second"]
        == planner.MEASURED.activation_mib_per_audio_second
    )


def test_a_medium_voice_in_fp16_with_16_streams_gets_the_smallest_h100_slice() -> None:
    plan = planner.plan(VOICE, "fp16", 16, H100)
    assert plan.option.profile is not None and plan.option.profile.name == "1g.10gb"
    assert plan.as_dict()["resource"] == "nvidia.com/mig-1g.10gb"
    assert plan.as_dict()["placement"] == "mig"
    assert plan.instances == 1
    memory = plan.memory
    parts = memory.context + memory.runtime + memory.weights + memory.activations
    assert memory.total == pytest.approx(parts)
    assert memory.with_headroom == pytest.approx(memory.total * 1.2)
    assert memory.with_headroom <= memory.available < 10


def test_int8_is_never_planned_onto_a_gpu_slice_and_the_error_names_fp16() -> None:
    assert planner.plan(VOICE, "fp16", 100, H100).option.name == "mig-1g.20gb"
    with pytest.raises(PlanError, match=r"int8 runs on CPU only.*use fp16 on GPUs"):
        planner.plan(VOICE, "int8", 100, H100)
    with pytest.raises(PlanError, match="use fp16 on GPUs"):
        planner.check(VOICE, "int8", 1, H100[0])


def test_other_voices_scale_from_the_measured_one_by_quality() -> None:
    high = planner.footprint("en_GB-alan-high")
    assert high.weights_mib["fp16"] > planner.MEASURED.weights_mib["fp16"]
    assert "estimated from en_US-joe-medium" in high.measured


@given(
    precision=st.sampled_from(["fp32", "fp16"]),
    streams=st.integers(min_value=1, max_value=400),
    more=st.integers(min_value=1, max_value=400),
)
def test_more_streams_never_get_a_smaller_slice(precision: str, streams: int, more: int) -> None:
    def size(n: int) -> float:
        try:
            return planner.plan(VOICE, precision, n, H100).option.memory_gib
        except PlanError:
            return float("inf")

    assert size(streams) <= size(streams + more)


def test_the_default_pool_offers_h100_slices_and_whole_l4s() -> None:
    names = sorted(o.name for o in planner.options_from_nodes(pool_nodes(DEFAULT_POOL)))
    assert names == ["NVIDIA-L4", "mig-1g.10gb", "mig-2g.20gb", "mig-3g.40gb"]


def test_single_strategy_and_time_sliced_nodes_are_offered_as_such() -> None:
    nodes = pool_nodes(
        """
pools:
  - name: a100
    count: 1
    gpu: {product: A100-80GB, count: 8, migStrategy: single, migLayout: {1g.10gb: 7}}
  - name: l4shared
    count: 1
    gpu: {product: L4, count: 4, timeSlicingReplicas: 4}
"""
    )
    options = {o.name: o for o in planner.options_from_nodes(nodes)}
    assert set(options) == {"mig-1g.10gb", "shared-NVIDIA-L4"}
    assert options["mig-1g.10gb"].strategy == "single"
    assert options["mig-1g.10gb"].resource == "nvidia.com/gpu"
    assert options["mig-1g.10gb"].product_label == "NVIDIA-A100-SXM4-80GB-MIG-1g.10gb"
    assert options["shared-NVIDIA-L4"].memory_gib == pytest.approx(23034 / 1024 / 4)


def test_capacity_counts_allocatable_slices_and_those_bound_pods_hold() -> None:
    nodes = pool_nodes(DEFAULT_POOL)
    option = next(o for o in planner.options_from_nodes(nodes) if o.name == "mig-1g.10gb")
    h100 = [n["metadata"]["name"] for n in nodes if "h100" in n["metadata"]["name"]]

    def pod(node: str | None, phase: str = "Running") -> dict[str, Any]:
        limits = {"nvidia.com/mig-1g.10gb": "1"}
        spec = {"containers": [{"resources": {"limits": limits}}]}
        return {"spec": spec | ({"nodeName": node} if node else {}), "status": {"phase": phase}}

    pods = [pod(h100[0]), pod(h100[1]), pod(h100[1], "Succeeded"), pod(None)]
    have = planner.capacity(option, nodes, pods)
    assert (have.nodes, have.allocatable, have.in_use, have.free) == (2, 32, 2, 30)
    assert have.free_by_node() == {h100[0]: 15, h100[1]: 15}


def test_plan_prints_the_choice_as_json() -> None:
    result = CliRunner().invoke(
        app, ["plan", "--voice", VOICE, "--precision", "fp16", "--concurrency", "40",
              "--gpu", "H100-80GB", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert (out["placement"], out["resource"], out["profile"]) == (
        "mig", "nvidia.com/mig-1g.10gb", "1g.10gb",
    )  # fmt: skip
    assert set(out["memory_gib"]) >= {"weights", "activations", "total", "available"}


def test_plan_refuses_with_the_numbers_and_exit_status_1() -> None:
    result = CliRunner().invoke(
        app, ["plan", "--precision", "fp32", "--concurrency", "2000", "--gpu", "L4", "--json"]
    )
    assert result.exit_code == 1
    out = json.loads(result.output)
    assert out["placement"] is None
    assert "2000 streams of en_US-joe-medium in fp32 need" in out["error"]


def test_plan_names_the_known_gpus_for_an_unknown_one() -> None:
    result = CliRunner().invoke(app, ["plan", "--concurrency", "8", "--gpu", "B200"])
    assert result.exit_code == 1
    assert "H100-80GB" in result.output


def test_only_nodes_the_fleet_may_land_on_are_offered() -> None:
    nodes = pool_nodes(DEFAULT_POOL)
    h100 = [n for n in nodes if "h100" in n["metadata"]["name"]]
    l4 = [n for n in nodes if "l4" in n["metadata"]["name"]]
    for node in l4:
        node["metadata"]["labels"]["pool"] = "tts"
    gpu = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    picked = planner.eligible_nodes(nodes, {"pool": "tts"}, gpu)
    assert [o.name for o in planner.options_from_nodes(picked)] == ["NVIDIA-L4"]
    # Without the GPU toleration, the tainted GPU nodes are out.
    assert planner.eligible_nodes(h100 + l4, {}, []) == []
    # A cordoned node is out.
    h100[0]["spec"]["unschedulable"] = True
    assert planner.eligible_nodes(h100, {}, gpu) == h100[1:]


def test_tolerations_match_as_kubernetes_does() -> None:
    taint = {"key": "dedicated", "value": "tts", "effect": "NoSchedule"}
    assert planner.tolerated(taint, [{"key": "dedicated", "value": "tts"}])
    assert not planner.tolerated(taint, [{"key": "dedicated", "value": "batch"}])
    assert planner.tolerated(taint, [{"key": "dedicated", "operator": "Exists"}])
    assert not planner.tolerated(taint, [{"key": "dedicated", "operator": "Exists",
                                          "effect": "NoExecute"}])  # fmt: skip
    assert planner.tolerated(taint, [{"operator": "Exists"}])


def test_the_slice_chosen_before_stays_while_it_fits() -> None:
    fresh = planner.plan(VOICE, "fp16", 16, H100)
    assert fresh.option.name == "mig-1g.10gb"
    kept = planner.plan(VOICE, "fp16", 16, H100, keep="mig-3g.40gb")
    assert kept.option.name == "mig-3g.40gb"  # a cheaper one joining does not roll it
    gone = planner.plan(VOICE, "fp16", 16, [o for o in H100 if o.name != "mig-3g.40gb"],
                        keep="mig-3g.40gb")  # fmt: skip
    assert gone.option.name == "mig-1g.10gb"
    too_small = planner.plan(VOICE, "fp16", 100, H100, keep="mig-1g.10gb")
    assert too_small.option.name == "mig-1g.20gb"


def test_mps_shared_gpus_are_shares_and_bad_replica_labels_do_not_crash() -> None:
    nodes = pool_nodes("pools:\n  - name: l4\n    count: 1\n    gpu: {product: L4, count: 4}\n")
    labels = nodes[0]["metadata"]["labels"]
    labels["nvidia.com/gpu.sharing-strategy"] = "mps"
    labels["nvidia.com/gpu.product"] = "NVIDIA-L4-SHARED"
    labels["nvidia.com/gpu.replicas"] = "4"
    (option,) = planner.options_from_nodes(nodes)
    assert (option.kind, option.product_label, option.share) == ("shared", "NVIDIA-L4-SHARED", 4)
    labels["nvidia.com/gpu.replicas"] = "0"
    assert planner.options_from_nodes(nodes)[0].share == 1


def test_an_explicit_single_strategy_slice_counts_every_product_that_has_it() -> None:
    nodes = pool_nodes(
        """
pools:
  - name: a100
    count: 1
    gpu: {product: A100-80GB, count: 8, migStrategy: single, migLayout: {1g.10gb: 7}}
  - name: h100
    count: 1
    gpu: {product: H100-80GB, count: 8, migStrategy: single, migLayout: {1g.10gb: 7}}
"""
    )
    h100 = GPUS["H100-80GB"]
    explicit = Option("mig", h100, h100.profile("1g.10gb"), "single", any_product=True)
    assert planner.capacity(explicit, nodes, []).allocatable == 2 * 56
    planned = Option("mig", h100, h100.profile("1g.10gb"), "single")  # auto: this product
    assert planner.capacity(planned, nodes, []).allocatable == 56
