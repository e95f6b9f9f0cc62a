"""The Controller against the real apiserver: what one holds, another does not."""

from __future__ import annotations

import copy

import pytest
import yaml

from tests.conftest import Cluster
from tests.helpers import REPO, load_example
from ttsfleet import kube
from ttsfleet.controller import Controller, OperatorMetrics

pytestmark = pytest.mark.usefixtures("crd")


def reconciles(metrics: OperatorMetrics, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "ttsfleet_operator_reconciles_total", {"result": result}
    )
    return value or 0.0


def test_two_controllers_in_one_process_share_no_state(cluster: Cluster, namespace: str) -> None:
    doc = load_example(REPO / "examples" / "joe-mig.yaml")
    # Never Ready (20 replicas of a slice the cluster has 16 of): looked at again.
    waiting = copy.deepcopy(doc)
    waiting["metadata"]["name"] = "waiting"
    waiting["spec"]["placement"] = {"mode": "mig", "profile": "3g.40gb"}
    waiting["spec"]["replicas"] = waiting["spec"]["maxReplicas"] = 20
    # No node holds it: planned again.
    unplaced = copy.deepcopy(doc)
    unplaced["metadata"]["name"] = "unplaced"
    unplaced["spec"]["model"]["precision"] = "fp32"
    unplaced["spec"]["placement"] = {"mode": "auto", "streamsPerReplica": 1000}
    for obj in (waiting, unplaced):
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(obj))

    a = Controller(kube.api_client(cluster.kubeconfig), OperatorMetrics())
    b = Controller(kube.api_client(cluster.kubeconfig), OperatorMetrics())
    a.reconcile(namespace, "waiting", apply=True)
    a.reconcile(namespace, "unplaced", apply=True)
    a.autoscaler.tick()

    assert (namespace, "waiting") in a.not_ready
    assert (namespace, "unplaced") in a.unplaced
    assert (namespace, "waiting") in a.autoscaler.conditions  # MetricsUnavailable said
    assert a.nodes.nodes(a.api)  # listed once, cached
    # (The tick's status writes reconcile each fleet once more.)
    assert reconciles(a.metrics, "ok") >= 1 and reconciles(a.metrics, "stalled") >= 1
    # The other controller saw none of it.
    assert not b.not_ready and not b.unplaced and not b.failed and not b.locks
    assert not b.autoscaler.conditions and not b.autoscaler.autoscaler.states
    assert reconciles(b.metrics, "ok") == 0 and reconciles(b.metrics, "stalled") == 0
    assert b.metrics.registry is not a.metrics.registry
    assert b.nodes is not a.nodes and b.autoscaler is not a.autoscaler
    # What one forgets, the other never knew; what it keeps is its own.
    b.forget((namespace, "waiting"))
    assert (namespace, "waiting") in a.not_ready
