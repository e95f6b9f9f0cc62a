"""The chunked engine (`spec.runtime.engine: chunked`) in the real tritonserver: audio
comes a chunk at a time, a stream equals a batch reply, streams side by side share one
scheduler (in batches), bulk requests go through it, and a cancelled stream stops."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Triton, wait_for
from ttsfleet import client
from ttsfleet.cluster import local
from ttsfleet.harness import REPO
from ttsfleet.triton import aio, contract

TEXT = "The fleet is ready. Every replica is warm, and the queue is empty. Speak now."
LONG = " ".join(f"This is sentence {n} of a story nobody will hear to its end." for n in range(8))


@pytest.fixture(scope="module")
def chunked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    """Triton serving this repository's models (the chunked engine, their default),
    with batches of 1, 2 and 4 allowed."""
    repository = tmp_path_factory.mktemp("chunked") / "models"
    shutil.copytree(REPO / "triton_models", repository)
    for config in repository.glob("*/config.pbtxt"):
        text = config.read_text()
        assert 'key: "engine" value: { string_value: "chunked" }' in text
        sizes = 'parameters { key: "batch_sizes" value: { string_value: "1,2,4" } }'
        config.write_text(text + sizes + "\n")
    server = Triton(
        local.free_port(), local.free_port(), local.free_port(), repository.parent / "log",
        repository=repository, extra_args=("--exit-timeout-secs=5",),
    )  # fmt: skip
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_audio_comes_a_chunk_at_a_time_and_equals_the_batch_reply(chunked: Triton) -> None:
    streamed = client.stream(chunked.grpc_address, TEXT)
    whole = client.synthesize(chunked.grpc_address, TEXT)
    assert streamed.chunks > 3  # more than one a sentence: the first after 24 frames
    assert streamed.seconds_to_first_audio < streamed.seconds_total
    assert len(streamed.audio) == len(whole.audio)
    difference = np.abs(streamed.audio.astype(np.int32) - whole.audio.astype(np.int32))
    assert difference.max() <= 4  # the same samples to -78 dB (other window places)
    assert np.abs(whole.audio.astype(np.int32)).mean() > 100  # not silence
    log = Path(chunked.log).read_text()
    assert "chunked engine" in log


def test_a_cancelled_stream_stops_at_the_next_chunk(chunked: Triton) -> None:
    full = client.synthesize(chunked.grpc_address, LONG).audio_seconds

    def spoken() -> float:
        return chunked.metric(contract.AUDIO_SECONDS, model=contract.STREAM_MODEL)

    before = spoken()

    async def first_then_cancel() -> None:
        channels = aio.Channels()
        upstream = aio.stream(channels.stub(chunked.grpc_address), LONG)
        assert await anext(upstream) is not None
        await upstream.aclose()  # cancels the gRPC call
        await channels.close()

    asyncio.run(first_then_cancel())
    wait_for(
        "the cancelled request to end",
        lambda: chunked.metric(contract.INFLIGHT_STREAMS, model=contract.STREAM_MODEL) == 0,
        timeout=10,
    )
    # Eight sentences make ~30 s of audio; the model stopped a chunk or two in.
    assert spoken() - before < full / 4


def test_streams_side_by_side_each_get_their_own_audio(chunked: Triton) -> None:
    """One scheduler runs them all, in batches (this config allows 1, 2 and 4 rows):
    each stream's audio is what it gets alone (to -78 dB: a bulk reply's windows are
    placed apart from a live stream's first one)."""
    texts = [TEXT, "Please hold.", LONG[:200], "Your order ships on Friday.", TEXT[::-1]]
    alone = [client.synthesize(chunked.grpc_address, t).audio for t in texts]
    with ThreadPoolExecutor(len(texts)) as pool:
        together = list(pool.map(lambda t: client.stream(chunked.grpc_address, t).audio, texts))
    for expected, got in zip(alone, together, strict=True):
        assert len(got) == len(expected)
        assert np.abs(got.astype(np.int32) - expected.astype(np.int32)).max() <= 4


def test_bulk_requests_run_through_the_stream_models_scheduler(chunked: Triton) -> None:
    def streamed() -> float:
        return chunked.metric(contract.AUDIO_SECONDS, model=contract.STREAM_MODEL)

    before = streamed()
    whole = client.synthesize(chunked.grpc_address, "A bulk request, for a narration batch.")
    assert streamed() - before == pytest.approx(whole.audio_seconds, abs=0.01)
    bulk = client.stream(chunked.grpc_address, TEXT, priority="bulk")
    assert len(bulk.audio) == len(client.stream(chunked.grpc_address, TEXT).audio)
    with pytest.raises(
        client.SynthesisError, match="PRIORITY 'urgent' is not one of realtime, bulk"
    ):
        client.stream(chunked.grpc_address, TEXT, priority="urgent")


def test_live_streams_before_their_first_audio_are_the_queue_the_autoscaler_reads(
    chunked: Triton,
) -> None:
    """The scheduler takes every request at once (Triton's pending count stays 0), so
    the engine exports the live streams still waiting for their first audio; it falls
    back to 0 when all have spoken, and a bulk request never counts."""

    def waiting() -> float:
        return chunked.metric(contract.WAITING_STREAMS, model=contract.STREAM_MODEL)

    assert waiting() == 0
    seen: list[float] = []
    with ThreadPoolExecutor(12) as pool:
        runs = [pool.submit(client.stream, chunked.grpc_address, LONG) for _ in range(12)]
        while not all(r.done() for r in runs):
            seen.append(waiting())
        assert all(r.result().chunks > 3 for r in runs)
    assert max(seen) >= 2  # several waited for their first audio at once
    wait_for("every stream to have spoken", lambda: waiting() == 0, timeout=10)
    with ThreadPoolExecutor(1) as pool:
        bulk = pool.submit(client.stream, chunked.grpc_address, LONG, priority="bulk")
        bulk_seen = []
        while not bulk.done():
            bulk_seen.append(waiting())
        assert bulk.result().chunks > 3
    assert max(bulk_seen) == 0


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_int8_and_fp16_are_served_by_the_chunked_engine_on_a_cpu_instance(
    tmp_path: Path, precision: str
) -> None:
    """`precision: int8` on a CPU instance: the model builds the static INT8 frame part
    where the image did not (calibrated, gated), then streams chunk by chunk with it.
    `fp16` (the default precision): the FP16 frame part the split holds, not the
    sentence engine."""
    repository = tmp_path / "models"
    shutil.copytree(REPO / "triton_models" / "tts_stream", repository / "tts_stream")
    config = repository / "tts_stream" / "config.pbtxt"
    text = config.read_text()
    assert 'key: "precision" value: { string_value: "fp32" }' in text
    config.write_text(text.replace('string_value: "fp32"', f'string_value: "{precision}"'))
    server = Triton(
        local.free_port(), local.free_port(), local.free_port(), tmp_path / "log",
        models=("tts_stream",), repository=repository, extra_args=("--exit-timeout-secs=5",),
        env={"TTSFLEET_MODEL_DIR": str(tmp_path / "variants")},
    )  # fmt: skip
    server.start(timeout=240)
    try:
        streamed = client.stream(server.grpc_address, TEXT)
    finally:
        server.stop()
    assert streamed.chunks > 3
    assert np.abs(streamed.audio.astype(np.int32)).mean() > 100  # not silence
    assert f"({precision}, chunked engine)" in (tmp_path / "log").read_text()
    built = tmp_path / "variants" / f"en_US-joe-medium.frames.{precision}.onnx"
    assert built.exists()
