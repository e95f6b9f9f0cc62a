"""`ttsfleet cluster` as a user runs it: side by side clusters, clean `down`, clear errors."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from tests.conftest import REPO, Cluster, ttsfleet, wait_for
from ttsfleet.cluster import local
from ttsfleet.cluster.pool import default_pool_text


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def healthy(name: str) -> bool:
    record = local.load(name)
    return record is not None and local.status(record).healthy


def routes() -> str:
    return subprocess.run(["ip", "route"], capture_output=True, text=True, check=True).stdout


def test_a_second_cluster_runs_beside_the_first_and_down_leaves_nothing(cluster: Cluster) -> None:
    up = ttsfleet("cluster", "up", "--name", "side")
    assert up.returncode == 0, up.stderr
    first, second = local.load(cluster.name), local.load("side")
    assert first is not None and second is not None
    assert second.apiserver_port != first.apiserver_port
    assert second.kubeconfig != first.kubeconfig
    for a in (first.pod_cidr, first.service_cidr):
        for b in (second.pod_cidr, second.service_cidr):
            assert not ipaddress.ip_network(a).overlaps(ipaddress.ip_network(b))
    assert ttsfleet("cluster", "kubeconfig", "side").stdout.strip() == str(second.kubeconfig)
    status = ttsfleet("cluster", "status").stdout
    assert "side" in status and cluster.name in status
    assert local.processes("side"), "the cluster's components should be running"
    # The default pool has a local node: the runner gives it a network namespace.
    wait_for(
        "the local node's network namespace",
        lambda: (
            "ttsfleet_side_local-0"
            in subprocess.run(
                ["ip", "netns", "list"], capture_output=True, text=True, check=False
            ).stdout
        ),
    )
    assert f"blackhole {second.pod_cidr}" in routes()

    down = ttsfleet("cluster", "down", "side")
    assert down.returncode == 0, down.stderr
    wait_for("every process of the removed cluster to end", lambda: not local.processes("side"), 10)
    assert f"blackhole {second.pod_cidr}" not in routes()
    namespaces = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=False
    ).stdout
    assert "ttsfleet_side_" not in namespaces
    assert not local.cluster_dir("side").exists()
    assert not (local.kwok_workdir() / "clusters" / "side").exists()
    assert healthy(cluster.name), "removing one cluster must not disturb another"


def test_a_name_already_in_use_is_refused_and_the_cluster_is_kept(cluster: Cluster) -> None:
    line = one_line_error(ttsfleet("cluster", "up", "--name", cluster.name))
    assert "already exists" in line and f"cluster down {cluster.name}" in line
    assert healthy(cluster.name)


def test_reuse_keeps_a_running_cluster(cluster: Cluster) -> None:
    before = local.load(cluster.name)
    result = ttsfleet("cluster", "up", "--name", cluster.name, "--reuse")
    assert result.returncode == 0, result.stderr
    assert "Reused" in result.stdout
    assert local.load(cluster.name) == before


def test_a_port_already_taken_is_refused_before_anything_is_made() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        line = one_line_error(ttsfleet("cluster", "up", "--name", "porty", "--port", str(port)))
    assert f"port {port} is already in use" in line and "--port" in line
    assert local.load("porty") is None


def test_an_unknown_pool_field_names_the_field(tmp_path: Path) -> None:
    pool = tmp_path / "pool.yaml"
    pool.write_text(
        "pools:\n  - name: h100\n    count: 1\n    gpus: {product: H100-80GB, count: 8}\n"
    )
    line = one_line_error(ttsfleet("cluster", "up", "--name", "typo", "--pool", str(pool)))
    assert "pools[0].gpus" in line and "unknown field" in line
    assert local.load("typo") is None


def test_the_tool_build_is_cached_and_a_second_run_builds_nothing() -> None:
    result = subprocess.run(
        ["bash", "hack/tools.sh", "build"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "building" not in result.stderr
    assert "tools ready" in result.stdout


@pytest.mark.parametrize(
    ("go_script", "expected"),
    [
        (None, "Go >= 1.25 is needed"),
        ("#!/bin/sh\necho go1.21.0\n", "Go 1.21.0 is too old"),
    ],
)
def test_a_missing_or_old_go_is_a_one_line_error(
    tmp_path: Path, go_script: str | None, expected: str
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if go_script is not None:
        go = bin_dir / "go"
        go.write_text(go_script)
        go.chmod(0o755)
    system_path = "/usr/bin:/bin"
    result = subprocess.run(
        ["bash", "hack/tools.sh", "check"],
        cwd=REPO, capture_output=True, text=True, check=False,
        env=os.environ | {"PATH": f"{bin_dir}:{system_path}"},
    )  # fmt: skip
    line = one_line_error(result)
    assert expected in line and "install" in line


def test_reuse_with_a_changed_pool_updates_the_capacity_of_existing_nodes(
    cluster: Cluster, tmp_path: Path
) -> None:
    default = yaml.safe_load(default_pool_text())
    default["pools"][0]["cpu"] = "96"  # h100 nodes: 192 CPUs in the shipped pool
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump(default))
    try:
        result = ttsfleet("cluster", "up", "--name", cluster.name, "--reuse", "--pool", str(pool))
        assert result.returncode == 0, result.stderr
        node = client.CoreV1Api(cluster.api).read_node("h100-0")
        assert node.status.capacity["cpu"] == "96"
        assert node.status.allocatable["cpu"] == "96"
    finally:
        ttsfleet("cluster", "up", "--name", cluster.name, "--reuse")
    assert client.CoreV1Api(cluster.api).read_node("h100-0").status.capacity["cpu"] == "192"
