"""The PodDisruptionBudget: voluntary disruptions take one replica at a time."""

from __future__ import annotations

from ttsfleet.resources.common import Manifest, TtsObject, child, selector_labels


def build_pdb(tts: TtsObject) -> Manifest:
    spec = {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(tts)}}
    return child(tts, "policy/v1", "PodDisruptionBudget", tts.name, {"spec": spec})
