"""What both Triton models share: reading a request, metrics, error responses.

`pb` is Triton's `triton_python_backend_utils`, importable only inside Triton's
Python backend stub, so it is passed in rather than imported here.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import numpy as np

from ttsfleet.serving import variants
from ttsfleet.serving.engine import Audio, Request, RequestError, Synthesizer, check_request
from ttsfleet.serving.streaming import CHUNKED_PRECISIONS, ChunkedSynthesizer, ensure_split
from ttsfleet.triton import contract

Engine = Synthesizer | ChunkedSynthesizer

TTFA_BUCKETS = [0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0]


def load(pb: Any, args: dict[str, str]) -> tuple[Engine, str]:
    """The engine for the voice, precision and engine in the model's config parameters.

    `engine` "chunked" runs the split voice a chunk at a time, in both models (a stream
    and a batch request give the same audio, to one int16 step); "sentence" (the
    default) a sentence at a time.
    Chunked runs fp32, fp16 (the frame part in FP16, the text part in FP32) and int8
    (its frame part in static INT8, built and gated on first use where the image did
    not build it) on CPU instances, fp32 and fp16 on GPU instances (opt-in, below), its
    frame part on the fixed shapes of its windows and `batch_sizes` (on a GPU, one
    CUDA graph each: `serving.frames`); anything else falls back to the sentence
    engine, with a line in Triton's log saying so.
    """
    config = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in (config.get("parameters") or {}).items()}
    # Triton says which kind of instance this is, and for KIND_GPU which GPU it is on.
    gpu = args.get("model_instance_kind") == "GPU"
    device_id = int(args.get("model_instance_device_id") or 0)
    voice, precision = params.get("voice", "en_US-joe-medium"), params.get("precision", "fp32")
    where = f"GPU {device_id}" if gpu else "CPU"
    kind = params.get("engine", "sentence")
    device = "cuda" if gpu else "cpu"
    # Not yet measured on a GPU: there the chunked engine runs only when the config asks
    # (`gpu_engine: chunked`, as `benchmarks/gpu_bench.py` does); GPU fleets keep the
    # sentence engine measured on an H100 until its figures are in.
    unproven = gpu and params.get("gpu_engine") != "chunked"
    engine: Engine
    if kind == "chunked" and precision in CHUNKED_PRECISIONS[device] and not unproven:
        threads = None if gpu else max(1, _cores() // lanes(args))
        directory = ensure_split(voice)
        if precision == "int8":
            try:
                variants.ensure_int8(voice, directory)
            except variants.VariantError as err:
                raise RequestError(str(err)) from err
        engine = ChunkedSynthesizer(
            voice, directory, threads=threads, precision=precision, device=device,
            device_id=device_id, rows=batch_sizes(args),
        )  # fmt: skip
    else:
        if kind == "chunked" and unproven:
            pb.Logger.log_warn(
                "the chunked engine is not yet measured on GPUs (parameter gpu_engine: "
                f"chunked runs it); {where} uses the sentence engine"
            )
        elif kind == "chunked":
            pb.Logger.log_warn(
                f"the chunked engine runs {' and '.join(CHUNKED_PRECISIONS[device])} on "
                f"{where} instances; {precision} uses the sentence engine"
            )
            kind = "sentence"
        engine = Synthesizer(voice, precision, device=device, device_id=device_id)
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


def read_request(pb: Any, request: Any, voice: str, priority: str = "realtime") -> Request:
    """The request's inputs, checked (RequestError says what is wrong); `priority` is
    the model's default for requests that do not say."""
    rate = _first(pb, request, "SPEAKING_RATE")
    return check_request(
        _first(pb, request, "TEXT") or b"",
        _first(pb, request, "VOICE"),
        None if rate is None else float(rate),
        _first(pb, request, "FORMAT"),
        default_voice=voice,
        priority=_first(pb, request, "PRIORITY"),
        default_priority=priority,
    )


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _params(args: dict[str, str]) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in (config.get("parameters") or {}).items()}


def lanes(args: dict[str, str]) -> int:
    """How many threads run the scheduler's work side by side (the `lanes` parameter;
    by default 2, or 1 on a single core), each with its share of the cores. A GPU
    instance runs one: its batches go to the GPU in turn, and its CUDA graphs are
    captured by the thread that replays them (`serving.frames`)."""
    if args.get("model_instance_kind") == "GPU":
        return 1
    text = _params(args).get("lanes") or str(min(2, _cores()))
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise RequestError(f"lanes {text!r} must be a whole number from 1 to 64")
    return int(text)


def cut_short(args: dict[str, str]) -> bool:
    """Whether a new stream's first audio may cut short work nobody waits for
    (`serving.worker.Worker`; the `cut_short` parameter, "true" by default on CPU
    instances; never on GPU ones, whose windows take milliseconds)."""
    if args.get("model_instance_kind") == "GPU":
        return False
    text = _params(args).get("cut_short", "true").lower()
    if text not in ("true", "false"):
        raise RequestError(f"cut_short {text!r} must be true or false")
    return text == "true"


def wide_engine(engine: ChunkedSynthesizer) -> ChunkedSynthesizer | None:
    """An engine on every core for a new stream's first audio while the other lanes
    are idle (`serving.worker.Worker`), when the lanes each have fewer threads than
    there are cores."""
    if engine.device != "cpu":
        return None
    cores = _cores()
    return engine.lane(cores) if (engine.threads or cores) < cores else None


def batch_sizes(args: dict[str, str]) -> tuple[int, ...]:
    """The batch sizes the scheduler may run (the `batch_sizes` parameter, "1,2,4,8"):
    on a CPU 1 alone by default, where a batch costs its rows' sum (measured: 0.43 ms a
    frame at 1, 2, 4 or 8 rows) and only holds back a new stream's first audio."""
    text = _params(args).get("batch_sizes", "1")
    try:
        sizes = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        raise RequestError(f"batch_sizes {text!r} is not a list of numbers like 1,2,4,8") from None
    if not sizes or sizes[0] != 1 or sizes[-1] > 64:
        raise RequestError(f"batch_sizes {text!r} must start at 1 and stay at most 64")
    return sizes


def error_message(err: Exception) -> str:
    return str(err) if isinstance(err, RequestError) else f"synthesis failed: {err}"


class TritonSink:
    """A stream's audio to its gRPC client through Triton's response sender, with the
    contract's metrics (`serving.worker.Sink`).

    Every call into Triton (response sender, cancel flag, metrics) is made under one
    lock: with two scheduler lanes sending at once, tritonserver crashed in its Python
    backend (SIGSEGV in libtriton_python, reproduced at 16 streams)."""

    _lock = threading.Lock()

    def __init__(self, pb: Any, request: Any, metrics: Metrics, sample_rate: int) -> None:
        self.pb, self.request, self.metrics, self.sample_rate = pb, request, metrics, sample_rate
        self.arrived = time.perf_counter()
        self.first = True
        self.bulk = False  # a bulk stream's first audio is not a listener's wait: not in TTFA
        self.waiting = False  # counted in the waiting gauge until its first audio
        with self._lock:
            self.sender = request.get_response_sender()
            metrics.inflight.increment(1)

    def admitted(self, bulk: bool) -> None:
        """The request was read: a live one waits (the gauge) until its first audio."""
        self.bulk = bulk
        if not bulk:
            with self._lock:
                self.metrics.waiting.increment(1)
                self.waiting = True

    def _answered(self) -> None:  # under the lock
        if self.waiting:
            self.metrics.waiting.increment(-1)
            self.waiting = False

    def cancelled(self) -> bool:
        with self._lock:
            return bool(self.request.is_cancelled())

    def audio(self, samples: Audio) -> None:
        pb = self.pb
        tensors = outputs(pb, samples, self.sample_rate, False)
        with self._lock:
            self.sender.send(pb.InferenceResponse(output_tensors=tensors))
            if self.first and not self.bulk:
                self.metrics.ttfa.observe(time.perf_counter() - self.arrived)
            self._answered()
            self.first = False
            self.metrics.audio_seconds.increment(len(samples) / self.sample_rate)

    def end(self, error: str | None = None) -> None:
        pb = self.pb
        with self._lock:
            self.metrics.inflight.increment(-1)
            self._answered()
            if error is None:
                self.sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            try:
                response = pb.InferenceResponse(error=pb.TritonError(error))
                self.sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception:  # the client is gone (cancelled): nothing to tell
                pb.Logger.log_warn(f"could not send the error: {error}")


def stream_call(pb: Any, request: Request) -> Any:
    """The BLS request that has `tts_stream` of this server synthesise `request` (its
    scheduler, at the request's priority): the batch model's path with the chunked
    engine. Send it with `async_exec(decoupled=True)` from the model's own thread (BLS
    calls from threads of our own crashed tritonserver) and join its responses with
    `joined`."""

    def text(value: str) -> Any:
        return np.array([value.encode("utf-8")], dtype=np.object_)

    inputs = [
        pb.Tensor("TEXT", text(request.text)),
        pb.Tensor("VOICE", text(request.voice)),
        pb.Tensor("SPEAKING_RATE", np.array([request.rate], dtype=np.float32)),
        pb.Tensor("PRIORITY", text(request.priority)),
    ]
    return pb.InferenceRequest(
        model_name=contract.STREAM_MODEL, inputs=inputs,
        requested_output_names=["AUDIO", "SAMPLE_RATE"],
    )  # fmt: skip


def joined(pb: Any, responses: Any) -> tuple[Audio, int]:
    """The audio of a decoupled call's responses, joined, and its sample rate."""
    parts, sample_rate = [], 0
    for response in responses:
        if response.has_error():
            raise RequestError(response.error().message())
        audio = pb.get_output_tensor_by_name(response, "AUDIO")
        if audio is None:  # the final, empty response
            continue
        parts.append(audio.as_numpy().reshape(-1))
        rate = pb.get_output_tensor_by_name(response, "SAMPLE_RATE")
        sample_rate = int(rate.as_numpy().reshape(-1)[0])
    audio = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)
    return audio.astype(np.int16), sample_rate


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
            pb.MetricFamily(
                name=contract.WAITING_STREAMS,
                description="Live streams taken and not yet at their first audio",
                kind=pb.MetricFamily.GAUGE,
            ),
        ]
        self.ttfa = self.families[0].Metric(labels=labels, buckets=TTFA_BUCKETS)
        self.audio_seconds = self.families[1].Metric(labels=labels)
        self.inflight = self.families[2].Metric(labels=labels)
        self.waiting = self.families[3].Metric(labels=labels)
