from __future__ import annotations

import pytest

from ttsfleet.gpu.catalog import GPUS, mig_layout_problems


@pytest.mark.parametrize(
    ("gpu", "layout"),
    [
        ("H100-80GB", {"1g.10gb": 7}),
        ("H100-80GB", {"1g.10gb": 2, "2g.20gb": 1, "3g.40gb": 1}),
        ("H100-80GB", {"3g.40gb": 2}),
        ("H100-80GB", {"7g.80gb": 1}),
        ("A100-40GB", {"1g.5gb": 7}),
        ("H200-141GB", {"1g.18gb": 7}),
        ("A30", {"1g.6gb": 4}),
        ("A30", {"2g.12gb": 2}),
    ],
)
def test_layouts_nvidia_ships_are_accepted(gpu: str, layout: dict[str, int]) -> None:
    assert mig_layout_problems(GPUS[gpu], layout) == []


@pytest.mark.parametrize(
    ("gpu", "layout", "problem"),
    [
        ("H100-80GB", {"1g.10gb": 8}, "at most 7 x 1g.10gb"),
        ("H100-80GB", {"7g.80gb": 1, "1g.10gb": 1}, "compute slices"),
        ("A30", {"4g.24gb": 1, "1g.6gb": 1}, "compute slices"),
        ("L40S", {"1g.10gb": 1}, "does not support MIG"),
    ],
)
def test_impossible_layouts_are_refused(gpu: str, layout: dict[str, int], problem: str) -> None:
    assert any(problem in p for p in mig_layout_problems(GPUS[gpu], layout))


def test_every_profile_names_its_memory_and_the_device_plugin_resource() -> None:
    h100 = GPUS["H100-80GB"]
    profile = h100.profile("3g.40gb")
    assert profile is not None
    assert profile.memory_gib == 40
    assert profile.resource == "nvidia.com/mig-3g.40gb"
    for gpu in GPUS.values():
        for p in gpu.mig_profiles:
            assert p.memory_gib * 1024 <= gpu.memory_mib + 1024
            assert p.compute_slices <= gpu.compute_slices
