"""The local runner: kubelet, container runtime and CNI for the cluster's `local` nodes.

Dev and test tooling, not part of the operator. For each node labelled
`ttsfleet.io/local=true` it
- gives the node a network namespace (`ttsfleet_<cluster>_<node>`) joined to the
  host by a veth pair: the host side holds the first address of the node's
  podCIDR, the namespace side holds the pod IPs (a more specific route than the
  blackhole that covers the cluster's pod CIDR); the namespace routes every local
  cluster's pod CIDR through the host, which forwards between these veths only (per
  interface, not `ip_forward`), so pods of one local cluster reach another's as
  clusters in peered networks do (regions), and a packet for any address no local node
  holds meets the blackhole: nothing leaves the host;
- heartbeats the node (status conditions and its Lease in kube-node-lease);
- runs each container of each pod bound to the node as a local process inside that
  namespace, bound to the pod's IP: the container's own command, args and env, its
  ConfigMap and emptyDir volumes (shared by the pod's containers), with the image
  mapped to a local program (`images.py`); reports the pod Running, and Ready once
  every container's readiness probe (HTTP GET or TCP, against the pod IP) passes,
  with its IP, so EndpointSlices point at live servers;
- when a container's process exits, does what kubelet does by the pod's `restartPolicy`:
  Always restarts it, OnFailure only after a non-zero exit, Never not at all, each
  restart after a back-off that doubles (1 s to 60 s here; kubelet's is 10 s to 5 min),
  and reports the phase, the container's `terminated` state or `waiting`
  CrashLoopBackOff with its `lastState`, and the restartCount as kubelet does;
- honours deletion: the preStop sleep, SIGTERM, the grace period, SIGKILL, then
  deletes the pod (only a kubelet can finish that), and frees its address.

It needs root or CAP_NET_ADMIN. Traffic goes only to loopback and these namespaces.
Every call to the API goes through `kube`.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ttsfleet import kube
from ttsfleet.cluster import images, local, podfs
from ttsfleet.cluster.pool import LOCAL_LABEL

log = logging.getLogger("ttsfleet.runner")
Manifest = dict[str, Any]
HEARTBEAT_SECONDS = 10.0
LEASE_SECONDS = 40
FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 60.0
# A container that ran this long before it exited starts its back-off afresh (kubelet
# forgets a back-off after twice its longest step, too).
BACKOFF_RESET_SECONDS = 2 * MAX_BACKOFF_SECONDS
RESTART_POLICIES = ("Always", "OnFailure", "Never")
VOLUME_SYNC_SECONDS = 2.0  # ConfigMap, Secret and token volumes of running pods
# The name pods reach the apiserver by: the serving certificate must name it (checked),
# and each pod's /etc/hosts maps it to its node's address, as cluster DNS would.
API_HOST = "kubernetes.default.svc"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def host_interface(cluster: str, node: str) -> str:
    """The host side of local node `node`'s veth pair (a name short enough for Linux)."""
    digest = hashlib.sha1(f"{cluster}/{node}".encode()).hexdigest()[:8]  # noqa: S324
    return f"tf{digest}"


def _cluster_cidrs() -> set[ipaddress.IPv4Network]:
    """The pod CIDRs of every local cluster now up (this one's included) whose blackhole
    is in place: only those are routed, so nothing forwarded can leave the host."""
    return {
        ipaddress.IPv4Network(r.pod_cidr)
        for r in local.records()
        if r.pod_cidr and r.pod_cidr in r.blackhole_routes
    }


@dataclass
class LocalNode:
    """A local node and its network namespace."""

    name: str
    pod_cidr: ipaddress.IPv4Network
    netns: str
    host_if: str
    used: set[ipaddress.IPv4Address] = field(default_factory=set)
    routed: set[ipaddress.IPv4Network] = field(default_factory=set)

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.pod_cidr.network_address + 1

    def allocate(self, previous: str | None = None) -> ipaddress.IPv4Address:
        """A free pod IP: the pod's previous one if it still can be (a restarted runner
        must not renumber running pods), else the lowest free."""
        if previous:
            ip = ipaddress.IPv4Address(previous)
            if ip in self.pod_cidr and ip != self.gateway and ip not in self.used:
                self.used.add(ip)
                return ip
        for ip in list(self.pod_cidr.hosts())[1:]:
            if ip not in self.used:
                self.used.add(ip)
                return ip
        raise RuntimeError(f"node {self.name} has no free pod address in {self.pod_cidr}")

    def setup(self) -> None:
        """Create the namespace and veth pair (idempotent: a restart finds them there)."""
        if self.netns not in _ip("netns", "list").stdout.split():
            _ip("netns", "add", self.netns)
        host_side = _ip("link", "show", self.host_if, check=False).returncode == 0
        if host_side and _ip("-n", self.netns, "link", "show", "eth0", check=False).returncode:
            # A pair left by a namespace that was removed while processes still held it
            # (a run killed mid-clean-up): its other end is not here. A new pair.
            log.warning("Replacing %s: its peer is not in %s", self.host_if, self.netns)
            _ip("link", "delete", self.host_if, check=False)
        if _ip("link", "show", self.host_if, check=False).returncode != 0:
            _ip(
                "link",
                "add",
                self.host_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                self.netns,
            )
        gateway = f"{self.gateway}/{self.pod_cidr.prefixlen}"
        _ip("addr", "replace", gateway, "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        # Forward what this node's pods send to other local nodes (routed below), on this
        # interface only: the host's `ip_forward` stays as it is.
        subprocess.run(
            ["sysctl", "-qw", f"net.ipv4.conf.{self.host_if}.forwarding=1"],
            check=True, capture_output=True,
        )  # fmt: skip
        _ip("-n", self.netns, "link", "set", "lo", "up")
        _ip("-n", self.netns, "link", "set", "eth0", "up")
        # Pod IPs share eth0 and one subnet: without this, removing the first one
        # (the primary) would silently remove every other pod's address with it.
        subprocess.run(
            ["ip", "netns", "exec", self.netns, "sysctl", "-qw",
             "net.ipv4.conf.all.promote_secondaries=1", "net.ipv4.conf.eth0.promote_secondaries=1"],
            check=True, capture_output=True,
        )  # fmt: skip

    def route_clusters(self, cidrs: set[ipaddress.IPv4Network]) -> None:
        """Route each local cluster's pod CIDR in `cidrs` through the host (each has the
        host's blackhole under its nodes' routes), and no longer those gone. Replaced
        each time (idempotent), `onlink`: the namespace may hold no pod address yet."""
        for cidr in cidrs:
            _ip("-n", self.netns, "route", "replace", str(cidr), "via", str(self.gateway),
                "dev", "eth0", "onlink")  # fmt: skip
        for cidr in self.routed - cidrs:
            _ip("-n", self.netns, "route", "del", str(cidr), check=False)
        self.routed = set(cidrs)

    def add_address(self, ip: ipaddress.IPv4Address) -> None:
        _ip("-n", self.netns, "addr", "replace", f"{ip}/{self.pod_cidr.prefixlen}", "dev", "eth0")

    def remove_address(self, ip: ipaddress.IPv4Address) -> None:
        _ip(
            "-n",
            self.netns,
            "addr",
            "del",
            f"{ip}/{self.pod_cidr.prefixlen}",
            "dev",
            "eth0",
            check=False,
        )
        self.used.discard(ip)

    def teardown(self) -> None:
        _ip("netns", "delete", self.netns, check=False)
        _ip("link", "delete", self.host_if, check=False)


@dataclass
class ContainerProcess:
    """One container of a pod, running as a local process."""

    name: str
    log: str  # its file in the pod's directory
    process: subprocess.Popen[bytes] | None = None
    started_at: str = ""
    started_monotonic: float = 0.0
    restarts: int = 0  # kubelet's restartCount: starts after the first
    ever_started: bool = False
    ready: bool = False
    waiting_reason: str = ""
    waiting_message: str = ""
    last_terminated: Manifest | None = None  # the previous run, while another follows
    terminated: Manifest | None = None  # the last run, when none follows
    next_start: float = 0.0
    backoff: float = FIRST_BACKOFF_SECONDS


@dataclass
class PodProcess:
    """One pod: its address, its volumes, and a process per container (all in its
    node's network namespace, each in a mount namespace of its own)."""

    uid: str
    namespace: str
    name: str
    node: LocalNode
    ip: ipaddress.IPv4Address
    workdir: Path
    containers: dict[str, ContainerProcess] = field(default_factory=dict)
    reported: str = ""
    volumes: podfs.Volumes | None = None

    @property
    def running(self) -> bool:
        return any(c.process is not None for c in self.containers.values())


def restart_wanted(policy: str, exit_code: int) -> bool:
    """Whether kubelet starts a container again after it exited with `exit_code`."""
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


def terminated_state(
    returncode: int, started_at: str, finished_at: str, container_id: str
) -> Manifest:
    """A container's `terminated` state as a runtime reports it: a process killed by
    signal N (`returncode` -N) exits 128 + N; reason Completed after 0, else Error."""
    exit_code = returncode if returncode >= 0 else 128 - returncode
    return {
        "exitCode": exit_code,
        "reason": "Completed" if exit_code == 0 else "Error",
        "startedAt": started_at,
        "finishedAt": finished_at,
        "containerID": container_id,
    }


def pod_phase(policy: str, running: bool, terminated: Manifest | None, exited_before: bool) -> str:
    """The phase of a one-container pod, as kubelet's getPhase gives it: Succeeded or
    Failed once its container has exited for good, Running while it runs or waits to be
    restarted after an exit, Pending before its first start."""
    if terminated is not None:
        if terminated["exitCode"] == 0:
            return "Succeeded"
        return "Failed" if policy == "Never" else "Running"
    if running or exited_before:
        return "Running"
    return "Pending"


def _container_status(container: Manifest, state: ContainerProcess) -> Manifest:
    """One entry of the pod's containerStatuses, as kubelet writes it."""
    shown: Manifest
    if state.process is not None:
        shown = {"running": {"startedAt": state.started_at}}
    elif state.terminated is not None:
        shown = {"terminated": state.terminated}
    else:
        shown = {"waiting": {"reason": state.waiting_reason or "ContainerCreating",
                             "message": state.waiting_message}}  # fmt: skip
    container_id = (
        f"ttsfleet-local://{state.process.pid}"
        if state.process is not None
        else str((state.terminated or state.last_terminated or {}).get("containerID", ""))
    )
    return {
        "name": container["name"],
        "image": container["image"],
        "imageID": "",
        "containerID": container_id,
        "ready": state.ready,
        "started": state.process is not None,
        "restartCount": state.restarts,
        "state": shown,
        "lastState": {"terminated": state.last_terminated} if state.last_terminated else {},
    }


def pods_phase(policy: str, containers: list[ContainerProcess]) -> str:
    """`pod_phase` of a pod with several containers: Succeeded or Failed once every one
    has exited for good (Failed if one failed), else Running once one has started."""
    finals = [c.terminated for c in containers]
    if finals and all(t is not None for t in finals):
        worst = max(finals, key=lambda t: t is not None and t["exitCode"] != 0)
        return pod_phase(policy, False, worst, True)
    started = any(c.process is not None or c.ever_started for c in containers)
    return pod_phase(policy, any(c.process is not None for c in containers), None, started)


class Runner:
    """Acts as the kubelet of every local node of one cluster."""

    def __init__(self, cluster: str, kubeconfig: Path, state_dir: Path) -> None:
        self.cluster = cluster
        self.api = kube.api_client(kubeconfig, user_agent="ttsfleet-runner")
        self.state_dir = state_dir
        self.nodes: dict[str, LocalNode] = {}
        self.pods: dict[str, PodProcess] = {}
        self.stopping: set[str] = set()
        self.stop_threads: list[threading.Thread] = []
        self.last_heartbeat = 0.0
        self.last_volume_sync = 0.0
        self.source = KubeSource(self.api)
        self._api_checked = False

    # ---- nodes -------------------------------------------------------------
    def discover_nodes(self) -> None:
        for node in kube.list_nodes(self.api, f"{LOCAL_LABEL}=true"):
            name = node["metadata"]["name"]
            cidr = node.get("spec", {}).get("podCIDR")
            if name in self.nodes or not cidr:
                continue
            local_node = LocalNode(
                name=name,
                pod_cidr=ipaddress.IPv4Network(cidr),
                netns=f"{local.netns_prefix(self.cluster)}{name}",
                host_if=host_interface(self.cluster, name),
            )
            local_node.setup()
            local_node.route_clusters(_cluster_cidrs())
            self.nodes[name] = local_node
            log.info("Set up network namespace %s for node %s (%s)", local_node.netns, name, cidr)

    def heartbeat(self) -> None:
        now = _now()
        cidrs = _cluster_cidrs()
        for node in list(self.nodes.values()):
            node.route_clusters(cidrs)
            try:
                alive = self._heartbeat(node, now)
            except Exception:
                log.exception("Heartbeat of %s failed", node.name)
                continue
            if not alive:  # the node was deleted: forget it
                log.info("Node %s is gone", node.name)
                node.teardown()
                del self.nodes[node.name]

    def _heartbeat(self, node: LocalNode, now: str) -> bool:
        """Post the node's status and renew its Lease; False when the node is gone."""
        conditions = [
            {"type": kind, "status": "False", "reason": f"KubeletHas{reason}",
             "lastHeartbeatTime": now, "lastTransitionTime": now}
            for kind, reason in (
                ("MemoryPressure", "SufficientMemory"),
                ("DiskPressure", "NoDiskPressure"),
                ("PIDPressure", "SufficientPID"),
            )
        ]  # fmt: skip
        conditions.append(
            {"type": "Ready", "status": "True", "reason": "KubeletReady",
             "message": "ttsfleet local runner is posting ready status",
             "lastHeartbeatTime": now, "lastTransitionTime": now}
        )  # fmt: skip
        status = {
            "conditions": conditions,
            "addresses": [
                {"type": "InternalIP", "address": str(node.gateway)},
                {"type": "Hostname", "address": node.name},
            ],
        }
        if not kube.patch_node_status(self.api, node.name, status):
            return False
        kube.renew_node_lease(self.api, node.name, LEASE_SECONDS)
        return True

    # ---- pods --------------------------------------------------------------
    def sync_pods(self) -> None:
        seen: set[str] = set()
        for node in self.nodes.values():
            for pod in kube.list_node_pods(self.api, node.name):
                uid = pod["metadata"]["uid"]
                seen.add(uid)
                try:
                    if pod["metadata"].get("deletionTimestamp") or uid in self.stopping:
                        self._terminate(pod)
                    elif pod.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
                        self._ensure_running(pod, node)
                except Exception:  # one pod's trouble must not stall the others
                    log.exception("Pod %s/%s failed to sync", pod["metadata"].get("namespace"),
                                  pod["metadata"].get("name"))  # fmt: skip
        for uid in set(self.pods) - seen:  # gone from the API without us: stop it
            self._stop(self.pods.pop(uid), grace=0)

    def _ensure_running(self, pod: Manifest, node: LocalNode) -> None:
        uid = pod["metadata"]["uid"]
        proc = self.pods.get(uid)
        if proc is None:
            ip = node.allocate(pod.get("status", {}).get("podIP"))
            node.add_address(ip)
            proc = PodProcess(
                uid=uid, namespace=pod["metadata"]["namespace"], name=pod["metadata"]["name"],
                node=node, ip=ip, workdir=self.state_dir / "pods" / uid,
            )  # fmt: skip
            statuses = pod.get("status", {}).get("containerStatuses") or []
            restarts = {s.get("name"): int(s.get("restartCount") or 0) for s in statuses}
            for i, container in enumerate(pod["spec"]["containers"]):
                name = container["name"]
                log_name = "container.log" if i == 0 else f"container-{name}.log"
                proc.containers[name] = ContainerProcess(
                    name, log_name, restarts=restarts.get(name, 0)
                )
            self.pods[uid] = proc
        policy = pod["spec"].get("restartPolicy") or "Always"
        for container in pod["spec"]["containers"]:
            state = proc.containers[container["name"]]
            if state.process is not None and (returncode := state.process.poll()) is not None:
                self._exited(proc, state, returncode, policy)
            if (state.terminated is None and state.process is None
                    and time.monotonic() >= state.next_start):  # fmt: skip
                self._start(pod, container, proc, state)
            if state.process is not None:
                state.ready = _probe(container, proc.ip)
        self._report(pod, proc, policy)

    def _exited(
        self, proc: PodProcess, state: ContainerProcess, returncode: int, policy: str
    ) -> None:
        """A container's process ended: restart it after a back-off, or not, by policy."""
        assert state.process is not None
        done = terminated_state(
            returncode, state.started_at, _now(), f"ttsfleet-local://{state.process.pid}"
        )
        ran = time.monotonic() - state.started_monotonic
        state.process, state.ready = None, False
        log.warning("Pod %s/%s container %s exited with %s (restartPolicy %s)", proc.namespace,
                    proc.name, state.name, done["exitCode"], policy)  # fmt: skip
        if not restart_wanted(policy, done["exitCode"]):
            state.terminated = done
            if all(c.terminated is not None for c in proc.containers.values()):
                proc.node.remove_address(proc.ip)  # as a pod sandbox torn down frees its IP
            return
        state.last_terminated = done
        if ran >= BACKOFF_RESET_SECONDS:
            state.backoff = FIRST_BACKOFF_SECONDS
        state.next_start = time.monotonic() + state.backoff
        state.waiting_reason = "CrashLoopBackOff"
        state.waiting_message = (
            f"back-off {state.backoff:.0f}s restarting failed container={state.name} "
            f"pod={proc.name}_{proc.namespace}({proc.uid})"
        )
        state.backoff = min(state.backoff * 2, MAX_BACKOFF_SECONDS)

    def _start(
        self, pod: Manifest, container: Manifest, proc: PodProcess, state: ContainerProcess
    ) -> None:
        project = images.is_project_image(str(container.get("image") or ""))
        # What the downward API reads of the pod: its address is known here first.
        status = (pod.get("status") or {}) | {
            "podIP": str(proc.ip), "hostIP": str(proc.node.gateway),
        }  # fmt: skip
        pod = pod | {"status": status}
        try:
            if proc.volumes is None:
                proc.volumes = podfs.Volumes(pod, proc.workdir / "volumes", self.source)
            volumes = proc.volumes.sync()
            env = podfs.environment(container, pod, self.source)
            hosts = None
            if project:
                env |= self._api_environment()
                hosts = self._hosts_file(proc)
            command = images.local_command(
                container, volumes, proc.workdir, str(proc.ip), proc.uid, env, hosts
            )
        except images.NotRunnableLocallyError as err:
            state.waiting_reason, state.waiting_message = "ImageNotRunnableLocally", str(err)
            state.next_start = time.monotonic() + 30
            return
        except podfs.PodSetupError as err:  # kubelet's word for a missing ConfigMap or key
            state.waiting_reason, state.waiting_message = "CreateContainerConfigError", str(err)
            state.next_start = time.monotonic() + 5
            return
        argv = command.wrapped()
        env = command.env
        proc.workdir.mkdir(parents=True, exist_ok=True)
        proc.node.add_address(proc.ip)  # idempotent; a restart finds it in place
        with (proc.workdir / state.log).open("ab") as out:
            state.process = subprocess.Popen(
                ["ip", "netns", "exec", proc.node.netns, *argv],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        state.started_at = _now()
        state.started_monotonic = time.monotonic()
        if state.ever_started:
            state.restarts += 1
        state.ever_started = True
        state.waiting_reason = state.waiting_message = ""
        log.info("Started pod %s/%s container %s at %s (pid %s)", proc.namespace, proc.name,
                 state.name, proc.ip, state.process.pid)  # fmt: skip

    def _report(self, pod: Manifest, proc: PodProcess, policy: str) -> None:
        states = [proc.containers[c["name"]] for c in pod["spec"]["containers"]]
        phase = pods_phase(policy, states)
        finished = phase in ("Succeeded", "Failed")
        ready = "True" if all(c.ready for c in states) else "False"
        conditions: list[Manifest] = [
            {"type": kind, "status": value}
            for kind, value in (
                ("PodScheduled", "True"),
                ("PodReadyToStartContainers", "False" if finished else "True"),
                ("Initialized", "True"),
                ("ContainersReady", ready),
                ("Ready", ready),
            )
        ]
        if finished:  # kubelet's reason on a pod whose containers are all done
            for cond in conditions[3:]:
                cond["reason"] = "PodCompleted"
        status: Manifest = {
            "phase": phase,
            "hostIP": str(proc.node.gateway),
            "hostIPs": [{"ip": str(proc.node.gateway)}],
            "podIP": str(proc.ip),
            "podIPs": [{"ip": str(proc.ip)}],
            "startTime": pod.get("status", {}).get("startTime") or _now(),
            "conditions": conditions,
            "containerStatuses": [
                _container_status(container, state)
                for container, state in zip(pod["spec"]["containers"], states, strict=True)
            ],
        }
        digest = json.dumps(status, sort_keys=True)
        if digest == proc.reported:
            return
        now = _now()
        for cond in conditions:
            cond["lastTransitionTime"] = now
        kube.patch_pod_status(self.api, proc.namespace, proc.name, status)
        proc.reported = digest

    def _terminate(self, pod: Manifest) -> None:
        """Stop a deleted pod in the background (its preStop and grace take seconds)."""
        uid = pod["metadata"]["uid"]
        if uid in self.stopping:
            return
        self.stopping.add(uid)
        proc = self.pods.pop(uid, None)
        grace = int(pod["metadata"].get("deletionGracePeriodSeconds") or 30)
        # Each container's preStop sleep runs at once (as kubelet's do): the longest counts.
        pre_stop = max(
            int((((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {})
                .get("seconds") or 0)
            for c in pod["spec"]["containers"]
        )  # fmt: skip

        def stop_and_delete() -> None:
            try:
                if proc is not None:
                    self._stop(proc, grace=grace, pre_stop=pre_stop)
                kube.delete_pod(self.api, pod["metadata"]["namespace"], pod["metadata"]["name"], 0)
            except Exception:  # the next sync sees the pod again and tries again
                log.exception("Stopping pod %s/%s failed", pod["metadata"]["namespace"],
                              pod["metadata"]["name"])  # fmt: skip
            finally:
                self.stopping.discard(uid)

        thread = threading.Thread(target=stop_and_delete, daemon=True)
        thread.start()
        self.stop_threads = [t for t in self.stop_threads if t.is_alive()] + [thread]

    def _api_environment(self) -> dict[str, str]:
        """What in-cluster clients read to find the apiserver (as kubelet sets it)."""
        port = str(urllib.parse.urlsplit(self.api.configuration.host).port or 443)
        if not self._api_checked:
            check_api_certificate(self.api.configuration.host)
            self._api_checked = True
        return {
            "KUBERNETES_SERVICE_HOST": API_HOST,
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
        }

    def _hosts_file(self, proc: PodProcess) -> Path:
        """The pod's /etc/hosts: itself, and the apiserver at its node's address."""
        path = proc.workdir / "etc-hosts"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "127.0.0.1\tlocalhost\n::1\tlocalhost\n"
            f"{proc.ip}\t{proc.name}\n"
            f"{proc.node.gateway}\tkubernetes kubernetes.default {API_HOST} "
            f"{API_HOST}.cluster.local\n"
        )
        return path

    def sync_volumes(self) -> None:
        """Write running pods' ConfigMap, Secret and token volumes again (kubelet's
        periodic sync): changes reach the processes without a restart."""
        for proc in list(self.pods.values()):
            if not proc.running or proc.volumes is None:
                continue
            try:
                proc.volumes.sync()
            except Exception:  # a ConfigMap deleted under a running pod: keep the files
                log.exception("Syncing the volumes of %s/%s failed", proc.namespace, proc.name)

    def _stop(self, proc: PodProcess, grace: int, pre_stop: int = 0) -> None:
        """preStop sleep (still serving, leaving the endpoints), SIGTERM to every
        container, grace, SIGKILL to those still there."""
        processes = [c.process for c in proc.containers.values() if c.process is not None]
        if processes:
            deadline = time.monotonic() + grace
            if pre_stop:
                time.sleep(min(pre_stop, grace))
            for process in processes:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=10)
        proc.node.remove_address(proc.ip)
        shutil.rmtree(proc.workdir, ignore_errors=True)
        for region in Path("/dev/shm").glob(images.shm_prefix(proc.uid) + "*"):  # noqa: S108
            region.unlink(missing_ok=True)
        log.info("Stopped pod %s/%s", proc.namespace, proc.name)

    # ---- loop --------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    self.discover_nodes()
                    if time.monotonic() - self.last_heartbeat > HEARTBEAT_SECONDS:
                        self.heartbeat()
                        self.last_heartbeat = time.monotonic()
                    self.sync_pods()
                    if time.monotonic() - self.last_volume_sync > VOLUME_SYNC_SECONDS:
                        self.sync_volumes()
                        self.last_volume_sync = time.monotonic()
                except Exception:
                    log.exception("Runner loop failed; trying again")
                stop.wait(1.0)
        finally:
            # All pods at once (a few seconds of grace each), then those already on their
            # way out: `cluster down` waits for this, but not for ever.
            stops = [
                threading.Thread(target=self._stop, args=(proc,), kwargs={"grace": 5})
                for proc in self.pods.values()
            ]
            for thread in stops:
                thread.start()
            deadline = time.monotonic() + 15
            for thread in stops + self.stop_threads:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
            self.pods.clear()


class KubeSource:
    """What pods' volumes and environment read, from the API (`podfs.Source`)."""

    def __init__(self, api: Any) -> None:
        self.api = api

    def config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        found = kube.get(self.api, "v1", "ConfigMap", name, namespace)
        return None if found is None else dict(found.get("data") or {})

    def secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        found = kube.get(self.api, "v1", "Secret", name, namespace)
        return None if found is None else podfs.decode_secret(found)

    def token(self, pod: Manifest, audience: str | None, seconds: int) -> str:
        meta = pod["metadata"]
        account = pod["spec"].get("serviceAccountName") or "default"
        audiences = [audience] if audience else None
        return kube.request_token(
            self.api, meta["namespace"], account, seconds, pod, audiences=audiences
        )


def check_api_certificate(url: str) -> None:
    """Refuse to start API clients in pods unless the apiserver's serving certificate
    names API_HOST, the name pods reach it by (their TLS check would fail)."""
    from cryptography import x509  # noqa: PLC0415

    parts = urllib.parse.urlsplit(url)
    pem = ssl.get_server_certificate((parts.hostname or "127.0.0.1", parts.port or 443))
    cert = x509.load_pem_x509_certificate(pem.encode())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = None
    dns = names.get_values_for_type(x509.DNSName) if names is not None else []
    if API_HOST not in dns:
        raise images.NotRunnableLocallyError(
            f"the apiserver's certificate names {', '.join(dns) or 'no DNS name'}, not "
            f"{API_HOST}: pods could not verify it"
        )


def _port(container: Manifest, port: int | str) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, str):
        return int(next(p["containerPort"] for p in container.get("ports", [])
                        if p.get("name") == port))  # fmt: skip
    return port


def _probe(container: Manifest, ip: ipaddress.IPv4Address) -> bool:
    """The container's readiness probe (HTTP GET or TCP connect), against its pod IP
    (in our namespace)."""
    readiness = container.get("readinessProbe") or {}
    if "tcpSocket" in readiness:
        try:
            with socket.create_connection(
                (str(ip), _port(container, readiness["tcpSocket"]["port"])), 1
            ):
                return True
        except OSError:
            return False
    probe = readiness.get("httpGet")
    if probe is None:
        return True
    port = _port(container, probe["port"])
    scheme = str(probe.get("scheme", "HTTP")).lower()
    url = f"{scheme}://{ip}:{port}{probe.get('path', '/')}"
    try:
        with local.open_direct(url, 1) as response:
            return bool(200 <= response.status < 400)
    except OSError:
        return False
