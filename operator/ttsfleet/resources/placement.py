"""Turn `spec.placement` into resources, node selection, tolerations and instances."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ttsfleet.api.v1alpha1 import PlacementMode, PlacementSpec, Precision, TtsDeploymentSpec
from ttsfleet.gpu import planner
from ttsfleet.gpu.catalog import GPU_RESOURCE, GPUS, MIG_RESOURCE_PREFIX

GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}


def gpu_tolerations(p: PlacementSpec) -> list[dict[str, Any]]:
    """The spec's tolerations, and the GPU nodes' taint's once."""
    tolerations = [t.wire() for t in p.tolerations]
    return tolerations if GPU_TOLERATION in tolerations else [*tolerations, GPU_TOLERATION]


class PlacementError(ValueError):
    """A placement the schema accepted but that cannot be honoured; says what to change."""


@dataclass(frozen=True)
class Placement:
    resources: dict[str, str]
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    affinity: dict[str, Any] | None
    instances: int
    gpu: bool
    summary: str
    option: planner.Option | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_placement(
    spec: TtsDeploymentSpec,
    offers: Sequence[planner.Option] | None = None,
    keep: str | None = None,
) -> Placement:
    """How and where replicas run.

    Triton instances follow the slice unless `runtime.instances` says otherwise:
    one per MIG compute slice, four per whole GPU (`planner.WHOLE_GPU_INSTANCES`,
    measured on an H100), one on a shared GPU or on CPU. `offers` (what the cluster's
    nodes advertise) is needed by `mode: auto`, which asks the planner for the
    cheapest of them that holds `streamsPerReplica`, except for int8, which runs on
    CPU only: auto places it there. An explicit MIG profile is
    checked against the same memory estimate. `keep` (auto) is the slice chosen
    before: it stays while offered and big enough.
    """
    p = spec.placement
    int8 = spec.model.precision == Precision.INT8
    if p.mode == PlacementMode.AUTO and not int8:
        return _planned(spec, offers, keep)
    selector = dict(p.node_selector)
    affinity = None
    option: planner.Option | None = None
    if p.mode in (PlacementMode.CPU, PlacementMode.AUTO):  # auto: int8 runs on CPU only
        resources: dict[str, str] = {}
        instances, summary = 1, "cpu"
    elif p.mode == PlacementMode.MIG:
        assert p.profile is not None  # the CRD's CEL rule requires it
        products = [g for g in GPUS.values() if g.profile(p.profile) is not None]
        compute = max(g.profile(p.profile).compute_slices for g in products)  # type: ignore[union-attr]
        strategy = p.mig_strategy or "mixed"
        base = planner.Option("mig", products[0], None, strategy, any_product=True)
        option = _check_profile(spec, base, p.profile)
        if strategy == "mixed":
            resources = {f"{MIG_RESOURCE_PREFIX}{p.profile}": "1"}
        else:
            resources = {GPU_RESOURCE: "1"}
            affinity = _product_affinity([f"{g.product_label}-MIG-{p.profile}" for g in products])
        instances, summary = compute, f"mig-{p.profile}"
    elif p.mode == PlacementMode.WHOLE:
        gpus = p.gpus or 1
        resources = {GPU_RESOURCE: str(gpus)}
        if p.product:
            selector["nvidia.com/gpu.product"] = p.product
        instances = planner.WHOLE_GPU_INSTANCES * gpus
        summary = f"{gpus}x{p.product}" if p.product else f"{gpus}xGPU"
    else:  # shared
        resources = {GPU_RESOURCE: "1"}
        selector["nvidia.com/gpu.sharing-strategy"] = "time-slicing"
        if p.product:
            selector["nvidia.com/gpu.product"] = f"{p.product}-SHARED"
        instances, summary = 1, f"shared-{p.product}" if p.product else "shared"
    gpu = bool(resources)
    tolerations = gpu_tolerations(p) if gpu else [t.wire() for t in p.tolerations]
    return Placement(
        resources=resources,
        node_selector=selector,
        tolerations=tolerations,
        affinity=affinity,
        instances=spec.runtime.instances or instances,
        gpu=gpu,
        summary=summary,
        option=option,
    )


def _check_profile(spec: TtsDeploymentSpec, base: planner.Option, profile: str) -> planner.Option:
    """Refuse an explicit MIG profile whose memory cannot hold the request (with the numbers).

    A profile's memory is in its name, so any GPU that has it gives the same answer.
    """
    option = replace(base, profile=base.product.profile(profile))
    try:
        planner.check(
            spec.model.voice, spec.model.precision.value,
            spec.placement.streams_per_replica, option, spec.runtime.instances,
        )  # fmt: skip
    except planner.PlanError as err:
        raise PlacementError(f"spec.placement.profile: {err}") from err
    return option


def _planned(
    spec: TtsDeploymentSpec, offers: Sequence[planner.Option] | None, keep: str | None
) -> Placement:
    """`mode: auto`: the planner's choice among what the cluster offers."""
    p = spec.placement
    try:
        chosen = planner.plan(
            spec.model.voice, spec.model.precision.value, p.streams_per_replica,
            offers or [], spec.runtime.instances, keep,
        )  # fmt: skip
    except planner.PlanError as err:
        raise PlacementError(f"spec.placement.mode auto: {err}") from err
    option = chosen.option
    selector = dict(p.node_selector)
    affinity = None
    if option.kind == "mig" and option.strategy == "single":
        affinity = _product_affinity([option.product_label])
    elif option.kind != "mig":
        selector["nvidia.com/gpu.product"] = option.product_label
    return Placement(
        resources={option.resource: "1"},
        node_selector=selector,
        tolerations=gpu_tolerations(p),
        affinity=affinity,
        instances=chosen.instances,
        gpu=True,
        summary=option.name,
        option=option,
    )


def _product_affinity(products: list[str]) -> dict[str, Any]:
    term = {"key": "nvidia.com/gpu.product", "operator": "In", "values": sorted(products)}
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [term]}]
            }
        }
    }
