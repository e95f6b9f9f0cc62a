"""Pure builders: a `TtsDeployment` in, the manifests of its children out.

`build_children` is what the reconciler applies. Builders never mutate their
inputs and do no I/O.
"""

from __future__ import annotations

from ttsfleet.resources.common import Manifest, TtsObject
from ttsfleet.resources.configmap import build_configmap
from ttsfleet.resources.deployment import build_deployment
from ttsfleet.resources.networkpolicy import build_fleet_policy
from ttsfleet.resources.pdb import build_pdb
from ttsfleet.resources.placement import Placement, PlacementError, resolve_placement
from ttsfleet.resources.service import build_service

__all__ = [
    "Manifest",
    "Placement",
    "PlacementError",
    "TtsObject",
    "build_children",
    "build_configmap",
    "build_deployment",
    "build_fleet_policy",
    "build_pdb",
    "build_service",
    "resolve_placement",
]


def build_children(tts: TtsObject, placement: Placement | None = None) -> list[Manifest]:
    """Every child, in the order they are applied (config before the pods that mount it).

    `placement` is `resolve_placement`'s answer for `tts`, resolved here when not given
    (the reconciler resolves it once and passes it to every builder).
    """
    if placement is None:
        placement = resolve_placement(tts.spec, tts.offers, tts.placed)
    configmap = build_configmap(tts, placement)
    return [
        configmap,
        build_service(tts),
        build_deployment(tts, configmap, placement),
        build_pdb(tts),
        build_fleet_policy(tts),
    ]
