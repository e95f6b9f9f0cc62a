"""Local clusters: kwokctl's binary runtime with locally built components.

Each cluster has a name, its own ports, kubeconfig and non-overlapping pod and
service CIDRs, and lives under `$TTSFLEET_HOME/clusters/<name>/` (default
`~/.local/state/ttsfleet`). kwokctl keeps its own files under
`$TTSFLEET_HOME/kwok/clusters/<name>/`. The pod CIDR is routed to a blackhole on
the host, so a stray connection to a simulated pod fails here instead of
leaving the machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ttsfleet import kube
from ttsfleet.cluster import nodes as cluster_nodes
from ttsfleet.cluster import toolchain
from ttsfleet.cluster.pool import PoolFile, render_nodes

DEFAULT_NAME = "ttsfleet"
MAX_CLUSTERS = 14
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,28}[a-z0-9])?$")


class ClusterError(RuntimeError):
    """A cluster operation that cannot go ahead; the message says what to do."""


def home() -> Path:
    default = Path.home() / ".local" / "state" / "ttsfleet"
    return Path(os.environ.get("TTSFLEET_HOME", default))


def pod_cidr(index: int) -> ipaddress.IPv4Network:
    """Cluster `index`'s pod CIDR: 10.16.0.0/12, 10.32.0.0/12, ... (4,096 /24 node ranges)."""
    return ipaddress.IPv4Network(f"10.{16 * (index + 1)}.0.0/12")


def service_cidr(index: int) -> ipaddress.IPv4Network:
    """Cluster `index`'s service CIDR: 10.1.0.0/16, 10.2.0.0/16, ..."""
    return ipaddress.IPv4Network(f"10.{index + 1}.0.0/16")


@dataclass
class ClusterRecord:
    """What `up` made, kept as JSON so that `down` can remove all of it."""

    name: str
    index: int
    pod_cidr: str
    service_cidr: str
    apiserver_port: int = 0
    prometheus_port: int = 0
    blackhole_routes: list[str] = field(default_factory=list)
    created: float = 0.0
    audit: bool = False  # the apiserver writes an audit log of every write (audit_log())

    @property
    def dir(self) -> Path:
        return cluster_dir(self.name)

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "cluster.json").write_text(json.dumps(asdict(self), indent=2) + "\n")


@dataclass
class ClusterHealth:
    name: str
    apiserver: bool
    controller_manager: bool
    scheduler: bool
    nodes: int
    ready_nodes: int
    kubeconfig: Path

    @property
    def healthy(self) -> bool:
        return self.apiserver and self.controller_manager and self.scheduler


@dataclass
class UpResult:
    record: ClusterRecord
    created: bool
    nodes_created: int
    seconds: float
    warnings: list[str] = field(default_factory=list)


def cluster_dir(name: str) -> Path:
    return home() / "clusters" / name


def kwok_workdir() -> Path:
    return home() / "kwok"


def load(name: str) -> ClusterRecord | None:
    path = cluster_dir(name) / "cluster.json"
    if not path.exists():
        return None
    return ClusterRecord(**json.loads(path.read_text()))


def records() -> list[ClusterRecord]:
    root = home() / "clusters"
    if not root.is_dir():
        return []
    found = (load(p.name) for p in sorted(root.iterdir()))
    return [r for r in found if r is not None]


def kubeconfig(name: str) -> Path:
    record = load(name)
    if record is None:
        raise ClusterError(f"no cluster named {name!r}: `ttsfleet cluster status` lists them")
    return record.kubeconfig


def check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ClusterError(
            f"cluster name {name!r} is not valid: use 1-30 lower-case letters, digits and '-'"
        )


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))  # noqa: S104 - the apiserver binds all addresses
        except OSError:
            return True
    return False


_PLAIN = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# HTTPS to a local server or pod, as a kubelet's probe: the certificate is not verified.
_UNVERIFIED = ssl.create_default_context()
_UNVERIFIED.check_hostname = False
_UNVERIFIED.verify_mode = ssl.CERT_NONE
_TLS = urllib.request.build_opener(
    urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=_UNVERIFIED)
)


def open_direct(url: str, timeout: float) -> Any:
    """`urlopen` for a loopback or pod address: never through an HTTP proxy, and for
    https:// without verifying the certificate (probes, not clients)."""
    return (_TLS if url.startswith("https:") else _PLAIN).open(url, timeout=timeout)


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _host_routes() -> list[ipaddress.IPv4Network]:
    """Every IPv4 destination in the host's main routing table."""
    try:
        out = subprocess.run(
            ["ip", "-4", "route", "show", "table", "main"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    nets = []
    for line in out.splitlines():
        words = line.split()
        dest = words[1] if words and words[0] in {"blackhole", "unreachable"} else words[0]
        if dest == "default":
            continue
        with contextlib.suppress(ValueError):
            nets.append(ipaddress.IPv4Network(dest, strict=False))
    return nets


def choose_index(taken: set[int], routes: list[ipaddress.IPv4Network]) -> int:
    """The lowest cluster index whose CIDRs are free: not another cluster's
    (`taken`), and overlapping none of the host's `routes`."""
    for index in range(MAX_CLUSTERS):
        if index in taken:
            continue
        cidrs = (pod_cidr(index), service_cidr(index))
        if not any(c.overlaps(r) for c in cidrs for r in routes):
            return index
    raise ClusterError(
        f"no free address range for another cluster ({MAX_CLUSTERS} at most): "
        "remove one with `ttsfleet cluster down NAME`"
    )


def _kwokctl(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"KWOK_WORKDIR": str(kwok_workdir())}
    return subprocess.run(
        [str(toolchain.binary("kwokctl")), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# Every request that changes something, with who sent it (user, user agent) and when:
# what the chaos tests count an operator's writes by. Reads are not logged.
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    verbs: [create, update, patch, delete, deletecollection]
  - level: None
"""


def audit_log(record: ClusterRecord) -> Path:
    """The apiserver's audit log (JSON lines) of a cluster made with `audit=True`."""
    return kwok_workdir() / "clusters" / record.name / "logs" / "audit.log"


def _create_args(record: ClusterRecord, qps_limits: bool) -> list[str]:
    pods = pod_cidr(record.index)
    kwok_fallback = list(pods.subnets(new_prefix=24))[-1]
    args = [
        "create", "cluster", "--name", record.name, "--runtime", "binary",
        "--kubeconfig", str(record.kubeconfig),
        "--kube-authorization", "--kube-admission", "--wait", "60s",
        "--kube-apiserver-binary", str(toolchain.binary("kube-apiserver")),
        "--kube-controller-manager-binary", str(toolchain.binary("kube-controller-manager")),
        "--kube-scheduler-binary", str(toolchain.binary("kube-scheduler")),
        "--kwok-controller-binary", str(toolchain.binary("kwok")),
        "--etcd-binary", str(toolchain.binary("etcd")),
    ]  # fmt: skip
    if record.apiserver_port:
        args += ["--kube-apiserver-port", str(record.apiserver_port)]
    if not qps_limits:
        args.append("--disable-qps-limits")
    if record.audit:
        policy = record.dir / "audit-policy.yaml"
        policy.write_text(AUDIT_POLICY)
        args += ["--kube-audit-policy", str(policy)]
    extra = {
        # kwok manages only the annotated nodes; `local` nodes are left to the local runner.
        "kwok-controller": [
            "manage-all-nodes=false",
            "manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            f"cidr={kwok_fallback}",
        ],
        "kube-apiserver": [f"service-cluster-ip-range={record.service_cidr}"],
        "kube-controller-manager": [
            "allocate-node-cidrs=true",
            f"cluster-cidr={record.pod_cidr}",
            f"service-cluster-ip-range={record.service_cidr}",
            "node-cidr-mask-size=24",
        ],
    }
    # kwokctl 0.7 files a component's later args under the patch whose index is
    # the position of its first arg in the flag list: give the first arg of every
    # component first, in order, so the two indices agree.
    firsts = [f"{c}={values[0]}" for c, values in extra.items()]
    rests = [f"{c}={v}" for c, values in extra.items() for v in values[1:]]
    for arg in firsts + rests:
        args += ["--extra-args", arg]
    return args


def up(
    name: str,
    pool_file: PoolFile,
    *,
    port: int | None = None,
    reuse: bool = False,
    qps_limits: bool = False,
    wait_ready: float = 120.0,
    audit: bool = False,
) -> UpResult:
    """Start cluster `name` with the nodes of `pool_file`.

    With `reuse`, a cluster of that name that is already up is kept as it is
    (and a stopped one is started again); without it, the name must be free.
    With `audit`, the apiserver logs every write to `audit_log(record)`.
    """
    start = time.monotonic()
    check_name(name)
    existing = load(name)
    if existing is not None:
        if not reuse:
            raise ClusterError(
                f"a cluster named {name!r} already exists: use it "
                f"(`ttsfleet cluster kubeconfig {name}`), remove it "
                f"(`ttsfleet cluster down {name}`) or pick another --name"
            )
        return _reuse(existing, pool_file, start, wait_ready)
    if port is not None and port_in_use(port):
        raise ClusterError(f"port {port} is already in use: pick another --port, or leave it out")
    if shutil.which("ip") is None:
        raise ClusterError(
            "the `ip` command is missing: install iproute2 (apt-get install iproute2)"
        )
    for tool in ("kwokctl", "kwok", "kube-apiserver", "etcd"):
        toolchain.binary(tool)
    index = choose_index({r.index for r in records()}, _host_routes())
    record = ClusterRecord(
        name=name,
        index=index,
        pod_cidr=str(pod_cidr(index)),
        service_cidr=str(service_cidr(index)),
        apiserver_port=port or 0,
        created=time.time(),
        audit=audit,
    )
    record.save()
    warnings = []
    try:
        result = _kwokctl(*_create_args(record, qps_limits))
        if result.returncode != 0:
            raise ClusterError(
                f"kwokctl could not create cluster {name!r}:\n{result.stderr[-2000:]}"
            )
        warnings += _add_blackhole(record)
        record.apiserver_port = _apiserver_port(record.kubeconfig)
        record.save()
        nodes_created = _create_nodes(record, pool_file, wait_ready)
        warnings += _start_runner(record, pool_file)
        _start_prometheus(record)
    except BaseException:
        # Nothing of a half-made cluster stays behind.
        with contextlib.suppress(Exception):
            _remove(record)
        raise
    return UpResult(record, True, nodes_created, time.monotonic() - start, warnings)


def _reuse(record: ClusterRecord, pool_file: PoolFile, start: float, wait: float) -> UpResult:
    health = status(record)
    if not health.apiserver:
        result = _kwokctl("start", "cluster", "--name", record.name)
        if result.returncode != 0:
            raise ClusterError(
                f"cluster {record.name!r} exists but is stopped and did not start again: "
                f"remove it with `ttsfleet cluster down {record.name}`\n{result.stderr[-1000:]}"
            )
    # After a reboot the route is gone while the record still lists it: check the kernel.
    warnings = _add_blackhole(record)
    created = _create_nodes(record, pool_file, wait)
    warnings += _start_runner(record, pool_file)
    _start_prometheus(record)
    return UpResult(record, False, created, time.monotonic() - start, warnings)


def _create_nodes(record: ClusterRecord, pool_file: PoolFile, wait: float) -> int:
    api = kube.api_client(record.kubeconfig)
    deadline = time.monotonic() + 60
    while not kube.readyz(api):
        if time.monotonic() > deadline:
            raise ClusterError(f"the apiserver of {record.name!r} did not become ready in 60s")
        time.sleep(0.2)
    nodes = render_nodes(pool_file, toolchain.kubernetes_version())
    created = cluster_nodes.create_nodes(api, nodes)
    kwok_nodes = {n["metadata"]["name"] for n in nodes if cluster_nodes.is_simulated(n)}
    deadline = time.monotonic() + wait
    while True:
        ready = cluster_nodes.ready_nodes(api)
        if kwok_nodes <= ready:
            return created
        if time.monotonic() > deadline:
            missing = len(kwok_nodes - ready)
            raise ClusterError(
                f"{missing} simulated nodes of {record.name!r} not Ready after {wait:.0f}s"
            )
        time.sleep(0.5)


def prometheus_dir(name: str) -> Path:
    """Prometheus's config and data (inside kwok's cluster dir, so `down` finds it)."""
    return kwok_workdir() / "clusters" / name / "prometheus"


def prometheus_url(record: ClusterRecord) -> str:
    return f"http://127.0.0.1:{record.prometheus_port}"


def _start_prometheus(record: ClusterRecord) -> None:
    """Prometheus scraping the cluster's Triton pods, unless it already runs."""
    from ttsfleet.cluster import prometheus  # noqa: PLC0415 - only when a cluster starts

    directory = prometheus_dir(record.name)
    if running(record.name, str(directory)):
        return
    if not record.prometheus_port or port_in_use(record.prometheus_port):
        record.prometheus_port = free_port()
        record.save()
    prometheus.start(directory, record.kubeconfig, record.prometheus_port)


def runner_dir(name: str) -> Path:
    """The local runner's state (inside kwok's cluster dir, so `down` finds its processes)."""
    return kwok_workdir() / "clusters" / name / "ttsfleet-runner"


def running(name: str, marker: str) -> list[int]:
    """PIDs of cluster `name`'s live processes whose command line holds `marker`."""
    return [pid for pid in processes(name) if marker in cmdline(pid)]


def runner_running(name: str) -> bool:
    return bool(running(name, f"cluster runner {name} "))


def _start_runner(record: ClusterRecord, pool_file: PoolFile) -> list[str]:
    """Start the local runner in the background when the pool has local nodes."""
    if not any(p.local and p.count for p in pool_file.pools) or runner_running(record.name):
        return []
    if os.geteuid() != 0:
        return [
            "local nodes need the local runner, which needs root (network namespaces): "
            f"run `sudo ttsfleet cluster runner {record.name}`"
        ]
    state = runner_dir(record.name)
    state.mkdir(parents=True, exist_ok=True)
    with (state / "runner.log").open("ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "ttsfleet", "cluster", "runner", record.name,
             "--state-dir", str(state)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    return []


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            + " "
        )
    return ""


def _apiserver_port(path: Path) -> int:
    match = re.search(r"server:\s*https?://[^:\s]+:(\d+)", path.read_text())
    if match is None:
        raise ClusterError(f"no apiserver address in {path}")
    return int(match[1])


def _add_blackhole(record: ClusterRecord) -> list[str]:
    """Route the pod CIDR to a blackhole, so nothing sent there leaves the host.

    Idempotent, and checked against the kernel's table (a reboot empties it)."""
    result = subprocess.run(
        ["ip", "route", "replace", "blackhole", record.pod_cidr],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        return [
            f"could not route {record.pod_cidr} to a blackhole ({result.stderr.strip()}): "
            "run as root (or with CAP_NET_ADMIN) so that stray traffic to simulated pods stays here"
        ]
    if record.pod_cidr not in record.blackhole_routes:
        record.blackhole_routes.append(record.pod_cidr)
        record.save()
    return []


def down(name: str) -> None:
    """Stop every process of cluster `name` and remove all it made."""
    check_name(name)
    record = load(name)
    if record is None:
        raise ClusterError(f"no cluster named {name!r}: `ttsfleet cluster status` lists them")
    _remove(record)


def _remove(record: ClusterRecord) -> None:
    # The local runner first, gently: it stops its pods (preStop, SIGTERM) and cleans up.
    runners = running(record.name, f"cluster runner {record.name} ")
    for pid in runners:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while runners and time.monotonic() < deadline:
        runners = [
            p for p in runners if Path(f"/proc/{p}").exists() and not _is_zombie(Path(f"/proc/{p}"))
        ]
        time.sleep(0.2)
    _kwokctl("delete", "cluster", "--name", record.name, "--kubeconfig", str(record.kubeconfig))
    for pid in processes(record.name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for namespace in _network_namespaces(record.name):
        subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, check=False)
    for route in record.blackhole_routes:
        subprocess.run(
            ["ip", "route", "delete", "blackhole", route], capture_output=True, check=False
        )
    shutil.rmtree(kwok_workdir() / "clusters" / record.name, ignore_errors=True)
    shutil.rmtree(record.dir, ignore_errors=True)


def netns_prefix(name: str) -> str:
    """Network namespaces made for cluster `name` start with this (`_` appears in no
    cluster or node name, so one cluster's prefix is never another's)."""
    return f"ttsfleet_{name}_"


def _network_namespaces(name: str) -> list[str]:
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    except OSError:
        return []
    names = (line.split()[0] for line in out.stdout.splitlines() if line.strip())
    return [n for n in names if n.startswith(netns_prefix(name))]


def processes(name: str) -> list[int]:
    """PIDs of live processes that belong to cluster `name` (their command line names
    one of its directories: its components, the local runner and its pods, an operator
    started for it by `ttsfleet demo`)."""
    markers = (str(kwok_workdir() / "clusters" / name) + "/", str(cluster_dir(name)) + "/")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if any(m in cmdline for m in markers) and not _is_zombie(entry):
                found.append(int(entry.name))
    return found


def _is_zombie(proc: Path) -> bool:
    with contextlib.suppress(OSError):
        return (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return False


def status(record: ClusterRecord) -> ClusterHealth:
    api = kube.api_client(record.kubeconfig) if record.kubeconfig.exists() else None
    if api is None or not kube.readyz(api):
        return ClusterHealth(record.name, False, False, False, 0, 0, record.kubeconfig)
    fresh = 60.0  # leases renew every few seconds; a minute stale means stopped

    def alive(lease: str) -> bool:
        age = lease_age_seconds(api, lease)
        return age is not None and age < fresh

    nodes = kube.list_nodes(api)
    return ClusterHealth(
        name=record.name,
        apiserver=True,
        controller_manager=alive("kube-controller-manager"),
        scheduler=alive("kube-scheduler"),
        nodes=len(nodes),
        ready_nodes=sum(cluster_nodes.node_is_ready(n) for n in nodes),
        kubeconfig=record.kubeconfig,
    )


def lease_age_seconds(api: Any, name: str, namespace: str = "kube-system") -> float | None:
    """Seconds since a control-plane component's Lease was last renewed (None: no Lease,
    or never renewed): whether kube-controller-manager and kube-scheduler still run."""
    lease = kube.read_lease(api, namespace, name, timeout=5)
    renewed = ((lease or {}).get("spec") or {}).get("renewTime")
    if not renewed:
        return None
    return (datetime.now(UTC) - datetime.fromisoformat(renewed)).total_seconds()


def statuses() -> Iterator[ClusterHealth]:
    for record in records():
        yield status(record)


@dataclass(frozen=True)
class Component:
    """A running control-plane component of a local cluster, as kwokctl started it, with
    what it takes to stop it as a crash would and start it again (chaos tests)."""

    name: str
    pid_file: Path
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    log: Path

    def pid(self) -> int:
        return int(self.pid_file.read_text().strip())

    def running(self) -> bool:
        with contextlib.suppress(OSError, ValueError):
            proc = Path(f"/proc/{self.pid()}")
            return (
                proc.exists()
                and not _is_zombie(proc)
                and cmdline(self.pid()).startswith(self.argv[0])
            )
        return False

    def stop(self, timeout: float = 30) -> None:
        """SIGKILL, and wait until it is gone."""
        pid = self.pid()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                raise ClusterError(f"{self.name} (pid {pid}) did not stop")
            time.sleep(0.05)

    def start(self) -> int:
        """Start it again exactly as kwokctl had started it; returns its pid."""
        with self.log.open("ab") as out:
            process = subprocess.Popen(
                self.argv, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        self.pid_file.write_text(str(process.pid))  # as kwokctl writes it: no newline
        return process.pid


def components(name: str) -> dict[str, Component]:
    """The running control-plane components of cluster `name`, by name."""
    workdir = kwok_workdir() / "clusters" / name
    found = {}
    for pid_file in sorted((workdir / "pids").glob("*.pid")):
        with contextlib.suppress(OSError, ValueError):
            proc = Path(f"/proc/{int(pid_file.read_text().strip())}")
            if _is_zombie(proc):
                continue
            argv = [a.decode() for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
            env = dict(
                item.decode(errors="replace").split("=", 1)
                for item in (proc / "environ").read_bytes().split(b"\0")
                if b"=" in item
            )
            component = pid_file.stem
            found[component] = Component(
                component, pid_file, argv, (proc / "cwd").resolve(), env,
                workdir / "logs" / f"{component}.log",
            )  # fmt: skip
    return found


def restart_exited(found: dict[str, Component]) -> list[str]:
    """Start again every component of `found` that is no longer running, as the kubelet
    restarts a control plane's static pods (kube-controller-manager and kube-scheduler
    exit when they lose their own leader election, e.g. during an apiserver outage)."""
    restarted = []
    for component in found.values():
        if not component.running():
            component.start()
            restarted.append(component.name)
    return restarted
