"""The ConfigMap holding the Triton `config.pbtxt` of the served model (and, for a
batch fleet on the chunked engine, of the `tts_stream` model whose scheduler it uses)."""

from __future__ import annotations

from dataclasses import replace

from ttsfleet.resources.common import Manifest, TtsObject, child, configmap_name
from ttsfleet.resources.placement import Placement
from ttsfleet.triton import contract
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


STREAM_CONFIG_KEY = "stream.pbtxt"


def models(tts: TtsObject) -> list[str]:
    """The models a fleet's Triton loads: the one it serves, and `tts_stream` under a
    chunked `tts_batch` (which sends its requests through that model's scheduler)."""
    if tts.spec.streaming:
        return [contract.STREAM_MODEL]
    if tts.spec.runtime.engine.value == "chunked":
        return [contract.BATCH_MODEL, contract.STREAM_MODEL]
    return [contract.BATCH_MODEL]


def build_configmap(tts: TtsObject, placement: Placement) -> Manifest:
    config = model_config(tts, placement)
    data = {"config.pbtxt": render(config)}
    if contract.STREAM_MODEL in models(tts) and not config.streaming:
        data[STREAM_CONFIG_KEY] = render(replace(config, streaming=True))
    return child(tts, "v1", "ConfigMap", configmap_name(tts), {"data": data})
