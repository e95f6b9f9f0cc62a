"""A `TtsRegion`'s children: the region agent, and its clients' Envoy beside it.

One pod runs `ttsfleet region` (the gateway's image): it probes every region's gateway,
serves its votes on /status (the Service's `status` port: what peers name as
`statusUrl`), and writes what it sees into the TtsRegion's `status.regions` (a Role lets
it patch that one object's status and nothing else). With `spec.envoy`, Envoy runs in
the same pod and reads its EDS file from a shared emptyDir, which the agent replaces by
rename; the Service's `speech` port is then this region's front door for its clients.
The probe token is a mounted Secret: the operator itself never reads Secrets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttsfleet.api import v1alpha1 as api
from ttsfleet.failover import envoy, publish, traffic
from ttsfleet.resources.common import HASH_ANNOTATION, content_hash
from ttsfleet.resources.gateway import GATEWAY_USER, placed, restricted

Manifest = dict[str, Any]

REGION_LABEL = "ttsfleet.io/region"
STATUS_PORT = 8090
ADMIN_PORT = 9901
SPEC_DIR = "/etc/ttsfleet/region"
SPEC_KEY = "region.json"
ENVOY_KEY = "envoy.json"
PROBE_DIR = "/etc/ttsfleet/probe"
XDS_DIR = "/var/run/ttsfleet/xds"
CA_DIR = "/etc/ttsfleet/upstream-ca"


@dataclass(frozen=True)
class Region:
    name: str
    namespace: str
    uid: str
    spec: api.TtsRegionSpec

    @classmethod
    def from_body(cls, body: Manifest) -> Region:
        """Parse an object as the API returns it; raises pydantic's ValidationError."""
        meta = body["metadata"]
        spec = api.TtsRegionSpec.model_validate(body.get("spec") or {})
        return cls(meta["name"], meta["namespace"], meta["uid"], spec)

    @property
    def child_name(self) -> str:
        return f"{self.name}-region"

    @property
    def status_url(self) -> str:
        """Where peers in this cluster's network read its votes."""
        return f"http://{self.child_name}.{self.namespace}.svc:{STATUS_PORT}/status"


def labels(region: Region) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "ttsfleet-region",
        "app.kubernetes.io/instance": region.name,
        "app.kubernetes.io/component": "region-agent",
        "app.kubernetes.io/managed-by": "ttsfleet",
        REGION_LABEL: region.name,
    }


def _meta(region: Region) -> Manifest:
    """A child's name, namespace, labels and owner (the TtsRegion)."""
    owner = {
        "apiVersion": api.API_VERSION, "kind": api.REGION_KIND, "name": region.name,
        "uid": region.uid, "controller": True, "blockOwnerDeletion": True,
    }  # fmt: skip
    return {"name": region.child_name, "namespace": region.namespace, "labels": labels(region),
            "ownerReferences": [owner]}  # fmt: skip


def _child(region: Region, api_version: str, kind: str, body: Manifest) -> Manifest:
    metadata = _meta(region) | {"annotations": {HASH_ANNOTATION: content_hash(body)}}
    return {"apiVersion": api_version, "kind": kind, "metadata": metadata, **body}


def children(region: Region, gateway_url: str) -> list[Manifest]:
    """Every child of `region`; `gateway_url` is its own gateway as the agent probes it."""
    spec = region.spec
    name = region.child_name
    rbac = "rbac.authorization.k8s.io/v1"
    data = {SPEC_KEY: json.dumps({"spec": spec.wire()}, indent=2, sort_keys=True)}
    volumes: list[Manifest] = [
        {"name": "spec", "configMap": {"name": name}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[Manifest] = [
        {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - a container path
    ]
    args = [
        "region",
        f"--spec={SPEC_DIR}/{SPEC_KEY}",
        f"--gateway-url={gateway_url}",
        f"--port={STATUS_PORT}",
        f"--status-to={region.namespace}/{region.name}",
    ]
    token = spec.detection.probe_token_secret_ref
    if token is not None:
        volumes.append({"name": "probe-token", "secret": {"secretName": token.name}})
        mounts.append({"name": "probe-token", "mountPath": PROBE_DIR, "readOnly": True})
        args.append(f"--token-file={PROBE_DIR}/{token.key}")
    ports = [{"name": "status", "containerPort": STATUS_PORT, "protocol": "TCP"}]
    containers: list[Manifest] = [
        {
            "name": "agent",
            "image": spec.image,
            "args": args,
            "ports": ports,
            "readinessProbe": {
                "httpGet": {"path": "/healthz", "port": "status"},
                "periodSeconds": 5,
            },
            "resources": {
                "requests": {"cpu": "50m", "memory": "96Mi"},
                "limits": {"memory": "256Mi"},
            },
            "volumeMounts": mounts,
            "securityContext": restricted(GATEWAY_USER),
        }
    ]
    service_ports = [{"name": "status", "port": STATUS_PORT, "targetPort": "status"}]
    if spec.envoy is not None:
        eds = Path(XDS_DIR) / "eds.json"
        envoy_mounts = [
            {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
            {"name": "xds", "mountPath": XDS_DIR, "readOnly": True},
        ]
        ca_file = envoy.SYSTEM_CA
        if (ca := spec.envoy.ca_config_map_ref) is not None:
            volumes.append({"name": "upstream-ca", "configMap": {"name": ca.name}})
            envoy_mounts.append({"name": "upstream-ca", "mountPath": CA_DIR, "readOnly": True})
            ca_file = f"{CA_DIR}/{ca.key}"
        boot = envoy.bootstrap(
            region.spec.region, spec.envoy.port, ADMIN_PORT, eds,
            host="0.0.0.0", ca_file=ca_file,  # noqa: S104 - the pod's listener
        )  # fmt: skip
        data[ENVOY_KEY] = json.dumps(boot, indent=1, sort_keys=True)
        volumes.append({"name": "xds", "emptyDir": {}})
        mounts.append({"name": "xds", "mountPath": XDS_DIR})
        args.append(f"--eds={eds}")
        containers.append(
            {
                "name": "envoy",
                "image": spec.envoy.image,
                "args": ["-c", f"{SPEC_DIR}/{ENVOY_KEY}", "--reject-unknown-dynamic-fields"],
                "ports": [{"name": "speech", "containerPort": spec.envoy.port, "protocol": "TCP"}],
                "readinessProbe": {  # on its listener: the admin port is loopback's
                    "httpGet": {"path": envoy.READY_PATH, "port": "speech"},
                    "periodSeconds": 2,
                },
                "volumeMounts": envoy_mounts,
                "securityContext": restricted(101),  # the official image's envoy user
            }
        )
        service_ports.append({"name": "speech", "port": spec.envoy.port, "targetPort": "speech"})
    account = {"kind": "ServiceAccount", "name": name, "namespace": region.namespace}
    pod = placed(spec, {"serviceAccountName": name, "containers": containers, "volumes": volumes})
    return [
        _child(region, "v1", "ServiceAccount", {}),
        _child(
            region,
            rbac,
            "Role",
            {
                "rules": [
                    {
                        "apiGroups": [api.GROUP],
                        "resources": [f"{api.REGION_PLURAL}/status"],
                        "resourceNames": [region.name],
                        "verbs": ["patch"],
                    },
                ]
            },
        ),
        _child(
            region,
            rbac,
            "RoleBinding",
            {
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [account],
            },
        ),
        _child(region, "v1", "ConfigMap", {"data": data}),
        _child(
            region,
            "apps/v1",
            "Deployment",
            {
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {REGION_LABEL: region.name}},
                    "strategy": {"type": "Recreate"},  # one observer per region at a time
                    "template": {"metadata": {"labels": labels(region)}, "spec": pod},
                }
            },
        ),
        _child(
            region,
            "v1",
            "Service",
            {
                "spec": {
                    "selector": {REGION_LABEL: region.name},
                    "ports": service_ports,
                }
            },
        ),
    ]


def published(region: Region, body: Manifest, gateway_service: str, port: int) -> list[Manifest]:
    """The DNSEndpoint and HTTPRoute (with its peers' ExternalName Services) that
    `spec.publish` asks for, weighted by the agent's view in `body`'s status."""
    spec = region.spec
    if spec.publish is None:
        return []
    seen = (body.get("status") or {}).get("regions") or []
    percent = {r: 100 for r in spec.regions()}
    percent |= {str(r["name"]): int(r.get("trafficPercent", 100)) for r in seen}
    weights = traffic.published_weights(
        {spec.region: spec.weight} | {p.name: p.weight for p in spec.peers}, percent,
        frozenset(p.name for p in spec.peers if p.standby),
    )  # fmt: skip
    meta = _meta(region)
    out = []
    if spec.publish.dns_endpoint:
        out.append(publish.dns_endpoint(spec, weights, meta))
    if spec.publish.http_route_parents:
        out += publish.http_route(spec, weights, meta, gateway_service, port)
    return out


def degraded(region: Manifest) -> str:
    """'' when every region is Healthy in the agent's last view, else what is not."""
    seen = (region.get("status") or {}).get("regions") or []
    off = []
    for r in seen:
        if r.get("state") in (None, api.RegionState.HEALTHY.value):
            continue
        votes = r.get("downVotes") or []
        said = f" (down votes: {', '.join(votes)})" if votes else ""
        off.append(f"{r['name']} {r['state']} at {r.get('trafficPercent', 0)}%{said}")
    return "; ".join(off)


def _condition(kind: str, status: bool, reason: str, message: str) -> dict[str, str]:
    return {
        "type": kind,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message,
    }


def conditions(region: Manifest, deployment: Manifest | None) -> list[dict[str, str]]:
    """Ready (the agent runs), Reconciling, Stalled, and Degraded (a region not Healthy)."""
    available = int(((deployment or {}).get("status") or {}).get("availableReplicas") or 0)
    off = degraded(region)
    ready = available > 0
    return [
        _condition(
            "Ready",
            ready,
            "AgentRunning" if ready else "AgentStarting",
            "the region agent probes every region"
            if ready
            else "waiting for the region agent's pod",
        ),
        _condition(
            "Reconciling",
            not ready,
            "AgentStarting" if not ready else "AgentRunning",
            "" if ready else "waiting for the region agent's pod",
        ),
        _condition("Stalled", False, "AgentRunning", ""),
        _condition(
            "Degraded",
            bool(off),
            "RegionsNotHealthy" if off else "AllRegionsHealthy",
            off or "every region is Healthy",
        ),
    ]


def stalled_conditions(reason: str, message: str) -> list[dict[str, str]]:
    return [
        _condition("Ready", False, reason, message),
        _condition("Reconciling", False, reason, "waiting for the spec to change"),
        _condition("Stalled", True, reason, message),
    ]
