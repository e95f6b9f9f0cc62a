"""Turn `spec.placement` into resources, node selection, tolerations and instances."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ttsfleet.api.v1alpha1 import PlacementMode, TtsDeploymentSpec
from ttsfleet.gpu.catalog import GPU_RESOURCE, GPUS, MIG_RESOURCE_PREFIX

GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}


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
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_placement(spec: TtsDeploymentSpec) -> Placement:
    """How and where replicas run.

    Triton instances follow the slice unless `runtime.instances` says otherwise:
    one per MIG compute slice, two per whole GPU (one computes while the other
    prepares text), one on a shared GPU or on CPU.
    """
    p = spec.placement
    selector = dict(p.node_selector)
    tolerations = [t.wire() for t in p.tolerations]
    affinity = None
    if p.mode == PlacementMode.AUTO:
        raise PlacementError(
            "spec.placement.mode auto needs the GPU placement planner, which this version "
            "does not have yet: set placement.mode to whole, mig, shared or cpu"
        )
    if p.mode == PlacementMode.CPU:
        resources: dict[str, str] = {}
        instances, summary = 1, "cpu"
    elif p.mode == PlacementMode.MIG:
        assert p.profile is not None  # the CRD's CEL rule requires it
        products = [g for g in GPUS.values() if g.profile(p.profile) is not None]
        compute = max(g.profile(p.profile).compute_slices for g in products)  # type: ignore[union-attr]
        if (p.mig_strategy or "mixed") == "mixed":
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
        instances = 2 * gpus
        summary = f"{gpus}x{p.product}" if p.product else f"{gpus}xGPU"
    else:  # shared
        resources = {GPU_RESOURCE: "1"}
        selector["nvidia.com/gpu.sharing-strategy"] = "time-slicing"
        if p.product:
            selector["nvidia.com/gpu.product"] = f"{p.product}-SHARED"
        instances, summary = 1, f"shared-{p.product}" if p.product else "shared"
    gpu = p.mode != PlacementMode.CPU
    if gpu and GPU_TOLERATION not in tolerations:
        tolerations.append(GPU_TOLERATION)
    return Placement(
        resources=resources,
        node_selector=selector,
        tolerations=tolerations,
        affinity=affinity,
        instances=spec.runtime.instances or instances,
        gpu=gpu,
        summary=summary,
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
