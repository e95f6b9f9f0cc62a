"""What NVML says about a node's GPUs, as frozen values, and what the agent publishes.

`read` is the only function here that calls NVML (through the `Nvml` port); the
rest are pure: an `Inventory` in, annotations or metric samples out.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass

from ttsfleet.agent import nvml as nvml_port
from ttsfleet.agent.nvml import Nvml

ANNOTATION_PREFIX = "ttsfleet.io/"
GPU_COUNT = "ttsfleet.io/gpu-count"
GPU_PRODUCT = "ttsfleet.io/gpu-product"
DRIVER_VERSION = "ttsfleet.io/gpu-driver-version"
MIG_MODE = "ttsfleet.io/mig-mode"
MIG_PENDING = "ttsfleet.io/mig-pending"
MIG_LAYOUT = "ttsfleet.io/mig-layout"
GPUS = "ttsfleet.io/gpus"
SOURCE = "ttsfleet.io/gpu-inventory-source"
ANNOTATIONS = (
    GPU_COUNT, GPU_PRODUCT, DRIVER_VERSION, MIG_MODE, MIG_PENDING, MIG_LAYOUT, GPUS, SOURCE,
)  # fmt: skip

MIB = 1024 * 1024


@dataclass(frozen=True)
class MigProfile:
    """A GPU-instance profile as the GPU reports it (nvmlGpuInstanceProfileInfo)."""

    name: str
    profile_id: int
    slices: int
    memory_mib: int
    multiprocessors: int
    max_instances: int


@dataclass(frozen=True)
class GpuInstance:
    """A GPU instance that exists now (nvmlGpuInstanceInfo)."""

    instance_id: int
    profile: str
    placement_start: int
    placement_size: int


@dataclass(frozen=True)
class Gpu:
    """One physical GPU. MIG fields are None when the GPU does not support MIG;
    utilisation is None when NVML does not report it (as on a GPU in MIG mode)."""

    index: int
    uuid: str
    product: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_gpu_percent: int | None
    utilization_memory_percent: int | None
    mig_current: bool | None
    mig_pending: bool | None
    profiles: tuple[MigProfile, ...] = ()
    instances: tuple[GpuInstance, ...] = ()

    @property
    def mig_layout(self) -> dict[str, int]:
        """Instances per profile name, e.g. {"1g.10gb": 2, "3g.40gb": 1}."""
        return dict(sorted(Counter(i.profile for i in self.instances).items()))

    @property
    def mig_change_pending(self) -> bool:
        return self.mig_current is not None and self.mig_current != self.mig_pending


@dataclass(frozen=True)
class Inventory:
    """Every GPU of a node, with where the figures came from."""

    driver_version: str
    gpus: tuple[Gpu, ...]
    source: str = "nvml"
    synthetic: bool = False

    @property
    def mig_layout(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for gpu in self.gpus:
            total.update(gpu.mig_layout)
        return dict(sorted(total.items()))


def profile_name(raw_name: bytes | str, slices: int, memory_mib: int) -> str:
    """NVIDIA's short name of a profile: "1g.10gb" from "MIG 1g.10gb".

    Without a name from NVML (the v1 structure has none), it is made the way
    NVIDIA's tools make it: slices, then memory in GiB rounded up.
    """
    name = raw_name.decode() if isinstance(raw_name, bytes) else raw_name
    name = name.strip().removeprefix("MIG ").strip()
    return name or f"{slices}g.{math.ceil(memory_mib / 1024)}gb"


def read(nvml: Nvml, source: str = "nvml", synthetic: bool = False) -> Inventory:
    """Read every GPU through `nvml` (already initialised). Only read calls."""
    gpus = tuple(_read_gpu(nvml, i) for i in range(nvml.nvmlDeviceGetCount()))
    return Inventory(nvml.nvmlSystemGetDriverVersion(), gpus, source, synthetic)


def _read_gpu(nvml: Nvml, index: int) -> Gpu:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
        gpu_percent: int | None = int(utilization.gpu)
        memory_percent: int | None = int(utilization.memory)
    except nvml_port.NotSupported:
        gpu_percent = memory_percent = None
    try:
        current, pending = nvml.nvmlDeviceGetMigMode(handle)
        mig_current: bool | None = current == nvml_port.MIG_ENABLE
        mig_pending: bool | None = pending == nvml_port.MIG_ENABLE
    except nvml_port.NotSupported:
        mig_current = mig_pending = None
    profiles: tuple[MigProfile, ...] = ()
    instances: tuple[GpuInstance, ...] = ()
    if mig_current:
        profiles, instances = _read_mig(nvml, handle)
    return Gpu(
        index=index,
        uuid=nvml.nvmlDeviceGetUUID(handle),
        product=nvml.nvmlDeviceGetName(handle),
        memory_total_bytes=int(memory.total),
        memory_used_bytes=int(memory.used),
        utilization_gpu_percent=gpu_percent,
        utilization_memory_percent=memory_percent,
        mig_current=mig_current,
        mig_pending=mig_pending,
        profiles=profiles,
        instances=instances,
    )


def _read_mig(nvml: Nvml, handle: object) -> tuple[tuple[MigProfile, ...], tuple[GpuInstance, ...]]:
    """The GPU's GPU-instance profiles and the instances that exist, from NVML itself."""
    profiles: dict[int, MigProfile] = {}
    for index in nvml_port.PROFILE_INDICES:
        try:
            info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, index)
        except nvml_port.Absent:
            continue  # this GPU has no profile of that kind
        memory_mib = int(info.memorySizeMB)
        slices = int(info.sliceCount)
        profiles.setdefault(
            int(info.id),
            MigProfile(
                name=profile_name(info.name, slices, memory_mib),
                profile_id=int(info.id),
                slices=slices,
                memory_mib=memory_mib,
                multiprocessors=int(info.multiprocessorCount),
                max_instances=int(info.instanceCount),
            ),
        )
    instances = []
    for profile in profiles.values():
        for gi in nvml_port.gpu_instances(nvml, handle, profile.profile_id, profile.max_instances):
            found = nvml.nvmlGpuInstanceGetInfo(gi)
            instances.append(
                GpuInstance(
                    instance_id=int(found.id),
                    profile=profile.name,
                    placement_start=int(found.placement.start),
                    placement_size=int(found.placement.size),
                )
            )
    instances.sort(key=lambda i: (i.placement_start, i.instance_id))
    return tuple(profiles.values()), tuple(instances)


def _mode(value: bool | None) -> str:
    return "unsupported" if value is None else ("enabled" if value else "disabled")


def node_annotations(inventory: Inventory) -> dict[str, str]:
    """The `ttsfleet.io/` annotations that describe `inventory` on its Node.

    Only figures that change with the hardware or its configuration: utilisation
    and memory in use are metrics, so the Node is not rewritten every pass.
    """
    modes = {_mode(g.mig_current) for g in inventory.gpus}
    gpus = [
        {
            "index": g.index,
            "uuid": g.uuid,
            "product": g.product,
            "memoryMiB": g.memory_total_bytes // MIB,
            "migMode": {"current": _mode(g.mig_current), "pending": _mode(g.mig_pending)},
            "migLayout": g.mig_layout,
        }
        for g in inventory.gpus
    ]
    source = inventory.source + (", synthetic" if inventory.synthetic else "")
    return {
        GPU_COUNT: str(len(inventory.gpus)),
        GPU_PRODUCT: ",".join(sorted({g.product for g in inventory.gpus})),
        DRIVER_VERSION: inventory.driver_version,
        MIG_MODE: modes.pop() if len(modes) == 1 else ("mixed" if modes else "unsupported"),
        MIG_PENDING: str(any(g.mig_change_pending for g in inventory.gpus)).lower(),
        MIG_LAYOUT: json.dumps(inventory.mig_layout, sort_keys=True),
        GPUS: json.dumps(gpus, sort_keys=True),
        SOURCE: source,
    }


@dataclass(frozen=True)
class Sample:
    """One metric sample: a gauge's name, its labels and its value."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


METRICS: dict[str, str] = {
    "ttsfleet_agent_gpus": "GPUs NVML reports on this node.",
    "ttsfleet_agent_gpu_info": "Always 1; the GPU's product and driver as labels.",
    "ttsfleet_agent_gpu_memory_total_bytes": "Memory of the GPU (nvmlDeviceGetMemoryInfo).",
    "ttsfleet_agent_gpu_memory_used_bytes": "Memory in use on the GPU (nvmlDeviceGetMemoryInfo).",
    "ttsfleet_agent_gpu_utilization_ratio": (
        "Share of the last sample period a kernel ran (absent where NVML does not report it)."
    ),
    "ttsfleet_agent_gpu_memory_activity_ratio": (
        "Share of the last sample period memory was read or written."
    ),
    "ttsfleet_agent_gpu_mig_enabled": "MIG mode (mode: current or pending): 1 on, 0 off.",
    "ttsfleet_agent_mig_instances": "GPU instances of each profile the GPU reports.",
}


def samples(inventory: Inventory) -> list[Sample]:
    """The metric samples of `inventory` (names are keys of METRICS)."""
    out = [Sample("ttsfleet_agent_gpus", (), float(len(inventory.gpus)))]
    for g in inventory.gpus:
        ids = (("gpu", str(g.index)), ("uuid", g.uuid))
        info = (*ids, ("product", g.product), ("driver_version", inventory.driver_version))
        out += [
            Sample("ttsfleet_agent_gpu_info", info, 1.0),
            Sample("ttsfleet_agent_gpu_memory_total_bytes", ids, float(g.memory_total_bytes)),
            Sample("ttsfleet_agent_gpu_memory_used_bytes", ids, float(g.memory_used_bytes)),
        ]
        if g.utilization_gpu_percent is not None:
            ratio = g.utilization_gpu_percent / 100
            out.append(Sample("ttsfleet_agent_gpu_utilization_ratio", ids, ratio))
        if g.utilization_memory_percent is not None:
            ratio = g.utilization_memory_percent / 100
            out.append(Sample("ttsfleet_agent_gpu_memory_activity_ratio", ids, ratio))
        for mode, value in (("current", g.mig_current), ("pending", g.mig_pending)):
            if value is not None:
                labels = (*ids, ("mode", mode))
                out.append(Sample("ttsfleet_agent_gpu_mig_enabled", labels, float(value)))
        layout = g.mig_layout
        for profile in g.profiles:
            labels = (*ids, ("profile", profile.name))
            count = float(layout.get(profile.name, 0))
            out.append(Sample("ttsfleet_agent_mig_instances", labels, count))
    return out


def label_notes(inventory: Inventory, labels: dict[str, str]) -> list[str]:
    """Where NVIDIA's node labels (read, never written) disagree with NVML."""
    notes = []
    product = labels.get("nvidia.com/gpu.product")
    names = {g.product.replace(" ", "-") for g in inventory.gpus}
    if product and names and not any(product.startswith(n) for n in names):
        notes.append(f"nvidia.com/gpu.product is {product!r}; NVML reports {sorted(names)}")
    state = labels.get("nvidia.com/mig.config.state")
    pending = [g.index for g in inventory.gpus if g.mig_change_pending]
    if pending and state == "success":
        notes.append(
            f"GPUs {pending} have a MIG mode change pending (a GPU reset applies it) "
            "while nvidia.com/mig.config.state is 'success'"
        )
    return notes
