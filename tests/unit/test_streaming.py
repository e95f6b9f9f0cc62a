"""The chunked engine on the shipped voice: the split is exact, chunks join into what
the whole voice makes, the first audio comes early, and a cancel stops it."""

from __future__ import annotations

import functools
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ttsfleet.serving import streaming
from ttsfleet.serving.engine import voices
from ttsfleet.serving.frames import CutShortError
from ttsfleet.serving.quality import join_energy
from ttsfleet.serving.scheduler import BULK, TEXT
from ttsfleet.serving.worker import Worker

VOICE = "en_US-joe-medium"
LONG = (
    "Your order shipped this morning and should arrive on Thursday, unless the weather "
    "gets in the way of the trucks that carry it across the mountains."
)
SENTENCES = " ".join(
    f"This is sentence {n} of a story nobody will hear to its end." for n in range(8)
)


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("split")
    streaming.build_split(VOICE, directory)
    return directory


@pytest.fixture(scope="module")
def engine(split: Path) -> streaming.ChunkedSynthesizer:
    return streaming.ChunkedSynthesizer(VOICE, split)


@functools.cache
def _whole() -> Any:
    import onnxruntime  # noqa: PLC0415

    return onnxruntime.InferenceSession(str(voices()[VOICE][0]), providers=["CPUExecutionProvider"])


def whole_voice(engine: streaming.ChunkedSynthesizer, ids: list[int]) -> np.ndarray:
    """The unsplit voice's own output (Piper's ONNX, one run)."""
    session = _whole()
    inputs = {
        "input": np.array([ids], np.int64), "input_lengths": np.array([len(ids)], np.int64),
        "scales": np.array([0.0, 1.0, 0.0], np.float32),
    }  # fmt: skip
    return np.asarray(session.run(None, inputs)[0]).reshape(-1)


def test_the_two_parts_run_one_after_the_other_are_the_whole_voice(
    engine: streaming.ChunkedSynthesizer,
) -> None:
    ids = engine._sentences(LONG)[-1]
    expected = whole_voice(engine, ids)
    z, mask = engine._text_part(ids, 1.0)
    feed = {streaming.SPLIT_POINT[0]: z, streaming.SPLIT_POINT[1]: mask}
    (audio,) = engine._frames.run(["output"], feed)
    assert np.array_equal(np.asarray(audio).reshape(-1), expected)


@pytest.mark.parametrize("text", [LONG, SENTENCES[:200]])
def test_windows_with_their_context_reproduce_the_whole_run(
    engine: streaming.ChunkedSynthesizer, text: str
) -> None:
    ids = engine._sentences(text)
    expected = np.concatenate([whole_voice(engine, one) for one in ids])
    assert sum(engine._text_part(one, 1.0)[0].shape[2] for one in ids) > 2 * streaming.WINDOW
    chunked = engine.raw(text)
    peak = np.abs(expected).max()
    assert len(chunked) == len(expected)
    assert np.abs(chunked - expected).max() <= 1e-4 * peak  # -80 dB


def test_16_frames_of_context_are_not_enough(engine: streaming.ChunkedSynthesizer) -> None:
    """The context is what makes the chunks exact: with less, the joins are heard."""
    worst = 0.0
    for text in (LONG, SENTENCES[:200]):
        ids = engine._sentences(text)
        expected = np.concatenate([whole_voice(engine, one) for one in ids])
        error = np.abs(engine.raw(text, context=16) - expected).max()
        worst = max(worst, float(error / np.abs(expected).max()))
    assert worst > 5e-4  # -66 dB, 25 times the error with 28 frames


def test_windows_cover_every_frame_once_with_context_where_the_sentence_goes_on() -> None:
    window, context = streaming.WINDOW, streaming.CONTEXT
    assert streaming.place(0, 1000, window) == (0, window - context)  # no context before 0
    assert streaming.place(200, 1000, window) == (200 - context, 200 - context + window - context)
    assert streaming.place(900, 1000, window) == (1000 - window, 1000)  # the rest fits
    assert streaming.place(0, 50, streaming.FIRST_WINDOW) == (0, 50)  # shorter: padded
    for frames in range(1, 900, 7):
        for first in (streaming.FIRST_WINDOW, window):
            position, size = 0, first
            while position < frames:
                start, end = streaming.place(position, frames, size)
                assert start <= position < end <= frames and end - start <= size
                assert position - start >= min(position, context)  # context before
                assert end == frames or start + size - end >= context  # and after
                position, size = end, window


def test_a_batch_of_windows_makes_what_each_stream_makes_alone(
    engine: streaming.ChunkedSynthesizer,
) -> None:
    texts = [LONG, "Please hold.", "Thanks for calling. How can I help you today?"]
    alone = [np.concatenate(list(engine.chunks(t))) for t in texts]
    streams = [engine.open(t) for t in texts]
    made: list[list[np.ndarray]] = [[] for _ in texts]
    while needs := [(i, n) for i, s in enumerate(streams) if (n := s.need()) is not None]:
        for i, need in needs:
            if need.kind == "text":
                engine.run_text(streams[i])
        frames = [(i, n) for i, n in needs if n.kind == "frames"]
        for size in {n.frames for _, n in frames}:
            rows = [i for i, n in frames if n.frames == size]
            made_now = engine.run_frames([streams[i] for i in rows], size)
            for i, audio in zip(rows, made_now, strict=True):
                made[i].append(audio)
    for expected, chunks in zip(alone, made, strict=True):
        got = np.concatenate(chunks)
        assert len(got) == len(expected)
        assert np.abs(got.astype(np.int32) - expected.astype(np.int32)).max() <= 1


def test_the_first_audio_is_one_small_chunk_not_the_sentence(
    engine: streaming.ChunkedSynthesizer,
) -> None:
    chunks = list(engine.chunks(LONG))
    assert len(chunks) > 4
    assert len(chunks[0]) == streaming.FIRST_CHUNK * engine.hop
    kept = streaming.WINDOW - 2 * streaming.CONTEXT
    assert kept * engine.hop in {len(c) for c in chunks}  # full windows in the middle
    assert all(len(c) <= (streaming.WINDOW - streaming.CONTEXT) * engine.hop for c in chunks)


def test_chunk_joins_are_as_smooth_as_the_voice_itself(
    engine: streaming.ChunkedSynthesizer,
) -> None:
    chunks = list(engine.chunks(LONG))
    audio = np.concatenate(chunks)
    joins = np.cumsum([len(c) for c in chunks])[:-1]
    assert join_energy(audio, joins, engine.sample_rate) < 0.6
    # And the stream is the whole run, scaled by the voice's gain (to the int16 step).
    whole = np.concatenate([whole_voice(engine, ids) for ids in engine._sentences(LONG)])
    scaled = np.clip(whole * engine.gain, -1, 1) * 32767
    assert np.abs(audio.astype(np.float64) - scaled).max() <= 4  # -78 dB of full scale


def test_a_cancel_stops_the_stream_at_the_next_chunk(
    engine: streaming.ChunkedSynthesizer,
) -> None:
    made: list[np.ndarray] = []
    for chunk in engine.chunks(LONG + " " + LONG, cancelled=lambda: len(made) >= 2):
        made.append(chunk)  # the client cancels once it has two chunks
    assert len(made) == 2


def test_one_gain_per_voice_keeps_the_calibration_set_under_full_scale(split: Path) -> None:
    meta = json.loads(streaming.split_paths(VOICE, split).meta.read_text())
    assert meta["split_point"] == list(streaming.SPLIT_POINT)
    assert meta["gain"] * meta["calibration_peak"] == pytest.approx(streaming.TARGET_PEAK)
    engine = streaming.ChunkedSynthesizer(VOICE, split)
    for text in streaming.CALIBRATION:
        peak = np.abs(engine.synthesize(text).astype(np.int32)).max()
        assert 0.3 * 32767 < peak <= streaming.TARGET_PEAK * 32767 + 2


def test_a_missing_split_is_built_on_first_use(tmp_path: Path) -> None:
    assert not streaming.split_paths(VOICE, tmp_path).exist()
    assert streaming.ensure_split(VOICE, tmp_path) == tmp_path
    assert streaming.split_paths(VOICE, tmp_path).exist()
    with pytest.raises(Exception, match="not split"):
        streaming.ChunkedSynthesizer(VOICE, tmp_path / "elsewhere")


def test_a_first_sentence_is_cut_so_its_first_piece_is_short() -> None:
    def phonemes(text: str) -> list[str]:
        return list(text)

    clause = phonemes("a" * 30 + ", " + "b" * 40 + ". ")
    first, rest = streaming.pieces([clause])
    assert "".join(first) == "a" * 30 + ","  # the first clause
    assert "".join(rest) == "b" * 40 + ". "
    # No clause mark early enough: cut at a word's end within FIRST_PIECE.
    run_on = phonemes(" ".join(["word"] * 60))
    head, *others = streaming.pieces([run_on])
    assert len(head) <= streaming.FIRST_PIECE and "".join(head).endswith("word")
    assert sum(len(p) for p in (head, *others)) + len(others) == len(run_on)
    # Later sentences: cut only at clause marks, each piece as long as MAX_PIECE allows.
    later = phonemes(("c" * 70 + ", ") * 4)
    cut = streaming.pieces([phonemes("Hi."), later])
    assert cut[0] == phonemes("Hi.") and all(len(p) <= streaming.MAX_PIECE for p in cut[1:])
    assert all("".join(p).endswith(",") for p in cut[1:-1])
    assert streaming.pieces([phonemes("x" * 300)]) == [phonemes("x" * 300)]  # nowhere to cut
    assert streaming.pieces([phonemes("Short.")]) == [phonemes("Short.")]


class Collected:
    """A stream's audio as a client gets it (`serving.worker.Sink`)."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.ended = threading.Event()
        self.error: str | None = None

    def cancelled(self) -> bool:
        return False

    def audio(self, samples: np.ndarray) -> None:
        self.parts.append(samples)

    def end(self, error: str | None = None) -> None:
        self.error = error
        self.ended.set()


def test_two_lanes_and_a_wide_engine_make_what_one_lane_makes(
    engine: streaming.ChunkedSynthesizer,
) -> None:
    """A new stream's first audio may run on the all-cores engine while the other lane
    idles: every stream still gets its own audio, in order, as one lane makes it."""
    texts = ["Thanks for calling, how are you?", LONG, "Please hold.", SENTENCES]
    workers = {
        "one lane": Worker(engine),
        "two lanes, wide": Worker(engine.lane(1), lanes=2, wide=engine.lane(2)),
    }
    heard: dict[str, list[np.ndarray]] = {}
    for name, worker in workers.items():
        worker.start()
        sinks = [Collected() for _ in texts]
        for text, sink in zip(texts, sinks, strict=True):
            worker.submit(text, 1.0, sink)
        for sink in sinks:
            assert sink.ended.wait(120) and sink.error is None, (name, sink.error)
        worker.stop()
        heard[name] = [np.concatenate(sink.parts) for sink in sinks]
    for alone, together in zip(heard["one lane"], heard["two lanes, wide"], strict=True):
        assert alone.size == together.size
        # Thread counts change float sums' order: within one int16 step or two.
        assert np.max(np.abs(alone.astype(np.int32) - together.astype(np.int32))) <= 2


def test_a_lane_with_nothing_to_run_sleeps_instead_of_polling(
    engine: streaming.ChunkedSynthesizer,
) -> None:
    """One stream on two lanes: while one lane runs its windows the other has nothing
    it may run, and waits to be told rather than asking the scheduler every
    millisecond (each look takes the interpreter from the lane that works)."""
    worker = Worker(engine.lane(1), lanes=2)
    looks, ran = [0], [0]
    asked = worker.scheduler.next

    def counted(*args: Any, **kwargs: Any) -> Any:
        looks[0] += 1
        work = asked(*args, **kwargs)
        ran[0] += work is not None
        return work

    worker.scheduler.next = counted  # type: ignore[method-assign]
    worker.start()
    sink = Collected()
    worker.submit(SENTENCES, 1.0, sink)
    assert sink.ended.wait(120) and sink.error is None
    worker.stop()
    # Each piece of work wakes both lanes once (and a lane may look once more before
    # it sleeps): a polling lane would look hundreds of times a second.
    assert ran[0] > 5
    assert looks[0] <= 4 * ran[0] + 10, (looks[0], ran[0])


class Chunks(Collected):
    """A sink that says when each chunk arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = threading.Event()

    def audio(self, samples: np.ndarray) -> None:
        super().audio(samples)
        self.arrived.set()


def alone(engine: streaming.ChunkedSynthesizer, text: str, bulk: bool) -> np.ndarray:
    stream, parts = engine.open(text, bulk=bulk), []
    while (need := stream.need()) is not None:
        if (audio := engine.run(stream, need)) is not None:
            parts.append(audio)
    return np.concatenate(parts)


def test_a_new_stream_cuts_short_work_nobody_waits_for(
    engine: streaming.ChunkedSynthesizer,
) -> None:
    """Both lanes in bulk windows (~150 ms each here): a live stream that arrives then
    cuts one short instead of waiting for it; the cut window runs again later, and
    every stream still gets exactly its own audio, each chunk once, in order."""
    worker = Worker(engine.lane(1), lanes=2).start()
    bulk = [Chunks() for _ in range(2)]
    for sink in bulk:
        worker.submit(SENTENCES, 1.0, sink, BULK)
    live: list[Collected] = []
    while worker.cuts == 0 and len(live) < 6:
        bulk[len(live) % 2].arrived.clear()
        assert bulk[len(live) % 2].arrived.wait(60)
        time.sleep(0.02)  # that lane is into its next window, the other in one too
        live.append(Collected())
        worker.submit(LONG, 1.0, live[-1])
    for sink in bulk + live:
        assert sink.ended.wait(120) and sink.error is None, sink.error
    worker.stop()
    assert worker.cuts >= 1
    for sink, text, is_bulk in [(s, SENTENCES, True) for s in bulk] + [
        (s, LONG, False) for s in live
    ]:
        heard, expected = np.concatenate(sink.parts), alone(engine, text, is_bulk)
        assert heard.size == expected.size
        # Thread counts change float sums' order: within one int16 step or two.
        assert np.max(np.abs(heard.astype(np.int32) - expected.astype(np.int32))) <= 2


def test_a_run_cut_short_leaves_the_stream_as_it_was(
    engine: streaming.ChunkedSynthesizer,
) -> None:
    import onnxruntime  # noqa: PLC0415

    stopped = onnxruntime.RunOptions()
    stopped.terminate = True
    stream = engine.open(LONG)
    with pytest.raises(CutShortError):
        engine.run_text(stream, stopped)
    assert stream.z is None and stream.need() == TEXT
    engine.run_text(stream)
    need = stream.need()
    assert need is not None and need.kind == "frames"
    with pytest.raises(CutShortError):
        engine.run_frames([stream], need.frames, options=stopped)
    assert (stream.position, stream.first) == (0, True)
    (first,) = engine.run_frames([stream], need.frames)
    assert first.size == streaming.FIRST_CHUNK * engine.hop
