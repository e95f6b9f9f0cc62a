"""The operator against the real cluster: apply a TtsDeployment, get a Triton workload
with a status that tells the truth, and keep it so whatever happens to it."""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Cluster, Operator, ttsfleet, wait_for
from tests.helpers import EXAMPLES, REPO, load_example

pytestmark = pytest.mark.usefixtures("operator")


def apply(cluster: Cluster, namespace: str, doc: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))


def get(cluster: Cluster, namespace: str, kind: str, name: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(
        cluster.kubectl("get", "-n", namespace, kind, name, "-o", "json")
    )
    return out


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond["type"] == kind:
            return dict(cond)
    return {}


def wait_ready(cluster: Cluster, namespace: str, name: str, timeout: float = 90) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        obj = get(cluster, namespace, "ttsd", name)
        status = obj.get("status") or {}
        fresh = status.get("observedGeneration") == obj["metadata"]["generation"]
        return obj if fresh and condition(obj, "Ready").get("status") == "True" else None

    result: dict[str, Any] = wait_for(f"TtsDeployment {name} to be Ready", ready, timeout)
    return result


def children_versions(cluster: Cluster, namespace: str, name: str) -> dict[str, str]:
    out = json.loads(
        cluster.kubectl(
            "get",
            "-n",
            namespace,
            "deploy,svc,cm,pdb",
            "-l",
            f"ttsfleet.io/deployment={name}",
            "-o",
            "json",
        )
    )
    return {
        f"{i['kind']}/{i['metadata']['name']}": i["metadata"]["resourceVersion"]
        for i in out["items"]
    }


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_reaches_ready_on_the_simulated_gpu_nodes(
    cluster: Cluster, namespace: str, example: Path
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", str(example))
    name = load_example(example)["metadata"]["name"]
    obj = wait_ready(cluster, namespace, name)
    status = obj["status"]
    assert status["readyReplicas"] == status["desiredReplicas"] >= 1
    table = cluster.kubectl("get", "-n", namespace, "ttsd", name)
    assert table.split("\n")[0].split() == [
        "NAME",
        "READY",
        "REPLICAS",
        "PRECISION",
        "PLACEMENT",
        "AGE",
    ]
    assert table.split("\n")[1].split()[1] == "True"


def test_the_minimal_manifest_gets_a_truthful_status_and_a_triton_deployment(
    cluster: Cluster, namespace: str
) -> None:
    apply(cluster, namespace, load_example(REPO / "examples" / "joe-mig.yaml"))
    obj = wait_ready(cluster, namespace, "joe")
    status = obj["status"]
    assert status["precision"] == "fp16"
    assert status["placement"] == "mig-1g.10gb"
    assert status["selector"] == "ttsfleet.io/deployment=joe"
    assert status["endpoints"]["grpc"] == f"joe.{namespace}.svc:8001"
    assert obj["spec"]["replicas"] == 1  # defaulted to minReplicas through the scale subresource
    for kind in ("Ready", "Reconciling", "Stalled", "MetricsUnavailable", "CapacityExhausted"):
        assert condition(obj, kind)["reason"], kind
    assert condition(obj, "CapacityExhausted")["status"] == "False"
    pods = json.loads(
        cluster.kubectl(
            "get", "-n", namespace, "pods", "-l", "ttsfleet.io/deployment=joe", "-o", "json"
        )
    )["items"]
    assert len(pods) == 1 and pods[0]["spec"]["nodeName"].startswith("h100-")
    events = cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=joe"
    )
    assert "Applied" in events


def test_kubectl_scale_drives_the_deployment_and_reapplying_the_manifest_keeps_it(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    doc = load_example(REPO / "examples" / "joe-mig.yaml")
    apply(cluster, namespace, doc)
    wait_ready(cluster, namespace, "joe")
    cluster.kubectl("scale", "-n", namespace, "ttsd/joe", "--replicas=3")
    wait_for(
        "the Deployment to follow",
        lambda: get(cluster, namespace, "deploy", "joe")["spec"]["replicas"] == 3,
    )
    assert wait_ready(cluster, namespace, "joe")["status"]["readyReplicas"] == 3
    # A GitOps re-apply of the manifest (no spec.replicas in it) leaves the scale alone,
    # also after the operator has seen it.
    apply(cluster, namespace, doc)
    # The operator's own word that it has looked since: an event without a spec change
    # moves its reconcile counter, and the autoscaler decides on the fleet twice more.
    reconciles, ticks = reconciles_done(operator), autoscaler_ticks(operator)
    cluster.kubectl("annotate", "-n", namespace, "ttsd/joe", "reapplied=yes")
    wait_for("the operator to reconcile", lambda: reconciles_done(operator) > reconciles)
    wait_for("two autoscaler ticks", lambda: autoscaler_ticks(operator) >= ticks + 2)
    wait_ready(cluster, namespace, "joe")
    assert get(cluster, namespace, "ttsd", "joe")["spec"]["replicas"] == 3
    assert get(cluster, namespace, "deploy", "joe")["spec"]["replicas"] == 3


def reconciles_done(operator: Operator) -> float:
    """Reconciles the operator finished (every result)."""
    return operator.metric("ttsfleet_operator_reconciles_total") or 0.0


def autoscaler_ticks(operator: Operator) -> float:
    return operator.metric("ttsfleet_operator_autoscaler_ticks_total") or 0.0


def test_an_unchanged_reapply_changes_no_child(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    doc = load_example(REPO / "examples" / "joe-mig.yaml")
    apply(cluster, namespace, doc)
    wait_ready(cluster, namespace, "joe")
    before = children_versions(cluster, namespace, "joe")
    reconciles = reconciles_done(operator)
    apply(cluster, namespace, doc)
    # An event without a spec change:
    cluster.kubectl("annotate", "-n", namespace, "ttsd/joe", "touched=yes")
    # The operator did look again (its counter moved) and wrote nothing.
    wait_for("the operator to reconcile", lambda: reconciles_done(operator) > reconciles)
    wait_ready(cluster, namespace, "joe")
    assert children_versions(cluster, namespace, "joe") == before


def test_a_child_deleted_or_edited_by_hand_is_repaired(cluster: Cluster, namespace: str) -> None:
    apply(cluster, namespace, load_example(REPO / "examples" / "joe-mig.yaml"))
    wait_ready(cluster, namespace, "joe")
    cluster.kubectl("delete", "-n", namespace, "service", "joe")
    cluster.kubectl("delete", "-n", namespace, "configmap", "joe-triton")
    wait_for(
        "the Service back",
        lambda: "joe" in cluster.kubectl("get", "-n", namespace, "svc", "-o", "name"),
    )
    wait_for(
        "the ConfigMap back",
        lambda: "joe-triton" in cluster.kubectl("get", "-n", namespace, "cm", "-o", "name"),
    )
    cluster.kubectl("set", "image", "-n", namespace, "deploy/joe", "triton=someone/else:1")

    def image() -> str:
        dep = get(cluster, namespace, "deploy", "joe")
        return str(dep["spec"]["template"]["spec"]["containers"][0]["image"])

    wait_for("the image to be put back", lambda: image() == "ttsfleet/triton-tts:0.1.0")


def test_a_placement_the_operator_cannot_honour_is_stalled_with_an_event(
    cluster: Cluster, namespace: str
) -> None:
    doc = load_example(REPO / "examples" / "joe-mig.yaml")
    # The schema accepts it; the planner knows 500 streams do not fit in 10 GB.
    doc["spec"]["placement"] = {"mode": "mig", "profile": "1g.10gb", "streamsPerReplica": 500}
    apply(cluster, namespace, doc)

    def stalled() -> dict[str, Any]:
        return condition(get(cluster, namespace, "ttsd", "joe"), "Stalled")

    cond = wait_for("Stalled", lambda: stalled().get("status") == "True" and stalled())
    assert cond["reason"] == "PlacementUnavailable"
    assert "spec.placement.profile: mig-1g.10gb on " in cond["message"]
    assert "has 9.5 GiB but 500 streams" in cond["message"]
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", "type=Warning")
    assert "PlacementUnavailable" in events
    assert "joe" not in cluster.kubectl("get", "-n", namespace, "deploy", "-o", "name")
    # Fixing the spec clears it.
    doc["spec"]["placement"] = {"mode": "mig", "profile": "1g.10gb"}
    apply(cluster, namespace, doc)
    wait_ready(cluster, namespace, "joe")


def test_scaling_past_capacity_reports_capacity_exhausted(cluster: Cluster, namespace: str) -> None:
    doc = load_example(REPO / "examples" / "joe-mig.yaml")
    # Two simulated H100 nodes hold 16 slices of 3g.40gb in all.
    doc["spec"]["placement"] = {"mode": "mig", "profile": "3g.40gb"}
    doc["spec"]["replicas"] = 20
    doc["spec"]["maxReplicas"] = 20
    apply(cluster, namespace, doc)

    def exhausted() -> dict[str, Any]:
        cond = condition(get(cluster, namespace, "ttsd", "joe"), "CapacityExhausted")
        return cond if cond.get("status") == "True" else {}

    cond = wait_for("CapacityExhausted", exhausted, timeout=90)
    assert cond["reason"] == "InsufficientCapacity"
    assert re.match(
        r"no capacity for \d+ replicas of mig-3g\.40gb: 2 nodes have 16,", cond["message"]
    )
    assert "Insufficient nvidia.com/mig-3g.40gb" in cond["message"]  # the scheduler's words
    ready = condition(get(cluster, namespace, "ttsd", "joe"), "Ready")
    assert ready["status"] == "False" and ready["reason"] == "WaitingForCapacity"


def test_an_operator_killed_mid_reconcile_converges_on_restart(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    doc = load_example(REPO / "examples" / "joe-mig.yaml")
    apply(cluster, namespace, doc)
    operator.kill()
    try:
        # Changed while the operator is down, with a child lost too.
        doc["spec"]["model"]["precision"] = "fp32"
        apply(cluster, namespace, doc)
        cluster.kubectl("delete", "-n", namespace, "pdb", "joe", "--ignore-not-found")
    finally:
        operator.start()
    obj = wait_ready(cluster, namespace, "joe")
    assert obj["status"]["precision"] == "fp32"
    config = get(cluster, namespace, "cm", "joe-triton")["data"]["config.pbtxt"]
    assert 'string_value: "fp32"' in config
    wait_for(
        "the PodDisruptionBudget back",
        lambda: "joe" in cluster.kubectl("get", "-n", namespace, "pdb", "-o", "name"),
    )
    kinds = sorted(children_versions(cluster, namespace, "joe"))
    assert kinds == [
        "ConfigMap/joe-triton",
        "Deployment/joe",
        "PodDisruptionBudget/joe",
        "Service/joe",
    ]


def test_the_operator_serves_metrics_and_health(operator: Operator) -> None:
    assert operator.healthy() and operator.ready()
    assert operator.leading()  # alone, it holds the Lease
    with urllib.request.urlopen(
        f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5
    ) as r:
        text = r.read().decode()
    assert 'ttsfleet_operator_reconciles_total{result="ok"}' in text
    assert "ttsfleet_operator_reconcile_duration_seconds_bucket" in text


def test_a_metrics_port_in_use_is_a_one_line_error(cluster: Cluster) -> None:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = ttsfleet(
            "operator", "--kubeconfig", str(cluster.kubeconfig), "--metrics-port", str(port)
        )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: cannot serve metrics on port {port} (Address already in use): "
        "pick another --metrics-port"
    ]


def test_no_finalizers_so_deleting_while_the_operator_is_down_completes(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    doc = load_example(REPO / "examples" / "joe-mig.yaml")
    doc["spec"]["placement"] = {"mode": "mig", "profile": "3g.40gb"}
    doc["spec"]["replicas"] = doc["spec"]["maxReplicas"] = 20  # never Ready: rechecked
    apply(cluster, namespace, doc)
    wait_for(
        "a status",
        lambda: condition(get(cluster, namespace, "ttsd", "joe"), "CapacityExhausted"),
    )
    assert not get(cluster, namespace, "ttsd", "joe")["metadata"].get("finalizers")
    operator.kill()
    try:
        cluster.kubectl("delete", "-n", namespace, "ttsd/joe", "--timeout=30s")
    finally:
        operator.start()
    assert "joe" not in cluster.kubectl("get", "-n", namespace, "ttsd", "-o", "name")


def test_a_child_that_cannot_be_applied_is_a_warning_event(
    cluster: Cluster, namespace: str
) -> None:
    # An immutable ConfigMap in the way: the apply of the model config must fail.
    cluster.kubectl(
        "create", "configmap", "joe-triton", "-n", namespace, "--from-literal=config.pbtxt=x"
    )
    cluster.kubectl(
        "patch", "configmap", "joe-triton", "-n", namespace, "-p", '{"immutable": true}'
    )
    apply(cluster, namespace, load_example(REPO / "examples" / "joe-mig.yaml"))

    def warned() -> str:
        return cluster.kubectl(
            "get", "events", "-n", namespace, "--field-selector", "reason=ApplyFailed"
        )

    events = wait_for("an ApplyFailed event", lambda: "ApplyFailed" in warned() and warned())
    assert "immutable" in events
    assert condition(get(cluster, namespace, "ttsd", "joe"), "Ready").get("status") != "True"
    # The obstacle removed: no event reaches the operator (that ConfigMap is not one of its
    # children), yet its own re-check applies the failed object again and it converges.
    cluster.kubectl("delete", "configmap", "joe-triton", "-n", namespace)
    wait_ready(cluster, namespace, "joe")
    config = get(cluster, namespace, "cm", "joe-triton")
    assert config["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "ttsfleet"
