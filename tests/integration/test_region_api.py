"""TtsRegion against the real apiserver: its CEL rules, and the operator's reconcile (the
agent's Deployment, its conditions, and its gateway's config)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from tests.conftest import Cluster
from tests.helpers import REGION_EXAMPLES, REPO, load_example
from ttsfleet import kube
from ttsfleet.api import v1alpha1 as api
from ttsfleet.cluster import toolchain
from ttsfleet.controller import Controller, OperatorMetrics

pytestmark = pytest.mark.usefixtures("crd")

EXAMPLE = load_example(REGION_EXAMPLES[0])


def create(cluster: Cluster, namespace: str, doc: dict[str, Any]) -> dict[str, Any]:
    return kube.create_custom(
        kube.api_client(cluster.kubeconfig),
        api.GROUP,
        api.VERSION,
        api.REGION_PLURAL,
        namespace,
        doc,
    )


def refused(cluster: Cluster, namespace: str, **spec: Any) -> str:
    doc = copy.deepcopy(EXAMPLE)
    doc["metadata"]["name"] = "bad"
    doc["spec"].update(spec)
    with pytest.raises(ApiException) as err:
        create(cluster, namespace, doc)
    assert err.value.status == 422
    return str(json.loads(err.value.body)["message"])


def test_the_example_is_accepted_with_its_defaults(cluster: Cluster, namespace: str) -> None:
    made = create(cluster, namespace, copy.deepcopy(EXAMPLE))
    assert made["spec"]["mode"] == "active-active"
    assert made["spec"]["detection"]["ttfaThresholdMs"] == 800
    assert made["spec"]["detection"]["probeTokenSecretRef"]["key"] == "token"
    assert made["spec"]["envoy"] == {"image": "envoyproxy/envoy:v1.40.0", "port": 10000}


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (
            {
                "peers": [
                    {"name": "eu-west", "gatewayUrl": "https://x"},
                    {"name": "b", "gatewayUrl": "https://y"},
                ]
            },
            "lists this region itself",
        ),
        (
            {
                "peers": [
                    {"name": "b", "gatewayUrl": "https://x"},
                    {"name": "b", "gatewayUrl": "https://y"},
                ]
            },
            "names a region twice",
        ),
        (
            {"peers": [{"name": "us-east", "gatewayUrl": "https://x"}]},
            "set spec.detection.witnessUrl",
        ),
        (
            {"residency": [{"name": "eu", "tenants": ["a"], "regions": ["mars"]}]},
            "neither spec.region nor in spec.peers",
        ),
        ({"mode": "active-standby"}, "no peer has standby: true"),
        ({"failback": {"steps": [10, 50]}}, "ending at 100"),
        ({"failback": {"steps": [50, 25, 100]}}, "must increase"),
        ({"detection": {"failuresToDown": 5, "recoverAfter": 2}}, "raise recoverAfter"),
        ({"peers": [{"name": "us-east", "gatewayUrl": "ftp://x"}]}, "gatewayUrl"),
    ],
)
def test_the_schema_refuses_what_cannot_work_and_names_the_fix(
    cluster: Cluster, namespace: str, change: dict[str, Any], says: str
) -> None:
    assert says in refused(cluster, namespace, **change)


def test_a_two_region_product_with_a_witness_is_accepted(cluster: Cluster, namespace: str) -> None:
    doc = copy.deepcopy(EXAMPLE)
    doc["spec"]["peers"] = doc["spec"]["peers"][:1]
    doc["spec"]["detection"]["witnessUrl"] = "https://witness.speech.example.com:8090/status"
    create(cluster, namespace, doc)


def agent_says(controller: Controller, namespace: str, view: list[dict[str, Any]]) -> None:
    """Write status.regions of the TtsRegion eu-west as its agent would."""
    kube.patch_custom_status(
        controller.api, api.GROUP, api.VERSION, api.REGION_PLURAL, namespace, "eu-west",
        {"regions": view},
    )  # fmt: skip


def behind_the_example_gateway(cluster: Cluster, namespace: str) -> Controller:
    """The example TtsGateway applied in `namespace`; a controller to reconcile with."""
    gateway = load_example(REPO / "examples" / "local-gateway.yaml")
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(gateway))
    return Controller(kube.api_client(cluster.kubeconfig), OperatorMetrics())


def gateway_config(cluster: Cluster, namespace: str) -> dict[str, Any]:
    out = cluster.kubectl("get", "configmap", "-n", namespace, "speech-gateway", "-o", "json")
    doc: dict[str, Any] = json.loads(json.loads(out)["data"]["gateway.json"])
    return doc


def test_the_operator_runs_the_agent_and_tells_the_gateway_about_its_region(
    cluster: Cluster, namespace: str
) -> None:
    controller = behind_the_example_gateway(cluster, namespace)
    doc = copy.deepcopy(EXAMPLE)
    doc["spec"].pop("gatewayUrl")  # the agent probes the gateway's in-cluster Service
    create(cluster, namespace, doc)
    controller.on_region_event(
        None, {"metadata": {"namespace": namespace, "name": "eu-west"}, "spec": doc["spec"]}
    )

    deployment = json.loads(
        cluster.kubectl("get", "deployment", "-n", namespace, "eu-west-region", "-o", "json")
    )
    agent, envoy = deployment["spec"]["template"]["spec"]["containers"]
    assert f"--gateway-url=http://speech-gateway.{namespace}.svc" in agent["args"]
    assert envoy["name"] == "envoy"
    region = json.loads(
        cluster.kubectl("get", "ttsregion", "-n", namespace, "eu-west", "-o", "json")
    )
    assert region["status"]["statusUrl"] == (f"http://eu-west-region.{namespace}.svc:8090/status")
    conditions = {c["type"]: c for c in region["status"]["conditions"]}
    assert conditions["Degraded"]["status"] == "False"
    config = gateway_config(cluster, namespace)
    assert config["region"]["name"] == "eu-west"
    assert config["region"]["healthy"] == ["eu-west", "us-east", "ap-south"]
    assert config["region"]["residency"][0]["tenants"] == ["acme-eu"]

    # The agent's view arrives in the status (as the agent writes it): us-east is down.
    view = [
        {"name": "eu-west", "state": "Healthy", "trafficPercent": 100, "downVotes": []},
        {
            "name": "us-east",
            "state": "Down",
            "trafficPercent": 0,
            "downVotes": ["ap-south", "eu-west"],
        },
        {"name": "ap-south", "state": "Healthy", "trafficPercent": 100, "downVotes": []},
    ]
    agent_says(controller, namespace, view)
    controller.on_region_event(
        "MODIFIED", {"metadata": {"namespace": namespace, "name": "eu-west"}, "spec": doc["spec"]}
    )
    assert gateway_config(cluster, namespace)["region"]["healthy"] == ["eu-west", "ap-south"]
    region = json.loads(
        cluster.kubectl("get", "ttsregion", "-n", namespace, "eu-west", "-o", "json")
    )
    conditions = {c["type"]: c for c in region["status"]["conditions"]}
    assert conditions["Degraded"]["status"] == "True"
    assert "us-east Down at 0% (down votes: ap-south, eu-west)" in conditions["Degraded"]["message"]
    kept = [{k: r[k] for k in view[0]} for r in region["status"]["regions"]]
    assert kept == view  # the operator's write kept the agent's


def test_a_region_whose_gateway_does_not_exist_is_stalled_naming_the_field(
    cluster: Cluster, namespace: str
) -> None:
    controller = Controller(kube.api_client(cluster.kubeconfig), OperatorMetrics())
    doc = copy.deepcopy(EXAMPLE)
    doc["spec"].pop("gatewayUrl")
    doc["spec"]["gateway"] = "nowhere"
    create(cluster, namespace, doc)
    outcome = controller.reconcile_region(namespace, "eu-west")
    assert outcome is not None and outcome.stalled_reason == "GatewayMissing"
    region = json.loads(
        cluster.kubectl("get", "ttsregion", "-n", namespace, "eu-west", "-o", "json")
    )
    stalled = next(c for c in region["status"]["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True"
    assert "spec.gateway names TtsGateway 'nowhere'" in stalled["message"]


@pytest.fixture(scope="module")
def published_crds(cluster: Cluster) -> None:
    """Gateway API's (v1.6) and external-dns's CRDs, as a cluster publishing regions has."""
    for path in toolchain.published_crds():
        cluster.kubectl("apply", "--server-side", "-f", str(path))
        cluster.wait_established(f"crd/{yaml.safe_load(path.read_text())['metadata']['name']}")


@pytest.mark.usefixtures("published_crds")
def test_the_shares_are_published_as_dns_records_and_route_weights_the_apiserver_accepts(
    cluster: Cluster, namespace: str
) -> None:
    controller = behind_the_example_gateway(cluster, namespace)
    doc = copy.deepcopy(EXAMPLE)
    doc["spec"]["publish"] = {
        "hostname": "speech.example.com",
        "httpRouteParents": [{"name": "edge"}],
    }
    create(cluster, namespace, doc)
    outcome = controller.reconcile_region(namespace, "eu-west")
    assert outcome is not None and outcome.stalled_reason is None

    def get(kind: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(
            cluster.kubectl("get", kind, "-n", namespace, "eu-west-region", "-o", "json")
        )
        return out

    records = get("dnsendpoints.externaldns.k8s.io")["spec"]["endpoints"]
    assert [r["setIdentifier"] for r in records] == ["eu-west", "us-east", "ap-south"]
    route = get("httproutes.gateway.networking.k8s.io")["spec"]
    assert [b["weight"] for b in route["rules"][0]["backendRefs"]] == [100, 100, 100]

    view = [
        {"name": "eu-west", "state": "Healthy", "trafficPercent": 100, "downVotes": []},
        {"name": "us-east", "state": "Down", "trafficPercent": 0, "downVotes": ["ap-south"]},
        {"name": "ap-south", "state": "Ramping", "trafficPercent": 10, "downVotes": []},
    ]
    agent_says(controller, namespace, view)
    controller.reconcile_region(namespace, "eu-west")
    records = get("dnsendpoints.externaldns.k8s.io")["spec"]["endpoints"]
    assert [(r["setIdentifier"], r["providerSpecific"][0]["value"]) for r in records] == [
        ("eu-west", "100"),
        ("ap-south", "10"),
    ]
    route = get("httproutes.gateway.networking.k8s.io")["spec"]
    assert [b["weight"] for b in route["rules"][0]["backendRefs"]] == [100, 0, 10]
