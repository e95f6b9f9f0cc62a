"""Chaos scenarios for the operator's high availability (dev tooling, not the operator).

Each runs two `ttsfleet operator` replicas against a local cluster whose apiserver
keeps an audit log, breaks something, and returns what was lost or duplicated, counted
from the cluster itself: objects not Ready, children per owner, orphans, and each
replica's writes as the apiserver saw them (audit log, by user agent: every replica's
client names its identity there). `tests/e2e/test_chaos.py` runs each scenario once
and asserts the counts are 0; `benchmarks/chaos_bench.py` repeats the leader kill and
reports the failover time.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from ttsfleet import kube
from ttsfleet.api import v1alpha1 as api
from ttsfleet.cluster import local
from ttsfleet.cluster.pool import PoolFile, parse_pool_file
from ttsfleet.harness import (
    CHART,
    OperatorProcess,
    helm,
    pod_kubeconfig,
    scratch_namespace,
    wait_established,
    wait_for,
)
from ttsfleet.resources.common import DEPLOYMENT_LABEL

Manifest = dict[str, Any]
CRD = CHART.parent.parent / "crds" / "ttsfleet.io_ttsdeployments.yaml"

# Enough MIG slices for a storm of 100 one-replica fleets (7 x 8 GPUs x 2 1g.10gb).
POOL = """
pools:
  - name: h100
    count: 7
    cpu: "192"
    memory: 2Ti
    gpu: {product: H100-80GB, count: 8, migStrategy: mixed,
          migLayout: {1g.10gb: 2, 2g.20gb: 1, 3g.40gb: 1}}
    taints: ["nvidia.com/gpu=present:NoSchedule"]
"""
CHILD_KINDS = (
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("v1", "ConfigMap"),
    ("policy/v1", "PodDisruptionBudget"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
)


def pool() -> PoolFile:
    return parse_pool_file(POOL)


@contextmanager
def chaos_cluster(name: str, workdir: Path) -> Iterator[local.ClusterRecord]:
    """A local cluster of `POOL` whose apiserver keeps an audit log, with the CRD and the
    chart installed once (`RELEASE` in `RELEASE_NAMESPACE`, no operator pods: the
    replicas run here, see `Pair`); removed on exit.

    Once, and never uninstalled while the cluster runs: the apiserver (1.34, and later
    ones until kubernetes/kubernetes#130887 is fixed) stops resolving a built-in
    paramKind such as Lease for good, until it restarts, as soon as no binding names it,
    which would turn the chart's leader fence off for every later install.
    """
    record = local.up(name, pool(), audit=True).record
    try:
        api_client = kube.api_client(record.kubeconfig)
        kube.apply(api_client, [yaml.safe_load(CRD.read_text())], "ttsfleet-tests")
        wait_established(api_client, f"{api.PLURAL}.{api.GROUP}")
        helm(
            record.kubeconfig, workdir / "helm", "install", RELEASE, str(CHART),
            "-n", RELEASE_NAMESPACE, "--create-namespace", "--set", "replicaCount=0",
            "--set", f"leaderElection.leaseName={LEASE}",
        )  # fmt: skip
        yield record
    finally:
        local.down(name)


@dataclass(frozen=True)
class Timings:
    """Leader election flags: the defaults, or shorter ones for quick tests."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def args(self) -> list[str]:
        return [
            "--lease-duration", str(self.lease_duration),
            "--renew-deadline", str(self.renew_deadline),
            "--retry-period", str(self.retry_period),
        ]  # fmt: skip

    @property
    def failover_goal(self) -> float:
        """The issue's bound on kill -> first write by the new leader."""
        return self.lease_duration + self.retry_period + 2


RELEASE_NAMESPACE = "ttsfleet-system"
RELEASE = "ttsfleet"
ACCOUNT = f"{RELEASE}-tts-operator"  # the chart's ServiceAccount
LEASE = "ttsfleet-operator"


@dataclass
class Pair:
    """Two replicas of the operator as the chart runs them: with the chart that
    `chaos_cluster` installed (its RBAC, its Lease Role, its admission policies with the
    leader fence), each replica with a token bound to a pod of its own, electing a
    leader through the chart's Lease.

    The pods are placeholders on simulated nodes (kwok runs no containers); the
    replicas run here as processes with those pods' tokens, so the apiserver sees
    each write as coming from its pod, exactly as in a cluster.
    """

    api: client.ApiClient
    replicas: list[OperatorProcess]
    lease: str = LEASE
    lease_namespace: str = RELEASE_NAMESPACE

    @classmethod
    def make(
        cls, record: local.ClusterRecord, workdir: Path, timings: Timings, tag: str = ""
    ) -> Pair:
        tag = tag or uuid.uuid4().hex[:6]
        replicas = []
        for name in ("a", "b"):
            pod, kubeconfig = pod_kubeconfig(
                record.kubeconfig, RELEASE_NAMESPACE, ACCOUNT, f"op-{tag}-{name}",
                workdir / f"operator-{name}.kubeconfig",
            )  # fmt: skip
            replicas.append(
                OperatorProcess(
                    kubeconfig,
                    workdir / f"operator-{name}.log",
                    local.free_port(),
                    local.free_port(),
                    identity=f"{pod['metadata']['name']}_{name}",
                    extra_args=[
                        "--leader-election-id",
                        LEASE,
                        "--leader-election-namespace",
                        RELEASE_NAMESPACE,
                        *timings.args(),
                    ],
                )
            )
        return cls(kube.api_client(record.kubeconfig), replicas)

    def start(self) -> None:
        """The first replica leads before the second starts (so which leads is known)."""
        first, second = self.replicas
        first.start()
        wait_for("the first replica to lead", first.leading, timeout=60)
        second.start()
        wait_for("the second replica to stand by, ready", second.ready, timeout=60)

    def holder(self) -> str:
        lease = kube.read_lease(self.api, self.lease_namespace, self.lease, 5)
        return str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")

    def by_identity(self, identity: str) -> OperatorProcess | None:
        return next((r for r in self.replicas if r.identity == identity), None)

    def leader(self) -> OperatorProcess:
        found = self.by_identity(self.holder())
        assert found is not None, f"no replica holds Lease {self.lease}"
        return found

    def other(self, replica: OperatorProcess) -> OperatorProcess:
        return next(r for r in self.replicas if r is not replica)

    def leaders(self) -> list[str]:
        """Identities of the replicas that say they lead (their gauges)."""
        return [str(r.identity) for r in self.replicas if r.process and r.leading()]

    def stop(self) -> None:
        """Stop both (each releases the Lease it holds) and remove their pods."""
        for replica in self.replicas:
            replica.stop()
        for replica in self.replicas:
            pod = str(replica.identity).rsplit("_", 1)[0]
            kube.delete_pod(self.api, RELEASE_NAMESPACE, pod, 0)


# ---- what the apiserver saw --------------------------------------------------------------


@dataclass(frozen=True)
class Write:
    """One write request, from the audit log."""

    at: float  # requestReceivedTimestamp, epoch seconds
    verb: str
    resource: str
    name: str
    agent: str
    user: str
    pod: str  # the pod a pod-bound token names
    code: int

    @property
    def made(self) -> bool:
        """Whether the apiserver accepted it (a refused request changes nothing)."""
        return 200 <= self.code < 300


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def writes(audit_log: Path, since: float = 0.0) -> list[Write]:
    """Every write the apiserver completed or refused since `since` (epoch seconds)."""
    out: list[Write] = []
    if not audit_log.exists():
        return out
    for line in audit_log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line the apiserver is still writing
        if event.get("stage") != "ResponseComplete":
            continue
        at = _epoch(event["requestReceivedTimestamp"])
        if at < since:
            continue
        ref = event.get("objectRef") or {}
        user = event.get("user") or {}
        pod = (user.get("extra") or {}).get("authentication.kubernetes.io/pod-name") or [""]
        resource = ref.get("resource", "") + (
            f"/{ref['subresource']}" if ref.get("subresource") else ""
        )
        out.append(
            Write(
                at,
                event.get("verb", ""),
                resource,
                ref.get("name", ""),
                event.get("userAgent", ""),
                user.get("username", ""),
                pod[0],
                int((event.get("responseStatus") or {}).get("code") or 0),
            )
        )
    return out


def by_replica(found: list[Write], replica: OperatorProcess) -> list[Write]:
    """The writes `replica` sent: its token names its pod (kopf's requests included)."""
    pod = str(replica.identity).rsplit("_", 1)[0]
    return [w for w in found if w.pod == pod]


def by_kopf(found: list[Write]) -> list[Write]:
    """Writes kopf's own client sent: the operator configures kopf to write nothing."""
    return [w for w in found if w.agent.startswith("kopf/")]


# ---- fleets --------------------------------------------------------------------------------


def fleet(name: str) -> Manifest:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name},
        "spec": {
            "model": {"voice": "en_US-joe-medium", "precision": "fp16"},
            "placement": {"mode": "mig", "profile": "1g.10gb"},
            "minReplicas": 1,
            "maxReplicas": 2,
            "scaling": {"mode": "manual"},
        },
    }


class Storm:
    """Creates fleets `prefix-0..n-1` in a namespace from a thread, as fast as it can."""

    def __init__(self, api_client: client.ApiClient, namespace: str, prefix: str, count: int):
        self.api, self.namespace, self.prefix, self.count = api_client, namespace, prefix, count
        self.created = 0
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True, name="storm")

    @property
    def names(self) -> list[str]:
        return [f"{self.prefix}-{i}" for i in range(self.count)]

    def start(self) -> Storm:
        self._thread.start()
        return self

    def _run(self) -> None:
        for name in self.names:
            try:
                kube.create_custom(
                    self.api, api.GROUP, api.VERSION, api.PLURAL, self.namespace, fleet(name)
                )
                self.created += 1
            except Exception as err:  # counted: a storm that lost objects is a failure
                self.errors.append(f"{name}: {err}")

    def join(self, timeout: float = 120) -> None:
        self._thread.join(timeout)


@dataclass
class Census:
    """What the cluster holds for a set of fleets: each count that must be 0 is named."""

    not_ready: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # asked for, never created
    duplicate_children: list[str] = field(default_factory=list)  # kind/owner with > 1
    missing_children: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)  # children whose owner is gone
    extra_pods: list[str] = field(default_factory=list)  # more pods than replicas

    def lost_or_duplicated(self) -> dict[str, int]:
        return {
            "not_ready": len(self.not_ready),
            "missing": len(self.missing),
            "duplicate_children": len(self.duplicate_children),
            "missing_children": len(self.missing_children),
            "orphans": len(self.orphans),
            "extra_pods": len(self.extra_pods),
        }


def census(api_client: client.ApiClient, namespace: str, names: list[str]) -> Census:
    """Count, in `namespace`, what must be exactly one per fleet."""
    objects = {
        o["metadata"]["name"]: o
        for o in kube.list_custom(api_client, api.GROUP, api.VERSION, api.PLURAL, namespace)
    }
    out = Census()
    out.missing = [n for n in names if n not in objects]
    for name in names:
        obj = objects.get(name)
        if obj is not None and not _ready(obj):
            out.not_ready.append(name)
    uids = {o["metadata"]["uid"]: name for name, o in objects.items()}
    for api_version, kind in CHILD_KINDS:
        owned: Counter[str] = Counter()
        for child in kube.list_objects(
            api_client, api_version, kind, namespace, "app.kubernetes.io/managed-by=ttsfleet"
        ):
            owners = [
                r["uid"] for r in child["metadata"].get("ownerReferences") or []
                if r.get("kind") == api.KIND
            ]  # fmt: skip
            if not owners or owners[0] not in uids:
                out.orphans.append(f"{kind}/{child['metadata']['name']}")
                continue
            owned[uids[owners[0]]] += 1
        out.duplicate_children += [f"{kind}/{n}" for n, c in owned.items() if c > 1]
        out.missing_children += [f"{kind}/{n}" for n in objects if n in names and not owned[n]]
    pods: Counter[str] = Counter()
    for pod in kube.list_pods(api_client, namespace, DEPLOYMENT_LABEL):
        if not pod["metadata"].get("deletionTimestamp"):
            pods[pod["metadata"]["labels"][DEPLOYMENT_LABEL]] += 1
    for name, obj in objects.items():
        replicas = int((obj.get("spec") or {}).get("replicas") or 0)
        if pods[name] > replicas:
            out.extra_pods.append(f"{name}: {pods[name]} pods for {replicas} replicas")
    return out


def _ready(obj: Manifest) -> bool:
    """Ready for its current spec: the Ready condition of the newest generation."""
    status = obj.get("status") or {}
    fresh = status.get("observedGeneration") == obj["metadata"].get("generation")
    return fresh and any(
        c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or []
    )


def all_ready(api_client: client.ApiClient, namespace: str, names: list[str]) -> bool:
    found = census(api_client, namespace, names)
    return not found.not_ready and not found.missing


# ---- the scenarios ---------------------------------------------------------------------------


def _since(found: list[Write], start: float, *, skip: tuple[str, ...] = ()) -> float | None:
    """Seconds from `start` to the first of `found` on a resource not in `skip`."""
    times = [w.at for w in found if w.resource not in skip]
    return round(min(times) - start, 3) if times else None


def leader_kill_during_storm(
    record: local.ClusterRecord, pair: Pair, timings: Timings, count: int = 100,
    kill_after: int = 30,
) -> dict[str, Any]:  # fmt: skip
    """SIGKILL the leader once `kill_after` of `count` new fleets exist; the standby
    finishes. Returns the census counts and the failover times."""
    api_client = pair.api
    with scratch_namespace(api_client, "chaos") as ns:
        storm = Storm(api_client, ns, "storm", count).start()
        leader = pair.leader()
        standby = pair.other(leader)
        wait_for(f"{kill_after} fleets", lambda: storm.created >= kill_after or storm.errors, 60)
        assert not storm.errors, storm.errors[:3]
        killed_at = time.time()
        leader.kill()
        wait_for("the standby to lead", standby.leading, timeout=3 * timings.lease_duration)
        storm.join()
        wait_for(f"all {count} fleets Ready", lambda: all_ready(api_client, ns, storm.names), 300)
        found = census(api_client, ns, storm.names)
        after = writes(local.audit_log(record), since=killed_at)
        theirs = [w for w in by_replica(after, standby) if w.made]
        return {
            "created": storm.created,
            "storm_errors": storm.errors,
            **found.lost_or_duplicated(),
            "kopf_writes": len(by_kopf(writes(local.audit_log(record)))),
            "new_leader_writes": len(theirs),
            # kill -> the new leader's Lease write, and its first write of a fleet or child.
            "lease_acquired_s": _since([w for w in theirs if w.resource == "leases"], killed_at),
            "failover_s": _since(theirs, killed_at, skip=("leases", "events")),
            "killed": str(leader.identity),
            "new_leader": str(standby.identity),
        }


def apiserver_outage(
    record: local.ClusterRecord, pair: Pair, timings: Timings, seconds: float = 20,
    count: int = 20,
) -> dict[str, Any]:  # fmt: skip
    """Stop the apiserver for `seconds` right after `count` fleets are created (their
    reconciles under way), then start it again. Both replicas must live through it
    (same processes, /healthz answering throughout), and one leader must act after."""
    api_client = pair.api
    parts = local.components(record.name)
    pids = [r.pid for r in pair.replicas]
    with scratch_namespace(api_client, "chaos") as ns:
        storm = Storm(api_client, ns, "outage", count).start()
        storm.join()
        parts["kube-apiserver"].stop()
        stopped_at = time.monotonic()
        unhealthy = []
        while time.monotonic() - stopped_at < seconds:
            unhealthy += [str(r.identity) for r in pair.replicas if not r.healthy()]
            time.sleep(0.5)
        parts["kube-apiserver"].start()
        wait_for("the apiserver", lambda: kube.readyz(api_client), timeout=60)
        restarted = local.restart_exited(parts)
        wait_for(
            "one leader, the Lease's holder",
            lambda: pair.leaders() == [pair.holder()],
            timeout=3 * timings.lease_duration,
        )
        wait_for(f"all {count} fleets Ready", lambda: all_ready(api_client, ns, storm.names), 180)
        found = census(api_client, ns, storm.names)
        return {
            "created": storm.created,
            "storm_errors": storm.errors,
            **found.lost_or_duplicated(),
            "replica_exits": sum(
                r.process is None or r.process.poll() is not None or r.pid != pid
                for r, pid in zip(pair.replicas, pids, strict=True)
            ),
            "unhealthy_probes": len(unhealthy),
            "leaders_after": len(pair.leaders()),
            "leader_after": pair.holder(),
            "components_restarted": restarted,
        }


def paused_leader(
    record: local.ClusterRecord, pair: Pair, timings: Timings, count: int = 30
) -> dict[str, Any]:
    """SIGSTOP the leader in the middle of a storm, past its Lease; once the standby
    leads, SIGCONT it while more work arrives (every fleet scaled to 2). The old leader
    must write nothing after it wakes, as the apiserver counts it."""
    api_client = pair.api
    with scratch_namespace(api_client, "chaos") as ns:
        storm = Storm(api_client, ns, "pause", count).start()
        leader = pair.leader()
        standby = pair.other(leader)
        wait_for("a third of the fleets", lambda: storm.created >= count // 3 or storm.errors, 60)
        assert not storm.errors, storm.errors[:3]
        leader.signal(signal.SIGSTOP)
        paused_at = time.time()
        try:
            wait_for("the standby to lead", standby.leading, timeout=3 * timings.lease_duration)
            storm.join()
        finally:
            resumed_at = time.time()
            leader.signal(signal.SIGCONT)
        for name in storm.names:
            kube.scale_custom(api_client, api.GROUP, api.VERSION, api.PLURAL, ns, name, 2)
        ended = "ttsfleet_operator_leader_transitions_total"
        wait_for(
            "the old leader to end its term",
            lambda: (leader.metric(ended, to="standby") or 0) >= 1,
            timeout=3 * timings.lease_duration,
        )
        wait_for(
            f"all {count} fleets Ready at 2 replicas",
            lambda: (
                all_ready(api_client, ns, storm.names)
                and census(api_client, ns, storm.names).lost_or_duplicated()["extra_pods"] == 0
            ),
            180,
        )
        found = census(api_client, ns, storm.names)
        pid = leader.pid
        standing_by = leader.ready() and not leader.leading() and leader.pid == pid
        late = by_replica(writes(local.audit_log(record), since=resumed_at), leader)
        paused = [w for w in by_replica(writes(local.audit_log(record), since=paused_at), leader)
                  if w.at < resumed_at]  # fmt: skip
        return {
            "created": storm.created,
            "storm_errors": storm.errors,
            **found.lost_or_duplicated(),
            # Made: accepted by the apiserver. Refused: sent, and denied by the chart's
            # leader fence (a request that passed the replica's own check before it was
            # paused, and went out when it woke).
            "old_leader_writes_after_resume": sum(w.made for w in late),
            "old_leader_refused_after_resume": sum(not w.made for w in late),
            "old_leader_writes_while_paused": len(paused),
            "examples": [f"{w.verb} {w.resource}/{w.name} -> {w.code}" for w in late[:5]],
            # Back to standby in the same process (nothing restarted it), ready to lead.
            "old_leader_standing_by": standing_by,
            "paused_s": round(resumed_at - paused_at, 1),
        }
