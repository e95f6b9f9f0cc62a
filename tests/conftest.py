"""Fixtures for every suite: a session-wide real local cluster and a fresh namespace per test.

Clusters made by tests live in their own TTSFLEET_HOME, so they never touch a
developer's clusters; the session's cluster is removed when the session ends.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client

from ttsfleet import harness, kube
from ttsfleet.cluster import local
from ttsfleet.cluster.pool import load_pool_file
from ttsfleet.harness import OperatorProcess as Operator
from ttsfleet.harness import TritonProcess as Triton
from ttsfleet.harness import scratch_namespace, wait_for

__all__ = ["REPO", "Cluster", "Operator", "Triton", "ttsfleet", "wait_for"]

REPO = Path(__file__).resolve().parent.parent


_MADE_HOME: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    if "TTSFLEET_HOME" not in os.environ:
        os.environ["TTSFLEET_HOME"] = tempfile.mkdtemp(prefix="ttsfleet-test-home-")
        _MADE_HOME.append(os.environ["TTSFLEET_HOME"])


def pytest_unconfigure(config: pytest.Config) -> None:
    for home in _MADE_HOME:  # the session's clusters are down by now
        shutil.rmtree(home, ignore_errors=True)


@dataclass
class Cluster:
    """A running local cluster, with clients for it."""

    name: str
    kubeconfig: Path
    api: client.ApiClient

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str:
        return harness.kubectl(self.kubeconfig, *args, check=check, input=input)

    def wait_established(self, crd: str, timeout: float = 60) -> None:
        """Poll until `crd` (crd/plural.group) is Established: `harness.wait_established`,
        which the benchmarks use too."""
        harness.wait_established(self.api, crd, timeout=timeout)


def ttsfleet(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the `ttsfleet` CLI as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "ttsfleet", *args],
        capture_output=True, text=True, timeout=300, check=False,
        env=os.environ | {"COLUMNS": "200"} | (env or {}),
    )  # fmt: skip


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    name = f"pytest-{os.getpid() % 100000}"
    result = local.up(name, load_pool_file(None))
    try:
        yield Cluster(name, result.record.kubeconfig, kube.api_client(result.record.kubeconfig))
    finally:
        local.down(name)


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    with scratch_namespace(cluster.api, "t", digits=8) as name:
        yield name


@pytest.fixture(scope="session")
def crd(cluster: Cluster) -> None:
    """The CRDs (TtsDeployment, TtsGateway, TtsRegion), installed from crds/ as a user would."""
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    cluster.wait_established("crd/ttsdeployments.ttsfleet.io")
    cluster.wait_established("crd/ttsgateways.ttsfleet.io")
    cluster.wait_established("crd/ttsregions.ttsfleet.io")


@pytest.fixture(scope="session")
def operator(
    cluster: Cluster, crd: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    """The session's operator: one replica, leader election on (as users run it). Its
    identity is stable, so a restart takes its own Lease back at once, as a restarted
    container of the same pod does."""
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    record = local.load(cluster.name)
    assert record is not None
    op = Operator(
        cluster.kubeconfig, log, local.free_port(), local.free_port(), local.prometheus_url(record),
        identity="pytest-operator",
    )  # fmt: skip
    op.start()
    wait_for("the operator to lead", op.leading, timeout=60)
    yield op
    op.stop()


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    server = Triton(
        local.free_port(), local.free_port(), local.free_port(),
        tmp_path_factory.mktemp("triton") / "triton.log",
        extra_args=("--cache-config=local,size=67108864", "--exit-timeout-secs=5"),
    )  # fmt: skip
    server.start()
    try:
        yield server
    finally:
        server.stop()
