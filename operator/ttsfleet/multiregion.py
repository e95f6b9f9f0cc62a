"""Local clusters as regions: dev and test tooling (like `harness`), not the operator.

Each region is a local cluster of its own (`ttsfleet cluster up`): its control plane, its
Prometheus, its operator (a process, as `OperatorProcess` runs it), the CRDs, and in the
namespace `speech` a CPU fleet (`examples/local-cpu.yaml`: a real tritonserver pod on the
cluster's local node), the TtsGateway `speech` (`examples/local-gateway.yaml`) and a
TtsRegion naming the other regions as its peers. The local runner routes every local
cluster's pod CIDR between their nodes, so one region's agent probes another's gateway
pod and reads its agent's /status as peered regions do; nothing leaves the host.

One identity provider for all regions (the first region's signing key): a token is good
in every region, as a voice product with one IdP has. The TtsRegions are made in two
passes, as a GitOps repository would fill in each peer's address once it exists: first
with the peers' gateways, then with their agents' status endpoints (each agent takes up
the edited spec without a restart).

A region is lost by cutting its local node's link (`cut()`): its gateway, Triton and
agent are unreachable from every other region, and it can reach none of them (nor its
own apiserver), its Envoy included. `restore()` brings the link back.

Each TtsRegion runs its clients' Envoy beside the agent (`spec.envoy`), reached at the
region Service's `speech` endpoint (`edge_address()`): nearest region first.
"""

from __future__ import annotations

import contextlib
import copy
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from ttsfleet import kube
from ttsfleet.api import v1alpha1 as api
from ttsfleet.cluster import local, runner, tokens
from ttsfleet.cluster.pool import LOCAL_LABEL, load_pool_file
from ttsfleet.harness import OperatorProcess, kubectl, wait_established, wait_for
from ttsfleet.resources import region as region_resources

Manifest = dict[str, Any]
REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "speech"
FLEET = REPO / "examples" / "local-cpu.yaml"
GATEWAY = REPO / "examples" / "local-gateway.yaml"
PROBE_SECRET = "region-probe"  # noqa: S105 - a Secret's name
GATEWAY_PORT = 8080
CRDS = ("ttsdeployments", "ttsgateways", "ttsregions")
NODE = "local-0"  # the local node of the default pool, where every pod here runs


@dataclass
class RegionCluster:
    """One region: a local cluster with its operator and speech stack."""

    region: str
    cluster: str
    record: local.ClusterRecord
    api: client.ApiClient
    operator: OperatorProcess

    def kubectl(self, *args: str, check: bool = True) -> str:
        return kubectl(self.record.kubeconfig, *args, check=check)

    def fleet(self) -> Manifest:
        """The fleet's Deployment: its spec.replicas and status.readyReplicas."""
        found = kube.get(self.api, "apps/v1", "Deployment", "joe-local", NAMESPACE)
        return found or {}

    def autoscaling(self) -> Manifest:
        """The fleet's status.autoscaling: desired replicas, the floor and its reason."""
        found = kube.get_custom(
            self.api, api.GROUP, api.VERSION, api.PLURAL, NAMESPACE, "joe-local"
        )
        return dict(((found or {}).get("status") or {}).get("autoscaling") or {})

    def _pod_dir(self, pod: Manifest) -> Path:
        """Where the local runner keeps `pod`'s logs and volumes."""
        return local.runner_dir(self.cluster) / "pods" / str(pod["metadata"]["uid"])

    def _agent_pods(self) -> list[Manifest]:
        return kube.list_pods(self.api, NAMESPACE, f"{region_resources.REGION_LABEL}={self.region}")

    def gateway_logs(self) -> list[Path]:
        """The access logs of this region's gateway pods (their container logs)."""
        pods = kube.list_pods(self.api, NAMESPACE, "ttsfleet.io/gateway=speech")
        return [self._pod_dir(p) / "container.log" for p in pods]

    def gateway_address(self) -> str:
        """host:port of the gateway pod, once ready."""
        found = kube.ready_endpoints(self.api, NAMESPACE, "speech-gateway", "http")
        return found[0] if found else ""

    def edge_address(self) -> str:
        """host:port of this region's Envoy (its clients' front door), once ready."""
        found = kube.ready_endpoints(self.api, NAMESPACE, f"{self.region}-region", "speech")
        return found[0] if found else ""

    def eds_file(self) -> Path | None:
        """This region's Envoy's EDS file as its agent last wrote it (the pod's emptyDir)."""
        found = [self._pod_dir(p) / "volumes" / "xds" / "eds.json" for p in self._agent_pods()]
        return next((f for f in found if f.exists()), None)

    def agent_ip(self) -> str:
        """The region agent pod's IP, once it runs on the local node (never a simulated
        node's pod: no process is behind its address)."""
        running = [
            p for p in self._agent_pods()
            if (p.get("status") or {}).get("phase") == "Running"
            and p["spec"].get("nodeName") in self.local_nodes()
        ]  # fmt: skip
        return str(running[0]["status"].get("podIP") or "") if running else ""

    def local_nodes(self) -> set[str]:
        return {n["metadata"]["name"] for n in kube.list_nodes(self.api, f"{LOCAL_LABEL}=true")}

    def view(self) -> dict[str, Manifest]:
        """What this region's agent last wrote into its TtsRegion: each region by name."""
        with contextlib.suppress(Exception):
            found = kube.get_custom(
                self.api, api.GROUP, api.VERSION, api.REGION_PLURAL, NAMESPACE, self.region
            )
            seen = ((found or {}).get("status") or {}).get("regions") or []
            return {str(r["name"]): r for r in seen}
        return {}

    def states(self) -> dict[str, str]:
        return {name: str(r.get("state")) for name, r in self.view().items()}

    def all_healthy(self) -> bool:
        states = self.states()
        return bool(states) and set(states.values()) == {api.RegionState.HEALTHY.value}

    def netns(self) -> str:
        """The network namespace of the cluster's local node (its pods' network)."""
        return local.netns_prefix(self.cluster) + NODE

    def node_cidr(self) -> str:
        """The pod range of the cluster's local node."""
        node = kube.get(self.api, "v1", "Node", NODE, None) or {}
        return str(node["spec"]["podCIDR"])

    def cut(self) -> None:
        """Lose the region: its local node's link goes down."""
        subprocess.run(["ip", "link", "set", runner.host_interface(self.cluster, NODE), "down"],
                       check=True)  # fmt: skip

    def restore(self) -> None:
        subprocess.run(["ip", "link", "set", runner.host_interface(self.cluster, NODE), "up"],
                       check=True)  # fmt: skip

    def logs(self) -> str:
        """The operator's log and every pod's, for a failure message."""
        out = [f"== {self.region} ({self.cluster}) operator", _tail(self.operator.log)]
        pods = local.runner_dir(self.cluster) / "pods"
        for log in sorted(pods.glob("*/container.log")):
            out += [f"== {self.region} pod {log.parent.name}", _tail(log)]
        out += [self.kubectl("get", "pods,ttsd,ttsgw,ttsregion", "-n", NAMESPACE, "-o", "wide",
                             check=False)]  # fmt: skip
        return "\n".join(out)


def _tail(path: Path, size: int = 4000) -> str:
    return path.read_text(errors="replace")[-size:] if path.exists() else "(none)"


def region_spec(
    region: str, peers: Sequence[tuple[str, str, str | None]], own_gateway: str,
    detection: Manifest, failback: Manifest, residency: Sequence[Manifest],
) -> Manifest:  # fmt: skip
    """A TtsRegion for `region`; `peers` are (name, gatewayUrl, statusUrl) nearest first."""
    listed = [
        {"name": name, "gatewayUrl": url} | ({"statusUrl": status} if status else {})
        for name, url, status in peers
    ]
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.REGION_KIND,
        "metadata": {"name": region, "namespace": NAMESPACE},
        "spec": {
            "region": region, "gateway": "speech", "gatewayUrl": own_gateway, "peers": listed,
            "detection": detection | {"probeTokenSecretRef": {"name": PROBE_SECRET}},
            "failback": failback, "residency": list(residency),
            "envoy": {},  # this region's clients' front door, programmed by the agent
            # the agent (and Envoy) run on the local node, like the gateway beside them
            "nodeSelector": {LOCAL_LABEL: "true"},
            "tolerations": [{"key": LOCAL_LABEL, "operator": "Exists", "effect": "NoSchedule"}],
        },
    }  # fmt: skip


@contextlib.contextmanager
def regions_up(
    names: Sequence[str], workdir: Path, *, detection: Manifest, failback: Manifest,
    residency: Sequence[Manifest] = (), prefix: str = "region",
    scaling: Manifest | None = None, nearest: dict[str, list[str]] | None = None,
) -> Iterator[dict[str, RegionCluster]]:  # fmt: skip
    """Bring up one local cluster per region in `names`, each region Healthy in every
    agent's view; remove them all after. Each region's peers are `nearest[region]`
    (default: the others in `names` order). `scaling` replaces the fleet's
    `spec.scaling` (the example's is manual)."""
    made: dict[str, RegionCluster] = {}
    try:
        for name in names:
            made[name] = _cluster(name, f"{prefix}-{name}", workdir)
        idp = made[names[0]].cluster
        probe = tokens.token(idp, tenant="probe", ttl_seconds=6 * 3600, subject="region-probe")
        for rc in made.values():
            _speech_stack(rc, idp, probe, scaling)
        gateways = {
            name: f"http://{wait_for(f'{name} gateway', rc.gateway_address, timeout=300)}"
            for name, rc in made.items()
        }

        def apply(statuses: dict[str, str | None]) -> None:
            for name, rc in made.items():
                order = (nearest or {}).get(name) or [p for p in names if p != name]
                peers = [(p, gateways[p], statuses[p]) for p in order]
                spec = region_spec(name, peers, gateways[name], detection, failback, residency)
                kube.apply(rc.api, [spec], "ttsfleet-multiregion")

        user = tokens.token(idp, tenant="warm-up")
        for name, url in gateways.items():  # each fleet's replica ready and warm
            wait_for(f"speech from {name}", partial(_speaks, url, user), timeout=300, every=1)
        apply(dict.fromkeys(names))
        agents = {n: wait_for(f"{n} agent", rc.agent_ip, timeout=120) for n, rc in made.items()}
        apply({n: f"http://{ip}:{region_resources.STATUS_PORT}/status" for n, ip in agents.items()})
        for rc in made.values():
            wait_for(f"{rc.region} to see every region healthy", rc.all_healthy, timeout=180)
            wait_for(f"{rc.region}'s Envoy", rc.edge_address, timeout=60)
        yield made
    except BaseException:
        for rc in made.values():
            print(rc.logs())
        raise
    finally:
        for rc in made.values():
            with contextlib.suppress(Exception):
                rc.restore()
            rc.operator.stop()
            local.down(rc.cluster)


def _cluster(region: str, cluster: str, workdir: Path) -> RegionCluster:
    record = local.up(cluster, load_pool_file(None)).record
    api_client = kube.api_client(record.kubeconfig)
    kubectl(record.kubeconfig, "apply", "--server-side", "-f", str(REPO / "crds"))
    for crd in CRDS:
        wait_established(api_client, f"crd/{crd}.{api.GROUP}")
    operator = OperatorProcess(
        record.kubeconfig, workdir / f"{region}-operator.log", local.free_port(),
        local.free_port(), local.prometheus_url(record), identity=f"{region}-operator",
    )  # fmt: skip
    operator.start()
    wait_for(f"the {region} operator to lead", operator.leading, timeout=60)
    return RegionCluster(region, cluster, record, api_client, operator)


def _speech_stack(rc: RegionCluster, idp: str, probe_token: str, scaling: Manifest | None) -> None:
    """The namespace, the IdP's public keys, the probe token, the fleet and the gateway."""
    kube.create_namespace(rc.api, NAMESPACE)
    wait_for("the namespace", lambda: kube.namespace_ready(rc.api, NAMESPACE), timeout=30)
    probe = {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": PROBE_SECRET, "namespace": NAMESPACE},
        "stringData": {"token": probe_token},
    }  # fmt: skip
    stack = [tokens.jwks_secret(idp, NAMESPACE), probe]
    for path in (FLEET, GATEWAY):
        doc = copy.deepcopy(yaml.safe_load(path.read_text()))
        doc["metadata"]["namespace"] = NAMESPACE
        if scaling is not None and doc["kind"] == api.KIND:
            doc["spec"]["scaling"] = scaling
        stack.append(doc)
    kube.apply(rc.api, stack, "ttsfleet-multiregion")


def _speaks(address: str, token: str) -> bool:
    return speak(address, token)[0] == 200


def speak(address: str, token: str, text: str = "Hello.", timeout: float = 20) -> tuple[int, str]:
    """One speech request straight to a gateway: (status, the region that answered, or the
    error's message)."""
    import httpx2  # noqa: PLC0415 - the gateway extra

    try:
        reply = httpx2.post(
            f"{address}/v1/audio/speech",
            json={"model": "tts-1", "voice": "alloy", "input": text, "response_format": "pcm"},
            headers={"authorization": f"Bearer {token}"}, timeout=timeout,
        )  # fmt: skip
    except httpx2.HTTPError as err:
        return 0, str(err)
    if reply.status_code == 200:
        return 200, reply.headers.get("x-ttsfleet-region", "")
    with contextlib.suppress(ValueError, KeyError):
        return reply.status_code, str(reply.json()["error"]["message"])
    return reply.status_code, reply.text[:300]
