"""NVML replayed from a JSON inventory, behind the same `Nvml` port as pynvml.

The file holds what NVML's read calls return (the format `hack/capture-nvml.py`
writes). Answers come back in pynvml's own ctypes structures and errors as
pynvml's own `NVMLError` classes. Any call that is not one of the port's read
calls raises `ReadOnlyError`: a replay can never stand in for a change to a GPU.
"""

# ruff: noqa: N802, N803 - the names are NVML's own

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynvml

FORMAT_KEYS = ("source", "synthetic", "driverVersion", "devices")


class ReplayError(ValueError):
    """The inventory file cannot be replayed."""


class ReadOnlyError(RuntimeError):
    """Something asked the replay for a call outside the read-only port."""


@dataclass(frozen=True)
class _Device:
    """A replayed device handle."""

    index: int


def _struct(cls: type[ctypes.Structure], values: dict[str, Any]) -> Any:
    """An instance of pynvml's structure `cls` with the fields found in `values`."""
    obj = cls()
    for name, *_ in cls._fields_:
        if name in values and name != "version":
            value = values[name]
            setattr(obj, name, value.encode() if isinstance(value, str) else value)
    return obj


class Replay:
    """The `Nvml` port answered from an inventory (see module doc)."""

    def __init__(self, inventory: dict[str, Any]) -> None:
        missing = [k for k in FORMAT_KEYS if k not in inventory]
        if missing:
            raise ReplayError(f"the inventory lacks {', '.join(missing)}")
        if not isinstance(inventory["synthetic"], bool):
            raise ReplayError("'synthetic' must be true or false")
        self._inventory = inventory
        self._devices: list[dict[str, Any]] = list(inventory["devices"])
        self._initialised = 0
        # Fake GPU-instance handles (pointer values, never dereferenced) -> instance.
        self._instances: dict[int, dict[str, Any]] = {}

    @classmethod
    def from_file(cls, path: Path) -> Replay:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ReplayError(f"cannot read the NVML inventory {path}: {err}") from None
        if not isinstance(data, dict):
            raise ReplayError(f"{path} holds no NVML inventory object")
        return cls(data)

    @property
    def source(self) -> str:
        return str(self._inventory["source"])

    @property
    def synthetic(self) -> bool:
        return bool(self._inventory["synthetic"])

    def __getattr__(self, name: str) -> Any:
        if name.startswith("nvml"):
            raise ReadOnlyError(f"{name} is not one of the agent's read-only NVML calls")
        raise AttributeError(name)

    def _check(self) -> None:
        if not self._initialised:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def _device(self, handle: Any) -> dict[str, Any]:
        self._check()
        if not isinstance(handle, _Device):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._devices[handle.index]

    def nvmlInit(self) -> None:
        self._initialised += 1

    def nvmlShutdown(self) -> None:
        self._check()
        self._initialised -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check()
        return str(self._inventory["driverVersion"])

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self._devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        self._check()
        if not 0 <= index < len(self._devices):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return _Device(index)

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return str(self._device(handle)["name"])

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return str(self._device(handle)["uuid"])

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        return _struct(pynvml.c_nvmlMemory_t, self._device(handle)["memory"])

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        utilization = self._device(handle).get("utilization")
        if utilization is None:  # NVML does not report it, e.g. in MIG mode
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return _struct(pynvml.c_nvmlUtilization_t, utilization)

    def nvmlDeviceGetMigMode(self, device: Any) -> list[int]:
        mode = self._device(device).get("migMode")
        if mode is None:  # a GPU without MIG
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return [int(mode["current"]), int(mode["pending"])]

    def nvmlDeviceGetGpuInstanceProfileInfo(self, device: Any, profile: int) -> Any:
        found = self._profile(device, "profile", profile)
        return _struct(pynvml.c_nvmlGpuInstanceProfileInfo_v2_t, found)

    def _profile(self, device: Any, key: str, value: int) -> dict[str, Any]:
        dev = self._device(device)
        mode = dev.get("migMode")
        if mode is None or mode["current"] != pynvml.NVML_DEVICE_MIG_ENABLE:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        for found in dev.get("gpuInstanceProfiles") or []:
            if found[key] == value:
                return dict(found)
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetGpuInstances(
        self, device: Any, profileId: int, gpuInstancesRef: Any, countRef: Any
    ) -> int:
        self._profile(device, "id", profileId)
        assert isinstance(device, _Device)
        wanted = [
            gi
            for gi in self._device(device).get("gpuInstances") or []
            if gi["profileId"] == profileId
        ]
        if len(wanted) > len(gpuInstancesRef):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INSUFFICIENT_SIZE)
        for slot, gi in enumerate(wanted):
            key = (device.index + 1) << 16 | int(gi["id"])
            self._instances[key] = gi
            gpuInstancesRef[slot] = ctypes.cast(ctypes.c_void_p(key), pynvml.c_nvmlGpuInstance_t)
        countRef.contents.value = len(wanted)
        return int(pynvml.NVML_SUCCESS)

    def nvmlGpuInstanceGetInfo(self, gpuInstance: Any) -> Any:
        self._check()
        gi = self._instances.get(ctypes.cast(gpuInstance, ctypes.c_void_p).value or 0)
        if gi is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        info = pynvml.c_nvmlGpuInstanceInfo_t()
        info.id = int(gi["id"])
        info.profileId = int(gi["profileId"])
        info.placement.start = int(gi["placement"]["start"])
        info.placement.size = int(gi["placement"]["size"])
        return info
