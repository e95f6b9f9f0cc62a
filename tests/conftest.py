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
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from ttsfleet import kube
from ttsfleet.cluster import images, local, toolchain
from ttsfleet.cluster.pool import load_pool_file

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
        result = subprocess.run(
            [str(toolchain.binary("kubectl")), "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True, text=True, input=input, check=False, timeout=120,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def wait_established(self, crd: str, timeout: float = 60) -> None:
        """Poll until `crd` is Established. (`kubectl wait` fails at once, instead of
        waiting, when it reads a CRD whose status has no conditions yet.)"""
        jsonpath = '{.status.conditions[?(@.type=="Established")].status}'
        wait_for(
            f"{crd} Established",
            lambda: self.kubectl("get", crd, "-o", f"jsonpath={jsonpath}", check=False) == "True",
            timeout=timeout,
        )


def ttsfleet(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the `ttsfleet` CLI as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "ttsfleet", *args],
        capture_output=True, text=True, timeout=300, check=False,
        env=os.environ | {"COLUMNS": "200"} | (env or {}),
    )  # fmt: skip


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60, every: float = 0.25) -> Any:
    """Poll `probe` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


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
    name = f"t-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(cluster.api)
    core.create_namespace({"metadata": {"name": name}})
    wait_for(
        f"the default ServiceAccount in {name}",
        lambda: core.list_namespaced_service_account(name).items,
    )
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="session")
def crd(cluster: Cluster) -> None:
    """The TtsDeployment CRD, installed from crds/ as a user would."""
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    cluster.wait_established("crd/ttsdeployments.ttsfleet.io")


@dataclass
class Operator:
    """`ttsfleet operator` running as a process against the test cluster."""

    kubeconfig: Path
    log: Path
    metrics_port: int
    health_port: int
    prometheus_url: str | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "ttsfleet", "operator",
                    "--kubeconfig", str(self.kubeconfig),
                    "--metrics-port", str(self.metrics_port),
                    "--health-port", str(self.health_port),
                    *(["--prometheus-url", self.prometheus_url] if self.prometheus_url else []),
                ],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for("the operator's /healthz", self.healthy, timeout=60)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.health_port}/healthz", timeout=1
            ) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no clean-up, as when a node dies under the operator."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=30)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self.process = None


@pytest.fixture(scope="session")
def operator(
    cluster: Cluster, crd: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    record = local.load(cluster.name)
    assert record is not None
    op = Operator(
        cluster.kubeconfig, log, local.free_port(), local.free_port(), local.prometheus_url(record)
    )
    op.start()
    yield op
    op.stop()


@dataclass
class Triton:
    """A real tritonserver serving this repository's models on loopback."""

    http: int
    grpc: int
    metrics: int

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on the metrics endpoint (0 if absent)."""
        url = f"http://127.0.0.1:{self.metrics}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        wanted = [f'{k}="{v}"' for k, v in labels.items()]
        for line in text.splitlines():
            named = line.startswith((name + "{", name + " "))
            if named and all(w in line for w in wanted):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    ports = Triton(local.free_port(), local.free_port(), local.free_port())
    log = tmp_path_factory.mktemp("triton") / "triton.log"
    argv = images.triton_argv(
        f"--model-repository={REPO / 'triton_models'}",
        "--cache-config=local,size=67108864",
        "--model-control-mode=explicit",
        "--load-model=tts_stream",
        "--load-model=tts_batch",
        f"--http-port={ports.http}", f"--grpc-port={ports.grpc}", f"--metrics-port={ports.metrics}",
        "--exit-timeout-secs=5",
    )  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=os.environ | images.triton_environment()
        )

    def ready() -> bool:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            url = f"http://127.0.0.1:{ports.http}/v2/health/ready"
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    try:
        wait_for("tritonserver to be ready", ready, timeout=120)
        yield ports
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
