"""A `TtsGateway`'s children and status. Pure: manifests in, manifests out.

Per gateway `<name>`: a ServiceAccount, a Role and RoleBinding to watch EndpointSlices
in its namespace, a ClusterRoleBinding to the shared ClusterRole that lets gateways
read Nodes (to tell pods with a network behind them from simulated ones), the
ConfigMap with the gateway's config (routes resolved to each fleet's Service and
voice), the Deployment, its Service, its NetworkPolicy and a PodDisruptionBudget. All are named
`<name>-gateway`; the ClusterRoleBinding, which cannot be owned by a namespaced
object, is `ttsfleet-gateway-<namespace>-<name>` and is deleted with its gateway.
With `spec.rateLimits.managedRedis`, a Redis for the replicas to share limits through:
a Deployment of one pod, its Service and a NetworkPolicy that admits only the gateway's
pods, all `<name>-gateway-redis`. The gateway finds the Redis pod through the Service's
EndpointSlices, as it finds its fleets' replicas.

The config reaches running pods through the mounted ConfigMap (the gateway re-reads
it); the pod template does not change with it, so a route change restarts nothing.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ttsfleet.api import v1alpha1 as api
from ttsfleet.resources import networkpolicy
from ttsfleet.resources.common import DEPLOYMENT_LABEL, HASH_ANNOTATION, content_hash
from ttsfleet.status import READY, RECONCILING, STALLED

Manifest = dict[str, Any]

GATEWAY_LABEL = "ttsfleet.io/gateway"
REDIS_LABEL = "ttsfleet.io/gateway-redis"  # a gateway's Redis pods (not GATEWAY_LABEL:
# the gateway's Service, PDB and the fleets' policies select pods by that)
REDIS_PORT = networkpolicy.REDIS_PORT
REDIS_USER = 999  # the official image's redis user
GATEWAY_USER = 65532  # nonroot
OWNER_NAMESPACE_LABEL = "ttsfleet.io/gateway-namespace"
NODE_READER = "ttsfleet-gateway-node-reader"
PORT = 8080
CONFIG_DIR = "/etc/ttsfleet/gateway"
CONFIG_KEY = "gateway.json"
JWKS_DIR = "/etc/ttsfleet/jwks"
TICKETS_DIR = "/etc/ttsfleet/tickets"
TICKET_KEY = "key"
TLS_DIR = "/etc/ttsfleet/tls"


@dataclass(frozen=True)
class Gateway:
    name: str
    namespace: str
    uid: str
    spec: api.TtsGatewaySpec

    @classmethod
    def from_body(cls, body: Manifest) -> Gateway:
        """Parse an object as the API returns it; raises pydantic's ValidationError."""
        meta = body["metadata"]
        spec = api.TtsGatewaySpec.model_validate(body.get("spec") or {})
        return cls(meta["name"], meta["namespace"], meta["uid"], spec)

    @property
    def child_name(self) -> str:
        return f"{self.name}-gateway"

    @property
    def redis_name(self) -> str:
        return f"{self.child_name}-redis"

    @property
    def ticket_secret_name(self) -> str:
        return f"{self.child_name}-tickets"

    @property
    def cluster_binding_name(self) -> str:
        return cluster_binding_name(self.namespace, self.name)

    @property
    def scheme(self) -> str:
        return "https" if self.spec.tls is not None else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.child_name}.{self.namespace}.svc/v1"


def cluster_binding_name(namespace: str, name: str) -> str:
    return f"ttsfleet-gateway-{namespace}-{name}"


def selector_labels(gateway: Gateway) -> dict[str, str]:
    return {GATEWAY_LABEL: gateway.name}


def labels(gateway: Gateway) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "ttsfleet-gateway",
        "app.kubernetes.io/instance": gateway.name,
        "app.kubernetes.io/component": "speech-api",
        "app.kubernetes.io/managed-by": "ttsfleet",
        **selector_labels(gateway),
    }


def _child(
    gateway: Gateway, api_version: str, kind: str, body: Manifest, *, owned: bool = True
) -> Manifest:
    metadata: Manifest = {
        "name": gateway.child_name,
        "labels": labels(gateway),
        "annotations": {HASH_ANNOTATION: content_hash(body)},
    }
    if owned:
        metadata["namespace"] = gateway.namespace
        metadata["ownerReferences"] = [
            {
                "apiVersion": api.API_VERSION, "kind": api.GATEWAY_KIND, "name": gateway.name,
                "uid": gateway.uid, "controller": True, "blockOwnerDeletion": True,
            }
        ]  # fmt: skip
    return {"apiVersion": api_version, "kind": kind, "metadata": metadata, **body}


def node_reader_role(name: str = NODE_READER) -> Manifest:
    """The ClusterRole every gateway is bound to: read Nodes (nothing else). The chart
    ships it too (an operator with the chart's RBAC may patch it, not create it); no
    labels here, so that applying it takes none of Helm's fields."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}],
    }


def config(
    gateway: Gateway, fleets: Mapping[str, Manifest | None], region: Manifest | None = None
) -> Manifest:
    """The gateway's config document (`gateway.config.GatewayConfig`'s wire form); with
    the `TtsRegion` whose front door it is, its region block (see `region_block`)."""
    spec = gateway.spec

    def fleet(name: str, queue_limit: int | None = None) -> Manifest:
        found = fleets.get(name)
        voice, version = api.DEFAULT_VOICE, ""
        if found is not None:
            fleet_spec = found.get("spec") or {}
            model = fleet_spec.get("model") or {}
            voice = model.get("voice") or voice
            image = (fleet_spec.get("runtime") or {}).get("image") or api.DEFAULT_IMAGE
            version = f"{image} {model.get('precision') or 'fp16'}"
        out: Manifest = {
            "namespace": gateway.namespace, "name": name, "service": name, "port": "grpc",
            "voice": voice, "version": version,
        }  # fmt: skip
        if queue_limit is not None:
            out["maxStreamsPerReplica"] = queue_limit
        return out

    routes = []
    for route in spec.routes:
        rendered = {
            "models": list(route.models),
            "voices": list(route.voices),
            "fleet": fleet(route.fleet, route.max_streams_per_replica),
        }
        if route.fallback is not None:
            rendered["fallback"] = fleet(route.fallback)
        routes.append(rendered)
    document: Manifest = {
        "routes": routes,
        "balancer": spec.balancer.value,
        "maxInputCharacters": spec.max_input_characters,
        "cacheBytes": spec.cache_mi_b * 1024 * 1024,
        "breaker": spec.breaker.model_dump(by_alias=True),
    }
    if spec.rate_limits is not None:
        limits = spec.rate_limits.model_dump(
            by_alias=True, exclude_none=True, exclude={"managed_redis"}
        )
        if spec.rate_limits.managed_redis is not None:
            limits["redisService"] = {
                "namespace": gateway.namespace, "name": gateway.redis_name, "port": "redis",
            }  # fmt: skip
        # Alone (no Redis, or while it is down) each replica keeps its share: together
        # the gateway's replicas still admit at most each limit.
        limits["localShare"] = 1 / max(1, spec.replicas)
        document["rateLimits"] = limits
    if region is not None:
        document["region"] = region_block(region)
    if spec.auth is not None:
        auth = spec.auth
        document["auth"] = {
            "issuer": auth.issuer, "audiences": list(auth.audiences),
            "algorithms": [a.value for a in auth.algorithms], "tenantClaim": auth.tenant_claim,
            "scopeClaim": auth.scope_claim, "requiredScopes": list(auth.required_scopes),
            "leewaySeconds": auth.leeway_seconds, "refreshSeconds": auth.refresh_seconds,
        }  # fmt: skip
        if auth.jwks_secret_ref is not None:
            document["auth"]["jwksFile"] = f"{JWKS_DIR}/{auth.jwks_secret_ref.key}"
        else:
            document["auth"]["jwksUrl"] = auth.jwks_url
        document["auth"]["ticketKeyFile"] = f"{TICKETS_DIR}/{TICKET_KEY}"
    if spec.tls is not None:
        document["tls"] = {"certFile": f"{TLS_DIR}/tls.crt", "keyFile": f"{TLS_DIR}/tls.key"}
    return document


def region_block(region: Manifest) -> Manifest:
    """A TtsRegion as its gateway needs it: its name, the residency sets, and the regions
    taking traffic as the region's agent last wrote them (all of them before it has)."""
    spec = api.TtsRegionSpec.model_validate(region["spec"])
    seen = ((region.get("status") or {}).get("regions")) or []
    healthy = [r["name"] for r in seen if int(r.get("trafficPercent", 100)) > 0] if seen else None
    return {
        "name": spec.region,
        "healthy": spec.regions() if healthy is None else healthy,
        "residency": [s.wire() for s in spec.residency],
    }


def ticket_secret(gateway: Gateway, key: bytes) -> Manifest:
    """The key every replica signs and redeems WebSocket tickets with. Created once with
    a random key (never applied again: that would change it) and owned by the gateway."""
    secret = _child(gateway, "v1", "Secret", {"type": "Opaque"})
    secret["metadata"]["name"] = gateway.ticket_secret_name
    del secret["metadata"]["annotations"]
    secret["data"] = {TICKET_KEY: base64.b64encode(key).decode()}
    return secret


def restricted(user: int) -> Manifest:
    """A container's securityContext: `user`, no privileges, a read-only root."""
    return {
        "runAsNonRoot": True,
        "runAsUser": user,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def placed(spec: api.TtsGatewaySpec | api.TtsRegionSpec, pod_spec: Manifest) -> Manifest:
    """`pod_spec` on the nodes `spec` names: its nodeSelector and tolerations (a gateway's
    Redis runs beside it; a region's agent where its TtsRegion says)."""
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [t.wire() for t in spec.tolerations]
    return pod_spec


def children(
    gateway: Gateway, fleets: Mapping[str, Manifest | None], node_reader: str = NODE_READER,
    region: Manifest | None = None,
) -> list[Manifest]:  # fmt: skip
    """Every child of `gateway`, given the TtsDeployments its routes name (None: missing),
    bound to the ClusterRole `node_reader` (applied too), and the TtsRegion whose front
    door it is (None: none)."""
    spec = gateway.spec
    name = gateway.child_name
    rbac = "rbac.authorization.k8s.io/v1"
    account = {"kind": "ServiceAccount", "name": name, "namespace": gateway.namespace}
    document = json.dumps(config(gateway, fleets, region), indent=2, sort_keys=True)
    # /tmp writable under a read-only root file system.
    volumes: list[Manifest] = [
        {"name": "config", "configMap": {"name": name}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[Manifest] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - a container path
    ]
    if spec.auth is not None and spec.auth.jwks_secret_ref is not None:
        volumes.append({"name": "jwks", "secret": {"secretName": spec.auth.jwks_secret_ref.name}})
        mounts.append({"name": "jwks", "mountPath": JWKS_DIR, "readOnly": True})
    if spec.auth is not None:
        volumes.append({"name": "tickets", "secret": {"secretName": gateway.ticket_secret_name}})
        mounts.append({"name": "tickets", "mountPath": TICKETS_DIR, "readOnly": True})
    if spec.tls is not None:
        volumes.append({"name": "tls", "secret": {"secretName": spec.tls.secret_name}})
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    port = gateway.scheme
    scheme = port.upper()
    probe = {"httpGet": {"path": "/readyz", "port": port, "scheme": scheme}, "periodSeconds": 2}
    container = {
        "name": "gateway",
        "image": spec.image,
        "args": ["gateway", f"--config={CONFIG_DIR}/{CONFIG_KEY}", f"--port={PORT}"],
        "ports": [{"name": port, "containerPort": PORT, "protocol": "TCP"}],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {
                "name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
        ],
        "readinessProbe": probe,
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": port, "scheme": scheme},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": spec.resources.wire(),
        "volumeMounts": mounts,
        "securityContext": restricted(GATEWAY_USER),
    }
    pod_spec = placed(spec, {
        "serviceAccountName": name,
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": 30,
    })  # fmt: skip
    return [
        _child(gateway, "v1", "ServiceAccount", {}),
        _child(
            gateway,
            rbac,
            "Role",
            {
                "rules": [
                    {
                        "apiGroups": ["discovery.k8s.io"],
                        "resources": ["endpointslices"],
                        "verbs": ["get", "list", "watch"],
                    },
                ]
            },
        ),
        _child(
            gateway,
            rbac,
            "RoleBinding",
            {
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [account],
            },
        ),
        node_reader_role(node_reader),
        cluster_binding(gateway, node_reader),
        _child(gateway, "v1", "ConfigMap", {"data": {CONFIG_KEY: document}}),
        _child(
            gateway,
            "apps/v1",
            "Deployment",
            {
                "spec": {
                    "replicas": spec.replicas,
                    "selector": {"matchLabels": selector_labels(gateway)},
                    "strategy": {"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                    "template": {"metadata": {"labels": labels(gateway)}, "spec": pod_spec},
                }
            },
        ),
        _child(
            gateway,
            "v1",
            "Service",
            {
                "spec": {
                    "selector": selector_labels(gateway),
                    "ports": [
                        {
                            "name": port,
                            "port": 443 if spec.tls else 80,
                            "targetPort": port,
                            "protocol": "TCP",
                        }
                    ],
                }
            },
        ),
        _child(
            gateway,
            "networking.k8s.io/v1",
            "NetworkPolicy",
            {
                "spec": networkpolicy.gateway_policy_spec(
                    selector_labels(gateway),
                    port,
                    [{DEPLOYMENT_LABEL: name} for name in spec.fleet_names()],
                    spec.rate_limits.redis_url if spec.rate_limits else None,
                    redis_labels(gateway) if managed_redis(gateway) else None,
                )
            },
        ),
        _child(
            gateway,
            "policy/v1",
            "PodDisruptionBudget",
            {
                "spec": {
                    "maxUnavailable": 1,
                    "selector": {"matchLabels": selector_labels(gateway)},
                }
            },
        ),
        *redis_children(gateway),
    ]


def managed_redis(gateway: Gateway) -> api.ManagedRedis | None:
    limits = gateway.spec.rate_limits
    return limits.managed_redis if limits is not None else None


def redis_labels(gateway: Gateway) -> dict[str, str]:
    return {REDIS_LABEL: gateway.name}


def _redis_child(gateway: Gateway, api_version: str, kind: str, body: Manifest) -> Manifest:
    """A child of the gateway's Redis. Its metadata carries GATEWAY_LABEL (so a change
    to it reaches the gateway's reconcile); its pods do not."""
    manifest = _child(gateway, api_version, kind, body)
    manifest["metadata"]["name"] = gateway.redis_name
    manifest["metadata"]["labels"] |= {"app.kubernetes.io/component": "rate-limits",
                                       **redis_labels(gateway)}  # fmt: skip
    return manifest


def redis_children(gateway: Gateway) -> list[Manifest]:
    """The Redis the operator runs for `gateway` (none unless managedRedis)."""
    redis = managed_redis(gateway)
    if redis is None:
        return []
    spec = gateway.spec
    pod_labels = {
        "app.kubernetes.io/name": "redis", "app.kubernetes.io/instance": gateway.name,
        "app.kubernetes.io/component": "rate-limits", "app.kubernetes.io/managed-by": "ttsfleet",
        **redis_labels(gateway),
    }  # fmt: skip
    probe = {"tcpSocket": {"port": "redis"}}
    # Every address of the pod (its NetworkPolicy admits only the gateway); nothing on
    # disk: a limit lasts seconds, and a restarted Redis starts empty. Every key the
    # limiter writes expires, so the least recently used go first when memory is full.
    args = [
        "--port", str(REDIS_PORT), "--bind", "0.0.0.0", "--protected-mode", "no",  # noqa: S104
        "--save", "", "--appendonly", "no", "--dir", "/data",
        "--maxmemory", f"{redis.max_memory_mi_b}mb", "--maxmemory-policy", "volatile-lru",
    ]  # fmt: skip
    container = {
        "name": "redis",
        "image": redis.image,
        "command": ["redis-server"],
        "args": args,
        "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
        "readinessProbe": probe | {"periodSeconds": 2},
        "livenessProbe": probe | {"periodSeconds": 10, "failureThreshold": 3},
        "resources": redis.resources.wire(),
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "securityContext": restricted(REDIS_USER),
    }
    pod_spec = placed(spec, {
        "containers": [container],
        "volumes": [{"name": "data", "emptyDir": {}}],
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 5,
    })  # fmt: skip
    policy = networkpolicy.redis_policy_spec(redis_labels(gateway), selector_labels(gateway))
    return [
        _redis_child(
            gateway,
            "apps/v1",
            "Deployment",
            {
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": redis_labels(gateway)},
                    "strategy": {"type": "Recreate"},
                    "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
                }
            },
        ),
        _redis_child(
            gateway,
            "v1",
            "Service",
            {
                "spec": {
                    "selector": redis_labels(gateway),
                    "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis"}],
                }
            },
        ),
        _redis_child(gateway, "networking.k8s.io/v1", "NetworkPolicy", {"spec": policy}),
    ]


def redis_leftovers() -> list[tuple[str, str]]:
    """(apiVersion, kind) of the Redis children, to delete once a gateway no longer asks
    the operator for a Redis."""
    return [("apps/v1", "Deployment"), ("v1", "Service"), ("networking.k8s.io/v1", "NetworkPolicy")]


def cluster_binding(gateway: Gateway, node_reader: str = NODE_READER) -> Manifest:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {
            "name": gateway.cluster_binding_name,
            "labels": {
                "app.kubernetes.io/managed-by": "ttsfleet",
                GATEWAY_LABEL: gateway.name,
                OWNER_NAMESPACE_LABEL: gateway.namespace,
            },
        },
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": node_reader,
        },
        "subjects": [
            {"kind": "ServiceAccount", "name": gateway.child_name, "namespace": gateway.namespace}
        ],
    }


def _condition(kind: str, status: bool, reason: str, message: str) -> dict[str, str]:
    return {"type": kind, "status": "True" if status else "False", "reason": reason,
            "message": message}  # fmt: skip


def problems(gateway: Gateway, fleets: Mapping[str, Manifest | None]) -> list[str]:
    """What keeps routes from working that the user must fix, each naming its field."""
    found = []
    for index, route in enumerate(gateway.spec.routes):
        if fleets.get(route.fleet) is None:
            found.append(
                f"spec.routes[{index}].fleet: TtsDeployment {gateway.namespace}/{route.fleet} "
                "does not exist: create it or route to one that does"
            )
        if route.fallback is not None and fleets.get(route.fallback) is None:
            found.append(
                f"spec.routes[{index}].fallback: TtsDeployment {gateway.namespace}/"
                f"{route.fallback} does not exist: create it or leave the fallback out"
            )
    return found


def stalled_conditions(
    reason: str, message: str, waiting: str = "waiting for the spec to change"
) -> list[dict[str, str]]:
    """What the user must change before the gateway can be Ready."""
    return [
        _condition(READY, False, reason, message),
        _condition(RECONCILING, False, reason, waiting),
        _condition(STALLED, True, reason, message),
    ]


def conditions(
    gateway: Gateway, deployment: Manifest | None, fleets: Mapping[str, Manifest | None]
) -> list[dict[str, str]]:
    """kstatus conditions: Ready, Reconciling, Stalled."""
    wanted = gateway.spec.replicas
    dep_status = (deployment or {}).get("status") or {}
    ready = int(dep_status.get("readyReplicas") or 0)
    updated = int(dep_status.get("updatedReplicas") or 0)
    missing = problems(gateway, fleets)
    if missing:
        return stalled_conditions(
            "FleetNotFound", "; ".join(missing), "waiting for the fleets to exist"
        )
    if ready >= wanted and updated >= wanted:
        message = f"{ready}/{wanted} gateway replicas ready at {gateway.url}"
        return [
            _condition(READY, True, "GatewayReady", message),
            _condition(RECONCILING, False, "GatewayReady", message),
            _condition(STALLED, False, "GatewayReady", message),
        ]
    message = f"{ready}/{wanted} gateway replicas ready"
    return [
        _condition(READY, False, "ReplicasNotReady", message),
        _condition(RECONCILING, True, "ReplicasNotReady", message),
        _condition(STALLED, False, "ReplicasNotReady", message),
    ]


def fleet_status(fleets: Mapping[str, Manifest | None]) -> list[Manifest]:
    out = []
    for name, body in sorted(fleets.items()):
        fleet_status = (body or {}).get("status") or {}
        ready = any(
            c.get("type") == READY and c.get("status") == "True"
            for c in fleet_status.get("conditions") or []
        )
        out.append(
            {"name": name, "ready": ready,
             "readyReplicas": int(fleet_status.get("readyReplicas") or 0)}
        )  # fmt: skip
    return out
