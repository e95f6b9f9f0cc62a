#!/usr/bin/env python3
"""Record this machine's NVML inventory as JSON, in the format `ttsfleet agent --replay` reads.

Read-only: it calls only NVML's Get/Init/Shutdown functions and changes nothing on
any GPU. Run it on a GPU node (ideally one GPU in MIG mode) and commit the file
under tests/data/nvml/, with its "source" note saying what the machine was:

    .venv/bin/python hack/capture-nvml.py -o tests/data/nvml/h100-mig-captured.json \\
        --note "H100 80GB HBM3, MIG all-balanced applied by mig-parted"
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pynvml


def _fields(struct: Any) -> dict[str, Any]:
    """Every field of a pynvml ctypes structure but its version stamp, as JSON values."""
    out: dict[str, Any] = {}
    for name, *_ in type(struct)._fields_:
        if name == "version":
            continue
        value = getattr(struct, name)
        out[name] = value.decode() if isinstance(value, bytes) else value
    return out


def _or_none(call: Any, *args: Any) -> Any:
    """The answer of `call`, or None where NVML says the GPU does not support it."""
    try:
        return call(*args)
    except pynvml.NVMLError_NotSupported:
        return None


def capture_device(nvml: Any, index: int) -> dict[str, Any]:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    utilization = _or_none(nvml.nvmlDeviceGetUtilizationRates, handle)
    mode = _or_none(nvml.nvmlDeviceGetMigMode, handle)
    device: dict[str, Any] = {
        "index": index,
        "name": nvml.nvmlDeviceGetName(handle),
        "uuid": nvml.nvmlDeviceGetUUID(handle),
        "memory": _fields(nvml.nvmlDeviceGetMemoryInfo(handle)),
        "utilization": None if utilization is None else _fields(utilization),
        "migMode": None if mode is None else {"current": mode[0], "pending": mode[1]},
    }
    if mode is None or mode[0] != pynvml.NVML_DEVICE_MIG_ENABLE:
        return device
    profiles, instances = [], []
    for profile in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
        try:
            info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, profile)
        except pynvml.NVMLError:
            continue  # not a profile of this GPU
        profiles.append({"profile": profile, **_fields(info)})
        if info.instanceCount == 0:
            continue
        handles = (pynvml.c_nvmlGpuInstance_t * info.instanceCount)()
        count = ctypes.c_uint(0)
        nvml.nvmlDeviceGetGpuInstances(handle, info.id, handles, ctypes.pointer(count))
        for gi in handles[: count.value]:
            gi_info = nvml.nvmlGpuInstanceGetInfo(gi)
            instances.append(
                {
                    "id": gi_info.id,
                    "profileId": gi_info.profileId,
                    "placement": {"start": gi_info.placement.start, "size": gi_info.placement.size},
                }
            )
    device["gpuInstanceProfiles"] = profiles
    device["gpuInstances"] = instances
    return device


def capture(nvml: Any, note: str) -> dict[str, Any]:
    """The inventory of every GPU `nvml` (initialised) sees."""
    devices = [capture_device(nvml, i) for i in range(nvml.nvmlDeviceGetCount())]
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    version = metadata.version("nvidia-ml-py")
    source = f"Captured by hack/capture-nvml.py on {today} (nvidia-ml-py {version})."
    return {
        "source": f"{source} {note}".strip(),
        "synthetic": False,
        "driverVersion": nvml.nvmlSystemGetDriverVersion(),
        "devices": devices,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, help="File to write (default: stdout).")
    parser.add_argument("--note", default="", help="What the machine is, for the source note.")
    args = parser.parse_args()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        print(f"no NVIDIA GPU on this machine: nvmlInit failed with {err}", file=sys.stderr)
        return 1
    try:
        inventory = capture(pynvml, args.note)
    finally:
        pynvml.nvmlShutdown()
    text = json.dumps(inventory, indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
        print(f"Wrote {args.output} ({len(inventory['devices'])} GPUs)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
