"""Leader election's reads and writes against the real apiserver: two candidates, one
Lease, and the paths a leader rarely meets (a lost race, a release, a deleted Lease)."""

from __future__ import annotations

import time

import pytest
from kubernetes.client.exceptions import ApiException

from tests.conftest import Cluster, wait_for
from ttsfleet import kube
from ttsfleet.leader import Elector, Leadership, LeaseConfig


def candidate(cluster: Cluster, namespace: str, identity: str, duration: float = 2.5) -> Elector:
    config = LeaseConfig("lease", namespace, identity, duration, 1.5, 0.5)
    return Elector(kube.api_client(cluster.kubeconfig), config, Leadership(config.renew_deadline))


def spec(cluster: Cluster, namespace: str) -> dict[str, object]:
    lease = kube.read_lease(cluster.api, namespace, "lease", 5)
    assert lease is not None
    found: dict[str, object] = lease["spec"]
    return found


def test_one_candidate_holds_the_lease_and_the_other_waits(
    cluster: Cluster, namespace: str
) -> None:
    a, b = candidate(cluster, namespace, "a_1"), candidate(cluster, namespace, "b_1")
    assert a.try_acquire_or_renew() and a.leadership.held()
    assert not b.try_acquire_or_renew() and not b.leadership.held()
    assert b.holder == "a_1"
    written = spec(cluster, namespace)
    assert written["holderIdentity"] == "a_1" and written["leaseTransitions"] == 0
    assert written["leaseDurationSeconds"] == 3  # 2.5 s rounded up, never down
    assert a.try_acquire_or_renew()  # renewing keeps acquireTime and transitions
    assert spec(cluster, namespace)["acquireTime"] == written["acquireTime"]
    # The holder stops renewing: the other takes over once the record is a lease
    # duration old on its own clock, and the transition is counted.
    wait_for("b to take over", b.try_acquire_or_renew, timeout=10, every=0.5)
    assert spec(cluster, namespace)["holderIdentity"] == "b_1"
    assert spec(cluster, namespace)["leaseTransitions"] == 1
    assert not a.try_acquire_or_renew() and a.holder == "b_1"


def test_a_write_at_a_stale_version_loses_the_race(cluster: Cluster, namespace: str) -> None:
    a = candidate(cluster, namespace, "a_1")
    assert a.try_acquire_or_renew()
    lease = kube.read_lease(cluster.api, namespace, "lease", 5)
    assert lease is not None
    stale = lease["metadata"]["resourceVersion"]
    assert a.try_acquire_or_renew()  # the record moved on
    with pytest.raises(ApiException) as lost:
        kube.write_lease(cluster.api, namespace, "lease", {"holderIdentity": "b_1"}, stale, 5)
    assert lost.value.status == 409
    assert spec(cluster, namespace)["holderIdentity"] == "a_1"


def test_only_the_holder_releases_and_a_release_is_taken_at_once(
    cluster: Cluster, namespace: str
) -> None:
    a, b = candidate(cluster, namespace, "a_1"), candidate(cluster, namespace, "b_1", 60)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    assert not b.release()  # not its Lease: untouched
    assert spec(cluster, namespace)["holderIdentity"] == "a_1"
    assert a.release() and not a.leadership.held()
    assert not spec(cluster, namespace).get("holderIdentity")
    assert b.try_acquire_or_renew()  # no waiting for a 60 s lease to expire


def test_a_lease_deleted_by_hand_is_taken_only_after_a_lease_duration(
    cluster: Cluster, namespace: str
) -> None:
    """The old leader may still be acting on a Lease someone deleted: a candidate that
    had seen it waits a lease duration before creating it again."""
    a, b = candidate(cluster, namespace, "a_1"), candidate(cluster, namespace, "b_1")
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    kube.dynamic_client(cluster.api).resources.get(
        api_version="coordination.k8s.io/v1", kind="Lease"
    ).delete(name="lease", namespace=namespace)
    gone_at = time.monotonic()
    assert not b.try_acquire_or_renew()  # gone, but too recently
    wait_for("b to take the deleted Lease", b.try_acquire_or_renew, timeout=10, every=0.5)
    assert time.monotonic() - gone_at >= 2.5
    assert spec(cluster, namespace)["holderIdentity"] == "b_1"
    # A candidate that never saw one (a fresh install) creates it at once.
    fresh = candidate(cluster, namespace, "c_1")
    kube.dynamic_client(cluster.api).resources.get(
        api_version="coordination.k8s.io/v1", kind="Lease"
    ).delete(name="lease", namespace=namespace)
    assert fresh.try_acquire_or_renew()
