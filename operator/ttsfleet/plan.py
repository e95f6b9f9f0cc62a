"""What one reconcile of a `TtsDeployment` should do, from what was observed. Pure.

Two steps, with the executor (`reconcile.py`) reading and writing between them:

1. `desire(body, nodes, ...)`: the spec and the nodes -> the children to apply (or why
   the spec cannot be honoured: `Stalled`), and the scale write that defaults
   `spec.replicas`. The placement is resolved once, here, and handed to every builder.
2. `report(desired, children, ...)`: what the children report afterwards (the
   Deployment, the pods while some are not ready, the bound pods when some wait for a
   slice) -> the status patch (None when nothing changed) and the Events to post.

Nothing here does I/O or reads the clock: `now` comes in as a parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from ttsfleet import status
from ttsfleet.api import v1alpha1 as api
from ttsfleet.gpu import planner
from ttsfleet.resources import Placement, PlacementError, TtsObject, build_children
from ttsfleet.resources.common import DEPLOYMENT_LABEL, drifted
from ttsfleet.resources.placement import gpu_tolerations, resolve_placement
from ttsfleet.resources.service import endpoints
from ttsfleet.triton import contract

Manifest = dict[str, Any]
# (True means unavailable, reason, message): the autoscaler's MetricsUnavailable word.
MetricsCondition = tuple[bool | None, str, str]


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Desired:
    """What the spec asks for. Exactly one of `children`/`stalled` says it."""

    body: Manifest
    generation: int
    tts: TtsObject | None = None
    placement: Placement | None = None
    children: tuple[Manifest, ...] = ()
    apply: bool = False  # whether to send `children` this time
    scale_to: int | None = None  # spec.replicas to write through the scale subresource
    stalled: tuple[str, str] | None = None  # (reason, message): the user must change the spec
    gone: bool = False  # deleted, or being deleted: nothing to do, forget it

    @property
    def key(self) -> tuple[str, str]:
        meta = self.body["metadata"]
        return meta["namespace"], meta["name"]


@dataclass(frozen=True)
class Report:
    status: Manifest | None  # the merge patch of status; None when nothing changed
    events: tuple[Event, ...] = ()
    ready: bool = False
    stalled_reason: str | None = None


@dataclass(frozen=True)
class Children:
    """What the executor read back after applying."""

    deployment: Manifest | None
    pods: Sequence[Manifest] = ()  # only while some replicas are not ready
    bound_pods: Sequence[Manifest] = ()  # only when `needs_capacity` said so
    nodes: Sequence[Manifest] = field(default_factory=list)


def desire(
    body: Manifest | None,
    nodes: Sequence[Manifest],
    *,
    apply: bool,
    live_child: Manifest | None = None,
) -> Desired | None:
    """The children of `body` and whether to apply them now.

    `nodes` is the cluster's node list (read by `placement.mode: auto` only). With
    `apply=False` only the status is refreshed. With a `live_child` (a child as a watch
    event showed it) the children are applied only if that child drifted: gone, or
    edited by hand. None when `body` is None (deleted before it was read).
    """
    if body is None:
        return None
    meta = body["metadata"]
    generation = int(meta.get("generation") or 0)
    if meta.get("deletionTimestamp"):
        return Desired(body, generation, gone=True)
    old_status = body.get("status") or {}
    try:
        tts = TtsObject.from_body(body)
        if tts.spec.placement.mode == api.PlacementMode.AUTO:
            tts = _with_offers(tts, nodes, old_status, generation)
        if (problem := voice_problem(tts.spec)) is not None:
            return Desired(body, generation, tts, stalled=("VoiceUnavailable", problem))
        placement = resolve_placement(tts.spec, tts.offers, tts.placed)
        children = tuple(build_children(tts, placement))
    except ValidationError as err:
        return Desired(body, generation, stalled=("InvalidSpec", describe(err)))
    except PlacementError as err:
        return Desired(body, generation, stalled=("PlacementUnavailable", str(err)))
    if live_child is not None:
        apply = _child_drifted(children, live_child)
    scale_to = tts.spec.min_replicas if tts.spec.replicas is None else None
    return Desired(body, generation, tts, placement, children, apply, scale_to)


def voice_problem(spec: api.TtsDeploymentSpec) -> str | None:
    """Why the model image cannot serve the voice, or None.

    Only ttsfleet's own image is known (`contract.IMAGE_VOICES`); a custom
    `runtime.image` may serve other voices, so it is trusted.
    """
    voice, image = spec.model.voice, spec.runtime.image
    if not contract.is_model_image(image) or voice in contract.IMAGE_VOICES:
        return None
    served = ", ".join(contract.IMAGE_VOICES)
    return (
        f"spec.model.voice: {voice} is not served by the image {image}, which serves "
        f"{served}: pick one of those, or set spec.runtime.image to an image that serves {voice}"
    )


def needs_pods(desired: Desired, deployment: Manifest | None) -> bool:
    """Pods matter only while some replicas are not ready (why: the scheduler's reason)."""
    assert desired.tts is not None
    ready = int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0)
    return ready < desired.tts.spec.desired_replicas


def needs_capacity(desired: Desired, pods: Sequence[Manifest]) -> bool:
    """Whether to count the slices (read the bound pods): some pod waits for a slice."""
    placement = desired.placement
    return bool(placement and placement.option and status.unschedulable_message(pods))


def report(
    desired: Desired,
    children: Children | None,
    *,
    now: str,
    metrics: MetricsCondition | None = None,
) -> Report:
    """The status (and Events) for what `desired` asked and `children` show.

    `children` is None for a stalled spec (nothing was applied or read).
    """
    body = desired.body
    old_status = body.get("status") or {}
    generation = desired.generation
    if desired.stalled is not None or desired.tts is None or children is None:
        reason, message = desired.stalled or ("InvalidSpec", "the spec could not be read")
        new = {
            "observedGeneration": generation,
            "conditions": status.merge_conditions(
                old_status.get("conditions") or [],
                status.stalled_conditions(reason, message),
                generation,
                now,
            ),
        }
        if not changed(old_status, new):
            return Report(None, stalled_reason=reason)
        return Report(new, (Event("Warning", reason, message),), stalled_reason=reason)

    tts, placement = desired.tts, desired.placement
    assert placement is not None
    spec = tts.spec
    have = None
    if needs_capacity(desired, children.pods):
        # Why pods wait, in the planner's numbers: slices there are, and taken.
        assert placement.option is not None
        eligible = planner.eligible_nodes(
            children.nodes, placement.node_selector, placement.tolerations
        )
        have = planner.capacity(placement.option, eligible, children.bound_pods)
    observed = status.Observed(
        generation=generation,
        desired_replicas=spec.desired_replicas,
        deployment=children.deployment,
        pods=children.pods,
        scaling_mode=spec.scaling.mode.value,
        metrics=metrics,
        capacity=have,
        slice_name=placement.summary,
    )
    dep_status = (children.deployment or {}).get("status") or {}
    conditions = status.merge_conditions(
        old_status.get("conditions") or [], status.conditions_for(observed), generation, now
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
    ready = any(c["type"] == status.READY and c["status"] == "True" for c in conditions)
    if not changed(old_status, new):
        return Report(None, ready=ready)
    events: tuple[Event, ...] = ()
    if old_status.get("observedGeneration") != generation:
        kinds = ", ".join(c["kind"] for c in desired.children)
        events = (Event("Normal", "Applied", f"Applied {kinds} for generation {generation}"),)
    return Report(new, events, ready=ready)


def _with_offers(
    tts: TtsObject, nodes: Sequence[Manifest], old_status: Manifest, generation: int
) -> TtsObject:
    """`tts` with what the nodes its pods may land on offer (placement.mode auto)."""
    wanted = tts.spec.placement
    eligible = planner.eligible_nodes(nodes, wanted.node_selector, gpu_tolerations(wanted))
    # The same spec keeps its slice while it fits; a new generation is planned anew.
    same = old_status.get("observedGeneration") == generation
    return replace(
        tts,
        offers=tuple(planner.options_from_nodes(eligible)),
        placed=old_status.get("placement") if same else None,
    )


def describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        if not e["loc"]:  # a rule across fields: its message names them
            parts.append(str(e["msg"]).removeprefix("Value error, "))
            continue
        where = ".".join(str(p) for p in e["loc"])
        parts.append(f"spec.{where}: {e['msg']}")
    return "; ".join(parts)


def _child_drifted(children: Sequence[Manifest], live: Manifest) -> bool:
    kind, name = live.get("kind"), live.get("metadata", {}).get("name")
    desired = next(
        (c for c in children if c["kind"] == kind and c["metadata"]["name"] == name), None
    )
    if desired is None:
        return False  # not one of ours any more (renamed); garbage collection removes it
    if live.get("metadata", {}).get("deletionTimestamp"):
        return True
    return drifted({k: v for k, v in desired.items() if k != "status"}, live)


def changed(old: Manifest, new: Manifest) -> bool:
    """Whether `new` says something `old` does not (ignoring fields only others write)."""
    return any(old.get(k) != v for k, v in new.items())
