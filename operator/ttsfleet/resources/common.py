"""What every child shares: names, labels, owner references, the input hash."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ttsfleet.api import v1alpha1 as api
from ttsfleet.gpu.planner import Option

Manifest = dict[str, Any]

FIELD_MANAGER = "ttsfleet"
DEPLOYMENT_LABEL = "ttsfleet.io/deployment"
HASH_ANNOTATION = "ttsfleet.io/input-hash"
CONFIG_HASH_ANNOTATION = "ttsfleet.io/config-hash"


@dataclass(frozen=True)
class TtsObject:
    """The parts of a `TtsDeployment` that the builders read."""

    name: str
    namespace: str
    uid: str
    spec: api.TtsDeploymentSpec
    # What the cluster's nodes offer (GPU slices, whole and shared GPUs): read by
    # `placement.mode: auto` only.
    offers: tuple[Option, ...] = ()
    # The slice auto placement chose before (status.placement): kept while it fits.
    placed: str | None = None

    @classmethod
    def from_body(cls, body: Manifest, offers: Sequence[Option] = ()) -> TtsObject:
        """Parse an object as the API returns it; raises pydantic's ValidationError."""
        meta = body["metadata"]
        return cls(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta["uid"],
            spec=api.TtsDeploymentSpec.model_validate(body.get("spec") or {}),
            offers=tuple(offers),
        )


def selector_labels(tts: TtsObject) -> dict[str, str]:
    return {DEPLOYMENT_LABEL: tts.name}


def labels(tts: TtsObject) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "triton-tts",
        "app.kubernetes.io/instance": tts.name,
        "app.kubernetes.io/component": "tts-server",
        "app.kubernetes.io/managed-by": "ttsfleet",
        **selector_labels(tts),
    }


def owner_reference(tts: TtsObject) -> Manifest:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": tts.name,
        "uid": tts.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def content_hash(value: Any) -> str:
    """A short, stable hash of JSON-able `value`."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def child(tts: TtsObject, api_version: str, kind: str, name: str, body: Manifest) -> Manifest:
    """A child manifest with metadata, owner reference and the hash of its own content."""
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": tts.namespace,
            "labels": labels(tts),
            "annotations": {HASH_ANNOTATION: content_hash(body)},
            "ownerReferences": [owner_reference(tts)],
        },
        **body,
    }


def configmap_name(tts: TtsObject) -> str:
    return f"{tts.name}-triton"


def drifted(desired: Any, live: Any) -> bool:
    """Whether `live` no longer holds everything `desired` sets.

    Fields that `live` has beyond `desired` (defaults, status, other managers' fields)
    are not drift. Quantities and ports the apiserver writes back in another form
    would only cost one more, unchanged, apply.
    """
    if isinstance(desired, dict):
        return not isinstance(live, dict) or any(
            drifted(value, live.get(key)) for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            not isinstance(live, list)
            or len(desired) != len(live)
            or any(drifted(d, x) for d, x in zip(desired, live, strict=True))
        )
    return bool(desired != live)
