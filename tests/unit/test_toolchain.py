from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from tests.conftest import REPO
from ttsfleet.cluster import local, toolchain


def test_the_wrapper_module_builds_the_kubernetes_version_the_package_expects() -> None:
    go_mod = (REPO / "hack" / "k8s" / "go.mod").read_text()
    required = re.search(r"^\s*k8s.io/kubernetes (v\S+)$", go_mod, re.MULTILINE)
    assert required is not None
    assert required[1] == toolchain.kubernetes_version()
    staging = re.findall(r"^\s+(k8s.io/\S+) => \1 (\S+)$", go_mod, re.MULTILINE)
    assert len(staging) == 31
    minor = toolchain.kubernetes_version().removeprefix("v1.")
    assert {v for _, v in staging} == {f"v0.{minor}"}
    etcd = re.search(r"go.etcd.io/etcd/server/v3 (\S+)", go_mod)
    assert etcd is not None and etcd[1] == toolchain.versions()["ETCD_VERSION"]


def test_a_binary_not_built_yet_says_to_run_make_tools(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TTSFLEET_CACHE", str(tmp_path))
    with pytest.raises(toolchain.MissingToolError, match="run `make tools`"):
        toolchain.binary("kube-apiserver")
    assert toolchain.bin_dirs() == []


def test_cluster_address_ranges_never_overlap() -> None:
    nets = [f(i) for i in range(local.MAX_CLUSTERS) for f in (local.pod_cidr, local.service_cidr)]
    for i, a in enumerate(nets):
        for b in nets[i + 1 :]:
            assert not a.overlaps(b), (a, b)
    # Room for 4,096 nodes with a /24 each.
    assert local.pod_cidr(0).num_addresses // 256 == 4096


def test_a_cluster_index_skips_taken_ones_and_host_routes() -> None:
    host = [ipaddress.IPv4Network("192.0.2.0/24"), ipaddress.IPv4Network("10.32.5.0/24")]
    assert local.choose_index(set(), host) == 0
    assert local.choose_index({0}, host) == 2  # index 1's pod CIDR holds 10.32.5.0/24
    with pytest.raises(local.ClusterError, match="no free address range"):
        local.choose_index(set(range(local.MAX_CLUSTERS)), [])


@pytest.mark.parametrize("name", ["", "UPPER", "-x", "a" * 31, "a_b"])
def test_bad_cluster_names_are_refused(name: str) -> None:
    with pytest.raises(local.ClusterError, match="not valid"):
        local.check_name(name)
