"""The GPUs ttsfleet knows, their MIG profiles, and the names NVIDIA's software uses.

Figures come from NVIDIA's MIG user guide (profiles, slices, SM counts, maximum
instances) and from the labels GPU Feature Discovery puts on nodes
(`nvidia.com/gpu.product`, `nvidia.com/gpu.memory` in MiB). A profile's memory is
the figure in its name; NVIDIA's tools report a few hundred MiB less.
"""

from __future__ import annotations

from dataclasses import dataclass

MIG_RESOURCE_PREFIX = "nvidia.com/mig-"
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class MigProfile:
    """One MIG GPU-instance profile, such as `1g.10gb` on an H100."""

    name: str
    compute_slices: int
    memory_slices: int
    multiprocessors: int
    max_instances: int

    @property
    def memory_gib(self) -> int:
        return int(self.name.split(".")[1].removesuffix("gb"))

    @property
    def resource(self) -> str:
        """The device plugin's resource name under the `mixed` strategy."""
        return f"{MIG_RESOURCE_PREFIX}{self.name}"


@dataclass(frozen=True)
class GpuProduct:
    """A GPU model as GPU Feature Discovery labels it."""

    key: str
    product_label: str
    memory_mib: int
    family: str
    compute_capability: tuple[int, int]
    compute_slices: int = 0
    memory_slices: int = 0
    mig_profiles: tuple[MigProfile, ...] = ()

    @property
    def mig_capable(self) -> bool:
        return bool(self.mig_profiles)

    def profile(self, name: str) -> MigProfile | None:
        return next((p for p in self.mig_profiles if p.name == name), None)


def _profiles(*rows: tuple[str, int, int, int, int]) -> tuple[MigProfile, ...]:
    return tuple(MigProfile(*row) for row in rows)


# (name, compute slices, memory slices of 8, SMs, max instances)
_A100_40 = _profiles(
    ("1g.5gb", 1, 1, 14, 7),
    ("1g.10gb", 1, 2, 14, 4),
    ("2g.10gb", 2, 2, 28, 3),
    ("3g.20gb", 3, 4, 42, 2),
    ("4g.20gb", 4, 4, 56, 1),
    ("7g.40gb", 7, 8, 98, 1),
)
_A100_80 = _profiles(
    ("1g.10gb", 1, 1, 14, 7),
    ("1g.20gb", 1, 2, 14, 4),
    ("2g.20gb", 2, 2, 28, 3),
    ("3g.40gb", 3, 4, 42, 2),
    ("4g.40gb", 4, 4, 56, 1),
    ("7g.80gb", 7, 8, 98, 1),
)
_H100_80 = _profiles(
    ("1g.10gb", 1, 1, 16, 7),
    ("1g.20gb", 1, 2, 26, 4),
    ("2g.20gb", 2, 2, 32, 3),
    ("3g.40gb", 3, 4, 60, 2),
    ("4g.40gb", 4, 4, 64, 1),
    ("7g.80gb", 7, 8, 132, 1),
)
_H200_141 = _profiles(
    ("1g.18gb", 1, 1, 16, 7),
    ("1g.35gb", 1, 2, 26, 4),
    ("2g.35gb", 2, 2, 32, 3),
    ("3g.71gb", 3, 4, 60, 2),
    ("4g.71gb", 4, 4, 64, 1),
    ("7g.141gb", 7, 8, 132, 1),
)
# The A30 has 4 compute and 4 memory slices.
_A30_24 = _profiles(
    ("1g.6gb", 1, 1, 14, 4),
    ("2g.12gb", 2, 2, 28, 2),
    ("4g.24gb", 4, 4, 56, 1),
)

GPUS: dict[str, GpuProduct] = {
    g.key: g
    for g in (
        GpuProduct("A100-40GB", "NVIDIA-A100-SXM4-40GB", 40960, "ampere", (8, 0), 7, 8, _A100_40),
        GpuProduct("A100-80GB", "NVIDIA-A100-SXM4-80GB", 81920, "ampere", (8, 0), 7, 8, _A100_80),
        GpuProduct("H100-80GB", "NVIDIA-H100-80GB-HBM3", 81559, "hopper", (9, 0), 7, 8, _H100_80),
        GpuProduct("H200-141GB", "NVIDIA-H200", 143771, "hopper", (9, 0), 7, 8, _H200_141),
        GpuProduct("A30", "NVIDIA-A30", 24576, "ampere", (8, 0), 4, 4, _A30_24),
        GpuProduct("L4", "NVIDIA-L4", 23034, "ada-lovelace", (8, 9)),
        GpuProduct("L40S", "NVIDIA-L40S", 46068, "ada-lovelace", (8, 9)),
        GpuProduct("A10G", "NVIDIA-A10G", 23028, "ampere", (8, 6)),
    )
}


def mig_layout_problems(gpu: GpuProduct, layout: dict[str, int]) -> list[str]:
    """Why `layout` (profile -> instances on one GPU) cannot exist on `gpu`; empty if it can.

    Checks the profile names, each profile's instance limit, and the compute and
    memory slices in total. NVIDIA's placement rules (which start slots a profile
    may use) are stricter still; layouts NVIDIA's mig-parted ships pass both.
    """
    if not gpu.mig_capable:
        return [f"{gpu.key} does not support MIG"]
    problems = []
    compute = memory = 0
    for name, count in layout.items():
        profile = gpu.profile(name)
        if profile is None:
            known = ", ".join(p.name for p in gpu.mig_profiles)
            problems.append(f"{gpu.key} has no MIG profile {name!r} (it has {known})")
            continue
        if count > profile.max_instances:
            problems.append(
                f"{gpu.key} holds at most {profile.max_instances} x {name}, not {count}"
            )
        compute += profile.compute_slices * count
        memory += profile.memory_slices * count
    if compute > gpu.compute_slices:
        problems.append(
            f"the layout needs {compute} compute slices; {gpu.key} has {gpu.compute_slices}"
        )
    if memory > gpu.memory_slices:
        problems.append(
            f"the layout needs {memory} memory slices; {gpu.key} has {gpu.memory_slices}"
        )
    return problems
