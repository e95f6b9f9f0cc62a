"""The ConfigMap holding the Triton `config.pbtxt` of the served model."""

from __future__ import annotations

from ttsfleet.resources.common import Manifest, TtsObject, child, configmap_name
from ttsfleet.resources.placement import Placement
from ttsfleet.triton.config import ModelConfig, render


def model_config(tts: TtsObject, placement: Placement) -> ModelConfig:
    spec = tts.spec
    batching = spec.batching
    return ModelConfig(
        streaming=spec.streaming,
        precision=spec.model.precision.value,
        voice=spec.model.voice,
        instances=placement.instances,
        gpu=placement.gpu,
        max_batch_size=batching.max_batch_size if batching else 8,
        max_queue_delay_microseconds=batching.max_queue_delay_microseconds if batching else 2000,
        cache=spec.cache is not None,
        engine=spec.runtime.engine.value,
    )


def build_configmap(tts: TtsObject, placement: Placement) -> Manifest:
    return child(
        tts, "v1", "ConfigMap", configmap_name(tts),
        {"data": {"config.pbtxt": render(model_config(tts, placement))}},
    )  # fmt: skip
