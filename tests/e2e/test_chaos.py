"""Chaos: the operator's replicas and its fleets under the failures production meets.

Each scenario runs once here and counts what was lost or duplicated, from the cluster
itself (objects, children, pods, and each replica's writes in the apiserver's audit
log); every count must be 0. `make bench-chaos` repeats the leader kill and reports
the failover time. The control-plane scenarios (leader killed, apiserver stopped,
leader paused) run two replicas on a cluster of their own, with an audit log and short
Lease timings; Prometheus and Triton are killed on the session cluster, whose local
node runs real Triton pods.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from tests.conftest import Cluster, Operator, wait_for
from tests.helpers import REPO, load_example
from ttsfleet import bench, chaos, client, harness, kube
from ttsfleet.cluster import local
from ttsfleet.cluster.pool import load_pool_file

TIMINGS = chaos.Timings(lease_duration=6, renew_deadline=4, retry_period=1)


@pytest.fixture(scope="module")
def chaos_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local.ClusterRecord]:
    """A cluster of 7 simulated H100 nodes whose apiserver keeps an audit log, with the
    chart installed (no operator pods)."""
    workdir = tmp_path_factory.mktemp("chaos")
    with chaos.chaos_cluster(f"chaos-{os.getpid() % 100000}", workdir) as record:
        yield record


@pytest.fixture
def pair(chaos_cluster: local.ClusterRecord, tmp_path: Path) -> Iterator[chaos.Pair]:
    replicas = chaos.Pair.make(chaos_cluster, tmp_path, TIMINGS)
    try:
        replicas.start()
        yield replicas
    finally:
        replicas.stop()


def test_the_leader_killed_in_a_create_storm_the_standby_finishes_it(
    chaos_cluster: local.ClusterRecord, pair: chaos.Pair
) -> None:
    result = chaos.leader_kill_during_storm(chaos_cluster, pair, TIMINGS, count=100)
    print(result)
    assert result["created"] == 100 and not result["storm_errors"]
    for count in ("not_ready", "missing", "duplicate_children", "missing_children", "orphans",
                  "extra_pods", "kopf_writes"):  # fmt: skip
        assert result[count] == 0, (count, result)
    # The standby did finish it: it wrote, and the first of its writes came after the kill.
    assert result["new_leader_writes"] > 0 and result["failover_s"] is not None, result


def test_an_apiserver_outage_mid_reconcile_leaves_both_replicas_up_and_one_leader(
    chaos_cluster: local.ClusterRecord, pair: chaos.Pair
) -> None:
    result = chaos.apiserver_outage(chaos_cluster, pair, TIMINGS, seconds=20, count=20)
    print(result)
    for count in ("not_ready", "missing", "duplicate_children", "missing_children", "orphans",
                  "extra_pods", "replica_exits", "unhealthy_probes"):  # fmt: skip
        assert result[count] == 0, (count, result)
    assert result["leaders_after"] == 1, result


def test_a_leader_paused_past_its_lease_writes_nothing_when_it_wakes(
    chaos_cluster: local.ClusterRecord, pair: chaos.Pair
) -> None:
    result = chaos.paused_leader(chaos_cluster, pair, TIMINGS, count=30)
    print(result)
    for count in ("not_ready", "missing", "duplicate_children", "missing_children", "orphans",
                  "extra_pods"):  # fmt: skip
        assert result[count] == 0, (count, result)
    # Counted by the apiserver, from the instant it was let go on.
    assert result["old_leader_writes_after_resume"] == 0, result
    assert result["old_leader_standing_by"], result
    # Paused past its renew deadline: its own fence had closed when it woke.
    assert result["paused_s"] > TIMINGS.renew_deadline


def test_sigterm_hands_the_lease_over_at_once(
    chaos_cluster: local.ClusterRecord, pair: chaos.Pair
) -> None:
    """A rollout's SIGTERM releases the Lease: the standby leads without waiting for it
    to expire (well inside one lease duration, with no replica paused or killed)."""
    leader = pair.leader()
    standby = pair.other(leader)
    leader.stop()  # returns once the process has exited
    lease = kube.read_lease(pair.api, pair.lease_namespace, pair.lease, 5)
    assert lease is not None
    # Released: the record the old leader left names no holder (or the standby already).
    assert lease["spec"].get("holderIdentity") in (None, "", standby.identity)
    # Within its next look at the Lease, not after the lease duration.
    wait_for("the standby to lead", standby.leading, timeout=TIMINGS.retry_period + 3)


def test_the_leader_fence_admits_writes_only_from_the_lease_holders_pod(
    chaos_cluster: local.ClusterRecord, tmp_path: Path
) -> None:
    """The chart's leader fence, enforced by the apiserver: while the Lease names a
    holder, the operator's ServiceAccount writes only from the holder's pod; a replica
    that lost the Lease (a paused leader waking up) is refused, whatever it sends."""
    api = kube.api_client(chaos_cluster.kubeconfig)
    pods = {}
    for name in ("fence-a", "fence-b"):
        pod, kubeconfig = harness.pod_kubeconfig(
            chaos_cluster.kubeconfig, chaos.RELEASE_NAMESPACE, chaos.ACCOUNT,
            f"{name}-{uuid.uuid4().hex[:4]}", tmp_path / f"{name}.kubeconfig",
        )  # fmt: skip
        pods[name] = (pod["metadata"]["name"], kube.api_client(kubeconfig))

    def hold(holder: str | None) -> None:
        """The chart's Lease, held by `holder` (None: released)."""
        lease = kube.read_lease(api, chaos.RELEASE_NAMESPACE, chaos.LEASE, 5)
        version = lease["metadata"]["resourceVersion"] if lease else None
        spec = {"holderIdentity": holder}
        kube.write_lease(api, chaos.RELEASE_NAMESPACE, chaos.LEASE, spec, version, 5)

    hold(f"{pods['fence-a'][0]}_1")
    tries = iter(range(10**6))

    def write(as_pod: str) -> str:
        """A ConfigMap write as the operator applies children; '' when admitted."""
        manifest = {"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "fenced", "namespace": chaos.RELEASE_NAMESPACE},
                    "data": {"try": str(next(tries))}}  # fmt: skip
        try:
            kube.apply(pods[as_pod][1], [manifest], "ttsfleet")
        except ApiException as err:
            return str(err.body) if err.status == 403 else f"unexpected {err.status}"
        return ""

    try:
        refused = wait_for("the fence to refuse the other pod", lambda: write("fence-b"), 60)
        assert "only the leader writes" in refused and pods["fence-b"][0] in refused
        assert write("fence-a") == ""  # the holder's pod writes
        # Released (shutdown): nobody leads, nothing is fenced.
        hold(None)
        wait_for("the released Lease to admit", lambda: write("fence-b") == "", 30)
    finally:
        hold(None)  # free for the replicas of the next test


def test_two_plain_operators_elect_one_leader_and_only_it_acts(
    chaos_cluster: local.ClusterRecord, tmp_path: Path
) -> None:
    """`ttsfleet operator` twice, with no flags but their ports: one leads (the default
    Lease, default/ttsfleet-operator, names it), the other stands by, healthy and ready,
    and runs nothing; SIGTERM hands the Lease over without waiting for it to expire."""
    operators = [
        Operator(chaos_cluster.kubeconfig, tmp_path / f"{n}.log", local.free_port(),
                 local.free_port())
        for n in ("a", "b")
    ]  # fmt: skip
    api = kube.api_client(chaos_cluster.kubeconfig)
    try:
        for op in operators:
            op.start()
        wait_for("one leader", lambda: [op.leading() for op in operators].count(True) == 1)
        leader = next(op for op in operators if op.leading())
        standby = next(op for op in operators if op is not leader)
        lease = kube.read_lease(api, "default", "ttsfleet-operator", 5)
        assert lease is not None
        assert lease["spec"]["holderIdentity"].endswith(f"_{leader.pid}")  # host_pid
        assert standby.healthy() and standby.ready()
        with harness.scratch_namespace(api, "chaos") as ns:
            kube.create_custom(api, "ttsfleet.io", "v1alpha1", "ttsdeployments", ns,
                               chaos.fleet("solo"))  # fmt: skip
            wait_for("the fleet Ready", lambda: chaos.all_ready(api, ns, ["solo"]), 60)
        # Only the leader reconciled and ran the autoscaler; the standby ran nothing.
        assert (leader.metric("ttsfleet_operator_reconciles_total") or 0) > 0
        wait_for(
            "the leader's autoscaler to tick",
            lambda: (leader.metric("ttsfleet_operator_autoscaler_ticks_total") or 0) > 1,
        )
        assert not standby.metric("ttsfleet_operator_reconciles_total")
        assert not standby.metric("ttsfleet_operator_autoscaler_ticks_total")
        assert standby.metric("ttsfleet_operator_leader_info", identity=
                              lease["spec"]["holderIdentity"]) == 1  # fmt: skip
        events = kube.list_objects(api, "v1", "Event", "default")
        assert any(
            e["reason"] == "LeaderElection"
            and e["message"] == f"{lease['spec']['holderIdentity']} became leader"
            for e in events
        )
        leader.stop()
        released = kube.read_lease(api, "default", "ttsfleet-operator", 5)
        assert released is not None
        assert released["spec"].get("holderIdentity") in (None, "", standby_identity(standby))
        wait_for("the standby to lead", standby.leading, timeout=30)
    finally:
        for op in operators:
            op.stop()


def standby_identity(op: Operator) -> str:
    return f"{socket.gethostname()}_{op.pid}"


# ---- on the session cluster: Prometheus and Triton -----------------------------------------


def fleet_manifest(name: str) -> dict[str, Any]:
    doc = load_example(REPO / "examples" / "local-cpu.yaml")
    doc["metadata"]["name"] = name
    doc["spec"]["maxReplicas"] = 2
    doc["spec"]["runtime"]["resources"]["requests"]["cpu"] = "100m"
    return doc


def get(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(
        cluster.kubectl("get", "-n", namespace, "ttsd", name, "-o", "json")
    )
    return out


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def test_prometheus_down_holds_the_size_and_says_so_then_resumes(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    pids = [p for p in local.processes(cluster.name) if "/prometheus/" in local.cmdline(p)]
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    try:
        # An idle fleet of two that could shrink at once (no delay), if it could see.
        doc = fleet_manifest("scaled")
        doc["spec"]["replicas"] = 2
        doc["spec"]["scaling"] = {"mode": "builtin", "scaleDownDelaySeconds": 0,
                                  "stableWindowSeconds": 6, "panicWindowSeconds": 2}  # fmt: skip
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))

        def unavailable() -> dict[str, Any]:
            cond = condition(get(cluster, namespace, "scaled"), "MetricsUnavailable")
            return cond if cond.get("status") == "True" else {}

        cond = wait_for("MetricsUnavailable", unavailable, timeout=60)
        assert cond["reason"] == "PrometheusUnavailable" and "Prometheus at" in cond["message"]
        # The autoscaler decided on every fleet, blind, several times more: still 2.
        ticks = operator.metric("ttsfleet_operator_autoscaler_ticks_total") or 0
        wait_for(
            "four autoscaler ticks without metrics",
            lambda: (operator.metric("ttsfleet_operator_autoscaler_ticks_total") or 0) >= ticks + 4,
        )
        assert get(cluster, namespace, "scaled")["spec"]["replicas"] == 2  # not scaled down
    finally:
        local.up(cluster.name, load_pool_file(None), reuse=True)  # starts Prometheus again
    wait_for(
        "metrics back",
        lambda: (
            condition(get(cluster, namespace, "scaled"), "MetricsUnavailable").get("status")
            == "False"
        ),
        timeout=90,
    )
    # Now it sees an idle fleet, and shrinks it.
    wait_for("scale down", lambda: get(cluster, namespace, "scaled")["spec"]["replicas"] == 1, 90)


def pod_of(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    selector = f"ttsfleet.io/deployment={name}"
    pods = json.loads(
        cluster.kubectl("get", "-n", namespace, "pods", "-l", selector, "-o", "json")
    )["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    pod: dict[str, Any] = pods[0]
    return pod


def test_a_triton_process_killed_under_load_is_restarted_and_serves_again(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    """The runner restarts the pod's process as kubelet would (restartPolicy Always):
    the same pod, restartCount 1, Ready again; requests sent once it is Ready succeed;
    the fleet is below minReplicas only while that one restart lasts."""
    doc = fleet_manifest("victim")
    doc["spec"]["scaling"] = {"mode": "manual"}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))

    def endpoints() -> list[str]:
        return kube.ready_endpoints(cluster.api, namespace, "victim", "grpc")

    wait_for("a ready endpoint", lambda: len(endpoints()) == 1, timeout=180)
    before = pod_of(cluster, namespace, "victim")
    container = before["status"]["containerStatuses"][0]
    pid = int(container["containerID"].rsplit("/", 1)[1])
    balancer = client.Balancer(endpoints, refresh_seconds=1)
    samples: list[tuple[float, bench.Sample]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            started = time.time()
            samples.append((started, bench.one(client.stream, balancer, bench.TEXTS[0])))

    ready_over_time: list[tuple[float, int]] = []

    def watch_ready() -> None:
        while not stop.is_set():
            status = get(cluster, namespace, "victim").get("status") or {}
            ready_over_time.append((time.time(), int(status.get("readyReplicas") or 0)))
            time.sleep(0.5)

    threads = [threading.Thread(target=f, daemon=True) for f in (load, load, watch_ready)]
    for thread in threads:
        thread.start()
    try:
        wait_for("requests served", lambda: sum(not s.error for _, s in samples) >= 3, 60)
        os.killpg(pid, signal.SIGKILL)  # the tritonserver process group, as an OOM kill
        killed_at = time.time()

        def restarted() -> bool:
            status = pod_of(cluster, namespace, "victim")["status"]["containerStatuses"][0]
            return bool(status["restartCount"] == 1 and status["ready"])

        wait_for("the pod restarted and Ready", restarted, timeout=180)
        ready_at = time.time()
        wait_for(
            "requests served again",
            lambda: sum(t > ready_at and not s.error for t, s in samples) >= 3,
            timeout=60,
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    after = pod_of(cluster, namespace, "victim")
    assert after["metadata"]["uid"] == before["metadata"]["uid"]  # restarted, not replaced
    assert after["status"]["containerStatuses"][0]["restartCount"] == 1
    failed_after = [s.error for t, s in samples if t > ready_at + 1 and s.error]
    assert failed_after == [], failed_after[:3]
    # Below minReplicas (1) only between the kill and the restarted pod's readiness.
    below = [t for t, ready in ready_over_time if ready < 1]
    assert below, "the kill was never seen"
    assert all(killed_at - 1 <= t <= ready_at + 1 for t in below), (killed_at, ready_at, below)
