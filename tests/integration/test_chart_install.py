"""The tts-operator chart against the real cluster: install, upgrade, uninstall, and RBAC
that is enough for the operator and no more.

The chart installs the CRD itself (from its crds/ directory) when it is missing; the
session's `crd` fixture may have installed it first, in which case Helm skips it. Either
way the CRD stays after `helm uninstall`, as the chart documents (other tests need it).
The simulated nodes run no containers, so the operator's Deployment is installed with
`replicaCount=0` (or with pods that no node takes); the operator runs here as a process
with the chart's ServiceAccount token instead. No CNI runs here either: the
NetworkPolicies are checked for what the apiserver accepts, not enforced.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.conftest import Cluster, Operator, wait_for
from tests.helpers import REPO, load_example
from ttsfleet import harness, kube
from ttsfleet.cluster import local, toolchain

CHART = REPO / "charts" / "tts-operator"
CRD = "customresourcedefinition/ttsdeployments.ttsfleet.io"
# The Lease the chart's operator pods elect a leader through (the chart's default).
LEASE = yaml.safe_load((CHART / "values.yaml").read_text())["leaderElection"]["leaseName"]


def run_helm(cluster: Cluster, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run helm against the test cluster, with its own config and cache under `home`."""
    return harness.run_helm(cluster.kubeconfig, home, *args)


def helm(cluster: Cluster, home: Path, *args: str) -> str:
    """helm's standard output; fails the test when helm fails."""
    return harness.helm(cluster.kubeconfig, home, *args)


def exists(cluster: Cluster, *what: str) -> bool:
    out = cluster.kubectl("get", *what, "--ignore-not-found", "-o", "name")
    return bool(out.strip())


def crd_established(cluster: Cluster) -> bool:
    cluster.wait_established(CRD)
    return True


def release_objects(cluster: Cluster, release: str, namespace: str) -> set[str]:
    """Everything labelled as the release's: namespaced in `namespace`, and cluster-wide."""
    selector = f"app.kubernetes.io/instance={release}"
    namespaced = cluster.kubectl(
        "get", "-n", namespace, "deploy,daemonset,sa,svc,role,rolebinding,pdb,networkpolicy",
        "-l", selector, "-o", "name",
    )  # fmt: skip
    clusterwide = cluster.kubectl(
        "get", "clusterrole,clusterrolebinding", "-l", selector, "-o", "name"
    )
    return set((namespaced + clusterwide).split())


def install(cluster: Cluster, home: Path, release: str, namespace: str, *sets: str) -> str:
    args = ["install", release, str(CHART), "-n", namespace, "--set", "replicaCount=0"]
    for value in sets:
        args += ["--set", value]
    out = helm(cluster, home, *args)
    crd_established(cluster)
    return out


def test_install_upgrade_uninstall_keeps_the_crd(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    release = f"tts-{uuid.uuid4().hex[:6]}"
    name = f"{release}-tts-operator"
    crd_before = exists(cluster, CRD)
    out = install(cluster, tmp_path, release, namespace)
    if not crd_before:  # installed from the chart's crds/ (else Helm skipped it)
        crd = json.loads(cluster.kubectl("get", CRD, "-o", "json", "--show-managed-fields"))
        assert "helm" in {f["manager"] for f in crd["metadata"]["managedFields"]}
    # NOTES tell how to upgrade the CRD, which Helm never does.
    assert "kubectl apply --server-side -f charts/tts-operator/crds/" in out
    try:
        assert release_objects(cluster, release, namespace) == {
            f"deployment.apps/{name}",
            f"serviceaccount/{name}",
            f"service/{name}",
            f"clusterrole.rbac.authorization.k8s.io/{name}",
            f"clusterrole.rbac.authorization.k8s.io/{name}-gateway-node-reader",
            f"clusterrolebinding.rbac.authorization.k8s.io/{name}",
            f"role.rbac.authorization.k8s.io/{name}-leader-election",
            f"rolebinding.rbac.authorization.k8s.io/{name}-leader-election",
        }
        deployment = json.loads(
            cluster.kubectl("get", "-n", namespace, "deploy", name, "-o", "json")
        )
        assert deployment["spec"]["replicas"] == 0
        pod = deployment["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == name
        # The apiserver accepted the restricted pod spec as rendered.
        assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True

        helm(
            cluster, tmp_path, "upgrade", release, str(CHART), "-n", namespace,
            "--reuse-values", "--set", "podAnnotations.ttsfleet\\.io/upgraded=yes",
        )  # fmt: skip
        deployment = json.loads(
            cluster.kubectl("get", "-n", namespace, "deploy", name, "-o", "json")
        )
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["ttsfleet.io/upgraded"] == "yes"
        assert deployment["spec"]["replicas"] == 0  # --reuse-values kept it
        # The schema, and the chart where the schema cannot compare values, stop a value
        # the operator cannot run with before the cluster sees it.
        refused = run_helm(
            cluster, tmp_path, "upgrade", release, str(CHART), "-n", namespace,
            "--set", "replicaCount=-1",
        )  # fmt: skip
        assert refused.returncode != 0
        assert "at '/replicaCount': minimum: got -1, want 0" in refused.stderr
        refused = run_helm(
            cluster, tmp_path, "upgrade", release, str(CHART), "-n", namespace,
            "--set", "leaderElection.enabled=false",
        )  # fmt: skip
        assert refused.returncode != 0
        assert "replicaCount is 2 but leaderElection.enabled is false" in refused.stderr
        history = json.loads(
            helm(cluster, tmp_path, "history", release, "-n", namespace, "-o", "json")
        )
        assert [h["revision"] for h in history] == [1, 2]
    finally:
        helm(cluster, tmp_path, "uninstall", release, "-n", namespace, "--wait", "--timeout", "60s")
    wait_for(
        "the release's objects to go",
        lambda: not release_objects(cluster, release, namespace),
        timeout=60,
    )
    # The CRD stays: Helm never deletes what it installed from crds/.
    assert exists(cluster, CRD)
    crd_established(cluster)


def kept(rendered: Any, live: Any, where: str = "") -> None:
    """Every field the chart rendered is in the live object, with the same value: the
    apiserver accepted it as is (it may add defaults; it dropped nothing)."""
    if isinstance(rendered, dict):
        assert isinstance(live, dict), where
        for key, value in rendered.items():
            assert key in live, f"{where}.{key} was dropped"
            kept(value, live[key], f"{where}.{key}")
    elif isinstance(rendered, list):
        assert isinstance(live, list) and len(live) == len(rendered), where
        for i, (mine, theirs) in enumerate(zip(rendered, live, strict=True)):
            kept(mine, theirs, f"{where}[{i}]")
    else:
        assert rendered == live, f"{where}: {rendered!r} became {live!r}"


def test_the_budget_policies_and_lease_rbac_are_accepted_by_the_apiserver(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    """Two operator pods (that no node takes), the agent, and every NetworkPolicy rule the
    values can make, installed: the apiserver validates each object and keeps it whole.
    Nothing enforces the policies here (no CNI); this checks that they are valid."""
    release = f"tts-{uuid.uuid4().hex[:6]}"
    name = f"{release}-tts-operator"
    nowhere = "ttsfleet\\.io/chart-test=nowhere"
    install(
        cluster, tmp_path, release, namespace,
        "replicaCount=2",
        f"nodeSelector.{nowhere}",
        "agent.enabled=true",
        f"agent.nodeSelector.{nowhere}",
        "networkPolicy.enabled=true",
        "prometheus.url=http://prometheus-operated.monitoring:9090",
        "networkPolicy.apiServer.cidrs={10.0.0.1/32,fd00::1/128}",
        "networkPolicy.operator.healthFrom[0].ipBlock.cidr=10.1.0.0/16",
        "networkPolicy.operator.extraEgress[0].to[0].ipBlock.cidr=203.0.113.0/24",
        "networkPolicy.operator.extraEgress[0].ports[0].port=443",
    )  # fmt: skip
    try:
        manifest = helm(cluster, tmp_path, "get", "manifest", release, "-n", namespace)
        rendered = [doc for doc in yaml.safe_load_all(manifest) if doc]
        kinds = {
            "PodDisruptionBudget", "NetworkPolicy", "Role", "RoleBinding", "ServiceAccount",
            "Deployment", "DaemonSet",
        }  # fmt: skip
        checked = [o for o in rendered if o["kind"] in kinds]
        assert sorted(o["kind"] for o in checked) == sorted(
            [*kinds, "NetworkPolicy", "ServiceAccount"]
        )
        for obj in checked:
            what = f"{obj['kind'].lower()}/{obj['metadata']['name']}"
            live = json.loads(cluster.kubectl("get", "-n", namespace, what, "-o", "json"))
            kept(obj.get("spec"), live.get("spec"), f"{what} spec")
            kept(obj.get("rules"), live.get("rules"), f"{what} rules")
            kept(
                obj.get("automountServiceAccountToken"),
                live.get("automountServiceAccountToken"),
                f"{what} automountServiceAccountToken",
            )

        def budget_counts_both_pods() -> bool:
            """The disruption controller finds the budget's pods (pending here)."""
            pdb = json.loads(cluster.kubectl("get", "-n", namespace, "pdb", name, "-o", "json"))
            return bool(pdb.get("status", {}).get("expectedPods") == 2)

        wait_for("the budget to count the operator's pods", budget_counts_both_pods, timeout=60)
    finally:
        helm(cluster, tmp_path, "uninstall", release, "-n", namespace, "--wait", "--timeout", "60s")


@dataclass
class Installed:
    release: str
    namespace: str
    service_account: str
    kubeconfig: Path  # the cluster's server and CA, the ServiceAccount's token

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


@pytest.fixture(scope="module")
def installed(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """The chart installed in a namespace of its own, and a kubeconfig of its ServiceAccount."""
    home = tmp_path_factory.mktemp("helm")
    namespace = f"op-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", namespace)
    release = f"tts-{uuid.uuid4().hex[:6]}"
    try:
        install(cluster, home, release, namespace)
        sa = f"{release}-tts-operator"
        token = cluster.kubectl("create", "token", sa, "-n", namespace, "--duration=1h").strip()
        kubeconfig = harness.token_kubeconfig(
            cluster.kubeconfig, token, home / "operator.kubeconfig"
        )
        yield Installed(release, namespace, sa, kubeconfig)
    finally:
        run_helm(cluster, home, "uninstall", release, "-n", namespace)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")
    assert exists(cluster, CRD)


def can_i(cluster: Cluster, installed: Installed, *args: str) -> bool:
    out = cluster.kubectl("auth", "can-i", f"--as={installed.user}", *args, check=False)
    return out.strip() == "yes"


@pytest.mark.parametrize(
    "args",
    [
        ("patch", "ttsdeployments.ttsfleet.io", "--subresource=status"),
        ("patch", "ttsdeployments.ttsfleet.io", "--subresource=scale"),
        ("watch", "ttsdeployments.ttsfleet.io"),
        ("patch", "deployments.apps"),
        ("create", "deployments.apps"),
        ("get", "deployments.apps"),
        ("patch", "services"),
        ("patch", "configmaps"),
        ("patch", "poddisruptionbudgets.policy"),
        ("patch", "networkpolicies.networking.k8s.io"),
        ("watch", "networkpolicies.networking.k8s.io"),
        ("list", "pods"),
        ("patch", "pods"),
        ("create", "events"),
        ("list", "nodes"),
        ("watch", "customresourcedefinitions.apiextensions.k8s.io"),
        ("watch", "ttsgateways.ttsfleet.io"),
        ("patch", "ttsgateways.ttsfleet.io", "--subresource=status"),
        ("create", "serviceaccounts"),
        ("create", "secrets"),
        ("create", "rolebindings.rbac.authorization.k8s.io"),
        ("delete", "clusterrolebindings.rbac.authorization.k8s.io"),
    ],
    ids=" ".join,
)
def test_the_service_account_may_do_what_the_operator_does(
    cluster: Cluster, installed: Installed, namespace: str, args: tuple[str, ...]
) -> None:
    assert can_i(cluster, installed, *args, "-n", namespace)


def test_the_service_account_may_patch_only_its_gateways_node_reader_role(
    cluster: Cluster, installed: Installed
) -> None:
    roles = "clusterroles.rbac.authorization.k8s.io"
    assert can_i(
        cluster, installed, "patch", f"{roles}/{installed.release}-tts-operator-gateway-node-reader"
    )
    assert not can_i(cluster, installed, "patch", f"{roles}/cluster-admin")
    assert not can_i(cluster, installed, "create", roles)


def test_the_service_account_may_hold_only_its_lease_in_the_release_namespace(
    cluster: Cluster, installed: Installed, namespace: str
) -> None:
    """Leader election's Role: get and update on the chart's Lease, create on Leases
    (RBAC cannot narrow a create by name), in the release namespace only."""
    here = ("-n", installed.namespace)
    lease = f"leases.coordination.k8s.io/{LEASE}"
    assert can_i(cluster, installed, "get", lease, *here)
    assert can_i(cluster, installed, "update", lease, *here)
    assert can_i(cluster, installed, "create", "leases.coordination.k8s.io", *here)
    for args in [
        ("get", "leases.coordination.k8s.io/another", *here),
        ("update", "leases.coordination.k8s.io/another", *here),
        ("delete", lease, *here),
        ("patch", lease, *here),
        ("list", "leases.coordination.k8s.io", *here),
        ("watch", "leases.coordination.k8s.io", *here),
        ("get", lease, "-n", namespace),
        ("create", "leases.coordination.k8s.io", "-n", namespace),
        ("update", lease, "-n", "kube-system"),
    ]:
        assert not can_i(cluster, installed, *args), args


@pytest.mark.parametrize(
    "args",
    [
        ("delete", "deployments.apps"),
        ("update", "deployments.apps"),
        ("delete", "ttsdeployments.ttsfleet.io"),
        ("update", "ttsdeployments.ttsfleet.io"),
        ("patch", "ttsdeployments.ttsfleet.io"),
        ("create", "ttsdeployments.ttsfleet.io"),
        ("get", "secrets"),
        ("list", "secrets"),
        ("create", "pods"),
        ("delete", "pods"),
        ("update", "pods"),
        ("watch", "pods"),
        ("patch", "pods", "--subresource=status"),
        ("patch", "nodes"),
        ("create", "customresourcedefinitions.apiextensions.k8s.io"),
        ("create", "clusterroles.rbac.authorization.k8s.io"),
        ("patch", "clusterroles.rbac.authorization.k8s.io/cluster-admin"),
        ("delete", "clusterroles.rbac.authorization.k8s.io"),
        ("escalate", "clusterroles.rbac.authorization.k8s.io"),
        ("bind", "clusterroles.rbac.authorization.k8s.io"),
        ("delete", "namespaces"),
        ("*", "*"),
    ],
    ids=" ".join,
)
def test_the_service_account_may_do_nothing_more(
    cluster: Cluster, installed: Installed, namespace: str, args: tuple[str, ...]
) -> None:
    assert not can_i(cluster, installed, *args, "-n", namespace)


def test_server_side_apply_creates_children_with_the_service_accounts_token(
    cluster: Cluster, installed: Installed, namespace: str
) -> None:
    """What the reconciler does to a child, done with kubectl and the same credentials."""
    as_operator = Cluster(cluster.name, installed.kubeconfig, cluster.api)
    for value in ("1", "2"):  # created through apply, then changed through apply
        configmap = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "rbac-check", "namespace": namespace},
            "data": {"a": value},
        }
        as_operator.kubectl(
            "apply", "--server-side", "--field-manager=ttsfleet", "-f", "-",
            input=json.dumps(configmap),
        )  # fmt: skip
    live = json.loads(cluster.kubectl("get", "-n", namespace, "cm", "rbac-check", "-o", "json"))
    assert live["data"] == {"a": "2"}
    refused = subprocess.run(
        [str(toolchain.binary("kubectl")), "--kubeconfig", str(installed.kubeconfig),
         "delete", "-n", namespace, "cm", "rbac-check"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "Forbidden" in refused.stderr and "cannot delete" in refused.stderr
    assert exists(cluster, "-n", namespace, "cm", "rbac-check")


def test_the_service_account_sets_a_pods_deletion_cost_and_nothing_else(
    cluster: Cluster, installed: Installed, namespace: str
) -> None:
    """The autoscaler's only pod write (`kube.annotate_pod`, a merge patch that reads
    nothing first), with the ServiceAccount's token."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "drain-check", "namespace": namespace},
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/none"}]},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
    as_operator = kube.api_client(installed.kubeconfig)
    cost = "controller.kubernetes.io/pod-deletion-cost"
    assert kube.annotate_pod(as_operator, namespace, "drain-check", {cost: "3"})
    live = json.loads(cluster.kubectl("get", "-n", namespace, "pod", "drain-check", "-o", "json"))
    assert live["metadata"]["annotations"][cost] == "3"
    with pytest.raises(ApiException) as refused:
        client.CoreV1Api(as_operator).delete_namespaced_pod("drain-check", namespace)
    assert refused.value.status == 403
    # RBAC allows any pod patch; the chart's admission policy only that annotation. It
    # takes a moment to be enforced: each try is a new value (one let through changes
    # only that).
    tries = iter(range(1000))
    for field in ("labels", "annotations"):

        def denied(field: str = field) -> str:
            change = {field: {"example.com/probe": str(next(tries))}}
            try:
                client.CoreV1Api(as_operator).patch_namespaced_pod(
                    "drain-check", namespace, {"metadata": change},
                    _content_type="application/merge-patch+json",
                )  # fmt: skip
            except ApiException as err:
                return str(err.body) if err.status == 403 else ""
            return ""

        message = wait_for(f"the policy to refuse a change of {field}", denied, timeout=60)
        assert "ValidatingAdmissionPolicy" in message and "pod-writes" in message
    assert kube.annotate_pod(as_operator, namespace, "drain-check", {cost: "5"})


def test_the_operator_runs_with_the_service_accounts_token(
    cluster: Cluster, installed: Installed, namespace: str, tmp_path: Path
) -> None:
    """The operator, with only the chart's RBAC, leads through the chart's Lease and
    brings a TtsDeployment to Ready.

    Another operator (the e2e suite's, with admin credentials) may serve the same object
    in this session: this one's own /metrics must count successful reconciles, and its
    log must show no request refused.
    """
    log = tmp_path / "operator.log"
    # As in a pod: a token bound to the operator's pod, and an identity that starts with
    # the pod's name (the chart's leader fence admits the holder's pod's writes only).
    pod, kubeconfig = harness.pod_kubeconfig(
        cluster.kubeconfig, installed.namespace, installed.service_account,
        f"operator-{uuid.uuid4().hex[:6]}", tmp_path / "operator.kubeconfig",
    )  # fmt: skip
    identity = f"{pod['metadata']['name']}_1"
    operator = Operator(
        kubeconfig, log, local.free_port(), local.free_port(), identity=identity,
        extra_args=["--leader-election-namespace", installed.namespace,
                    "--leader-election-id", LEASE, "--gateway-node-reader",
                    f"{installed.release}-tts-operator-gateway-node-reader"],
    )  # fmt: skip
    # Placement mode auto (the planner lists the nodes) and the autoscaler's floors.
    doc = load_example(REPO / "examples" / "contact-centre.yaml")
    name = doc["metadata"]["name"]

    def refused() -> list[str]:
        """RBAC denials of the operator's ServiceAccount (not, say, a namespace that
        another test is deleting, which the apiserver also answers with 403)."""
        text = log.read_text() if log.exists() else ""
        return [
            line
            for line in text.splitlines()
            if 'forbidden: User "' in line
            or "cannot get path" in line
            or "not enough permissions" in line.lower()
        ]

    def ready() -> bool:
        lines = refused()
        assert not lines, "\n".join(lines[:5])
        obj = json.loads(cluster.kubectl("get", "-n", namespace, "ttsd", name, "-o", "json"))
        status = obj.get("status") or {}
        fresh = status.get("observedGeneration") == obj["metadata"]["generation"]
        conditions = {c["type"]: c["status"] for c in status.get("conditions") or []}
        ok = operator.metric("ttsfleet_operator_reconciles_total", result="ok") or 0
        return fresh and conditions.get("Ready") == "True" and ok > 0

    operator.start()
    try:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))
        wait_for(f"{name} to be Ready, reconciled by this operator", ready, timeout=120)
        for kind in (f"deploy/{name}", f"svc/{name}", f"cm/{name}-triton", f"pdb/{name}"):
            assert exists(cluster, "-n", namespace, kind), kind
        # It reconciled as the leader: it holds the chart's Lease, in the release namespace.
        lease = json.loads(
            cluster.kubectl("get", "-n", installed.namespace, "lease", LEASE, "-o", "json")
        )
        assert lease["spec"]["holderIdentity"] == identity
        assert operator.leading()
        # A gateway in front of it: the operator grants the gateway's ServiceAccount its
        # Role and node-reader binding with no more than the chart gave the operator.
        gateway = {
            "apiVersion": "ttsfleet.io/v1alpha1", "kind": "TtsGateway",
            "metadata": {"name": "front"},
            "spec": {"replicas": 1, "routes": [{"models": ["tts-1"], "fleet": name}]},
        }  # fmt: skip
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(gateway))

        def gateway_ready() -> bool:
            assert not refused(), "\n".join(refused()[:5])
            obj = json.loads(
                cluster.kubectl("get", "-n", namespace, "ttsgw", "front", "-o", "json")
            )
            conditions = (obj.get("status") or {}).get("conditions") or []
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        wait_for("the TtsGateway to be Ready", gateway_ready, timeout=120)
        binding = f"clusterrolebinding/ttsfleet-gateway-{namespace}-front"
        for kind in ("sa/front-gateway", "role/front-gateway", "rolebinding/front-gateway"):
            assert exists(cluster, "-n", namespace, kind), kind
        assert exists(cluster, binding)
        cluster.kubectl("delete", "-n", namespace, "ttsgw", "front")
        wait_for("the gateway's binding to go", lambda: not exists(cluster, binding), 60)
        # Deleted while the operator runs: whatever kopf keeps on the object, it lets go.
        cluster.kubectl("delete", "-n", namespace, "ttsd", name, "--wait=false")
        wait_for(
            f"{name} to be deleted", lambda: not exists(cluster, "-n", namespace, "ttsd", name), 60
        )
    finally:
        operator.stop()
    assert not refused(), "\n".join(refused()[:5])
