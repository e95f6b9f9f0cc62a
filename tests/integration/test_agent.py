"""`ttsfleet agent` against the real apiserver: a replayed H100 inventory published on a
simulated H100 node, with the chart's agent RBAC (nodes get + patch) and nothing more.

NVIDIA's `nvidia.com/` labels, which the cluster's node pools set as GPU Feature
Discovery would, must come out unchanged.
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

from tests.conftest import Cluster, ttsfleet, wait_for
from tests.helpers import REPO
from ttsfleet import harness, kube
from ttsfleet.agent import inventory
from ttsfleet.cluster import toolchain

CHART = REPO / "charts" / "tts-operator"
H100 = REPO / "tests" / "data" / "nvml" / "h100-mig-all-balanced.json"
AGENT_TEMPLATES = [
    "agent-serviceaccount",
    "agent-clusterrole",
    "agent-clusterrolebinding",
    "agent-validatingadmissionpolicy",
    "agent-validatingadmissionpolicybinding",
]

pytestmark = pytest.mark.cluster


@dataclass
class AgentIdentity:
    namespace: str
    service_account: str
    kubeconfig: Path
    node: str  # where its pod runs: the node its pod-bound token names

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


@pytest.fixture
def agent_identity(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[AgentIdentity]:
    """The chart's agent ServiceAccount, RBAC and admission policy, applied; a kubeconfig
    with the token of an agent pod on an H100 node, as the kubelet would give it."""
    release = f"ag-{uuid.uuid4().hex[:6]}"
    args = ["template", release, str(CHART), "-n", namespace, "--set", "agent.enabled=true"]
    args += ["--kube-version", toolchain.kubernetes_version()]
    for name in AGENT_TEMPLATES:
        args += ["--show-only", f"templates/{name}.yaml"]
    rendered = subprocess.run(
        [str(toolchain.binary("helm")), *args],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=rendered)
    sa = f"{release}-tts-operator-agent"
    node = h100_node(cluster)["metadata"]["name"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": sa, "namespace": namespace},
        "spec": {
            "serviceAccountName": sa,
            "nodeName": node,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "agent", "image": "ttsfleet/operator:0.1.0"}],
        },
    }
    try:
        cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
        token = cluster.kubectl(
            "create", "token", sa, "-n", namespace, "--duration=1h",
            "--bound-object-kind=Pod", f"--bound-object-name={sa}",
        ).strip()  # fmt: skip
        kubeconfig = harness.token_kubeconfig(
            cluster.kubeconfig, token, tmp_path / "agent.kubeconfig"
        )
        yield AgentIdentity(namespace, sa, kubeconfig, node)
    finally:
        cluster.kubectl(
            "delete", "clusterrole,clusterrolebinding,validatingadmissionpolicy,"
            "validatingadmissionpolicybinding", sa, "--ignore-not-found",
        )  # fmt: skip


def h100_node(cluster: Cluster) -> dict[str, Any]:
    for node in kube.list_nodes(cluster.api):
        if "H100" in node["metadata"].get("labels", {}).get("nvidia.com/gpu.product", ""):
            return node
    raise AssertionError("the session cluster has no H100 node")


def read_node(cluster: Cluster, name: str) -> dict[str, Any]:
    node = kube.get(cluster.api, "v1", "Node", name, None)
    assert node is not None
    return node


def test_the_agent_role_is_get_and_patch_on_nodes(
    cluster: Cluster, agent_identity: AgentIdentity
) -> None:
    def can(*args: str) -> bool:
        out = cluster.kubectl("auth", "can-i", f"--as={agent_identity.user}", *args, check=False)
        return out.strip() == "yes"

    assert can("get", "nodes") and can("patch", "nodes")
    for args in [
        ("list", "nodes"),
        ("delete", "nodes"),
        ("update", "nodes"),
        ("patch", "nodes", "--subresource=status"),
        ("get", "pods"),
        ("get", "secrets"),
    ]:
        assert not can(*args), args


def test_the_agent_publishes_annotations_and_leaves_nvidia_labels_alone(
    cluster: Cluster, agent_identity: AgentIdentity
) -> None:
    name = agent_identity.node
    before = read_node(cluster, name)
    nvidia = {k: v for k, v in before["metadata"]["labels"].items() if k.startswith("nvidia.com/")}
    assert nvidia["nvidia.com/mig.strategy"] == "mixed"
    argv = ["agent", "--once", "--replay", str(H100), "--node", name]
    argv += ["--kubeconfig", str(agent_identity.kubeconfig)]

    result = ttsfleet(*argv)

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Annotated Node {name}" in result.stderr
    after = read_node(cluster, name)
    annotations = after["metadata"]["annotations"]
    assert json.loads(annotations[inventory.MIG_LAYOUT]) == {
        "1g.10gb": 16,
        "2g.20gb": 8,
        "3g.40gb": 8,
    }
    gpus = json.loads(annotations[inventory.GPUS])
    assert len(gpus) == 8
    assert gpus[0]["migLayout"] == {"1g.10gb": 2, "2g.20gb": 1, "3g.40gb": 1}
    assert annotations[inventory.GPU_COUNT] == "8"
    assert annotations[inventory.MIG_MODE] == "enabled"
    assert annotations[inventory.SOURCE] == "replay of h100-mig-all-balanced.json, synthetic"
    assert json.loads(result.stdout) == {k: annotations[k] for k in inventory.ANNOTATIONS}
    # Labels (NVIDIA's among them), other annotations, taints and capacity are untouched.
    assert after["metadata"]["labels"] == before["metadata"]["labels"]
    for key, value in (before["metadata"].get("annotations") or {}).items():
        if not key.startswith(inventory.ANNOTATION_PREFIX):
            assert annotations[key] == value, key
    assert after["spec"].get("taints") == before["spec"].get("taints")
    assert after["status"]["capacity"] == before["status"]["capacity"]

    again = ttsfleet(*argv)

    assert again.returncode == 0, again.stdout + again.stderr
    assert "Annotated Node" not in again.stderr  # nothing changed, nothing written


def test_an_unknown_node_is_a_one_line_error(
    cluster: Cluster, agent_identity: AgentIdentity
) -> None:
    result = ttsfleet(
        "agent", "--once", "--replay", str(H100), "--node", "no-such-node",
        "--kubeconfig", str(agent_identity.kubeconfig),
    )  # fmt: skip
    assert result.returncode == 1
    assert "error: Node no-such-node does not exist" in result.stderr


def kubectl_as(identity: AgentIdentity, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(toolchain.binary("kubectl")), "--kubeconfig", str(identity.kubeconfig), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_the_admission_policy_keeps_the_agent_to_ttsfleet_annotations_on_its_node(
    cluster: Cluster, agent_identity: AgentIdentity
) -> None:
    """RBAC lets the agent patch any Node; the chart's policy narrows that to its own
    Node's ttsfleet.io/ annotations."""
    own = agent_identity.node
    other = next(
        n["metadata"]["name"]
        for n in kube.list_nodes(cluster.api)
        if n["metadata"]["name"] != own and "h100" in n["metadata"]["name"]
    )

    def refused(*args: str) -> str:
        # (kubectl cordon says it could not, yet exits 0: read what it says.)
        result = kubectl_as(agent_identity, *args)
        return result.stderr if "denied request" in result.stderr else ""

    # The policy takes a moment to be enforced after it is created: probe with a
    # harmless change, a new value each time (one let through changes only that).
    probes = iter(range(1000))

    def probe() -> str:
        return refused("annotate", "node", own, f"example.com/probe={next(probes)}", "--overwrite")

    message = wait_for("the policy to be enforced", probe, timeout=60)
    cluster.kubectl("annotate", "node", own, "example.com/probe-")
    assert "may change only ttsfleet.io/ annotations" in message
    label = ("label", "node", own, "nvidia.com/gpu.product=NVIDIA-B200", "--overwrite")
    assert "may not change a Node's labels" in refused(*label)
    assert "may annotate only the Node its pod runs on" in refused(
        "annotate", "node", other, "ttsfleet.io/probe=1"
    )
    assert "may not change a Node's spec" in refused("cordon", own)
    assert not refused("annotate", "node", own, "ttsfleet.io/probe=1", "--overwrite")
    labels = read_node(cluster, own)["metadata"]["labels"]
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    cluster.kubectl("annotate", "node", own, "ttsfleet.io/probe-")
