"""The NVML port: the pynvml functions the agent calls, and nothing else.

The real `pynvml` module is the default implementation; `replay.Replay` is the
other. Every function named here only reads.
"""

# ruff: noqa: N802, N803 - the names are NVML's own

from __future__ import annotations

import ctypes
from typing import Any, Protocol

import pynvml

MIG_DISABLE: int = pynvml.NVML_DEVICE_MIG_DISABLE
MIG_ENABLE: int = pynvml.NVML_DEVICE_MIG_ENABLE
# The NVML_GPU_INSTANCE_PROFILE_* indices that nvmlDeviceGetGpuInstanceProfileInfo takes.
PROFILE_INDICES = range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT)

NVMLError: type[Exception] = pynvml.NVMLError
NotSupported: type[Exception] = pynvml.NVMLError_NotSupported
# NVML's answers to nvmlInit on a machine without an NVIDIA driver (so without a usable GPU).
NoDriver: tuple[type[Exception], ...] = (
    pynvml.NVMLError_LibraryNotFound,
    pynvml.NVMLError_DriverNotLoaded,
)
# NVML answers these when a profile or a feature does not exist on a GPU.
Absent: tuple[type[Exception], ...] = (
    pynvml.NVMLError_NotSupported,
    pynvml.NVMLError_InvalidArgument,
    pynvml.NVMLError_NotFound,
)


class MemoryInfo(Protocol):
    """nvmlMemory_t, in bytes."""

    @property
    def total(self) -> int: ...
    @property
    def free(self) -> int: ...
    @property
    def used(self) -> int: ...


class Utilization(Protocol):
    """nvmlUtilization_t, in percent of the last sample period."""

    @property
    def gpu(self) -> int: ...
    @property
    def memory(self) -> int: ...


class GpuInstanceProfileInfo(Protocol):
    """nvmlGpuInstanceProfileInfo_v2_t: the fields the agent reads."""

    @property
    def id(self) -> int: ...
    @property
    def sliceCount(self) -> int: ...
    @property
    def instanceCount(self) -> int: ...
    @property
    def multiprocessorCount(self) -> int: ...
    @property
    def memorySizeMB(self) -> int: ...
    @property
    def name(self) -> bytes: ...


class GpuInstancePlacement(Protocol):
    @property
    def start(self) -> int: ...
    @property
    def size(self) -> int: ...


class GpuInstanceInfo(Protocol):
    """nvmlGpuInstanceInfo_t: the fields the agent reads."""

    @property
    def id(self) -> int: ...
    @property
    def profileId(self) -> int: ...
    @property
    def placement(self) -> GpuInstancePlacement: ...


class Nvml(Protocol):
    """The read-only subset of pynvml the agent uses, under pynvml's own names."""

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetName(self, handle: Any) -> str: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> MemoryInfo: ...
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Utilization: ...
    def nvmlDeviceGetMigMode(self, device: Any) -> list[int]: ...
    def nvmlDeviceGetGpuInstanceProfileInfo(
        self, device: Any, profile: int
    ) -> GpuInstanceProfileInfo: ...
    def nvmlDeviceGetGpuInstances(
        self, device: Any, profileId: int, gpuInstancesRef: Any, countRef: Any
    ) -> int: ...
    def nvmlGpuInstanceGetInfo(self, gpuInstance: Any) -> GpuInstanceInfo: ...


def default() -> Nvml:
    """The real NVML, through pynvml."""
    real: Nvml = pynvml
    return real


def gpu_instances(nvml: Nvml, device: Any, profile_id: int, capacity: int) -> list[Any]:
    """Handles of the GPU instances of one profile (at most `capacity` of them)."""
    if capacity <= 0:
        return []
    handles = (pynvml.c_nvmlGpuInstance_t * capacity)()
    count = ctypes.c_uint(0)
    nvml.nvmlDeviceGetGpuInstances(device, profile_id, handles, ctypes.pointer(count))
    return list(handles[: count.value])
