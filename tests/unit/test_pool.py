"""Node pools: validation that names the field, and nodes shaped like NVIDIA's."""

from __future__ import annotations

from collections import Counter

import pytest

from ttsfleet.cluster.pool import (
    PoolError,
    load_pool_file,
    parse_pool_file,
    render_node,
    render_nodes,
    scale_gpu_pools,
)

K8S = "v1.34.2"


def nodes_by_name() -> dict[str, dict]:  # type: ignore[type-arg]
    return {n["metadata"]["name"]: n for n in render_nodes(load_pool_file(None), K8S)}


def test_the_default_pool_has_mig_h100_whole_l4_cpu_and_local_nodes() -> None:
    nodes = nodes_by_name()
    assert sorted(nodes) == ["cpu-0", "h100-0", "h100-1", "l4-0", "local-0"]
    h100 = nodes["h100-0"]
    assert h100["status"]["allocatable"] | {} == h100["status"]["capacity"]
    capacity = h100["status"]["capacity"]
    # 8 GPUs, each 2 x 1g.10gb + 1 x 2g.20gb + 1 x 3g.40gb (mig-parted's all-balanced).
    assert capacity["nvidia.com/mig-1g.10gb"] == "16"
    assert capacity["nvidia.com/mig-2g.20gb"] == "8"
    assert capacity["nvidia.com/mig-3g.40gb"] == "8"
    assert "nvidia.com/gpu" not in capacity  # mixed strategy, every GPU in MIG mode
    labels = h100["metadata"]["labels"]
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert labels["nvidia.com/mig.strategy"] == "mixed"
    assert labels["nvidia.com/mig-1g.10gb.count"] == "16"
    assert labels["nvidia.com/gpu.family"] == "hopper"
    assert h100["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
    assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in h100["spec"][
        "taints"
    ]
    assert nodes["l4-0"]["status"]["capacity"]["nvidia.com/gpu"] == "4"
    assert not any(k.startswith("nvidia.com/") for k in nodes["cpu-0"]["status"]["capacity"])


def test_local_nodes_are_tainted_labelled_and_not_managed_by_kwok() -> None:
    node = nodes_by_name()["local-0"]
    assert "kwok.x-k8s.io/node" not in node["metadata"]["annotations"]
    assert node["metadata"]["labels"]["ttsfleet.io/local"] == "true"
    assert {"key": "ttsfleet.io/local", "value": "true", "effect": "NoSchedule"} in node["spec"][
        "taints"
    ]
    assert node["status"]["capacity"]["cpu"] == "2"


def pool(gpu: str, extra: str = "") -> str:
    return f"pools:\n  - name: p\n    count: 1\n    gpu: {gpu}\n{extra}"


def test_single_strategy_advertises_slices_as_nvidia_gpu() -> None:
    pools = parse_pool_file(
        pool("{product: A100-40GB, count: 8, migStrategy: single, migLayout: {1g.5gb: 7}}")
    )
    node = render_node(pools.pools[0], 0, K8S)
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "56"
    assert (
        node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"
    )


def test_time_slicing_multiplies_nvidia_gpu_and_marks_the_product_shared() -> None:
    node = render_node(
        parse_pool_file(pool("{product: L4, count: 2, timeSlicingReplicas: 4}")).pools[0], 0, K8S
    )
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "8"
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-L4-SHARED"
    assert node["metadata"]["labels"]["nvidia.com/gpu.sharing-strategy"] == "time-slicing"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (pool("{product: H100-80GB, count: 8}", "    zone: a\n"), "pools[0].zone: unknown field"),
        (pool("{product: H100-80GB, cuont: 8}"), "pools[0].gpu.cuont: unknown field"),
        (pool("{product: B300, count: 8}"), "pools[0].gpu.product: unknown GPU 'B300'"),
        (pool("{product: L4, count: 0}"), "pools[0].gpu.count"),
        (
            pool("{product: H100-80GB, count: 8, migStrategy: mixed, migLayout: {1g.5gb: 1}}"),
            "has no MIG profile '1g.5gb'",
        ),
        (
            pool("{product: H100-80GB, count: 8, migStrategy: mixed, migLayout: {3g.40gb: 3}}"),
            "needs 9 compute slices",
        ),
        (
            pool("{product: L4, count: 1, migStrategy: mixed, migLayout: {1g.10gb: 1}}"),
            "L4 does not support MIG",
        ),
        (pool("{product: H100-80GB, count: 8, migStrategy: mixed}"), "needs a migLayout"),
        (pool("{product: L4, count: 1}", "    taints: [nvidia.com/gpu]\n"), "key[=value]:Effect"),
        (pool("{product: L4, count: 1}", "    local: true\n"), "remove its gpu"),
        ("pools:\n  - name: a\n    count: 1\n  - name: a\n    count: 1\n", "repeated: a"),
        ("pools:\n  - name: Bad_Name\n    count: 1\n", "pools[0].name"),
        ("pools: [", "not valid YAML"),
        ("pools: []", "pools: List should have at least 1 item"),
    ],
)
def test_bad_pool_files_get_errors_that_name_the_field(text: str, expected: str) -> None:
    with pytest.raises(PoolError) as err:
        parse_pool_file(text, "my-pool.yaml")
    assert expected in str(err.value)
    assert str(err.value).startswith("my-pool.yaml: ")
    assert "\n" not in str(err.value)


def test_scaling_spreads_gpu_nodes_in_proportion_and_keeps_other_pools() -> None:
    scaled = scale_gpu_pools(load_pool_file(None), 1000)
    counts = {p.name: p.count for p in scaled.pools}
    assert counts["h100"] + counts["l4"] == 1000
    assert counts["h100"] == 667 and counts["l4"] == 333  # 2:1 in the default file
    assert counts["cpu"] == 1 and counts["local"] == 1
    names = [n["metadata"]["name"] for n in render_nodes(scaled, K8S)]
    assert len(names) == len(set(names)) == 1002


@pytest.mark.parametrize("total", [0, 1, 2, 3, 7, 1000])
def test_scaled_counts_always_add_up(total: int) -> None:
    scaled = scale_gpu_pools(load_pool_file(None), total)
    assert sum(p.count for p in scaled.pools if p.gpu) == total


def test_scaling_a_pool_file_without_gpu_pools_is_an_error() -> None:
    with pytest.raises(PoolError, match="has none"):
        scale_gpu_pools(parse_pool_file("pools:\n  - name: c\n    count: 3\n"), 10)


def test_rendering_never_mutates_the_pool() -> None:
    pools = load_pool_file(None)
    before = pools.model_dump()
    nodes = render_nodes(pools, K8S)
    nodes[0]["metadata"]["labels"]["x"] = "y"
    assert pools.model_dump() == before
    assert Counter(n["metadata"]["labels"]["ttsfleet.io/pool"] for n in nodes)["h100"] == 2
