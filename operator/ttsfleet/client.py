"""The one module that talks to Triton: streaming and whole-utterance synthesis.

Targets are host:port gRPC addresses. `ttsfleet say` resolves a TtsDeployment to
its ready endpoints (EndpointSlices, through `kube.ready_endpoints`, which never
returns one on a node kwok simulates) and balances per request, as a client must in
a cluster where one long-lived gRPC channel through a ClusterIP would pin all load
to one pod.
"""

from __future__ import annotations

import atexit
import itertools
import queue
import threading
import time
import wave
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ttsfleet.triton import contract

Audio = npt.NDArray[np.int16]


_clients: dict[tuple[int, str], Any] = {}
_clients_lock = threading.Lock()


def _grpc_client(address: str) -> Any:
    """This thread's client for `address`, kept open: a channel costs a handshake."""
    from tritonclient import grpc  # noqa: PLC0415 - heavy; only clients need it

    key = (threading.get_ident(), address)
    with _clients_lock:
        if key not in _clients:
            if not _clients:
                atexit.register(_close_clients)
            # Pod IPs are reached directly (our namespaces), never through an HTTP proxy.
            # A refused connection (a pod restarting) is retried within a second, not
            # after gRPC's default backoff of up to two minutes, during which every
            # call on the channel fails at once.
            _clients[key] = grpc.InferenceServerClient(
                address, channel_args=[
                    ("grpc.enable_http_proxy", 0),
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000),
                ],
            )  # fmt: skip
        return _clients[key]


def _close_clients() -> None:
    """Close and drop every client while gRPC is still loaded (its own clean-up at
    interpreter teardown fails once the module is gone)."""
    with _clients_lock:
        for client in _clients.values():
            client.close()
        _clients.clear()


class SynthesisError(RuntimeError):
    """Triton refused or failed a request; the message is the server's."""


@dataclass
class Result:
    audio: Audio
    sample_rate: int
    seconds_to_first_audio: float
    seconds_total: float
    chunks: int
    chunk_times: list[float] = field(default_factory=list)

    @property
    def audio_seconds(self) -> float:
        return len(self.audio) / self.sample_rate if self.sample_rate else 0.0

    @property
    def real_time_factor(self) -> float:
        """Seconds of compute per second of audio (below 1: faster than real time)."""
        return self.seconds_total / self.audio_seconds if self.audio_seconds else float("inf")


def _inputs(
    grpc: Any, text: str, voice: str | None, rate: float | None, fmt: str | None,
    priority: str | None = None,
) -> list[Any]:  # fmt: skip
    def string(name: str, value: str) -> Any:
        tensor = grpc.InferInput(name, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([value.encode()], dtype=object))
        return tensor

    tensors = [string("TEXT", text)]
    if voice:
        tensors.append(string("VOICE", voice))
    if fmt:
        tensors.append(string("FORMAT", fmt))
    if priority:
        tensors.append(string("PRIORITY", priority))
    if rate is not None:
        tensor = grpc.InferInput("SPEAKING_RATE", [1], "FP32")
        tensor.set_data_from_numpy(np.array([rate], dtype=np.float32))
        tensors.append(tensor)
    return tensors


def stream(
    address: str, text: str, *, voice: str | None = None, rate: float | None = None,
    fmt: str | None = None, timeout: float = 120.0, priority: str | None = None,
) -> Result:  # fmt: skip
    """Synthesize over a gRPC stream from the streaming model; chunks arrive as made
    (`priority` "bulk" yields to live streams, with the chunked engine)."""
    from tritonclient import grpc  # noqa: PLC0415 - heavy; only clients need it

    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = _grpc_client(address)
    start = time.perf_counter()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(
            contract.STREAM_MODEL, _inputs(grpc, text, voice, rate, fmt, priority),
            enable_empty_final_response=True,
        )  # fmt: skip
        parts: list[Audio] = []
        times: list[float] = []
        sample_rate = 0
        while True:
            try:
                result, error = responses.get(timeout=timeout)
            except queue.Empty:
                raise SynthesisError(f"no response from {address} within {timeout:.0f}s") from None
            if error is not None:
                raise SynthesisError(str(error))
            final = result.get_response().parameters.get("triton_final_response")
            audio = result.as_numpy("AUDIO")
            if audio is not None and audio.size:
                times.append(time.perf_counter() - start)
                parts.append(audio.astype(np.int16).reshape(-1))
                sample_rate = int(result.as_numpy("SAMPLE_RATE").reshape(-1)[0])
            if final is not None and final.bool_param:
                break
    finally:
        client.stop_stream()
    total = time.perf_counter() - start
    audio = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)
    first = times[0] if times else total
    return Result(audio, sample_rate, first, total, len(parts), times)


def synthesize(
    address: str, text: str, *, voice: str | None = None, rate: float | None = None,
    fmt: str | None = None, timeout: float = 120.0,
) -> Result:  # fmt: skip
    """One request to the batched, cached model; the whole utterance in one response."""
    from tritonclient import grpc  # noqa: PLC0415
    from tritonclient.utils import InferenceServerException  # noqa: PLC0415

    client = _grpc_client(address)
    inputs = _inputs(grpc, text, voice, rate, fmt)
    for tensor in inputs:  # the batched model takes a leading batch dimension
        tensor.set_shape([1, 1])
    start = time.perf_counter()
    try:
        result = client.infer(contract.BATCH_MODEL, inputs, client_timeout=timeout)
    except InferenceServerException as err:
        raise SynthesisError(err.message()) from None
    total = time.perf_counter() - start
    audio = result.as_numpy("AUDIO").astype(np.int16).reshape(-1)
    sample_rate = int(result.as_numpy("SAMPLE_RATE").reshape(-1)[0])
    return Result(audio, sample_rate, total, total, 1, [total])


def write_wav(path: Path, audio: Audio, sample_rate: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(audio.astype("<i2").tobytes())


class Balancer:
    """Round-robin over a TtsDeployment's ready endpoints, refreshed as they change."""

    def __init__(self, resolve: Any, refresh_seconds: float = 2.0) -> None:
        self._resolve = resolve
        self._refresh = refresh_seconds
        self._lock = threading.Lock()
        self._addresses: Sequence[str] = ()
        self._cycle: Iterator[str] = iter(())
        self._fetched = 0.0

    def next(self) -> str:
        with self._lock:
            if time.monotonic() - self._fetched > self._refresh or not self._addresses:
                addresses = sorted(self._resolve())
                if addresses != list(self._addresses):
                    self._addresses = addresses
                    self._cycle = itertools.cycle(addresses)
                self._fetched = time.monotonic()
            if not self._addresses:
                raise SynthesisError("no ready endpoints: is the TtsDeployment Ready?")
            return next(self._cycle)
