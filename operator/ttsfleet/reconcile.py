"""One reconcile of a `TtsDeployment`: the thin executor of `plan`.

It reads what the plan needs, applies what `plan.desire` says, reads the children
back and writes what `plan.report` says. Level-based and idempotent: every call
converges on the same children whatever happened before (an operator killed mid-way,
a child deleted or edited by hand), and an unchanged object changes nothing
(server-side apply of the same content writes nothing).
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import ResourceNotFoundError
from pydantic import ValidationError

from ttsfleet import kube, plan, status
from ttsfleet.api import v1alpha1 as api
from ttsfleet.resources import gateway as gw
from ttsfleet.resources import region as rg
from ttsfleet.resources.common import DEPLOYMENT_LABEL, FIELD_MANAGER

Manifest = dict[str, Any]


class NodeCache:
    """The cluster's nodes and bound pods, listed at most once per `ttl` seconds each
    (placement and the capacity count read them)."""

    def __init__(self, ttl: float = 15.0) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._lists: dict[str, tuple[float, list[Manifest]]] = {}

    def _fresh(self, what: str, load: Callable[[], list[Manifest]]) -> list[Manifest]:
        with self._lock:
            at, items = self._lists.get(what, (-math.inf, []))
            if time.monotonic() - at > self.ttl:
                items = load()
                self._lists[what] = (time.monotonic(), items)
            return items

    def nodes(self, api_client: client.ApiClient) -> list[Manifest]:
        return self._fresh("nodes", lambda: kube.list_nodes(api_client))

    def bound_pods(self, api_client: client.ApiClient) -> list[Manifest]:
        """Every pod on a node (what holds the slices)."""
        return self._fresh("pods", lambda: kube.list_bound_pods(api_client))


@dataclass(frozen=True)
class Outcome:
    applied: bool
    stalled_reason: str | None
    seconds: float
    ready: bool = False
    gone: bool = False


def now_stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def reconcile(
    api_client: client.ApiClient,
    body: Manifest | None,
    nodes: NodeCache,
    *,
    apply: bool = True,
    live_child: Manifest | None = None,
    metrics: plan.MetricsCondition | None = None,
) -> Outcome:
    """Carry out `plan` for `body` (as just read): apply, read back, report.

    With `apply=False` only the status is refreshed (a pod changed). With a
    `live_child` (a child as a watch event showed it), the children are applied
    only if that child drifted from what it should be: gone, or edited by hand.
    """
    start = time.monotonic()
    desired = plan.desire(
        body,
        nodes.nodes(api_client) if _auto(body) else (),
        apply=apply,
        live_child=live_child,
    )
    if desired is None or desired.gone:
        return Outcome(False, None, time.monotonic() - start, gone=True)
    if desired.stalled is not None:
        _write_report(api_client, desired, plan.report(desired, None, now=now_stamp()))
        return Outcome(False, desired.stalled[0], time.monotonic() - start)
    tts = desired.tts
    assert tts is not None
    if desired.scale_to is not None:
        # spec.replicas defaults to minReplicas; written as any scaler would.
        kube.scale_custom(
            api_client, api.GROUP, api.VERSION, api.PLURAL, tts.namespace, tts.name,
            desired.scale_to,
        )  # fmt: skip
    if desired.apply:
        try:
            kube.apply(api_client, desired.children, FIELD_MANAGER)
        except ApiException as err:
            if err.status == 403 and "NamespaceTerminating" in str(err.body):
                # The namespace is going away, and this object with it.
                return Outcome(False, None, time.monotonic() - start, gone=True)
            # Said where users look; the operator's re-check applies it again.
            kube.post_event(
                api_client, desired.body, "Warning", "ApplyFailed",
                f"Applying the children failed ({err.status} {err.reason}): {err.body or ''}",
            )  # fmt: skip
            raise
    deployment = kube.get(api_client, "apps/v1", "Deployment", tts.name, tts.namespace)
    pods: list[Manifest] = []
    if plan.needs_pods(desired, deployment):
        pods = kube.list_pods(api_client, tts.namespace, f"{DEPLOYMENT_LABEL}={tts.name}")
    children = plan.Children(deployment, pods)
    if plan.needs_capacity(desired, pods):
        children = plan.Children(
            deployment, pods, nodes.bound_pods(api_client), nodes.nodes(api_client)
        )
    result = plan.report(desired, children, now=now_stamp(), metrics=metrics)
    _write_report(api_client, desired, result)
    return Outcome(desired.apply, None, time.monotonic() - start, result.ready)


def _auto(body: Manifest | None) -> bool:
    """Whether `body` asks for automatic placement (the only reader of the node list)."""
    if body is None or body["metadata"].get("deletionTimestamp"):
        return False
    placement = (body.get("spec") or {}).get("placement") or {}
    return bool(placement.get("mode", api.PlacementMode.AUTO.value) == api.PlacementMode.AUTO)


def _write_report(api_client: client.ApiClient, desired: plan.Desired, result: plan.Report) -> None:
    if result.status is None:
        return
    namespace, name = desired.key
    kube.patch_custom_status(
        api_client, api.GROUP, api.VERSION, api.PLURAL, namespace, name, result.status
    )
    for event in result.events:
        kube.post_event(api_client, desired.body, event.type, event.reason, event.message)


# ---- TtsGateway ---------------------------------------------------------------------------


def reconcile_gateway(
    api_client: client.ApiClient, body: Manifest | None, node_reader: str = gw.NODE_READER
) -> Outcome:
    """Apply a `TtsGateway`'s children and write its status (see resources.gateway).

    Its routes' TtsDeployments are read each time: their voices go into the config, and
    a missing one is reported (Stalled, naming the route) while the rest keep serving.
    """
    start = time.monotonic()
    if body is None or body["metadata"].get("deletionTimestamp"):
        return Outcome(False, None, time.monotonic() - start, gone=True)
    meta = body["metadata"]
    generation = int(meta.get("generation") or 0)
    old_status = body.get("status") or {}
    problem = None
    try:
        gateway = gw.Gateway.from_body(body)
        duplicate = gateway.spec.duplicate_model()
        if duplicate is not None:
            index, model = duplicate
            problem = (
                f"spec.routes[{index}].models: {model!r} is already routed by an earlier "
                "route: give each model name one route"
            )
    except ValidationError as err:
        problem = plan.describe(err)
    if problem is not None:
        new = {
            "observedGeneration": generation,
            "conditions": status.merge_conditions(
                old_status.get("conditions") or [],
                gw.stalled_conditions("InvalidSpec", problem), generation, now_stamp(),
            ),
        }  # fmt: skip
        if plan.changed(old_status, new):
            _gateway_status(api_client, meta, new)
            kube.post_event(api_client, body, "Warning", "InvalidSpec", problem)
        return Outcome(False, "InvalidSpec", time.monotonic() - start)
    fleets = {
        name: kube.get_custom(
            api_client, api.GROUP, api.VERSION, api.PLURAL, gateway.namespace, name
        )
        for name in gateway.spec.fleet_names()
    }
    if gateway.spec.auth is not None:  # before the Deployment that mounts it
        kube.create_if_absent(api_client, gw.ticket_secret(gateway, secrets.token_bytes(32)))
    children = gw.children(gateway, fleets, node_reader, front_door_of(api_client, gateway))
    kube.apply(api_client, children, FIELD_MANAGER)
    deployment = kube.get(
        api_client, "apps/v1", "Deployment", gateway.child_name, gateway.namespace
    )
    dep_status = (deployment or {}).get("status") or {}
    conditions = gw.conditions(gateway, deployment, fleets)
    new = {
        "observedGeneration": generation,
        "conditions": status.merge_conditions(
            old_status.get("conditions") or [], conditions, generation, now_stamp()
        ),
        "replicas": int(dep_status.get("replicas") or 0),
        "readyReplicas": int(dep_status.get("readyReplicas") or 0),
        "selector": f"{gw.GATEWAY_LABEL}={gateway.name}",
        "url": gateway.url,
        "fleets": gw.fleet_status(fleets),
        "redis": _gateway_redis(api_client, gateway, old_status),
    }
    ready = conditions[0]["status"] == "True"
    stalled = conditions[0]["reason"] if conditions[2]["status"] == "True" else None
    if plan.changed(old_status, new):
        _gateway_status(api_client, meta, new)
        if old_status.get("observedGeneration") != generation:
            kinds = ", ".join(c["kind"] for c in children)
            kube.post_event(
                api_client, body, "Normal", "Applied",
                f"Applied {kinds} for generation {generation}",
            )  # fmt: skip
        if stalled and old_status.get("observedGeneration") != generation:
            kube.post_event(api_client, body, "Warning", stalled, conditions[0]["message"])
    return Outcome(True, stalled, time.monotonic() - start, ready)


def _gateway_redis(
    api_client: client.ApiClient, gateway: gw.Gateway, old_status: Manifest
) -> Manifest | None:
    """The status of the Redis the operator runs for `gateway`; None (a merge patch
    removes the field) once it runs none, after deleting the one it ran before."""
    name, namespace = gateway.redis_name, gateway.namespace
    if gw.managed_redis(gateway) is None:
        if old_status.get("redis"):  # it did: managedRedis was taken out of the spec
            for api_version, kind in gw.redis_leftovers():
                kube.delete_object(api_client, api_version, kind, name, namespace)
        return None
    redis = kube.get(api_client, "apps/v1", "Deployment", name, namespace)
    ready = int(((redis or {}).get("status") or {}).get("readyReplicas") or 0) > 0
    return {"service": name, "ready": ready}


def forget_gateway(api_client: client.ApiClient, namespace: str, name: str) -> None:
    """Delete what a deleted gateway leaves behind: its ClusterRoleBinding (cluster
    scoped, so no owner reference collects it)."""
    binding = gw.cluster_binding_name(namespace, name)
    kube.delete_object(api_client, "rbac.authorization.k8s.io/v1", "ClusterRoleBinding", binding)


def front_door_of(api_client: client.ApiClient, gateway: gw.Gateway) -> Manifest | None:
    """The TtsRegion (in the gateway's namespace) whose front door the gateway is."""
    try:
        regions = kube.list_objects(api_client, api.API_VERSION, api.REGION_KIND, gateway.namespace)
    except ResourceNotFoundError:  # the TtsRegion CRD is not installed: no regions
        return None
    named = [r for r in regions if (r.get("spec") or {}).get("gateway") == gateway.name]
    return min(named, key=lambda r: r["metadata"]["name"]) if named else None


def _gateway_status(api_client: client.ApiClient, meta: Manifest, new: Manifest) -> None:
    kube.patch_custom_status(
        api_client, api.GROUP, api.VERSION, api.GATEWAY_PLURAL, meta["namespace"], meta["name"],
        new,
    )  # fmt: skip


def reconcile_region(api_client: client.ApiClient, body: Manifest | None) -> Outcome:
    """Apply a `TtsRegion`'s agent (resources.region) and write its conditions; the agent
    writes `status.regions` itself. A spec the operator cannot act on, or a gateway that
    does not exist, is reported Stalled with the field and the fix."""
    start = time.monotonic()
    if body is None or body["metadata"].get("deletionTimestamp"):
        return Outcome(False, None, time.monotonic() - start, gone=True)
    meta = body["metadata"]
    generation = int(meta.get("generation") or 0)
    old_status = body.get("status") or {}
    problem, reason = None, "InvalidSpec"
    try:
        region = rg.Region.from_body(body)
    except ValidationError as err:
        problem = plan.describe(err)
    else:
        gateway = kube.get_custom(
            api_client, api.GROUP, api.VERSION, api.GATEWAY_PLURAL, region.namespace,
            region.spec.gateway,
        )  # fmt: skip
        if gateway is None and region.spec.gateway_url is None:
            reason = "GatewayMissing"
            problem = (
                f"spec.gateway names TtsGateway {region.spec.gateway!r}, which does not exist "
                f"in namespace {region.namespace!r}: create it, fix the name, or set "
                "spec.gatewayUrl"
            )
    deployment = None
    if problem is None:
        url = region.spec.gateway_url
        if url is None:
            url = gw.Gateway.from_body(gateway or {}).url.removesuffix("/v1")
        children = rg.children(region, url)
        gateway_spec = (gateway or {}).get("spec") or {}
        port = 443 if gateway_spec.get("tls") else 80
        public = rg.published(region, body, f"{region.spec.gateway}-gateway", port)
        kube.apply(api_client, children, FIELD_MANAGER)
        try:
            kube.apply(api_client, public, FIELD_MANAGER)
        except ResourceNotFoundError as err:
            reason = "PublishUnavailable"
            problem = (
                f"spec.publish needs a CRD this cluster does not have ({err}): install "
                "external-dns's DNSEndpoint or Gateway API's HTTPRoute (v1.6), or remove "
                "what spec.publish asks for"
            )
        deployment = kube.get(api_client, "apps/v1", "Deployment", region.child_name,
                              region.namespace)  # fmt: skip
    if problem is None:
        conditions = rg.conditions(body, deployment)
    else:
        conditions = rg.stalled_conditions(reason, problem)
    new = {
        "observedGeneration": generation,
        "conditions": status.merge_conditions(
            old_status.get("conditions") or [], conditions, generation, now_stamp()
        ),
    }
    if problem is None:
        new["statusUrl"] = region.status_url
    if plan.changed(old_status, new):
        kube.patch_custom_status(
            api_client, api.GROUP, api.VERSION, api.REGION_PLURAL, meta["namespace"],
            meta["name"], new,
        )  # fmt: skip
        if problem is not None and old_status.get("observedGeneration") != generation:
            kube.post_event(api_client, body, "Warning", reason, problem)
    ready = conditions[0]["status"] == "True"
    return Outcome(problem is None, reason if problem else None, time.monotonic() - start, ready)
