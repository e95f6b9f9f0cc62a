"""The node agent's part of the tts-operator chart, rendered by the real helm binary."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.test_chart import CHART, KUBE_VERSION, _helm_built, helm, one, render

pytestmark = pytest.mark.skipif(not _helm_built(), reason="helm is not built: run `make tools`")
Manifest = dict[str, Any]
AGENT_KINDS = {
    "DaemonSet",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}


def agent_objects(*sets: str) -> list[Manifest]:
    objects = render("agent.enabled=true", *sets)
    return [
        o
        for o in objects
        if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "agent"
    ]


def agent_container(objects: list[Manifest]) -> Manifest:
    containers = one(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["agent"]
    container: Manifest = containers[0]
    return container


@pytest.fixture(scope="module")
def objects() -> list[Manifest]:
    return agent_objects()


def test_the_agent_is_off_by_default() -> None:
    names = [o["metadata"]["name"] for o in render()]
    assert not [n for n in names if n.endswith("-agent")]


def test_enabled_it_makes_a_daemonset_its_service_account_and_rbac(
    objects: list[Manifest],
) -> None:
    assert sorted(o["kind"] for o in objects) == sorted(AGENT_KINDS)
    for obj in objects:
        assert obj["metadata"]["name"] == "tts-tts-operator-agent"
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "tts"
    result = helm(
        "lint",
        str(CHART),
        "--strict",
        "--kube-version",
        KUBE_VERSION,
        "--set",
        "agent.enabled=true",
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_agent_runs_the_cli_command_on_its_own_node(objects: list[Manifest]) -> None:
    container = agent_container(objects)
    assert container["command"] == [
        "ttsfleet", "agent", "--interval", "30", "--metrics-port", "9402",
    ]  # fmt: skip
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"]["value"] == "utility"
    assert container["ports"] == [{"name": "metrics", "containerPort": 9402, "protocol": "TCP"}]
    # It serves nothing but its metrics: both probes ask for them.
    assert container["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert container["image"] == "ttsfleet/operator:0.1.0"
    # It reads the GPUs without allocating one.
    for section in container["resources"].values():
        assert not [r for r in section if r.startswith("nvidia.com/")]


def test_it_runs_on_gpu_nodes_and_tolerates_their_taint(objects: list[Manifest]) -> None:
    pod = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert "runtimeClassName" not in pod
    changed = one(agent_objects("agent.runtimeClassName=nvidia"), "DaemonSet")
    assert changed["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"


def test_the_pod_is_restricted_and_unprivileged(objects: list[Manifest]) -> None:
    pod = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "hostNetwork" not in pod and "hostPID" not in pod
    security = agent_container(objects)["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in security
    assert not [v for v in pod["volumes"] if "hostPath" in v]


def test_the_selector_is_the_agents_not_the_operators(objects: list[Manifest]) -> None:
    selector = one(objects, "DaemonSet")["spec"]["selector"]["matchLabels"]
    assert selector["app.kubernetes.io/component"] == "agent"
    operator = one(render("agent.enabled=true"), "Deployment")
    assert operator["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"


def test_rbac_is_get_and_patch_on_nodes_only(objects: list[Manifest]) -> None:
    role = one(objects, "ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]
    binding = one(objects, "ClusterRoleBinding")
    sa = one(objects, "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "ttsfleet-system"}
    ]
    pod = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert not {o["kind"] for o in agent_objects("rbac.create=false")} & {
        "ClusterRole",
        "ClusterRoleBinding",
    }


def test_values_reach_the_daemonset() -> None:
    objects = agent_objects(
        "agent.interval=10",
        "agent.metricsPort=9500",
        "agent.image.repository=reg.example/agent",
        "agent.image.tag=dev",
        "agent.serviceAccount.create=false",
        "agent.serviceAccount.name=mine",
    )
    container = agent_container(objects)
    assert container["command"][2:] == ["--interval", "10", "--metrics-port", "9500"]
    assert container["ports"][0]["containerPort"] == 9500
    assert container["image"] == "reg.example/agent:dev"
    assert not [o for o in objects if o["kind"] == "ServiceAccount"]
    assert one(objects, "ClusterRoleBinding")["subjects"][0]["name"] == "mine"
    digest = "sha256:" + "b" * 64
    pinned = agent_container(agent_objects(f"agent.image.digest={digest}"))
    assert pinned["image"] == f"ttsfleet/operator@{digest}"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("agent.enabled=yes", "at '/agent/enabled': got string, want boolean"),
        ("agent.interval=0", "at '/agent/interval'"),
        ("agent.metricsPort=70000", "at '/agent/metricsPort'"),
        ("agent.imagePullPolicy=Always", "additional properties 'imagePullPolicy' not allowed"),
        ("agent.readinessProbe.periodSeconds=0", "at '/agent/readinessProbe/periodSeconds'"),
        ("networkPolicy.agent.metricsFrom=all", "at '/networkPolicy/agent/metricsFrom'"),
    ],
)
def test_the_schema_rejects_wrong_agent_values(value: str, message: str) -> None:
    result = helm("template", "tts", str(CHART), "--kube-version", KUBE_VERSION, "--set", value)
    assert result.returncode != 0
    assert message in result.stderr


def test_probe_timings_and_a_cpu_limit_come_from_values(objects: list[Manifest]) -> None:
    container = agent_container(objects)
    assert container["livenessProbe"]["periodSeconds"] == 30
    assert container["readinessProbe"]["periodSeconds"] == 10
    assert "cpu" not in container["resources"]["limits"]
    changed = agent_container(
        agent_objects(
            "agent.readinessProbe.periodSeconds=5",
            "agent.livenessProbe.failureThreshold=6",
            "agent.resources.limits.cpu=100m",
        )
    )
    assert changed["readinessProbe"]["periodSeconds"] == 5
    assert changed["livenessProbe"]["failureThreshold"] == 6
    assert changed["resources"]["limits"] == {"cpu": "100m", "memory": "160Mi"}


def test_the_agent_policy_lets_in_its_metrics_and_out_dns_and_the_api() -> None:
    objects = agent_objects("networkPolicy.enabled=true", "agent.metricsPort=9500")
    policy = one(objects, "NetworkPolicy")
    spec = policy["spec"]
    assert policy["metadata"]["name"] == "tts-tts-operator-agent"
    assert spec["podSelector"] == one(objects, "DaemonSet")["spec"]["selector"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["ingress"] == [
        {"ports": [{"port": 9500, "protocol": "TCP"}], "from": [{"namespaceSelector": {}}]}
    ]
    dns, api = spec["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert {p["port"] for p in api["ports"]} == {443, 6443}
    assert not [
        o for o in agent_objects("networkPolicy.enabled=false") if o["kind"] == "NetworkPolicy"
    ]
