"""The chunked engine: a voice split in two, audio sent chunk by chunk as it is made.

A Piper (VITS) voice is cut at the input of its flow, into
- a **text part** (encoder, duration predictor, expansion to frames): phonemes in,
  the flow's input `z` (192 channels per 11.6 ms frame) and the frame mask out;
- a **frame part** (flow and HiFi-GAN decoder, convolutions only): frames in, audio
  out (256 samples per frame).
Run one after the other they are the whole voice. The frame part runs on windows of a
few fixed lengths (`FIRST_WINDOW` for a stream's first audio, `WINDOW` after it), each
with `CONTEXT` frames of its neighbours on the sides where the sentence goes on: it
needs them to make a chunk's audio as the whole run would (28 frames reproduce it
within 2e-5 of its peak, -94 dB; 24 leave -66 dB on some sentences, 16 -38 dB). A
window at a sentence's edge is placed against it (no context needed there), so a
window keeps up to `WINDOW - CONTEXT` frames; a sentence shorter than a window is
padded with masked frames. Fixed lengths let windows of many streams run as one batch
(`run_frames`), and let a GPU replay one captured graph per shape.

`Stream` is one request's progress; `need()` says what it needs next (the text part of
its next sentence, or a window of some length): `serving.scheduler` decides whose need
runs when, `serving.worker` runs it. `chunks` runs a single stream on its own (the
in-process path and the tests); `synthesize` (the sentence-at-a-time path) runs the
frame part on whole sentences.

Audio is scaled by one gain per voice (measured when the split is built: the loudest
of a set of sentences reaches `TARGET_PEAK`), not by each sentence's own peak as Piper
does, which a stream cannot know before the sentence ends; loudness is then the same
from sentence to sentence.

The split is built from the shipped voice by `build_split` (`ttsfleet models split`,
or on first load), nothing downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ttsfleet.serving.engine import (
    Audio,
    RequestError,
    default_model_dir,
    installed_voice,
    onnx_session,
    session_options,
)
from ttsfleet.serving.frames import FixedFrames, run_cuttable
from ttsfleet.serving.scheduler import TEXT, Need
from ttsfleet.serving.text import normalize

# The flow's input and the frame mask, as Piper's VITS export names them.
SPLIT_POINT = ("/Add_output_0", "/Cast_2_output_0")
TEXT_INPUTS = ("input", "input_lengths", "scales")
CONTEXT = 28  # frames of neighbours a window needs on each side where the sentence goes on
FIRST_CHUNK = 24  # frames (0.28 s at 22,050 Hz) of a stream's first audio
FIRST_WINDOW = FIRST_CHUNK + CONTEXT  # the window that makes it (a sentence's start)
WINDOW = 200  # frames of every later window: 144 kept between two contexts (1.7 s)
TARGET_PEAK = 0.95
# Kept in float32 in FP16 variants (the sentence engine's, the frame part's).
FP16_KEEP_FP32 = [
    "RandomNormalLike", "RandomUniformLike", "Range", "CumSum", "Exp", "Softplus", "Ceil",
    "Pow", "Sqrt", "ReduceSum", "ReduceMean", "Erf", "Shape", "ConstantOfShape", "Expand",
]  # fmt: skip
# What the chunked engine runs where: INT8 is CPU kernels only. FP16 (the frame part's
# weights; the text part stays FP32) earns its place on GPUs; on a CPU onnxruntime
# computes it through float32 at FP32's speed (measured), so the default precision is
# served by the chunked engine there too rather than by the sentence engine.
CHUNKED_PRECISIONS = {"cpu": ("fp32", "fp16", "int8"), "cuda": ("fp32", "fp16")}
CALIBRATION = (
    "The quick brown fox jumps over the lazy dog.",
    "Your order number is 4512, and it ships on Friday.",
    "Thanks for calling. How can I help you today?",
    "She sells seashells by the seashore, doesn't she?",
    "Wow! That is absolutely fantastic news!",
    "Please hold.",
)


# Sentences the INT8 frame part is calibrated on: none is a quality-gate sentence
# (`variants.GATE_SENTENCES`), so the gate judges text the calibration never saw.
INT8_CALIBRATION = (
    "Good morning, and thank you for calling the support line.",
    "Your balance is one hundred and twenty dollars and forty cents.",
    "I can help you with that. Could you spell your last name, please?",
    "The train to Boston leaves from platform nine at half past six.",
    "Press one for billing, two for technical support, or stay on the line.",
    "Wait... are you sure? That seems far too cheap!",
    "Chapter three. The storm rolled in over the hills before anyone noticed.",
    "Okay.",
)
# The convolutions the INT8 frame part quantises (name prefixes in Piper's VITS export):
# the flow and the decoder's first upsampling stage. `make bench-precision` chose them:
# adding parts in graph order, each kept while the calibration sentences stay within
# 1 dB of FP32 (the gate allows 1.5 on its own sentences). The second stage's parts
# each take that past 1.3 dB; every convolution of the last stage alone fails the gate.
INT8_PARTS = (
    "/flow/", "/dec/conv_pre/", "/dec/ups.0/", "/dec/resblocks.0/", "/dec/resblocks.1/",
    "/dec/resblocks.2/",
)  # fmt: skip
CONVS = ("Conv", "ConvTranspose")


@dataclass(frozen=True)
class SplitPaths:
    text: Path
    frames: Path
    meta: Path
    frames_int8: Path
    frames_fp16: Path

    def files(self) -> tuple[Path, ...]:
        """The split's own files (`build_split` writes them; INT8 is built apart)."""
        return (self.text, self.frames, self.frames_fp16, self.meta)

    def exist(self) -> bool:
        return all(p.exists() for p in self.files())

    def frame_part(self, precision: str) -> Path:
        return {"int8": self.frames_int8, "fp16": self.frames_fp16}.get(precision, self.frames)


def split_paths(voice: str, directory: Path | None = None) -> SplitPaths:
    base = directory or default_model_dir()
    return SplitPaths(
        base / f"{voice}.text.onnx", base / f"{voice}.frames.onnx", base / f"{voice}.split.json",
        base / f"{voice}.frames.int8.onnx", base / f"{voice}.frames.fp16.onnx",
    )  # fmt: skip


def build_split(voice: str, directory: Path | None = None) -> SplitPaths:
    """Cut `voice` in two at the flow's input, measure its gain, and write both parts
    and their metadata (each file written aside, then renamed into place)."""
    import onnx  # noqa: PLC0415 - build-time tools only
    from onnx.utils import Extractor  # noqa: PLC0415
    from onnxruntime.transformers.float16 import convert_float_to_float16  # noqa: PLC0415

    source, _ = installed_voice(voice)
    paths = split_paths(voice, directory)
    paths.text.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(source))
    names = {o for node in model.graph.node for o in node.output}
    if missing := [name for name in SPLIT_POINT if name not in names]:
        raise RequestError(
            f"{voice}'s graph has no {', '.join(missing)}: it is not a Piper VITS export this "
            "engine can split; serve it with the sentence engine"
        )
    extractor = Extractor(model)
    frames = extractor.extract_model(list(SPLIT_POINT), ["output"])
    half = onnx.ModelProto()
    half.CopyFrom(frames)  # the conversion changes the model it is given
    parts = {
        paths.text: extractor.extract_model(list(TEXT_INPUTS), list(SPLIT_POINT)),
        paths.frames: frames,
        # For GPUs: the frame part in FP16 (inputs and output float32); the text part
        # stays float32 there too.
        paths.frames_fp16: convert_float_to_float16(
            half, keep_io_types=True, op_block_list=list(FP16_KEEP_FP32)
        ),
    }
    for path, part in parts.items():
        staged = path.with_suffix(f".{os.getpid()}.building")  # two builders never collide
        onnx.save(part, str(staged))
        staged.replace(path)
    engine = ChunkedSynthesizer(voice, directory, gain=1.0)
    peak = max(float(np.max(np.abs(engine.raw(text)))) for text in CALIBRATION)
    meta = {
        "voice": voice, "split_point": list(SPLIT_POINT), "gain": TARGET_PEAK / peak,
        "calibration_peak": peak, "source_bytes": source.stat().st_size,
    }  # fmt: skip
    staged = paths.meta.with_suffix(f".{os.getpid()}.building")
    staged.write_text(json.dumps(meta, indent=2) + "\n")
    staged.replace(paths.meta)
    return paths


def ensure_split(voice: str, directory: Path | None = None) -> Path:
    """The directory holding `voice`'s split, built there on first use (or, when that
    directory cannot be written, in a temporary one)."""
    base = directory or default_model_dir()
    if split_paths(voice, base).exist():
        return base
    try:
        build_split(voice, base)
    except OSError:
        base = Path(tempfile.mkdtemp(prefix="ttsfleet-split-"))
        build_split(voice, base)
    return base


def build_int8(
    voice: str, directory: Path | None = None, parts: tuple[str, ...] = INT8_PARTS,
    out: Path | None = None,
) -> Path:  # fmt: skip
    """The frame part in static INT8 (QDQ: int8 weights per output channel, uint8
    activations with ranges calibrated on `INT8_CALIBRATION`), its convolutions whose
    names start with one of `parts` quantised, the rest left in float32. onnxruntime
    fuses each quantised Conv into a QLinearConv (VNNI kernels where the CPU has them).
    Written to `out` (by default beside the split), aside first, then renamed."""
    from onnxruntime.quantization import (  # noqa: PLC0415 - build-time tools only
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    paths = split_paths(voice, directory)
    engine = ChunkedSynthesizer(voice, directory)
    windows = [feed for text in INT8_CALIBRATION for feed in engine.windows(text)]

    class Windows(CalibrationDataReader):  # type: ignore[misc]  # untyped library base
        def __init__(self) -> None:
            self.left = iter(windows)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.left, None)

    import onnx  # noqa: PLC0415

    convs = [n.name for n in onnx.load(str(paths.frames)).graph.node if n.op_type in CONVS]
    chosen = [name for name in convs if name.startswith(parts)]
    if not chosen:
        raise RequestError(f"{voice}'s frame part has no convolution under {', '.join(parts)}")
    target = out or paths.frames_int8
    staged = target.with_suffix(f".{os.getpid()}.building")
    # Its advice to pre-process (shape inference, folding) is for dynamic graphs it
    # cannot see into; this one quantises only convolutions, whose shapes it needs not.
    quiet = _Dropping("pre-process")
    logging.getLogger().addFilter(quiet)
    try:
        quantize_static(
            str(paths.frames), str(staged), Windows(), quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=list(CONVS),
            nodes_to_quantize=chosen,
        )  # fmt: skip
    finally:
        logging.getLogger().removeFilter(quiet)
    staged.replace(target)
    return target


class _Dropping(logging.Filter):
    def __init__(self, words: str) -> None:
        super().__init__()
        self.words = words

    def filter(self, record: logging.LogRecord) -> bool:
        return self.words not in record.getMessage()


def place(position: int, frames: int, window: int, context: int = CONTEXT) -> tuple[int, int]:
    """Where the window of `window` frames making the next chunk from `position` of a
    sentence of `frames` frames starts, and where the chunk ends: `context` frames on
    each side the sentence goes on, the window pushed against the sentence's edges
    (which need none), the rest of the sentence kept when it fits."""
    start = max(0, position - context)
    if frames - start <= window:  # the rest fits: the window ends at the sentence's end
        return max(0, frames - window), frames
    return start, start + window - context


CLAUSE_MARKS = frozenset(",;:")
MIN_PIECE = 12  # phonemes: no piece shorter than this is cut off
FIRST_PIECE = 40  # phonemes (~18 ms of text part here): the most the first audio waits for
MAX_PIECE = 160  # phonemes: longer sentences are cut at clause marks where they have them


def _cut(phonemes: list[str], limit: int, words: bool) -> tuple[list[str], list[str]]:
    """The longest head of `phonemes` of at most `limit` that ends at a clause mark
    (or, with `words`, failing that, at a word's end), and the rest."""
    if len(phonemes) <= limit:
        return phonemes, []
    ends = [i + 1 for i in range(MIN_PIECE - 1, limit) if phonemes[i] in CLAUSE_MARKS]
    if not ends and words:
        ends = [i for i in range(MIN_PIECE, limit + 1) if phonemes[i] == " "]
    if not ends:
        return phonemes, []
    head, rest = phonemes[: ends[-1]], phonemes[ends[-1] :]
    while rest and rest[0] == " ":
        rest = rest[1:]
    return head, rest


def pieces(sentences: list[list[str]]) -> list[list[str]]:
    """Sentences (phonemes) cut into the pieces the text part runs on, one at a time.
    The text part's time grows with its input (17 ms for 34 phonemes, 215 ms for 400
    here), and a stream's first audio waits for its first piece: that piece is at most
    `FIRST_PIECE` phonemes, cut at a clause mark, else at a word's end (a 400-character
    first sentence then starts as soon as a short one). Later pieces are cut only at
    clause marks, at most `MAX_PIECE` long where the marks allow (a long text part
    holds up every other stream's chunks while it runs). The cuts are pauses the voice
    makes anyway; a word-end cut in a long first clause may be heard as a short one."""
    out: list[list[str]] = []
    for n, sentence in enumerate(sentences):
        rest, limit, words = sentence, FIRST_PIECE if n == 0 else MAX_PIECE, n == 0
        while rest:
            head, rest = _cut(rest, limit, words)
            out.append(head)
            limit, words = MAX_PIECE, False
    return out


def _session(
    path: Path, threads: int | None = None, device: str = "cpu", device_id: int = 0
) -> Any:
    return onnx_session(path, device, device_id, "DEFAULT", session_options(threads))


class ChunkedSynthesizer:
    """One voice, split; `chunks` yields audio a chunk (not a sentence) at a time."""

    def __init__(
        self, voice: str, directory: Path | None = None, *, gain: float | None = None,
        threads: int | None = None, precision: str = "fp32", device: str = "cpu",
        device_id: int = 0, rows: Sequence[int] = (1,),
    ) -> None:  # fmt: skip
        from piper import PiperConfig, PiperVoice  # noqa: PLC0415 - optional: the serving extra

        _, config = installed_voice(voice)
        paths = split_paths(voice, directory)
        if not paths.text.exists() or not paths.frames.exists():
            raise RequestError(
                f"{voice} is not split in {paths.text.parent}: run `ttsfleet models split`"
            )
        runs = CHUNKED_PRECISIONS.get(device, ())
        if precision not in runs:
            other = "fp16 on GPUs" if precision == "int8" else "the sentence engine"
            raise RequestError(
                f"the chunked engine runs {', '.join(runs)} on {device}, not {precision}: "
                f"use {other}"
            )
        frames = paths.frame_part(precision)
        if not frames.exists():
            raise RequestError(
                f"the {precision} frame part of {voice} is not built ({frames.name} is missing "
                f"in {frames.parent}): run `ttsfleet models build --precision {precision}`"
            )
        self.voice_name, self.precision = voice, precision
        self.directory, self.threads = directory, threads
        self.device, self.device_id, self.rows = device, device_id, tuple(rows)
        self._frames_path = frames
        self._dynamic: Any = None  # the frame part on any shape, made when first needed
        # Piper's front end only (espeak-ng phonemes, ids); its session is not used.
        self._voice: Any = PiperVoice(
            session=None,
            config=PiperConfig.from_dict(json.loads(config.read_text(encoding="utf-8"))),
        )
        self.sample_rate = int(self._voice.config.sample_rate)
        self.hop = int(getattr(self._voice.config, "hop_length", 256) or 256)
        # The text part stays float32; the frame part runs on the windows' fixed shapes.
        self._text = _session(paths.text, threads, device, device_id)
        self._fixed = FixedFrames(
            frames, (FIRST_WINDOW, WINDOW), self.rows, self.hop,
            device=device, device_id=device_id, threads=threads,
        )  # fmt: skip
        if gain is None:
            gain = float(json.loads(paths.meta.read_text())["gain"])
        self.gain = gain

    def warm(self) -> None:
        """Run every compiled shape once in this thread (on a GPU: capture its graphs
        for the thread that will replay them: a scheduler lane calls this first)."""
        self._fixed.warm()

    @property
    def _frames(self) -> Any:
        """The frame part on any shape (whole sentences, other windows: tests, calibration)."""
        if self._dynamic is None:
            self._dynamic = _session(self._frames_path, self.threads, self.device, self.device_id)
        return self._dynamic

    def _sentences(self, text: str) -> list[list[int]]:
        """The phoneme ids of each piece of `text` the text part runs on (`pieces`)."""
        sentences = [p for p in self._voice.phonemize(normalize(text)) if p]
        return [self._voice.phonemes_to_ids(piece) for piece in pieces(sentences)]

    def _text_part(
        self, ids: list[int], rate: float, options: Any = None
    ) -> tuple[npt.NDArray[np.float32], Any]:
        inputs = {
            "input": np.array([ids], dtype=np.int64),
            "input_lengths": np.array([len(ids)], dtype=np.int64),
            # noise 0 (deterministic: equal text, equal audio), length 1/rate, noise_w 0
            "scales": np.array([0.0, 1.0 / rate, 0.0], dtype=np.float32),
        }
        z, mask = run_cuttable(lambda o: self._text.run(list(SPLIT_POINT), inputs, o), options)
        return z, mask

    def _frame_part(self, z: npt.NDArray[np.float32], mask: Any) -> npt.NDArray[np.float32]:
        """The audio of frames `z` (a window, or a whole sentence), as the voice makes it."""
        (audio,) = self._frames.run(["output"], {SPLIT_POINT[0]: z, SPLIT_POINT[1]: mask})
        return np.asarray(audio, dtype=np.float32).reshape(-1)

    def lane(self, threads: int) -> ChunkedSynthesizer:
        """Another engine for the same voice with its own sessions of `threads` threads
        (a scheduler's second lane runs windows beside this one's)."""
        return ChunkedSynthesizer(
            self.voice_name, self.directory, gain=self.gain, threads=threads,
            precision=self.precision, device=self.device, device_id=self.device_id,
            rows=self.rows,
        )  # fmt: skip

    def open(self, text: str, rate: float = 1.0, *, bulk: bool = False) -> Stream:
        """A stream of `text` (phonemised now), nothing synthesised yet."""
        return Stream(self._sentences(text), rate, bulk=bulk)

    def run_text(self, stream: Stream, options: Any = None) -> None:
        """The text part of `stream`'s next sentence. `options` (onnxruntime
        `RunOptions`): `CutShortError` when its `terminate` is set meanwhile, the
        stream as it was."""
        z, mask = self._text_part(stream.sentences[0], stream.rate, options)
        stream.sentences.pop(0)
        stream.z, stream.mask, stream.position = z, mask, 0

    def run_frames(
        self, streams: list[Stream], window: int, context: int = CONTEXT, options: Any = None
    ) -> list[Audio]:
        """The next chunk of each of `streams`, all windows `window` frames long, run as
        one batch; each stream moves past its chunk (not when `options.terminate` cut
        the run short: `CutShortError`, the streams as they were)."""
        zs, masks, spans, ends = [], [], [], []
        for stream in streams:
            z, mask, span, end = self._window(stream, window, context)
            zs.append(z)
            masks.append(mask)
            spans.append(span)
            ends.append(end)
        z, mask = np.concatenate(zs), np.concatenate(masks).astype(np.float32)
        if window in self._fixed.windows:
            rows = self._fixed.run(z, mask, options)
        else:  # a window of another length (tests): the frame part on any shape
            feeds = {SPLIT_POINT[0]: z, SPLIT_POINT[1]: mask}
            (audio,) = run_cuttable(lambda o: self._frames.run(["output"], feeds, o), options)
            rows = np.asarray(audio, dtype=np.float32).reshape(len(streams), -1)
        for stream, end in zip(streams, ends, strict=True):
            stream.advance(end)
        return [_int16(row[a:b] * self.gain) for row, (a, b) in zip(rows, spans, strict=True)]

    def _window(
        self, stream: Stream, window: int, context: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], tuple[int, int], int]:
        """The frame part's input for `stream`'s next chunk (`window` frames, padded with
        masked frames where the sentence is shorter), the samples of its output that
        are the chunk, and the frame where the chunk ends (where the stream goes next)."""
        assert stream.z is not None and stream.mask is not None
        start, end = place(stream.position, stream.z.shape[2], window, context)
        z = stream.z[:, :, start : start + window]
        mask = stream.mask[:, :, start : start + window]
        if (short := window - z.shape[2]) > 0:  # a sentence shorter than the window
            z = np.pad(z, ((0, 0), (0, 0), (0, short)))
            mask = np.pad(mask, ((0, 0), (0, 0), (0, short)))
        span = ((stream.position - start) * self.hop, (end - start) * self.hop)
        return z, mask.astype(np.float32), span, end

    def windows(self, text: str, rate: float = 1.0) -> Iterator[dict[str, Any]]:
        """The frame part's inputs, window by window, as a live stream of `text` runs
        them (its short first window, then full ones): what INT8 is calibrated on."""
        stream = self.open(text, rate)
        while (need := stream.need()) is not None:
            if need.kind == "text":
                self.run_text(stream)
                continue
            z, mask, _, end = self._window(stream, need.frames, CONTEXT)
            stream.advance(end)
            yield {SPLIT_POINT[0]: z, SPLIT_POINT[1]: mask}

    def run(self, stream: Stream, need: Need) -> Audio | None:
        """`need` for `stream` alone: its text part (None), or its next chunk."""
        if need.kind == "text":
            self.run_text(stream)
            return None
        (audio,) = self.run_frames([stream], need.frames)
        return audio

    def raw(self, text: str, rate: float = 1.0, context: int = CONTEXT) -> npt.NDArray[np.float32]:
        """The model's own float output for `text`, in the windows a stream runs, no
        gain, no rounding (for calibration and the exactness tests)."""
        gain, self.gain = self.gain, 1.0
        try:
            stream, parts = self.open(text, rate), []
            while (need := stream.need()) is not None:
                if need.kind == "text":
                    self.run_text(stream)
                else:
                    parts.append(self._float_frames(stream, need.frames, context))
        finally:
            self.gain = gain
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def _float_frames(self, stream: Stream, window: int, context: int) -> npt.NDArray[np.float32]:
        assert stream.z is not None and stream.mask is not None
        start, end = place(stream.position, stream.z.shape[2], window, context)
        z, mask = stream.z[:, :, start : end + context], stream.mask[:, :, start : end + context]
        audio = self._frame_part(z, mask)[
            (stream.position - start) * self.hop : (end - start) * self.hop
        ]
        stream.advance(end)
        return audio

    def chunks(
        self, text: str, rate: float = 1.0, cancelled: Callable[[], bool] | None = None
    ) -> Iterator[Audio]:
        """Int16 PCM, a chunk at a time, the first after the first sentence's text part
        and one small window; stops at the next chunk once `cancelled()` is true."""
        stop = cancelled or (lambda: False)
        stream = self.open(text, rate)
        while (need := stream.need()) is not None and not stop():
            if (audio := self.run(stream, need)) is not None:
                yield audio

    def synthesize(self, text: str, rate: float = 1.0) -> Audio:
        """The whole utterance (the batch model): each sentence's frames in one run."""
        parts = []
        for ids in self._sentences(text):
            z, mask = self._text_part(ids, rate)
            parts.append(_int16(self._frame_part(z, mask) * self.gain))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)


def _int16(audio: npt.NDArray[np.float32]) -> Audio:
    return (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)


@dataclass(eq=False)
class Stream:
    """One request's progress through the engine."""

    sentences: list[list[int]]  # phoneme ids of the sentences not yet through the text part
    rate: float
    bulk: bool = False
    z: npt.NDArray[np.float32] | None = field(default=None, repr=False)
    mask: npt.NDArray[np.float32] | None = field(default=None, repr=False)
    position: int = 0  # the next frame of the current sentence to make audio of
    first: bool = True  # no audio made yet

    def advance(self, end: int) -> None:
        """Its audio up to frame `end` of the current sentence is made."""
        self.position, self.first = end, False

    def need(self) -> Need | None:
        """What comes next: the next sentence's text part, a window (the short first
        one for a live stream's first audio), or None when all is said."""
        if self.z is not None and self.position >= self.z.shape[2]:
            self.z = self.mask = None
        if self.z is None:
            return TEXT if self.sentences else None
        if self.first and not self.bulk:
            return Need("frames", FIRST_WINDOW)
        return Need("frames", WINDOW)
