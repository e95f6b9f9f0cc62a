"""The tts-operator chart, rendered by the real helm binary: lint, schema, and what it makes.

No cluster: `helm template` renders against a stated Kubernetes version.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import REPO
from ttsfleet.api.v1alpha1 import TtsDeploymentSpec
from ttsfleet.autoscale import metrics
from ttsfleet.cluster import prometheus, toolchain
from ttsfleet.resources import TtsObject, build_children
from ttsfleet.resources import gateway as gateway_resources
from ttsfleet.triton import contract

CHART = REPO / "charts" / "tts-operator"
# This helm is built from its Go module without the ldflags that stamp its default
# Kubernetes version (it would assume v1.20, below the chart's kubeVersion).
KUBE_VERSION = toolchain.kubernetes_version()
Manifest = dict[str, Any]


def _helm_built() -> bool:
    try:
        toolchain.binary("helm")
    except toolchain.MissingToolError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _helm_built(), reason="helm is not built: run `make tools`")


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(toolchain.binary("helm")), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def render(*sets: str, namespace: str = "ttsfleet-system") -> list[Manifest]:
    """The objects `helm template` makes (CRDs included) with `--set` of each of `sets`."""
    args = ["template", "tts", str(CHART), "-n", namespace, "--kube-version", KUBE_VERSION]
    args += ["--include-crds"]
    for value in sets:
        args += ["--set", value]
    result = helm(*args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def refusal(*sets: str) -> str:
    """What `helm template` says when it refuses `sets` (it must refuse them)."""
    args = ["template", "tts", str(CHART), "--kube-version", KUBE_VERSION]
    for value in sets:
        args += ["--set", value]
    result = helm(*args)
    assert result.returncode != 0, f"helm accepted {sets}"
    return result.stderr


def one(objects: list[Manifest], kind: str) -> Manifest:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


@pytest.fixture(scope="module")
def objects() -> list[Manifest]:
    return render()


def operator_container(objects: list[Manifest]) -> Manifest:
    containers = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    container: Manifest = containers[0]
    return container


@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
def test_the_chart_lints(strict: bool) -> None:
    result = helm("lint", str(CHART), "--kube-version", KUBE_VERSION, *(["--strict"] * strict))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "tts-operator"
    assert chart["version"] == chart["appVersion"] == "0.1.0"
    assert chart["kubeVersion"] == ">=1.30.0-0"


def by_name(objects: list[Manifest], kind: str, name: str) -> Manifest | None:
    return next((o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name), None)


def test_the_leader_fence_is_bound_to_the_charts_lease_and_off_without_election() -> None:
    objects = render("leaderElection.leaseName=my-lease")
    policy = by_name(objects, "ValidatingAdmissionPolicy", "tts-tts-operator-leader-fence")
    binding = by_name(objects, "ValidatingAdmissionPolicyBinding", "tts-tts-operator-leader-fence")
    assert policy is not None and binding is not None
    assert policy["spec"]["paramKind"] == {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease"}
    # Only the operator's own ServiceAccount is fenced, and not on its Lease.
    (condition,) = policy["spec"]["matchConditions"]
    assert "system:serviceaccount:ttsfleet-system:tts-tts-operator" in condition["expression"]
    resources = {r for rule in policy["spec"]["matchConstraints"]["resourceRules"]
                 for r in rule["resources"]}  # fmt: skip
    assert {"ttsdeployments/status", "ttsdeployments/scale", "deployments", "configmaps",
            "services", "poddisruptionbudgets", "pods", "events"} <= resources  # fmt: skip
    assert not any("lease" in r for r in resources)
    assert binding["spec"]["paramRef"] == {
        "name": "my-lease", "namespace": "ttsfleet-system", "parameterNotFoundAction": "Allow",
    }  # fmt: skip
    standalone = render("leaderElection.enabled=false", "replicaCount=1")
    assert by_name(standalone, "ValidatingAdmissionPolicy", "tts-tts-operator-leader-fence") is None
    assert by_name(standalone, "ValidatingAdmissionPolicy", "tts-tts-operator-pod-writes")


def test_it_renders_the_crd_and_one_object_of_each_kind(objects: list[Manifest]) -> None:
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == [
        "ClusterRole",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "CustomResourceDefinition",
        "CustomResourceDefinition",
        "Deployment",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "ValidatingAdmissionPolicyBinding",
    ]
    crds = {o["metadata"]["name"]: o for o in objects if o["kind"] == "CustomResourceDefinition"}
    for plural in ("ttsdeployments", "ttsgateways", "ttsregions"):
        shipped = (REPO / "crds" / f"ttsfleet.io_{plural}.yaml").read_text()
        assert crds[f"{plural}.ttsfleet.io"] == yaml.safe_load(shipped)
    for obj in objects:
        if obj["kind"] != "CustomResourceDefinition":
            labels = obj["metadata"]["labels"]
            assert labels["app.kubernetes.io/instance"] == "tts"
            assert labels["app.kubernetes.io/managed-by"] == "Helm"


def test_the_operator_runs_the_cli_command_in_cluster(objects: list[Manifest]) -> None:
    container = operator_container(objects)
    assert container["command"] == [
        "ttsfleet", "operator", "--metrics-port", "8080", "--health-port", "8081",
        "--gateway-node-reader", "tts-tts-operator-gateway-node-reader",
        "--leader-election-id", "ttsfleet-operator",
        "--lease-duration", "15", "--renew-deadline", "10", "--retry-period", "2",
    ]  # fmt: skip
    assert "args" not in container
    assert not any("kubeconfig" in arg for arg in container["command"])
    assert container["image"] == "ttsfleet/operator:0.1.0"
    assert container["imagePullPolicy"] == "IfNotPresent"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}


def test_the_liveness_probe_is_kopfs_healthz(objects: list[Manifest]) -> None:
    probe = operator_container(objects)["livenessProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": "health"}
    assert probe["periodSeconds"] > 0


def test_the_readiness_probe_is_readyz_with_timings_from_values(objects: list[Manifest]) -> None:
    probe = operator_container(objects)["readinessProbe"]
    assert probe == {
        "httpGet": {"path": "/readyz", "port": "health"},
        "initialDelaySeconds": 5,
        "periodSeconds": 10,
        "timeoutSeconds": 5,
        "failureThreshold": 3,
    }
    changed = operator_container(render("readinessProbe.periodSeconds=3"))["readinessProbe"]
    assert changed["periodSeconds"] == 3
    assert changed["httpGet"] == {"path": "/readyz", "port": "health"}


def test_the_pod_meets_the_restricted_pod_security_standard(objects: list[Manifest]) -> None:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = operator_container(objects)
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsNonRoot"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in security and "hostNetwork" not in pod
    # A read-only root needs a writable /tmp (the API client's discovery cache).
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert any(v["name"] == "tmp" and "emptyDir" in v for v in pod["volumes"])


def test_resources_come_from_values(objects: list[Manifest]) -> None:
    assert operator_container(objects)["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"memory": "300Mi"},
    }
    changed = operator_container(render("resources.limits.memory=1Gi"))["resources"]
    assert changed["limits"] == {"memory": "1Gi"}


def test_no_cpu_limit_by_default_and_one_when_set(objects: list[Manifest]) -> None:
    """No CPU limit unless asked (CFS would throttle reconcile bursts); values.yaml says so."""
    assert "cpu" not in operator_container(objects)["resources"]["limits"]
    limited = operator_container(render("resources.limits.cpu=500m"))["resources"]
    assert limited["limits"] == {"cpu": "500m", "memory": "300Mi"}
    assert limited["requests"] == {"cpu": "100m", "memory": "128Mi"}
    values = (CHART / "values.yaml").read_text()
    assert "No CPU limit by default" in values


def test_two_replicas_elect_a_leader_and_roll(objects: list[Manifest]) -> None:
    """Two pods, a leader and a standby: an update starts a new pod before it stops one."""
    spec = one(objects, "Deployment")["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    assert one(render("replicaCount=0"), "Deployment")["spec"]["replicas"] == 0
    assert one(render("replicaCount=3"), "Deployment")["spec"]["replicas"] == 3
    env = {e["name"]: e for e in operator_container(objects)["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_leader_election_values_reach_the_command() -> None:
    command = operator_container(
        render(
            "leaderElection.leaseName=my-lease",
            "leaderElection.leaseDuration=30",
            "leaderElection.renewDeadline=20",
            "leaderElection.retryPeriod=4",
        )
    )["command"]
    assert command[8:] == [
        "--leader-election-id", "my-lease",
        "--lease-duration", "30", "--renew-deadline", "20", "--retry-period", "4",
    ]  # fmt: skip


def test_without_leader_election_one_pod_is_recreated_never_two_side_by_side() -> None:
    objects = render("leaderElection.enabled=false", "replicaCount=1")
    spec = one(objects, "Deployment")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    command = spec["template"]["spec"]["containers"][0]["command"]
    assert command[8:] == ["--no-leader-election"]
    assert not {o["kind"] for o in objects} & {"Role", "RoleBinding", "PodDisruptionBudget"}
    # The default replicaCount, 2, needs leader election: the chart says so and how to fix it.
    message = refusal("leaderElection.enabled=false")
    assert "replicaCount is 2 but leaderElection.enabled is false" in message
    assert "Set replicaCount to 0 or 1, or set leaderElection.enabled=true" in message


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ["leaderElection.renewDeadline=15"],
            "leaderElection.renewDeadline (15) must be below leaderElection.leaseDuration (15)",
        ),
        (
            ["leaderElection.leaseDuration=8"],
            "leaderElection.renewDeadline (10) must be below leaderElection.leaseDuration (8)",
        ),
        (
            ["leaderElection.retryPeriod=10"],
            "leaderElection.retryPeriod (10) must be below leaderElection.renewDeadline (10)",
        ),
    ],
)
def test_leader_election_timings_must_nest(sets: list[str], message: str) -> None:
    """JSON schema cannot compare two values: the chart fails with the names and the fix."""
    refused = refusal(*sets)
    assert message in refused
    assert "lower" in refused and "raise" in refused


def test_the_lease_role_is_namespaced_and_narrow(objects: list[Manifest]) -> None:
    role = one(objects, "Role")
    assert role["metadata"]["namespace"] == "ttsfleet-system"
    assert role["metadata"]["name"] == "tts-tts-operator-leader-election"
    assert role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["ttsfleet-operator"],
            "verbs": ["get", "update"],
        },
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    ]
    binding = one(objects, "RoleBinding")
    assert binding["metadata"]["namespace"] == "ttsfleet-system"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    sa = one(objects, "ServiceAccount")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa, "namespace": "ttsfleet-system"}
    ]
    renamed = one(render("leaderElection.leaseName=other"), "Role")
    assert renamed["rules"][0]["resourceNames"] == ["other"]
    template = (CHART / "templates" / "operator-role.yaml").read_text()
    assert "create cannot be narrowed by resourceNames" in template


def test_a_budget_keeps_a_drain_from_taking_both_pods(objects: list[Manifest]) -> None:
    pdb = one(objects, "PodDisruptionBudget")
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # One pod (or none): no budget, which would block every drain of its node.
    for sets in (["replicaCount=1"], ["replicaCount=0"], ["podDisruptionBudget.enabled=false"]):
        assert not [o for o in render(*sets) if o["kind"] == "PodDisruptionBudget"], sets


def test_the_pods_prefer_different_nodes_unless_affinity_is_set(objects: list[Manifest]) -> None:
    pod = one(objects, "Deployment")["spec"]["template"]
    (term,) = pod["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    selector = term["podAffinityTerm"]["labelSelector"]["matchLabels"]
    assert selector == one(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    mine = one(render("affinity.nodeAffinity.x=y"), "Deployment")
    assert mine["spec"]["template"]["spec"]["affinity"] == {"nodeAffinity": {"x": "y"}}


def test_the_image_follows_its_values() -> None:
    container = operator_container(render("image.repository=reg.example/op", "image.tag=dev"))
    assert container["image"] == "reg.example/op:dev"
    digest = "sha256:" + "a" * 64
    assert operator_container(render(f"image.digest={digest}"))["image"] == (
        f"ttsfleet/operator@{digest}"
    )


def test_the_service_account_is_wired_into_the_pod_and_the_binding(
    objects: list[Manifest],
) -> None:
    sa = one(objects, "ServiceAccount")
    assert sa["metadata"]["namespace"] == "ttsfleet-system"
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is True
    binding = one(objects, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "ttsfleet-system"}
    ]
    role = by_name(objects, "ClusterRole", "tts-tts-operator")
    assert role is not None
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }


def test_an_existing_service_account_can_be_named() -> None:
    objects = render("serviceAccount.create=false", "serviceAccount.name=mine")
    assert not [o for o in objects if o["kind"] == "ServiceAccount"]
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "mine"
    assert one(objects, "ClusterRoleBinding")["subjects"][0]["name"] == "mine"
    result = helm(
        "template", "tts", str(CHART), "--kube-version", KUBE_VERSION,
        "--set", "serviceAccount.create=false",
    )  # fmt: skip
    assert result.returncode != 0
    assert "serviceAccount.name is required" in result.stderr


def test_the_service_selects_the_operator_pod_on_the_metrics_port(
    objects: list[Manifest],
) -> None:
    service = one(objects, "Service")
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]


def test_the_service_monitor_exists_only_when_enabled(objects: list[Manifest]) -> None:
    assert not [o for o in objects if o["kind"] == "ServiceMonitor"]
    enabled = render("serviceMonitor.enabled=true", "serviceMonitor.labels.release=prom")
    monitor = one(enabled, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        one(enabled, "Service")["metadata"]["labels"].items()
    )


def test_rbac_is_least_privilege(objects: list[Manifest]) -> None:
    operator_role = by_name(objects, "ClusterRole", "tts-tts-operator")
    assert operator_role is not None
    rules = operator_role["rules"]
    for rule in rules:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        assert not {
            "deletecollection",
            "update",
            "escalate",
            "bind",
            "impersonate",
        } & set(rule["verbs"]), rule
        # The one delete: a gateway's ClusterRoleBinding, which nothing else collects.
        assert "delete" not in rule["verbs"] or rule["resources"] == ["clusterrolebindings"]
        # Secrets: created (a gateway's ticket key), never read or changed.
        assert "secrets" not in rule["resources"] or rule["verbs"] == ["create"], rule
        assert "nonResourceURLs" not in rule
        # Named: the node-reader ClusterRole is the only one the operator may change.
        assert "resourceNames" not in rule or rule["resourceNames"] == [
            "tts-tts-operator-gateway-node-reader"
        ]
    granted = {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    for needed in [
        ("ttsfleet.io", "ttsdeployments", "watch"),
        ("ttsfleet.io", "ttsdeployments/status", "patch"),
        ("ttsfleet.io", "ttsdeployments/scale", "patch"),
        ("apps", "deployments", "patch"),
        ("", "services", "patch"),
        ("", "configmaps", "patch"),
        ("policy", "poddisruptionbudgets", "patch"),
        ("", "pods", "list"),
        ("", "pods", "patch"),
        ("", "events", "create"),
        ("", "nodes", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
        ("ttsfleet.io", "ttsgateways", "watch"),
        ("ttsfleet.io", "ttsgateways/status", "patch"),
        ("", "serviceaccounts", "patch"),
        ("", "secrets", "create"),
        ("discovery.k8s.io", "endpointslices", "watch"),
        ("rbac.authorization.k8s.io", "roles", "patch"),
        ("rbac.authorization.k8s.io", "rolebindings", "patch"),
        ("rbac.authorization.k8s.io", "clusterrolebindings", "delete"),
    ]:
        assert needed in granted, needed
    # Pods are only listed (nothing watches them) and patched (their deletion cost), CRDs
    # only watched (kopf's scanning), TtsDeployments only read: status and scale are the
    # operator's only writes to them.
    assert {v for g, r, v in granted if r == "pods"} == {"list", "patch"}
    assert {v for g, r, v in granted if r == "customresourcedefinitions"} == {"list", "watch"}
    assert {v for g, r, v in granted if r == "nodes"} == {"get", "list"}
    assert {v for g, r, v in granted if r == "ttsdeployments"} == {"get", "list", "watch"}


def test_the_operator_queries_the_prometheus_it_is_given() -> None:
    def command(*sets: str) -> list[str]:
        deployment = one(render(*sets), "Deployment")
        return list(deployment["spec"]["template"]["spec"]["containers"][0]["command"])

    assert "--prometheus-url" not in command()
    given = command("prometheus.url=http://prometheus-operated.monitoring:9090")
    assert given[-2:] == ["--prometheus-url", "http://prometheus-operated.monitoring:9090"]


def egress_ports(rule: Manifest) -> set[tuple[int, str]]:
    return {(p["port"], p["protocol"]) for p in rule["ports"]}


def test_network_policies_are_off_by_default(objects: list[Manifest]) -> None:
    assert not [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert not [o for o in render("agent.enabled=true") if o["kind"] == "NetworkPolicy"]


def test_the_operator_policy_lets_in_its_ports_and_out_what_it_needs() -> None:
    objects = render("networkPolicy.enabled=true")
    policy = one(objects, "NetworkPolicy")
    spec = policy["spec"]
    assert policy["metadata"]["namespace"] == "ttsfleet-system"
    assert spec["podSelector"] == one(objects, "Deployment")["spec"]["selector"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    # In: /metrics from any pod of the cluster; the health port from no pod (the
    # kubelet's probes are not subject to NetworkPolicy on most CNIs).
    assert spec["ingress"] == [
        {"ports": [{"port": 8080, "protocol": "TCP"}], "from": [{"namespaceSelector": {}}]}
    ]
    # Out: DNS, the apiserver (any address by default: it has no pod labels to select),
    # Triton's metrics on the fleets' pods; no Prometheus without prometheus.url.
    dns, api, triton = spec["egress"]
    assert egress_ports(dns) == {(53, "UDP"), (53, "TCP")}
    assert dns["to"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ]
    assert egress_ports(api) == {(443, "TCP"), (6443, "TCP")}
    assert "to" not in api
    assert egress_ports(triton) == {(contract.METRICS_PORT, "TCP")}
    assert triton["to"] == [
        {
            "namespaceSelector": {},
            "podSelector": {
                "matchExpressions": [{"key": "ttsfleet.io/deployment", "operator": "Exists"}]
            },
        }
    ]


def test_the_operator_policy_follows_its_values() -> None:
    spec = one(
        render(
            "networkPolicy.enabled=true",
            "prometheus.url=http://prometheus-operated.monitoring:9090",
            "networkPolicy.apiServer.cidrs={10.0.0.1/32,10.0.0.2/32}",
            "networkPolicy.apiServer.ports={6443}",
            "networkPolicy.operator.metricsFrom=null",
            "networkPolicy.operator.healthFrom[0].ipBlock.cidr=10.1.0.0/16",
            "networkPolicy.operator.prometheus.to[0].namespaceSelector.matchLabels.name=monitoring",
            "networkPolicy.operator.prometheus.port=9091",
            "networkPolicy.operator.extraEgress[0].to[0].ipBlock.cidr=203.0.113.0/24",
            "networkPolicy.operator.extraEgress[0].ports[0].port=443",
        ),
        "NetworkPolicy",
    )["spec"]
    # An empty peer list opens nothing (no rule open to all).
    assert spec["ingress"] == [
        {
            "ports": [{"port": 8081, "protocol": "TCP"}],
            "from": [{"ipBlock": {"cidr": "10.1.0.0/16"}}],
        }
    ]
    _, api, prometheus_rule, _, extra = spec["egress"]
    assert api == {
        "ports": [{"port": 6443, "protocol": "TCP"}],
        "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}, {"ipBlock": {"cidr": "10.0.0.2/32"}}],
    }
    assert prometheus_rule == {
        "ports": [{"port": 9091, "protocol": "TCP"}],
        "to": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
    }
    assert extra == {"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}], "ports": [{"port": 443}]}


def test_the_triton_pod_monitor_labels_samples_as_the_autoscaler_queries_them(
    objects: list[Manifest],
) -> None:
    """The PodMonitor must give Triton's samples the labels the operator groups by, as
    the local cluster's scrape config (the one the e2e autoscaling tests run) does."""
    assert not [o for o in objects if o["kind"] == "PodMonitor"]
    monitor = one(render("prometheus.podMonitor.enabled=true"), "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    assert monitor["spec"]["selector"]["matchExpressions"] == [
        {"key": "ttsfleet.io/deployment", "operator": "Exists"}
    ]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["interval"] == "5s"
    # The Triton container's metrics port, by the name the operator gives it.
    cpu = TtsDeploymentSpec.model_validate({"placement": {"mode": "cpu"}})
    children = build_children(TtsObject("joe", "voices", "uid", cpu))
    triton = one(children, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert endpoint["port"] in {port["name"] for port in triton["ports"]}
    assert {port["name"]: port["containerPort"] for port in triton["ports"]}[
        endpoint["port"]
    ] == contract.METRICS_PORT
    # The same relabelling as the local Prometheus, and labels the queries group by.
    relabel = {(r["sourceLabels"][0], r["targetLabel"]) for r in endpoint["relabelings"]}
    local_config = prometheus.config(Path("kubeconfig"))["scrape_configs"][0]
    local = {
        (r["source_labels"][0], r["target_label"])
        for r in local_config["relabel_configs"]
        if "target_label" in r
    }
    assert relabel == local
    assert {target for _, target in relabel} == {"namespace", "deployment", "pod"}
    assert all("sum by (namespace, deployment" in query for query in metrics.QUERIES.values())


def test_rbac_can_be_left_out() -> None:
    kinds = {o["kind"] for o in render("rbac.create=false")}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def test_only_the_pods_that_use_a_token_mount_one() -> None:
    """The ServiceAccounts mount no token by default; the operator and the agent pods,
    which talk to the API, ask for theirs; nothing else of the chart runs a pod."""
    objects = render("agent.enabled=true", "networkPolicy.enabled=true")
    accounts = [o for o in objects if o["kind"] == "ServiceAccount"]
    assert len(accounts) == 2
    for account in accounts:
        assert account["automountServiceAccountToken"] is False, account["metadata"]["name"]
    pod_templates = {
        o["kind"]: o["spec"]["template"]["spec"] for o in objects if "template" in o.get("spec", {})
    }
    assert set(pod_templates) == {"Deployment", "DaemonSet"}
    for pod in pod_templates.values():
        assert pod["automountServiceAccountToken"] is True
    assert not [o for o in objects if o["kind"] in {"Pod", "Job", "CronJob", "StatefulSet"}]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("replicaCount=two", "at '/replicaCount': got string, want integer"),
        ("replicaCount=-1", "at '/replicaCount': minimum: got -1, want 0"),
        ("replicaCunt=1", "additional properties 'replicaCunt' not allowed"),
        ("image.pullPolicy=Sometimes", "at '/image/pullPolicy'"),
        ("serviceMonitor.enabled=yes", "at '/serviceMonitor/enabled': got string, want boolean"),
        ("service.port=0", "at '/service/port'"),
        ("prometheus.podMonitor.interval=30s", "at '/prometheus/podMonitor/interval'"),
        ("prometheus.url=prometheus:9090", "at '/prometheus/url'"),
        ("leaderElection.enabled=yes", "at '/leaderElection/enabled': got string, want boolean"),
        ("leaderElection.leaseName=Not_A_Name", "at '/leaderElection/leaseName'"),
        ("leaderElection.leaseDuration=0", "at '/leaderElection/leaseDuration'"),
        ("leaderElection.retryPeriod=0", "at '/leaderElection/retryPeriod'"),
        ("leaderElection.leaseDuration=15s", "at '/leaderElection/leaseDuration'"),
        ("readinessProbe.periodSeconds=0", "at '/readinessProbe/periodSeconds'"),
        ("readinessProbe.path=/x", "additional properties 'path' not allowed"),
        ("podDisruptionBudget.maxUnavailable=0", "at '/podDisruptionBudget/maxUnavailable'"),
        ("networkPolicy.enabled=yes", "at '/networkPolicy/enabled'"),
        ("networkPolicy.apiServer.cidrs={10.0.0.1}", "at '/networkPolicy/apiServer/cidrs/0'"),
        ("networkPolicy.apiServer.ports={0}", "at '/networkPolicy/apiServer/ports/0'"),
        (
            "networkPolicy.operator.tritonMetricsPort=70000",
            "at '/networkPolicy/operator/tritonMetricsPort'",
        ),
        ("networkPolicy.operator.metricsFrom[0].namespaceSelectr.a=b", "namespaceSelectr"),
    ],
)
def test_the_schema_rejects_wrong_values_with_a_message(value: str, message: str) -> None:
    result = helm("template", "tts", str(CHART), "--kube-version", KUBE_VERSION, "--set", value)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr


def test_the_schema_types_every_default_value() -> None:
    """Every key of values.yaml is declared in the schema, with a type (nested ones too)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False

    def resolve(node: Manifest) -> Manifest:
        ref = node.get("$ref")
        if ref is None:
            return node
        resolved: Manifest = schema["definitions"][ref.rsplit("/", 1)[-1]]
        return resolved

    def check(value: Any, node: Manifest, where: str) -> None:
        node = resolve(node)
        assert "type" in node, f"{where} has no type"
        if isinstance(value, dict):
            for key, child in value.items():
                declared = node.get("properties", {}).get(key) or node.get("additionalProperties")
                assert isinstance(declared, dict), f"{where}.{key} is not in the schema"
                check(child, declared, f"{where}.{key}")

    check(values, schema, "values")


def test_the_readme_documents_the_crd_policy() -> None:
    readme = (CHART / "README.md").read_text()
    assert "kubectl apply --server-side -f charts/tts-operator/crds/" in readme
    assert "never upgrades or\ndeletes it" in readme


def test_helpers_are_prefixed_and_commented() -> None:
    text = (CHART / "templates" / "_helpers.tpl").read_text()
    lines = text.splitlines()
    defines = [i for i, line in enumerate(lines) if line.startswith('{{- define "')]
    assert defines
    for i in defines:
        name = lines[i].split('"')[1]
        assert name.startswith("tts-operator."), name
        assert lines[i - 1].strip() == "*/}}", f"{name} has no comment above it"


def test_templates_are_named_component_kind() -> None:
    names = sorted(p.name for p in (CHART / "templates").iterdir())
    assert names == [
        "NOTES.txt",
        "_helpers.tpl",
        "agent-clusterrole.yaml",
        "agent-clusterrolebinding.yaml",
        "agent-daemonset.yaml",
        "agent-networkpolicy.yaml",
        "agent-serviceaccount.yaml",
        "agent-validatingadmissionpolicy.yaml",
        "agent-validatingadmissionpolicybinding.yaml",
        "gateway-clusterrole.yaml",
        "operator-clusterrole.yaml",
        "operator-clusterrolebinding.yaml",
        "operator-deployment.yaml",
        "operator-networkpolicy.yaml",
        "operator-poddisruptionbudget.yaml",
        "operator-role.yaml",
        "operator-rolebinding.yaml",
        "operator-service.yaml",
        "operator-serviceaccount.yaml",
        "operator-servicemonitor.yaml",
        "operator-validatingadmissionpolicy.yaml",
        "operator-validatingadmissionpolicybinding.yaml",
        "triton-podmonitor.yaml",
    ]


def test_gateways_get_a_node_reader_role_that_matches_the_operators() -> None:
    """The chart ships the ClusterRole the operator binds gateways to (it may patch it
    but not create it): the same rules the operator applies."""
    objects = render()
    shipped = by_name(objects, "ClusterRole", "tts-tts-operator-gateway-node-reader")
    assert shipped is not None
    assert shipped["rules"] == gateway_resources.node_reader_role()["rules"]
    command = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["command"]
    flag = command.index("--gateway-node-reader")
    assert command[flag + 1] == shipped["metadata"]["name"]
