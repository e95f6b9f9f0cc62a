"""Which GPU slice a TTS replica needs: memory from the measured model, the cheapest fit.

Pure: the catalogue, a voice's measured footprint and the options a cluster offers
in; a `Plan` (or a `PlanError` with the numbers) out.

One replica's GPU memory, in MiB (an estimate until measured on a GPU; the figures
and their sources are in docs/placement.md):

    instances x (CUDA context + runtime workspace + weights)
    + streams x activations of one in-flight sentence

then `HEADROOM` on top, against `USABLE_FRACTION` of the slice's nominal memory.
Each Triton Python-backend instance is its own process, with its own CUDA context
and its own copy of the weights. Activations are held per stream because a GPU
replica synthesises its open streams' sentences in flight together.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ttsfleet.gpu.catalog import GPU_RESOURCE, GPUS, GpuProduct, MigProfile

# Per instance: a CUDA 12 context on Ampere/Hopper with lazy module loading, and
# ONNX Runtime's CUDA execution provider (arena start, cuDNN/cuBLAS workspaces).
CUDA_CONTEXT_MIB = 512.0
RUNTIME_WORKSPACE_MIB = 256.0
# Activations of one sentence, per second of audio, in FP32: measured on this CPU
# with ONNX Runtime (benchmarks/placement_bench.py); other precisions scale with
# their element size (FP16 2 bytes). INT8 is not planned onto GPUs (CPU only).
ELEMENT_BYTES = {"fp32": 4, "fp16": 2}
# The engine synthesises one sentence at a time per stream; ~10 s of speech is a
# long sentence (~180 characters) at Piper's speaking rate.
SENTENCE_AUDIO_SECONDS = 10.0
HEADROOM = 0.20
# NVML reports a few percent less than a slice's name says (1g.10gb: 9.75 GiB).
USABLE_FRACTION = 0.95
# Triton instances when `runtime.instances` is unset: one per MIG compute slice,
# four per whole GPU, one when shared. Measured on an H100 (benchmarks/gpu_sentence_bench.py):
# one instance uses little of the GPU at batch 1; FP16 replies per second for 1, 2, 4
# and 8 instances were 3.4, 6.7, 11.9 and 14.2, first chunk p50 125, 131, 149 and
# 273 ms. Four is the knee: 3.5x one instance for +20 % latency.
WHOLE_GPU_INSTANCES = 4

Kind = Literal["mig", "whole", "shared"]
_KIND_ORDER = {"mig": 0, "shared": 1, "whole": 2}


@dataclass(frozen=True)
class Footprint:
    """A voice's measured model: weights per precision, FP32 activations per audio second."""

    voice: str
    weights_mib: Mapping[str, float]
    activation_mib_per_audio_second: float
    measured: str


# `make bench-placement` measures these (weights: the variant files the model build
# writes; activations: peak memory growth while synthesising, FP32 on CPU).
# tests/unit/test_planner.py checks them against benchmarks/results/placement.json.
MEASURED = Footprint(
    voice="en_US-joe-medium",
    weights_mib={"fp32": 60.3, "fp16": 30.6},
    activation_mib_per_audio_second=18.1,
    measured="en_US-joe-medium, ONNX Runtime on CPU (benchmarks/results/placement.json)",
)
# Piper checkpoints of one quality share an architecture, so a voice's size follows
# its quality; relative to medium, from Piper's published checkpoint sizes.
_QUALITY_SCALE = {"x_low": 0.33, "low": 1.0, "medium": 1.0, "high": 1.8}


def footprint(voice: str) -> Footprint:
    """The measured footprint of `voice`, or its quality class's (scaled from the measured)."""
    if voice == MEASURED.voice:
        return MEASURED
    quality = voice.rsplit("-", 1)[-1]
    scale = _QUALITY_SCALE.get(quality)
    if scale is None:
        known = ", ".join(_QUALITY_SCALE)
        raise PlanError(f"voice {voice!r} has no quality suffix Piper uses ({known})")
    return Footprint(
        voice=voice,
        weights_mib={p: w * scale for p, w in MEASURED.weights_mib.items()},
        activation_mib_per_audio_second=MEASURED.activation_mib_per_audio_second * scale,
        measured=f"estimated from {MEASURED.voice} for {quality} quality (x{scale})",
    )


class PlanError(ValueError):
    """No option holds the request; the message carries the numbers."""


@dataclass(frozen=True)
class Option:
    """One way to give a replica a GPU: a MIG slice, a whole GPU, or a time-sliced share."""

    kind: Kind
    product: GpuProduct
    profile: MigProfile | None = None
    strategy: Literal["mixed", "single"] = "mixed"
    share: int = 1  # time-slicing replicas per GPU
    # An explicit MIG profile under the single strategy may land on any GPU product
    # that has it (its pods' affinity lists them all): capacity counts them all.
    any_product: bool = False

    @property
    def memory_gib(self) -> float:
        """Nominal memory of the slice (a time-sliced share gets its part of the GPU)."""
        if self.profile is not None:
            return float(self.profile.memory_gib)
        return self.product.memory_mib / 1024 / self.share

    @property
    def name(self) -> str:
        """What status and messages call it: mig-1g.10gb, NVIDIA-L4, shared-NVIDIA-L4."""
        if self.profile is not None:
            return f"mig-{self.profile.name}"
        label = self.product.product_label
        return f"shared-{label}" if self.kind == "shared" else label

    @property
    def resource(self) -> str:
        if self.profile is not None and self.strategy == "mixed":
            return self.profile.resource
        return GPU_RESOURCE

    @property
    def product_label(self) -> str:
        """The `nvidia.com/gpu.product` label of the nodes that have this option."""
        label = self.product.product_label
        if self.profile is not None and self.strategy == "single":
            return f"{label}-MIG-{self.profile.name}"
        return f"{label}-SHARED" if self.kind == "shared" else label

    def default_instances(self) -> int:
        if self.profile is not None:
            return self.profile.compute_slices
        return WHOLE_GPU_INSTANCES if self.kind == "whole" else 1

    def sort_key(self) -> tuple[float, int, int]:
        slices = self.profile.compute_slices if self.profile else self.product.compute_slices
        return (self.memory_gib, _KIND_ORDER[self.kind], slices)


@dataclass(frozen=True)
class Memory:
    """One replica's memory estimate, in GiB."""

    context: float
    runtime: float
    weights: float
    activations: float
    total: float
    with_headroom: float
    available: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in vars(self).items()}


@dataclass(frozen=True)
class Plan:
    option: Option
    instances: int
    streams: int
    precision: str
    memory: Memory
    footprint: Footprint

    def as_dict(self) -> dict[str, Any]:
        o = self.option
        return {
            "placement": o.kind,
            "resource": o.resource,
            "profile": o.profile.name if o.profile else None,
            "gpu": o.product.key,
            "product": o.product_label,
            "instances": self.instances,
            "streams_per_replica": self.streams,
            "precision": self.precision,
            "memory_gib": self.memory.as_dict(),
            "estimate": f"modelled (checked on an H100: 3-8 % above what one loaded "
            f"instance used); weights and activations from {self.footprint.measured}",
        }


def estimate(
    fp: Footprint, precision: str, streams: int, option: Option, instances: int | None = None
) -> tuple[Memory, int]:
    """The memory one replica needs on `option`, and its Triton instance count."""
    n = instances or option.default_instances()
    per_stream = (
        fp.activation_mib_per_audio_second
        * SENTENCE_AUDIO_SECONDS
        * ELEMENT_BYTES[precision]
        / ELEMENT_BYTES["fp32"]
    )
    mib = 1024.0
    context = n * CUDA_CONTEXT_MIB / mib
    runtime = n * RUNTIME_WORKSPACE_MIB / mib
    weights = n * fp.weights_mib[precision] / mib
    activations = streams * per_stream / mib
    total = context + runtime + weights + activations
    memory = Memory(
        context=context,
        runtime=runtime,
        weights=weights,
        activations=activations,
        total=total,
        with_headroom=total * (1 + HEADROOM),
        available=option.memory_gib * USABLE_FRACTION,
    )
    return memory, n


def fits(memory: Memory) -> bool:
    return memory.with_headroom <= memory.available


def catalogue_options(products: Iterable[GpuProduct] | None = None) -> list[Option]:
    """Every MIG slice (mixed strategy) and whole GPU of the given products (all by default)."""
    out: list[Option] = []
    for gpu in products if products is not None else GPUS.values():
        out.extend(Option("mig", gpu, p) for p in gpu.mig_profiles)
        out.append(Option("whole", gpu))
    return out


def plan(
    voice: str,
    precision: str,
    streams: int,
    options: Sequence[Option],
    instances: int | None = None,
    keep: str | None = None,
) -> Plan:
    """The cheapest option that holds `streams` of `voice` in `precision` with headroom.

    Cheapest: least memory, then MIG before a shared GPU before a whole one, then
    fewer compute slices. `keep` names the option chosen before: it stays while it is
    offered and still fits, so nodes joining or leaving do not roll a fleet. Raises
    PlanError with the numbers when none fits.
    """
    _gpu_precision(precision)
    fp = footprint(voice)
    for option in options:
        if keep is not None and option.name == keep:
            memory, n = estimate(fp, precision, streams, option, instances)
            if fits(memory):
                return Plan(option, n, streams, precision, memory, fp)
    if not options:
        raise PlanError(
            "no GPU to place on: the cluster advertises no NVIDIA GPUs or MIG slices;"
            " add GPU nodes, or set spec.placement.mode to cpu"
        )
    best: tuple[Memory, Option] | None = None
    for option in sorted(options, key=Option.sort_key):
        memory, n = estimate(fp, precision, streams, option, instances)
        if fits(memory):
            return Plan(option, n, streams, precision, memory, fp)
        if best is None or option.memory_gib > best[1].memory_gib:
            best = (memory, option)
    assert best is not None
    memory, largest = best
    raise PlanError(
        f"{streams} streams of {voice} in {precision} need {memory.with_headroom:.1f} GiB per "
        f"replica ({describe(memory)}); the largest option, {largest.name} on "
        f"{largest.product.key}, has {memory.available:.1f} GiB: lower "
        "spec.placement.streamsPerReplica (more replicas hold the rest) or use a smaller precision"
    )


def check(
    voice: str, precision: str, streams: int, option: Option, instances: int | None = None
) -> Plan:
    """Whether an explicitly chosen option holds the request; PlanError with the numbers if not."""
    _gpu_precision(precision)
    fp = footprint(voice)
    memory, n = estimate(fp, precision, streams, option, instances)
    if not fits(memory):
        raise PlanError(
            f"{option.name} on {option.product.key} has {memory.available:.1f} GiB but "
            f"{streams} streams of {voice} in {precision} need {memory.with_headroom:.1f} GiB "
            f"per replica ({describe(memory)}): choose a bigger profile, lower "
            "spec.placement.streamsPerReplica, or set spec.placement.mode to auto"
        )
    return Plan(option, n, streams, precision, memory, fp)


def _gpu_precision(precision: str) -> None:
    """INT8 is a CPU engine (static QDQ on VNNI kernels): no GPU slice is offered for it."""
    if precision == "int8":
        raise PlanError(
            "int8 runs on CPU only, so no GPU slice is planned for it: use fp16 on GPUs "
            "(it halves the weights too), or place int8 replicas on CPU"
        )


def describe(memory: Memory) -> str:
    return (
        f"context {memory.context:.2f} + runtime {memory.runtime:.2f} + weights "
        f"{memory.weights:.2f} + activations {memory.activations:.2f} = {memory.total:.2f} GiB, "
        f"+{HEADROOM:.0%} headroom"
    )


def product_for_label(label: str) -> GpuProduct | None:
    """The catalogue entry behind a GFD product label (also its -SHARED and -MIG- forms)."""
    base = label.removesuffix("-SHARED").split("-MIG-")[0]
    return next((g for g in GPUS.values() if base in (g.product_label, g.key)), None)


def options_from_nodes(nodes: Iterable[Mapping[str, Any]]) -> list[Option]:
    """The options a cluster offers, read from GFD labels and the device plugin's allocatable."""
    seen: dict[tuple[Any, ...], Option] = {}
    for node in nodes:
        labels = node.get("metadata", {}).get("labels") or {}
        allocatable = node.get("status", {}).get("allocatable") or {}
        gpu = product_for_label(labels.get("nvidia.com/gpu.product", ""))
        if gpu is None:
            continue
        found: list[Option] = []
        for resource, count in allocatable.items():
            if resource.startswith("nvidia.com/mig-") and _positive(count):
                profile = gpu.profile(resource.removeprefix("nvidia.com/mig-"))
                if profile is not None:
                    found.append(Option("mig", gpu, profile))
        if _positive(allocatable.get(GPU_RESOURCE, "0")):
            product = labels["nvidia.com/gpu.product"]
            if "-MIG-" in product:
                profile = gpu.profile(product.split("-MIG-")[1])
                if profile is not None:
                    found.append(Option("mig", gpu, profile, "single"))
            elif labels.get("nvidia.com/gpu.sharing-strategy", "none") not in ("", "none"):
                # Time-slicing or MPS: the GPU's memory is split between its replicas.
                replicas = labels.get("nvidia.com/gpu.replicas", "1")
                share = int(replicas) if _positive(replicas) else 1
                found.append(Option("shared", gpu, share=share))
            else:
                found.append(Option("whole", gpu))
        for option in found:
            key = (option.kind, gpu.key, option.profile, option.strategy, option.share)
            seen.setdefault(key, option)
    return list(seen.values())


def _positive(quantity: str) -> bool:
    try:
        return int(quantity) > 0
    except ValueError:
        return False


def tolerated(taint: Mapping[str, Any], tolerations: Iterable[Mapping[str, Any]]) -> bool:
    """Whether a toleration lets a pod onto a node with `taint` (Kubernetes' matching)."""
    for t in tolerations:
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        if not t.get("key"):
            if t.get("operator") == "Exists":
                return True
            continue
        if t.get("key") != taint.get("key"):
            continue
        if t.get("operator") == "Exists" or t.get("value", "") == taint.get("value", ""):
            return True
    return False


def eligible_nodes(
    nodes: Iterable[Mapping[str, Any]],
    node_selector: Mapping[str, str],
    tolerations: Iterable[Mapping[str, Any]],
) -> list[Mapping[str, Any]]:
    """The nodes a fleet's pods may land on: selector matched, schedulable, taints tolerated."""
    tolerations = list(tolerations)
    out = []
    for node in nodes:
        labels = node.get("metadata", {}).get("labels") or {}
        if any(labels.get(k) != v for k, v in node_selector.items()):
            continue
        if node.get("spec", {}).get("unschedulable"):
            continue
        taints = node.get("spec", {}).get("taints") or []
        blocking = [t for t in taints if t.get("effect") in ("NoSchedule", "NoExecute")]
        if all(tolerated(t, tolerations) for t in blocking):
            out.append(node)
    return out


@dataclass(frozen=True)
class Capacity:
    """Slices of one option: allocatable and in use, per node name."""

    allocatable_by_node: Mapping[str, int]
    in_use_by_node: Mapping[str, int]

    @property
    def allocatable(self) -> int:
        return sum(self.allocatable_by_node.values())

    @property
    def in_use(self) -> int:
        return sum(self.in_use_by_node.values())

    @property
    def nodes(self) -> int:
        return len(self.allocatable_by_node)

    @property
    def free(self) -> int:
        return max(self.allocatable - self.in_use, 0)

    def free_by_node(self) -> dict[str, int]:
        """Where replicas would fit: free slices per node, nodes with none left out."""
        free = {
            name: count - self.in_use_by_node.get(name, 0)
            for name, count in self.allocatable_by_node.items()
        }
        return {name: n for name, n in sorted(free.items()) if n > 0}


def node_matches(option: Option, labels: Mapping[str, str]) -> bool:
    product = labels.get("nvidia.com/gpu.product", "")
    if option.any_product and option.profile is not None:
        return product.endswith(f"-MIG-{option.profile.name}")
    return product == option.product_label


def capacity(
    option: Option, nodes: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]]
) -> Capacity:
    """How many replicas of `option` the cluster holds, and how many are taken by bound pods."""
    matching: dict[str, int] = {}
    for node in nodes:
        meta = node.get("metadata", {})
        if option.kind == "mig" and option.strategy == "mixed":
            ok = option.resource in (node.get("status", {}).get("allocatable") or {})
        else:
            ok = node_matches(option, meta.get("labels") or {})
        if ok:
            count = (node.get("status", {}).get("allocatable") or {}).get(option.resource, "0")
            matching[meta["name"]] = int(count) if _positive(count) else 0
    used: dict[str, int] = {}
    for pod in pods:
        spec = pod.get("spec", {})
        node_name = spec.get("nodeName")
        if node_name not in matching:
            continue
        if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            continue
        for container in spec.get("containers", []):
            limits = (container.get("resources") or {}).get("limits") or {}
            value = str(limits.get(option.resource, "0"))
            used[node_name] = used.get(node_name, 0) + (int(value) if value.isdigit() else 0)
    return Capacity(matching, used)
