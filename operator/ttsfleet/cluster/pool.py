"""Declarative node pools for the local cluster, and the Node objects they make.

A pool file (YAML) lists pools of simulated nodes. `render_nodes` turns it into
Node manifests whose capacity, allocatable, taints and labels look like those of
real nodes running NVIDIA's device plugin and GPU Feature Discovery (GFD). Pure:
no I/O beyond reading the file in `load_pool_file`.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from ttsfleet.gpu.catalog import GPU_RESOURCE, GPUS, GpuProduct, mig_layout_problems

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
LOCAL_LABEL = "ttsfleet.io/local"
POOL_LABEL = "ttsfleet.io/pool"
# The taint that keeps ordinary pods off nodes whose pods run as local processes.
LOCAL_TAINT = f"{LOCAL_LABEL}=true:NoSchedule"
# What GFD reports of the driver and CUDA on the simulated nodes.
DRIVER_VERSION = (550, 127, 5)
CUDA_VERSION = (12, 4)

_TAINT = re.compile(
    r"^(?P<key>[A-Za-z0-9][-A-Za-z0-9_./]*)(=(?P<value>[-A-Za-z0-9_.]*))?"
    r":(?P<effect>NoSchedule|PreferNoSchedule|NoExecute)$"
)
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?$")


class PoolError(ValueError):
    """A pool file that cannot be used; the message names the field and the fix."""


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True
    )


class GpuSpec(_Model):
    """The GPUs of every node in a pool."""

    product: str = Field(description="A catalogue key such as H100-80GB or L4.")
    count: int = Field(ge=1, le=16, description="GPUs per node.")
    mig_strategy: Literal["none", "single", "mixed"] = "none"
    mig_layout: dict[str, int] = Field(
        default_factory=dict, description="MIG instances per GPU, by profile."
    )
    time_slicing_replicas: int | None = Field(
        default=None, ge=2, description="Share each GPU this many ways (time-slicing)."
    )

    @field_validator("product")
    @classmethod
    def _known_product(cls, value: str) -> str:
        if value not in GPUS:
            raise ValueError(f"unknown GPU {value!r}: use one of {', '.join(GPUS)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> GpuSpec:
        gpu = GPUS[self.product]
        if self.mig_strategy == "none":
            if self.mig_layout:
                raise ValueError("migLayout needs migStrategy single or mixed")
            return self
        if not self.mig_layout:
            raise ValueError(f"migStrategy {self.mig_strategy} needs a migLayout")
        if self.time_slicing_replicas:
            raise ValueError("timeSlicingReplicas cannot be combined with MIG here")
        if self.mig_strategy == "single" and len(self.mig_layout) != 1:
            raise ValueError("migStrategy single needs one profile in migLayout")
        problems = mig_layout_problems(gpu, self.mig_layout)
        if problems:
            raise ValueError("migLayout: " + "; ".join(problems))
        return self

    @property
    def product_info(self) -> GpuProduct:
        return GPUS[self.product]


class Pool(_Model):
    """A group of identical nodes."""

    name: str
    count: int = Field(ge=0, le=5000)
    instance_type: str = "kwok"
    cpu: str = "8"
    memory: str = "32Gi"
    pods: int = Field(default=110, ge=1)
    gpu: GpuSpec | None = None
    local: bool = Field(
        default=False, description="Pods run as local processes; kwok leaves the node alone."
    )
    labels: dict[str, str] = Field(default_factory=dict)
    taints: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _dns_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use lower-case letters, digits and '-' (at most 42 characters)")
        return value

    @field_validator("taints")
    @classmethod
    def _taints(cls, value: list[str]) -> list[str]:
        for taint in value:
            if not _TAINT.match(taint):
                raise ValueError(f"taint {taint!r} is not of the form key[=value]:Effect")
        return value

    @model_validator(mode="after")
    def _local_is_cpu(self) -> Pool:
        if self.local and self.gpu is not None:
            raise ValueError("a local pool runs pods as local CPU processes: remove its gpu")
        return self


class PoolFile(_Model):
    pools: list[Pool] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> PoolFile:
        names = [p.name for p in self.pools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"pool names must be unique; repeated: {', '.join(dupes)}")
        return self


def default_pool_text() -> str:
    return (resources.files("ttsfleet.cluster") / "pools" / "default.yaml").read_text()


def parse_pool_file(text: str, source: str = "pool file") -> PoolFile:
    """Parse and validate YAML text; errors name the field, as `pools[0].gpu.count: ...`."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or "cannot parse"
        raise PoolError(f"{source}: not valid YAML{line}: {problem}") from err
    try:
        return PoolFile.model_validate(data)
    except ValidationError as err:
        raise PoolError(f"{source}: " + _describe(err)) from err


def load_pool_file(path: Path | None) -> PoolFile:
    if path is None:
        return parse_pool_file(default_pool_text(), "default pool file")
    try:
        text = path.read_text()
    except OSError as err:
        raise PoolError(f"cannot read pool file {path}: {err.strerror}") from err
    return parse_pool_file(text, str(path))


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = "unknown field: remove it or check its spelling (see the default pool file)"
        parts.append(f"{where or 'file'}: {message}")
    return "; ".join(parts)


def scale_gpu_pools(pool_file: PoolFile, gpu_nodes: int) -> PoolFile:
    """Spread `gpu_nodes` over the GPU pools in the proportions of their counts.

    Largest-remainder rounding, so the counts add up to exactly `gpu_nodes`.
    Pools without GPUs keep their counts.
    """
    gpu_pools = [p for p in pool_file.pools if p.gpu is not None]
    if not gpu_pools:
        raise PoolError("--nodes scales the GPU pools, and this pool file has none")
    weights = [max(p.count, 1) for p in gpu_pools]
    total = sum(weights)
    exact = [gpu_nodes * w / total for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: gpu_nodes - sum(counts)]:
        counts[i] += 1
    new_counts = {p.name: c for p, c in zip(gpu_pools, counts, strict=True)}
    pools = [
        p.model_copy(update={"count": new_counts[p.name]}) if p.name in new_counts else p
        for p in pool_file.pools
    ]
    return PoolFile(pools=pools)


def render_nodes(pool_file: PoolFile, kubernetes_version: str) -> list[dict[str, Any]]:
    """Every Node of every pool, named `<pool>-<index>`."""
    return [
        render_node(pool, index, kubernetes_version)
        for pool in pool_file.pools
        for index in range(pool.count)
    ]


def render_node(pool: Pool, index: int, kubernetes_version: str) -> dict[str, Any]:
    name = f"{pool.name}-{index}"
    labels = {
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/os": "linux",
        "kubernetes.io/hostname": name,
        "node.kubernetes.io/instance-type": pool.instance_type,
        POOL_LABEL: pool.name,
    }
    annotations = {"node.alpha.kubernetes.io/ttl": "0"}
    taints = list(pool.taints)
    capacity: dict[str, str] = {
        "cpu": pool.cpu,
        "memory": pool.memory,
        "pods": str(pool.pods),
        "ephemeral-storage": "500Gi",
    }
    if pool.local:
        labels[LOCAL_LABEL] = "true"
        taints.append(LOCAL_TAINT)
    else:
        labels["type"] = "kwok"
        annotations[KWOK_ANNOTATION] = "fake"
    if pool.gpu is not None:
        gpu_labels, gpu_capacity = _gpu_labels_and_capacity(pool.gpu)
        labels |= gpu_labels
        capacity |= gpu_capacity
    labels |= pool.labels
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {"taints": [_taint(t) for t in taints]} if taints else {},
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": kubernetes_version,
                "kubeProxyVersion": kubernetes_version,
                "containerRuntimeVersion": "ttsfleet-local" if pool.local else "kwok",
                "osImage": "simulated",
                "kernelVersion": "simulated",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        },
    }


def _gpu_labels_and_capacity(spec: GpuSpec) -> tuple[dict[str, str], dict[str, str]]:
    """The labels GFD sets and the resources the device plugin advertises."""
    gpu = spec.product_info
    major, minor, rev = DRIVER_VERSION
    labels = {
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": gpu.product_label,
        "nvidia.com/gpu.count": str(spec.count),
        "nvidia.com/gpu.memory": str(gpu.memory_mib),
        "nvidia.com/gpu.family": gpu.family,
        "nvidia.com/gpu.compute.major": str(gpu.compute_capability[0]),
        "nvidia.com/gpu.compute.minor": str(gpu.compute_capability[1]),
        "nvidia.com/cuda.driver.major": str(major),
        "nvidia.com/cuda.driver.minor": str(minor),
        "nvidia.com/cuda.driver.rev": f"{rev:02d}",
        "nvidia.com/cuda.runtime.major": str(CUDA_VERSION[0]),
        "nvidia.com/cuda.runtime.minor": str(CUDA_VERSION[1]),
        "nvidia.com/mig.capable": str(gpu.mig_capable).lower(),
        "nvidia.com/gpu.sharing-strategy": "time-slicing" if spec.time_slicing_replicas else "none",
    }
    capacity: dict[str, str] = {}
    if spec.mig_strategy == "none":
        replicas = spec.time_slicing_replicas or 1
        capacity[GPU_RESOURCE] = str(spec.count * replicas)
        if spec.time_slicing_replicas:
            labels["nvidia.com/gpu.replicas"] = str(replicas)
            labels["nvidia.com/gpu.product"] = f"{gpu.product_label}-SHARED"
        return labels, capacity
    labels["nvidia.com/mig.strategy"] = spec.mig_strategy
    labels["nvidia.com/mig.config.state"] = "success"
    if spec.mig_strategy == "single":
        ((name, per_gpu),) = spec.mig_layout.items()
        profile = gpu.profile(name)
        assert profile is not None  # checked by GpuSpec
        labels |= {
            "nvidia.com/gpu.product": f"{gpu.product_label}-MIG-{name}",
            "nvidia.com/gpu.count": str(per_gpu * spec.count),
            "nvidia.com/gpu.memory": str(profile.memory_gib * 1024),
            "nvidia.com/gpu.multiprocessors": str(profile.multiprocessors),
            "nvidia.com/gpu.slices.gi": str(profile.compute_slices),
            "nvidia.com/gpu.slices.ci": str(profile.compute_slices),
        }
        capacity[GPU_RESOURCE] = str(per_gpu * spec.count)
        return labels, capacity
    for name, per_gpu in spec.mig_layout.items():
        profile = gpu.profile(name)
        assert profile is not None  # checked by GpuSpec
        prefix = f"nvidia.com/mig-{name}"
        labels |= {
            f"{prefix}.count": str(per_gpu * spec.count),
            f"{prefix}.memory": str(profile.memory_gib * 1024),
            f"{prefix}.multiprocessors": str(profile.multiprocessors),
            f"{prefix}.slices.gi": str(profile.compute_slices),
            f"{prefix}.slices.ci": str(profile.compute_slices),
        }
        capacity[profile.resource] = str(per_gpu * spec.count)
    return labels, capacity


def _taint(text: str) -> dict[str, str]:
    match = _TAINT.match(text)
    assert match is not None  # checked by Pool
    taint = {"key": match["key"], "effect": match["effect"]}
    if match["value"]:
        taint["value"] = match["value"]
    return taint
