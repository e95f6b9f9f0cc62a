"""The local cluster is real: the real scheduler places GPU pods, the real apiserver runs CEL."""

from __future__ import annotations

import ipaddress
import os
import signal
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.conftest import Cluster, wait_for
from ttsfleet import kube

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def deployment(name: str, replicas: int, resources: dict[str, str]) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "tolerations": [GPU_TOLERATION],
                    "containers": [
                        {
                            "name": "triton",
                            "image": "nvcr.io/nvidia/tritonserver:24.10-py3",
                            "resources": {"limits": resources},
                        }
                    ],
                },
            },
        },
    }


def pods(cluster: Cluster, namespace: str, app: str) -> list[Any]:
    items: list[Any] = (
        client.CoreV1Api(cluster.api)
        .list_namespaced_pod(namespace, label_selector=f"app={app}")
        .items
    )
    return items


def test_mig_pods_are_scheduled_onto_h100_nodes_and_run(cluster: Cluster, namespace: str) -> None:
    apps = client.AppsV1Api(cluster.api)
    apps.create_namespaced_deployment(
        namespace, deployment("joe", 3, {"nvidia.com/mig-1g.10gb": "1"})
    )

    def running() -> list[Any]:
        found = pods(cluster, namespace, "joe")
        return found if len(found) == 3 and all(p.status.phase == "Running" for p in found) else []

    for pod in wait_for("3 Running pods", running):
        node = client.CoreV1Api(cluster.api).read_node(pod.spec.node_name)
        assert node.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert node.metadata.labels["nvidia.com/mig.strategy"] == "mixed"


def test_whole_gpu_pods_land_on_l4_nodes(cluster: Cluster, namespace: str) -> None:
    client.AppsV1Api(cluster.api).create_namespaced_deployment(
        namespace, deployment("bulk", 1, {"nvidia.com/gpu": "2"})
    )
    pod = wait_for(
        "a Running pod",
        lambda: [p for p in pods(cluster, namespace, "bulk") if p.status.phase == "Running"],
    )[0]
    assert pod.spec.node_name.startswith("l4-")


def test_more_slices_than_exist_stay_pending_with_the_schedulers_reason(
    cluster: Cluster, namespace: str
) -> None:
    # An H100 node in the default pool has 8 GPUs x 2 = 16 slices of 1g.10gb.
    client.AppsV1Api(cluster.api).create_namespaced_deployment(
        namespace, deployment("greedy", 1, {"nvidia.com/mig-1g.10gb": "17"})
    )

    def unschedulable() -> str:
        for pod in pods(cluster, namespace, "greedy"):
            for condition in pod.status.conditions or []:
                if condition.type == "PodScheduled" and condition.reason == "Unschedulable":
                    return str(condition.message)
        return ""

    message = wait_for("the scheduler to give up on the pod", unschedulable)
    assert "Insufficient nvidia.com/mig-1g.10gb" in message
    assert all(p.status.phase == "Pending" for p in pods(cluster, namespace, "greedy"))


CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.test.ttsfleet.io"},
    "spec": {
        "group": "test.ttsfleet.io",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {
                                    "minReplicas": {"type": "integer"},
                                    "maxReplicas": {"type": "integer"},
                                },
                                "x-kubernetes-validations": [
                                    {
                                        "rule": "!has(self.minReplicas) || !has(self.maxReplicas)"
                                        " || self.minReplicas <= self.maxReplicas",
                                        "message": "spec.minReplicas must not exceed"
                                        " spec.maxReplicas: lower minReplicas or raise maxReplicas",
                                    }
                                ],
                            }
                        },
                    }
                },
            }
        ],
    },
}


@pytest.fixture
def widget_crd(cluster: Cluster) -> Any:
    ext = client.ApiextensionsV1Api(cluster.api)
    ext.create_custom_resource_definition(CRD)

    def established() -> bool:
        crd = ext.read_custom_resource_definition(CRD["metadata"]["name"])
        return any(
            c.type == "Established" and c.status == "True" for c in crd.status.conditions or []
        )

    wait_for("the CRD to be Established", established)
    yield
    ext.delete_custom_resource_definition(CRD["metadata"]["name"])


@pytest.mark.usefixtures("widget_crd")
def test_a_cel_rule_rejects_a_bad_object_through_the_apiserver(
    cluster: Cluster, namespace: str
) -> None:
    widgets = kube.dynamic_client(cluster.api).resources.get(
        api_version="test.ttsfleet.io/v1", kind="Widget"
    )

    def widget(name: str, low: int, high: int) -> dict[str, Any]:
        return {
            "apiVersion": "test.ttsfleet.io/v1",
            "kind": "Widget",
            "metadata": {"name": name},
            "spec": {"minReplicas": low, "maxReplicas": high},
        }

    widgets.create(body=widget("good", 1, 8), namespace=namespace)
    with pytest.raises(ApiException) as rejected:
        widgets.create(body=widget("bad", 9, 8), namespace=namespace)
    assert rejected.value.status == 422
    assert "spec.minReplicas must not exceed spec.maxReplicas" in str(rejected.value.body)


def test_local_nodes_are_run_by_the_local_runner_not_kwok(cluster: Cluster) -> None:
    core = client.CoreV1Api(cluster.api)
    node = core.read_node("local-0")
    assert "kwok.x-k8s.io/node" not in (node.metadata.annotations or {})
    assert node.metadata.labels["ttsfleet.io/local"] == "true"
    taints = {(t.key, t.effect) for t in node.spec.taints}
    assert ("ttsfleet.io/local", "NoSchedule") in taints
    # The runner heartbeats it: Ready, with its Lease, and an address in its podCIDR.
    node = wait_for(
        "the runner to make local-0 Ready",
        lambda: (
            (n := core.read_node("local-0"))
            and any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])
            and n
        ),
    )
    lease = client.CoordinationV1Api(cluster.api).read_namespaced_lease(
        "local-0", "kube-node-lease"
    )
    assert lease.spec.holder_identity == "local-0"
    internal = next(a.address for a in node.status.addresses if a.type == "InternalIP")
    assert ipaddress.ip_address(internal) in ipaddress.ip_network(node.spec.pod_cidr)


def test_simulated_gpu_nodes_carry_gfd_labels_and_a_pod_cidr(cluster: Cluster) -> None:
    node = client.CoreV1Api(cluster.api).read_node("h100-0")
    labels = node.metadata.labels
    assert labels["nvidia.com/mig-1g.10gb.count"] == "16"
    assert labels["nvidia.com/mig-3g.40gb.memory"] == str(40 * 1024)
    assert node.status.allocatable["nvidia.com/mig-2g.20gb"] == "8"
    assert node.spec.pod_cidr.startswith("10.")


# ---- the local runner restarts a pod's process as kubelet would (restartPolicy) ----------


def bare_pod(name: str, policy: str, args: list[str]) -> dict[str, Any]:
    """A Pod on the local node whose container the runner runs as the real tritonserver."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": policy,
            "terminationGracePeriodSeconds": 5,
            "nodeSelector": {"ttsfleet.io/local": "true"},
            "tolerations": [
                {"key": "ttsfleet.io/local", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "containers": [
                {
                    "name": "triton",
                    "image": "nvcr.io/nvidia/tritonserver:24.10-py3",
                    "command": ["tritonserver"],
                    "args": args,
                }
            ],
        },
    }


BAD_ARGS = ["--no-such-flag"]  # tritonserver prints its usage and exits 1 at once
# A server with no models: up in well under a second, exits 0 on SIGTERM.
GOOD_ARGS = ["--model-repository=/models", "--model-control-mode=explicit",
             "--exit-timeout-secs=2"]  # fmt: skip


def pod_status(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    pod = kube.get(cluster.api, "v1", "Pod", name, namespace)
    assert pod is not None, f"pod {namespace}/{name} is gone"
    status: dict[str, Any] = pod.get("status") or {}
    return status


def container(status: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = (status.get("containerStatuses") or [{}])[0]
    return found


def test_a_never_pod_that_exits_non_zero_fails_and_is_not_restarted(
    cluster: Cluster, namespace: str
) -> None:
    client.CoreV1Api(cluster.api).create_namespaced_pod(
        namespace, bare_pod("never", "Never", BAD_ARGS)
    )
    status = wait_for(
        "the pod Failed",
        lambda: (s := pod_status(cluster, namespace, "never")).get("phase") == "Failed" and s,
        timeout=60,
    )
    state = container(status)
    assert state["state"]["terminated"]["exitCode"] == 1
    assert state["state"]["terminated"]["reason"] == "Error"
    assert state["restartCount"] == 0 and state["ready"] is False
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready.get("reason")) == ("False", "PodCompleted")
    # The runner's own word that restarts were due since: a pod that fails the same
    # way under restartPolicy Always, started now, is restarted twice meanwhile.
    client.CoreV1Api(cluster.api).create_namespaced_pod(
        namespace, bare_pod("control", "Always", BAD_ARGS)
    )
    wait_for(
        "the Always pod restarted twice",
        lambda: container(pod_status(cluster, namespace, "control")).get("restartCount", 0) >= 2,
        timeout=60,
    )
    again = pod_status(cluster, namespace, "never")
    assert again["phase"] == "Failed" and container(again)["restartCount"] == 0


@pytest.mark.parametrize("policy", ["OnFailure", "Always"])
def test_a_pod_that_keeps_failing_is_restarted_in_crash_loop_back_off(
    cluster: Cluster, namespace: str, policy: str
) -> None:
    client.CoreV1Api(cluster.api).create_namespaced_pod(
        namespace, bare_pod("crashy", policy, BAD_ARGS)
    )

    def backing_off() -> dict[str, Any]:
        status = pod_status(cluster, namespace, "crashy")
        state = container(status)
        waiting = (state.get("state") or {}).get("waiting") or {}
        if state.get("restartCount", 0) >= 2 and waiting.get("reason") == "CrashLoopBackOff":
            return status
        return {}

    status = wait_for("restarts in CrashLoopBackOff", backing_off, timeout=60)
    state = container(status)
    assert status["phase"] == "Running"  # as kubelet: restarting, not finished
    assert "back-off" in state["state"]["waiting"]["message"]
    assert state["lastState"]["terminated"]["exitCode"] == 1
    assert state["lastState"]["terminated"]["reason"] == "Error"
    assert state["ready"] is False


def test_an_on_failure_pod_that_exits_zero_succeeds_and_is_not_restarted(
    cluster: Cluster, namespace: str
) -> None:
    pod = bare_pod("done", "OnFailure", GOOD_ARGS)
    # Ready once Triton answers: its SIGTERM handler is in place by then (a SIGTERM while
    # it is still starting kills it with the signal, a failure OnFailure restarts).
    pod["spec"]["containers"][0]["readinessProbe"] = {
        "httpGet": {"path": "/v2/health/live", "port": 8000}, "periodSeconds": 1,
    }  # fmt: skip
    client.CoreV1Api(cluster.api).create_namespaced_pod(namespace, pod)
    running = wait_for(
        "the server running and answering",
        lambda: (
            (s := pod_status(cluster, namespace, "done")).get("phase") == "Running"
            and "running" in (container(s).get("state") or {})
            and container(s).get("ready")
            and s
        ),
        timeout=60,
    )
    pid = int(container(running)["containerID"].rsplit("/", 1)[1])
    os.killpg(pid, signal.SIGTERM)  # tritonserver shuts down cleanly: exit 0
    status = wait_for(
        "the pod Succeeded",
        lambda: (s := pod_status(cluster, namespace, "done")).get("phase") == "Succeeded" and s,
        timeout=60,
    )
    state = container(status)
    assert state["state"]["terminated"]["exitCode"] == 0
    assert state["state"]["terminated"]["reason"] == "Completed"
    assert state["restartCount"] == 0
