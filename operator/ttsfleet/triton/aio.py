"""Streaming synthesis for asyncio services (the gateway): one gRPC stream per request.

A channel per replica (`Channels`), opened on first use and closed when the replica
leaves. Each request is one `ModelStreamInfer` call carrying one request that asks
for Triton's empty final response, so the end of a stream is known without waiting
for the server to close it. (tritonclient's `grpc.aio` client cannot ask for that
response: its reserved-parameter check refuses `triton_*` names, so requests are made
here from its protobuf messages and sent on its stub.)

Cancelling the task that iterates `stream` cancels the call: Triton marks the request
cancelled and the model stops at its next chunk.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ttsfleet.triton import contract

Audio = npt.NDArray[np.int16]

# A refused connection (a replica restarting) is retried within a second rather than
# after gRPC's default backoff of up to two minutes; no HTTP proxy for pod IPs.
CHANNEL_OPTIONS = (
    ("grpc.enable_http_proxy", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


class UpstreamError(RuntimeError):
    """A replica failed a request or could not be reached; the message says which."""


@dataclass(frozen=True)
class Chunk:
    audio: Audio
    sample_rate: int


class Channels:
    """One gRPC channel and stub per replica address, kept open between requests."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[Any, Any]] = {}

    def stub(self, address: str) -> Any:
        if address not in self._open:
            import grpc  # noqa: PLC0415 - heavy; only gRPC clients need it
            from tritonclient.grpc import service_pb2_grpc  # noqa: PLC0415

            channel = grpc.aio.insecure_channel(address, options=list(CHANNEL_OPTIONS))
            self._open[address] = (channel, service_pb2_grpc.GRPCInferenceServiceStub(channel))
        return self._open[address][1]

    async def keep(self, addresses: Iterable[str]) -> None:
        """Close the channels of replicas not in `addresses` (they left the fleet)."""
        wanted = set(addresses)
        for address in [a for a in self._open if a not in wanted]:
            channel, _ = self._open.pop(address)
            await channel.close()

    async def close(self) -> None:
        await self.keep(())


def _bytes_tensor(request: Any, name: str, value: str) -> None:
    request.inputs.add(name=name, datatype="BYTES", shape=[1])
    data = value.encode()
    request.raw_input_contents.append(struct.pack("<I", len(data)) + data)


def request_message(text: str, *, voice: str | None = None, rate: float | None = None) -> Any:
    """The `ModelInferRequest` for one utterance on the streaming model."""
    from tritonclient.grpc import service_pb2  # noqa: PLC0415

    request = service_pb2.ModelInferRequest(model_name=contract.STREAM_MODEL)
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    _bytes_tensor(request, "TEXT", text)
    if voice:
        _bytes_tensor(request, "VOICE", voice)
    if rate is not None:
        request.inputs.add(name="SPEAKING_RATE", datatype="FP32", shape=[1])
        request.raw_input_contents.append(struct.pack("<f", rate))
    return request


async def stream(
    stub: Any, text: str, *, voice: str | None = None, rate: float | None = None,
    timeout: float = 120.0,
) -> AsyncGenerator[Chunk]:  # fmt: skip
    """The audio of `text` chunk by chunk (a sentence each), as Triton sends it."""
    import grpc  # noqa: PLC0415

    call = stub.ModelStreamInfer(iter([request_message(text, voice=voice, rate=rate)]))
    try:
        async with asyncio.timeout(timeout):
            async for response in call:
                if response.error_message:
                    raise UpstreamError(response.error_message)
                message = response.infer_response
                names = [output.name for output in message.outputs]
                if "AUDIO" in names and message.raw_output_contents:
                    raw = message.raw_output_contents
                    audio = np.frombuffer(raw[names.index("AUDIO")], dtype="<i2")
                    (rate_hz,) = struct.unpack("<i", raw[names.index("SAMPLE_RATE")][:4])
                    if audio.size:
                        yield Chunk(audio.astype(np.int16, copy=False), rate_hz)
                final = message.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    return
        raise UpstreamError("the stream ended before its final response")
    except grpc.aio.AioRpcError as err:
        raise UpstreamError(f"{err.code().name}: {err.details()}") from None
    except TimeoutError:
        raise UpstreamError(f"no complete answer within {timeout:.0f}s") from None
    finally:
        call.cancel()
