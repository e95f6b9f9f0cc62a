"""One reconcile of a `TtsDeployment`: the thin executor of `plan`.

It reads what the plan needs, applies what `plan.desire` says, reads the children
back and writes what `plan.report` says. Level-based and idempotent: every call
converges on the same children whatever happened before (an operator killed mid-way,
a child deleted or edited by hand), and an unchanged object changes nothing
(server-side apply of the same content writes nothing).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ttsfleet import kube, plan
from ttsfleet.api import v1alpha1 as api
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
