"""Pure builders: a `TtsDeployment` in, the manifests of its children out.

`build_children` is what the reconciler applies. Builders never mutate their
inputs and do no I/O.
"""

from __future__ import annotations

from ttsfleet.resources.common import Manifest, TtsObject
from ttsfleet.resources.configmap import build_configmap
from ttsfleet.resources.deployment import build_deployment
from ttsfleet.resources.pdb import build_pdb
from ttsfleet.resources.placement import PlacementError, resolve_placement
from ttsfleet.resources.service import build_service

__all__ = [
    "Manifest",
    "PlacementError",
    "TtsObject",
    "build_children",
    "build_configmap",
    "build_deployment",
    "build_pdb",
    "build_service",
    "resolve_placement",
]


def build_children(tts: TtsObject) -> list[Manifest]:
    """Every child, in the order they are applied (config before the pods that mount it)."""
    configmap = build_configmap(tts)
    return [configmap, build_service(tts), build_deployment(tts, configmap), build_pdb(tts)]
