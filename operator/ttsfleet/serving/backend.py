"""What both Triton models share: reading a request, metrics, error responses.

`pb` is Triton's `triton_python_backend_utils`, importable only inside Triton's
Python backend stub, so it is passed in rather than imported here.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ttsfleet.serving.engine import Audio, Request, Synthesizer, check_request
from ttsfleet.serving.streaming import ChunkedSynthesizer, ensure_split
from ttsfleet.triton import contract

Engine = Synthesizer | ChunkedSynthesizer

TTFA_BUCKETS = [0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0]


def load(pb: Any, args: dict[str, str]) -> tuple[Engine, str]:
    """The engine for the voice, precision and engine in the model's config parameters.

    `engine` "chunked" runs the split voice a chunk at a time, in both models (a stream
    and a batch request give the same audio, to one int16 step); "sentence" (the
    default) a sentence at a time.
    Chunked is built for fp32 on CPU instances; anything else falls back to the
    sentence engine, with a line in Triton's log saying so.
    """
    config = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in (config.get("parameters") or {}).items()}
    # Triton says which kind of instance this is, and for KIND_GPU which GPU it is on.
    gpu = args.get("model_instance_kind") == "GPU"
    device_id = int(args.get("model_instance_device_id") or 0)
    voice, precision = params.get("voice", "en_US-joe-medium"), params.get("precision", "fp32")
    where = f"GPU {device_id}" if gpu else "CPU"
    kind = params.get("engine", "sentence")
    engine: Engine
    if kind == "chunked" and precision == "fp32" and not gpu:
        engine = ChunkedSynthesizer(voice, ensure_split(voice))
    else:
        if kind == "chunked":
            pb.Logger.log_warn(
                f"the chunked engine runs fp32 on CPU instances; {precision} on {where} "
                "uses the sentence engine"
            )
            kind = "sentence"
        engine = Synthesizer(voice, precision, device="cuda" if gpu else "cpu", device_id=device_id)
    pb.Logger.log_info(
        f"Loaded voice {engine.voice_name} ({engine.precision}, {kind} engine) on {where}, "
        f"{engine.sample_rate} Hz"
    )
    return engine, config["name"]


def _first(pb: Any, request: Any, name: str) -> Any:
    tensor = pb.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    return values[0] if values.size else None


def read_request(pb: Any, request: Any, voice: str) -> Request:
    """The request's inputs, checked (RequestError says what is wrong)."""
    rate = _first(pb, request, "SPEAKING_RATE")
    return check_request(
        _first(pb, request, "TEXT") or b"",
        _first(pb, request, "VOICE"),
        None if rate is None else float(rate),
        _first(pb, request, "FORMAT"),
        default_voice=voice,
    )


def outputs(pb: Any, audio: Audio, sample_rate: int, batched: bool) -> list[Any]:
    shape = (1, -1) if batched else (-1,)
    rate_shape = (1, 1) if batched else (1,)
    return [
        pb.Tensor("AUDIO", audio.astype(np.int16).reshape(shape)),
        pb.Tensor("SAMPLE_RATE", np.array([sample_rate], dtype=np.int32).reshape(rate_shape)),
    ]


class Metrics:
    """The serving contract's custom metrics, through the Python backend's metrics API.

    The MetricFamily objects must stay referenced: a Metric whose family was
    garbage-collected raises on every update.
    """

    def __init__(self, pb: Any, model: str) -> None:
        labels = {"model": model}
        self.families = [
            pb.MetricFamily(
                name=contract.TIME_TO_FIRST_AUDIO,
                description="Seconds from a request's arrival to its first audio",
                kind=pb.MetricFamily.HISTOGRAM,
            ),
            pb.MetricFamily(
                name=contract.AUDIO_SECONDS,
                description="Seconds of audio synthesized",
                kind=pb.MetricFamily.COUNTER,
            ),
            pb.MetricFamily(
                name=contract.INFLIGHT_STREAMS,
                description="Requests being synthesized now (open streams)",
                kind=pb.MetricFamily.GAUGE,
            ),
        ]
        self.ttfa = self.families[0].Metric(labels=labels, buckets=TTFA_BUCKETS)
        self.audio_seconds = self.families[1].Metric(labels=labels)
        self.inflight = self.families[2].Metric(labels=labels)
