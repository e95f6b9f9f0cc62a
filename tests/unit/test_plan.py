"""The reconcile plan, with no cluster: spec and observed objects in, writes out."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.helpers import REPO
from ttsfleet import plan, status
from ttsfleet.cluster.pool import parse_pool_file, render_nodes
from ttsfleet.resources import placement as placement_module
from ttsfleet.triton import contract

NODES = render_nodes(
    parse_pool_file((REPO / "operator/ttsfleet/cluster/pools/default.yaml").read_text()),
    "v1.34.2",
)
NOW = "2026-12-06T10:00:00Z"


def body(spec: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "ttsfleet.io/v1alpha1",
        "kind": "TtsDeployment",
        "metadata": {"name": "joe", "namespace": "voices", "uid": "u-1", "generation": 1} | meta,
        "spec": {"placement": {"mode": "mig", "profile": "1g.10gb"}, "replicas": 2} | (spec or {}),
    }


def deployment(ready: int, replicas: int = 2, generation: int = 1) -> dict[str, Any]:
    return {
        "metadata": {"name": "joe", "generation": generation},
        "status": {
            "observedGeneration": generation,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": ready,
        },
    }


def unschedulable_pod() -> dict[str, Any]:
    return {
        "metadata": {"name": "joe-1"},
        "spec": {},
        "status": {
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": "0/9 nodes are available: 9 Insufficient nvidia.com/mig-3g.40gb."}
            ]
        },
    }  # fmt: skip


def with_status(obj: dict[str, Any], report: plan.Report) -> dict[str, Any]:
    """The object as the apiserver holds it after the report's patch."""
    out = copy.deepcopy(obj)
    out["status"] = (out.get("status") or {}) | (report.status or {})
    return out


def conditions(report: plan.Report) -> dict[str, dict[str, str]]:
    assert report.status is not None
    return {c["type"]: c for c in report.status["conditions"]}


# ---- desire -----------------------------------------------------------------------------


def test_a_new_object_applies_every_child_in_order_and_defaults_replicas() -> None:
    desired = plan.desire(body({"replicas": None}), NODES, apply=True)
    assert desired is not None and desired.apply and desired.stalled is None
    assert [c["kind"] for c in desired.children] == [
        "ConfigMap", "Service", "Deployment", "PodDisruptionBudget", "NetworkPolicy",
    ]  # fmt: skip
    assert desired.scale_to == 1  # spec.replicas absent: minReplicas, through the scale


def test_a_status_refresh_applies_nothing_and_writes_no_scale() -> None:
    desired = plan.desire(body(), NODES, apply=False)
    assert desired is not None and not desired.apply and desired.scale_to is None


def test_a_live_child_that_matches_is_not_applied_and_one_edited_by_hand_is() -> None:
    desired = plan.desire(body(), NODES, apply=True)
    assert desired is not None
    live = {c["kind"]: copy.deepcopy(c) for c in desired.children}
    # What the apiserver adds (status, defaults, other managers' fields) is not drift.
    live["Service"]["spec"]["clusterIP"] = "10.1.2.3"
    live["Service"]["status"] = {"loadBalancer": {}}
    again = plan.desire(body(), NODES, apply=True, live_child=live["Service"])
    assert again is not None and not again.apply
    edited = copy.deepcopy(live["Deployment"])
    edited["spec"]["template"]["spec"]["containers"][0]["image"] = "someone/else:1"
    drifted = plan.desire(body(), NODES, apply=False, live_child=edited)
    assert drifted is not None and drifted.apply
    deleting = copy.deepcopy(live["ConfigMap"])
    deleting["metadata"]["deletionTimestamp"] = NOW
    assert plan.desire(body(), NODES, apply=False, live_child=deleting).apply  # type: ignore[union-attr]


def test_deleted_and_deleting_objects_need_nothing() -> None:
    assert plan.desire(None, NODES, apply=True) is None
    desired = plan.desire(body(deletionTimestamp=NOW), NODES, apply=True)
    assert desired is not None and desired.gone and not desired.children


def test_the_placement_is_resolved_once_per_reconcile(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = placement_module.resolve_placement

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(plan, "resolve_placement", counting)
    monkeypatch.setattr(placement_module, "resolve_placement", counting)
    desired = plan.desire(body({"placement": {"mode": "auto"}}), NODES, apply=True)
    assert desired is not None
    result = plan.report(desired, plan.Children(deployment(2)), now=NOW)
    assert len(calls) == 1
    assert result.status is not None and result.status["placement"] == "mig-1g.10gb"


def test_auto_placement_keeps_the_slice_chosen_for_the_same_generation() -> None:
    spec = {"placement": {"mode": "auto", "streamsPerReplica": 4}}
    placed = body(spec) | {"status": {"observedGeneration": 1, "placement": "mig-2g.20gb"}}
    desired = plan.desire(placed, NODES, apply=True)
    assert desired is not None and desired.placement is not None
    assert desired.placement.summary == "mig-2g.20gb"
    # A new generation is planned anew: the cheapest slice that holds it.
    newer = copy.deepcopy(placed)
    newer["metadata"]["generation"] = 2
    replanned = plan.desire(newer, NODES, apply=True)
    assert replanned is not None and replanned.placement is not None
    assert replanned.placement.summary == "mig-1g.10gb"


@pytest.mark.parametrize(
    ("spec", "reason", "words"),
    [
        ({"placement": {"mode": "auto", "streamsPerReplica": 1000}, "model":
          {"precision": "fp32"}}, "PlacementUnavailable", "spec.placement.mode auto"),
        ({"placement": {"mode": "mig", "profile": "1g.10gb", "streamsPerReplica": 500}},
         "PlacementUnavailable", "spec.placement.profile: mig-1g.10gb"),
        ({"minReplicas": "many"}, "InvalidSpec", "spec.minReplicas"),
        # stored before the CRD refused it: reported, with the fix, never served on a GPU
        ({"model": {"precision": "int8"}, "placement": {"mode": "whole"}}, "InvalidSpec",
         "spec.model.precision int8 runs on CPU only: set precision fp16"),
        ({"model": {"voice": "en_US-nobody-medium"}}, "VoiceUnavailable",
         "spec.model.voice: en_US-nobody-medium is not served"),
    ],
)  # fmt: skip
def test_what_cannot_be_honoured_is_stalled_with_the_field_and_nothing_is_applied(
    spec: dict[str, Any], reason: str, words: str
) -> None:
    desired = plan.desire(body(spec), NODES, apply=True)
    assert desired is not None and desired.stalled is not None
    assert desired.stalled[0] == reason and words in desired.stalled[1]
    assert not desired.children and not desired.apply and desired.scale_to is None
    result = plan.report(desired, None, now=NOW)
    conds = conditions(result)
    assert conds["Stalled"]["status"] == "True" and conds["Ready"]["status"] == "False"
    assert result.events == (plan.Event("Warning", reason, desired.stalled[1]),)
    # Reported once: the same stall again writes nothing and posts no second Event.
    again = plan.report(desired, None, now="2026-12-06T10:00:05Z")
    stalled_again = plan.desire(with_status(body(spec), result), NODES, apply=True)
    assert stalled_again is not None
    assert plan.report(stalled_again, None, now=NOW).status is None
    assert again.stalled_reason == reason


def test_an_unknown_voice_lists_the_served_voices_and_a_custom_image_is_trusted() -> None:
    desired = plan.desire(body({"model": {"voice": "en_US-nobody-medium"}}), NODES, apply=True)
    assert desired is not None and desired.stalled is not None
    for voice in contract.IMAGE_VOICES:
        assert voice in desired.stalled[1]
    assert "spec.runtime.image" in desired.stalled[1]
    mirror = "registry.example:5000/ttsfleet/triton-tts@sha256:abc"  # still ttsfleet's image
    mirrored = {"model": {"voice": "en_US-nobody-medium"}, "runtime": {"image": mirror}}
    assert plan.desire(body(mirrored), NODES, apply=True).stalled is not None  # type: ignore[union-attr]
    custom = {"model": {"voice": "en_US-nobody-medium"},
              "runtime": {"image": "example.com/voices/nobody:2"}}  # fmt: skip
    trusted = plan.desire(body(custom), NODES, apply=True)
    assert trusted is not None and trusted.stalled is None and trusted.apply


# ---- report -----------------------------------------------------------------------------


def test_ready_replicas_make_it_ready_and_the_first_report_says_applied() -> None:
    desired = plan.desire(body(), NODES, apply=True)
    assert desired is not None
    result = plan.report(desired, plan.Children(deployment(2)), now=NOW)
    assert result.ready
    assert conditions(result)["Ready"]["status"] == "True"
    assert result.status is not None and result.status["readyReplicas"] == 2
    assert result.events == (
        plan.Event("Normal", "Applied",
                   "Applied ConfigMap, Service, Deployment, PodDisruptionBudget, NetworkPolicy "
                   "for generation 1"),
    )  # fmt: skip


def test_nothing_changed_writes_nothing() -> None:
    desired = plan.desire(body(), NODES, apply=True)
    assert desired is not None
    first = plan.report(desired, plan.Children(deployment(2)), now=NOW)
    again = plan.desire(with_status(body(), first), NODES, apply=False)
    assert again is not None
    result = plan.report(again, plan.Children(deployment(2)), now="2026-12-06T11:00:00Z")
    assert result.status is None and result.events == () and result.ready


def test_a_rollout_under_way_is_reconciling_not_ready() -> None:
    desired = plan.desire(body(), NODES, apply=True)
    assert desired is not None
    rolling = deployment(2, generation=2)
    rolling["status"]["observedGeneration"] = 1
    conds = conditions(plan.report(desired, plan.Children(rolling), now=NOW))
    assert conds["Ready"]["status"] == "False" and conds["Reconciling"]["reason"] == "RollingOut"


def test_pods_waiting_for_a_slice_are_counted_against_the_nodes() -> None:
    spec = {"placement": {"mode": "mig", "profile": "3g.40gb"}, "replicas": 20}
    desired = plan.desire(body(spec), NODES, apply=True)
    assert desired is not None
    pods = [unschedulable_pod()]
    assert plan.needs_pods(desired, deployment(16, replicas=20))
    assert plan.needs_capacity(desired, pods)
    assert not plan.needs_capacity(desired, [])
    h100s = [n for n in NODES if n["metadata"]["name"].startswith("h100-")]
    holding = [
        {"metadata": {"name": f"p{i}"}, "spec": {"nodeName": h100s[i % len(h100s)]["metadata"]
         ["name"], "containers": [{"resources": {"limits": {"nvidia.com/mig-3g.40gb": "1"}}}]}}
        for i in range(16)
    ]  # fmt: skip
    children = plan.Children(deployment(16, replicas=20), pods, holding, NODES)
    cond = conditions(plan.report(desired, children, now=NOW))[status.CAPACITY_EXHAUSTED]
    assert cond["status"] == "True" and cond["reason"] == "InsufficientCapacity"
    assert "16 in use, 0 free" in cond["message"]
    assert "add nodes with mig-3g.40gb" in cond["message"]


def test_the_autoscalers_word_on_metrics_is_reported() -> None:
    desired = plan.desire(body({"scaling": {"mode": "builtin"}}), NODES, apply=False)
    assert desired is not None
    word = (True, "PrometheusUnavailable", "Prometheus at http://p:9090 did not answer")
    cond = conditions(plan.report(desired, plan.Children(deployment(2)), now=NOW, metrics=word))
    assert cond[status.METRICS_UNAVAILABLE]["status"] == "True"
    assert cond[status.METRICS_UNAVAILABLE]["reason"] == "PrometheusUnavailable"
