"""One reconcile of a `TtsDeployment`: read it, build its children, apply them, report.

Level-based and idempotent: every call converges on the same children whatever
happened before (an operator killed mid-way, a child deleted or edited by hand),
and an unchanged object changes nothing (server-side apply of the same content
writes nothing).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from ttsfleet import kube, status
from ttsfleet.api import v1alpha1 as api
from ttsfleet.gpu import planner
from ttsfleet.resources import PlacementError, TtsObject, build_children
from ttsfleet.resources.common import DEPLOYMENT_LABEL, FIELD_MANAGER, drifted
from ttsfleet.resources.placement import gpu_tolerations, resolve_placement
from ttsfleet.resources.service import endpoints

log = logging.getLogger(__name__)
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


NODES = NodeCache()


@dataclass(frozen=True)
class Outcome:
    applied: bool
    stalled_reason: str | None
    seconds: float
    ready: bool = False


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        parts.append(f"spec.{where}: {e['msg']}")
    return "; ".join(parts)


def _with_offers(
    api_client: client.ApiClient, tts: TtsObject, old_status: Manifest, generation: int
) -> TtsObject:
    """`tts` with what the nodes its pods may land on offer (placement.mode auto)."""
    wanted = tts.spec.placement
    nodes = planner.eligible_nodes(
        NODES.nodes(api_client), wanted.node_selector, gpu_tolerations(wanted)
    )
    # The same spec keeps its slice while it fits; a new generation is planned anew.
    same = old_status.get("observedGeneration") == generation
    return replace(
        tts,
        offers=tuple(planner.options_from_nodes(nodes)),
        placed=old_status.get("placement") if same else None,
    )


def reconcile(
    api_client: client.ApiClient,
    body: Manifest,
    *,
    apply: bool = True,
    live_child: Manifest | None = None,
    metrics: tuple[bool | None, str, str] | None = None,
) -> Outcome:
    """Bring the children of `body` in line with its spec and report in its status.

    With `apply=False` only the status is refreshed (a pod changed). With a
    `live_child` (a child as a watch event showed it), the children are applied
    only if that child drifted from what it should be: gone, or edited by hand.
    """
    start = time.monotonic()
    meta = body["metadata"]
    generation = int(meta.get("generation") or 0)
    old_status = body.get("status") or {}
    try:
        tts = TtsObject.from_body(body)
        if tts.spec.placement.mode == api.PlacementMode.AUTO:
            tts = _with_offers(api_client, tts, old_status, generation)
        placement = resolve_placement(tts.spec, tts.offers, tts.placed)
        children = build_children(tts)
    except (ValidationError, PlacementError) as err:
        reason = "InvalidSpec" if isinstance(err, ValidationError) else "PlacementUnavailable"
        message = _describe(err) if isinstance(err, ValidationError) else str(err)
        conditions = status.stalled_conditions(reason, message)
        new = {
            "observedGeneration": generation,
            "conditions": status.merge_conditions(
                old_status.get("conditions") or [], conditions, generation, _now()
            ),
        }
        if _changed(old_status, new):
            kube.patch_custom_status(
                api_client, api.GROUP, api.VERSION, api.PLURAL, meta["namespace"], meta["name"], new
            )
            kube.post_event(api_client, body, "Warning", reason, message)
        return Outcome(False, reason, time.monotonic() - start)

    spec = tts.spec
    if spec.replicas is None:
        # spec.replicas defaults to minReplicas; written as any scaler would.
        kube.scale_custom(
            api_client, api.GROUP, api.VERSION, api.PLURAL, tts.namespace, tts.name,
            spec.min_replicas,
        )  # fmt: skip
    if live_child is not None:
        apply = _child_drifted(children, live_child)
    if apply:
        try:
            kube.apply(api_client, children, FIELD_MANAGER)
        except ApiException as err:
            if err.status == 403 and "NamespaceTerminating" in str(err.body):
                # The namespace is going away, and this object with it.
                return Outcome(False, None, time.monotonic() - start)
            # Said where users look; kopf retries the event with backoff.
            kube.post_event(
                api_client, body, "Warning", "ApplyFailed",
                f"Applying the children failed ({err.status} {err.reason}): {err.body or ''}",
            )  # fmt: skip
            raise
    deployment = kube.get(api_client, "apps/v1", "Deployment", tts.name, tts.namespace)
    ready = int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0)
    # Pods matter only while some are not ready (why: the scheduler's reason).
    pods = (
        kube.list_pods(api_client, tts.namespace, f"{DEPLOYMENT_LABEL}={tts.name}")
        if ready < spec.desired_replicas
        else []
    )
    have = None
    if placement.option is not None and status.unschedulable_message(pods):
        # Why pods wait, in the planner's numbers: slices there are, and taken.
        nodes = planner.eligible_nodes(
            NODES.nodes(api_client), placement.node_selector, placement.tolerations
        )
        have = planner.capacity(placement.option, nodes, NODES.bound_pods(api_client))
    observed = status.Observed(
        generation=generation,
        desired_replicas=spec.desired_replicas,
        deployment=deployment,
        pods=pods,
        scaling_mode=spec.scaling.mode.value,
        metrics=metrics,
        capacity=have,
        slice_name=placement.summary,
    )
    dep_status = (deployment or {}).get("status") or {}
    conditions = status.merge_conditions(
        old_status.get("conditions") or [], status.conditions_for(observed), generation, _now()
    )
    new = {
        "observedGeneration": generation,
        "conditions": conditions,
        "replicas": int(dep_status.get("replicas") or 0),
        "readyReplicas": int(dep_status.get("readyReplicas") or 0),
        "desiredReplicas": spec.desired_replicas,
        "selector": f"{DEPLOYMENT_LABEL}={tts.name}",
        "precision": spec.model.precision.value,
        "placement": placement.summary,
        "endpoints": endpoints(tts),
    }
    if _changed(old_status, new):
        kube.patch_custom_status(
            api_client, api.GROUP, api.VERSION, api.PLURAL, tts.namespace, tts.name, new
        )
        if old_status.get("observedGeneration") != generation:
            kinds = ", ".join(c["kind"] for c in children)
            kube.post_event(
                api_client,
                body,
                "Normal",
                "Applied",
                f"Applied {kinds} for generation {generation}",
            )
    ready = any(c["type"] == status.READY and c["status"] == "True" for c in conditions)
    return Outcome(apply, None, time.monotonic() - start, ready)


def _child_drifted(children: list[Manifest], live: Manifest) -> bool:
    kind, name = live.get("kind"), live.get("metadata", {}).get("name")
    desired = next(
        (c for c in children if c["kind"] == kind and c["metadata"]["name"] == name), None
    )
    if desired is None:
        return False  # not one of ours any more (renamed); garbage collection removes it
    if live.get("metadata", {}).get("deletionTimestamp"):
        return True
    return drifted({k: v for k, v in desired.items() if k != "status"}, live)


def _changed(old: Manifest, new: Manifest) -> bool:
    """Whether `new` says something `old` does not (ignoring fields only others write)."""
    return any(old.get(k) != v for k, v in new.items())
