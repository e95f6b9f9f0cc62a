"""The frame part on fixed shapes: what lets a GPU replay one captured CUDA graph per shape.

The chunked engine runs the frame part on windows of two lengths (a stream's short
first window and the full one) in batches of a few sizes (the scheduler's
`batch_sizes`). `FixedFrames` holds one onnxruntime session per (rows, window), made
from a copy of the frame part whose inputs have that exact shape, so that every
`Shape`/`ConstantOfShape` folds away at load and each run of a session has the same
shapes. Each session's inputs and output are bound once to buffers of that shape on the
device (`IOBinding`); a run copies the window in, runs, and copies the audio out: one
copy each way per batch, where an unbound run on the GPU made ~28.

On CUDA each session is made with `enable_cuda_graph`: its first run captures the whole
frame part as one CUDA graph, and every later run replays it into the same buffers.
onnxruntime keeps a captured graph per thread, so the capture is left to `warm()`, which
the thread that will run the shapes calls (a scheduler lane, at its start): the load
only makes the sessions. One lane runs a GPU instance's windows (`serving.backend`): two
threads capturing at once, or one capturing while another copies, would break the
capture. Inputs are copied in, then synchronised, before each replay. A batch smaller
than a compiled size is padded with silent windows (masked frames) up to the next one.
On the CPU the same code runs without the graph, warmed at load (tests, and
`benchmarks/gpu_bench.py --device cpu`).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ttsfleet.serving.engine import RequestError, onnx_session, session_options

INPUTS = ("/Add_output_0", "/Cast_2_output_0")  # z and the frame mask (streaming.SPLIT_POINT)
CHANNELS = 192  # the flow's input channels in Piper's VITS voices


def fixed_model(model: Path, rows: int, window: int) -> bytes:
    """The frame part at `model` with its inputs fixed to `rows` x window frames."""
    import onnx  # noqa: PLC0415 - the serving extra

    graph = onnx.load(str(model))
    shapes = {INPUTS[0]: (rows, CHANNELS, window), INPUTS[1]: (rows, 1, window)}
    for value in graph.graph.input:
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for size in shapes[value.name]:
            dims.add().dim_value = size
    out = io.BytesIO()
    onnx.save(graph, out)
    return out.getvalue()


@dataclass
class _Slot:
    session: Any
    binding: Any
    z: Any  # OrtValue (rows, CHANNELS, window) on the device
    mask: Any  # OrtValue (rows, 1, window)
    audio: Any  # OrtValue (rows, 1, 1, samples): Piper's export's output shape


class CutShortError(Exception):
    """A run cut short by its `RunOptions.terminate` (`serving.worker` cuts work nobody
    waits for when a new stream's first audio would wait for it)."""


def run_cuttable(run: Any, options: Any) -> Any:
    """`run(options)`, raising `CutShortError` when `options.terminate` stopped it."""
    try:
        return run(options)
    except Exception:
        if options is not None and options.terminate:
            raise CutShortError from None
        raise


class FixedFrames:
    """The frame part at `model` for windows of `windows` frames in batches of `rows`
    rows, on `device` ("cpu" or "cuda", GPU `device_id`): every slot made and run once
    at load (on CUDA: its graph captured)."""

    def __init__(
        self, model: Path, windows: Sequence[int], rows: Sequence[int], hop: int, *,
        device: str = "cpu", device_id: int = 0, threads: int | None = None,
    ) -> None:  # fmt: skip
        if device not in ("cpu", "cuda"):
            raise RequestError(f"device {device!r} is not supported: use cpu or cuda")
        self.model, self.hop = model, hop
        self.device, self.device_id, self.threads = device, device_id, threads
        self.rows = tuple(sorted(set(rows)))
        self.windows = tuple(sorted(set(windows)))
        self._slots = {(n, w): self._slot(n, w) for n in self.rows for w in self.windows}
        self._warm: set[int] = set()  # the threads each slot has run in
        if device == "cpu":
            self.warm()

    def _thread(self) -> int:
        """Whose warm-up counts: on CUDA each thread's (its own graphs), else anyone's."""
        return threading.get_ident() if self.device == "cuda" else 0

    def warm(self) -> None:
        """Run every shape once in this thread, with silence (on CUDA: capture its graph
        for this thread); again in the same thread does nothing."""
        thread = self._thread()
        if thread in self._warm:
            return
        for slot in self._slots.values():
            z, mask = slot.z.shape(), slot.mask.shape()
            self._replay(slot, np.zeros(z, np.float32), np.zeros(mask, np.float32))
        self._warm.add(thread)

    @staticmethod
    def _replay(
        slot: _Slot, z: npt.NDArray[np.float32], mask: npt.NDArray[np.float32],
        options: Any = None,
    ) -> None:  # fmt: skip
        slot.z.update_inplace(np.ascontiguousarray(z, np.float32))
        slot.mask.update_inplace(np.ascontiguousarray(mask, np.float32))
        # The copies in are done before the replay (its stream is not the copies').
        slot.binding.synchronize_inputs()
        run_cuttable(lambda o: slot.session.run_with_iobinding(slot.binding, o), options)

    def _slot(self, rows: int, window: int) -> _Slot:
        import onnxruntime  # noqa: PLC0415 - the serving extra

        options = session_options(self.threads)
        options.log_severity_level = 3  # errors only: FP16 on a CPU warns of each node
        session = onnx_session(  # the engine's checks: onnxruntime-gpu, no CPU fallback
            fixed_model(self.model, rows, window), self.device, self.device_id,
            "DEFAULT",  # fixed shapes: cuDNN's default algorithms, chosen once per shape
            options, {"enable_cuda_graph": "1"},
        )  # fmt: skip

        def buffer(shape: tuple[int, ...]) -> Any:
            return onnxruntime.OrtValue.ortvalue_from_shape_and_type(
                shape, np.float32, self.device, self.device_id
            )

        slot = _Slot(
            session,
            session.io_binding(),
            buffer((rows, CHANNELS, window)),
            buffer((rows, 1, window)),
            buffer((rows, 1, 1, window * self.hop)),
        )
        slot.binding.bind_ortvalue_input(INPUTS[0], slot.z)
        slot.binding.bind_ortvalue_input(INPUTS[1], slot.mask)
        slot.binding.bind_ortvalue_output("output", slot.audio)
        return slot

    def run(
        self, z: npt.NDArray[np.float32], mask: npt.NDArray[np.float32], options: Any = None
    ) -> npt.NDArray[np.float32]:
        """Audio (rows x samples) of a batch of windows (rows x CHANNELS x window): in
        pieces of the largest compiled batch size, the last padded with silent rows to
        the next compiled size. `options` (onnxruntime `RunOptions`): `CutShortError`
        when its `terminate` is set meanwhile."""
        count, window = z.shape[0], z.shape[2]
        if window not in self.windows:
            raise RequestError(f"no compiled frame-part shape for {window}-frame windows "
                               f"(windows {self.windows})")  # fmt: skip
        pieces, start = [], 0
        while start < count:
            left = count - start
            size = next((n for n in self.rows if n >= left), self.rows[-1])
            take = min(size, left)
            pieces.append(
                self._run(z[start : start + take], mask[start : start + take], size, options)
            )
            start += take
        return np.concatenate(pieces)

    def _run(
        self, z: npt.NDArray[np.float32], mask: npt.NDArray[np.float32], size: int,
        options: Any = None,
    ) -> npt.NDArray[np.float32]:  # fmt: skip
        count, window = z.shape[0], z.shape[2]
        slot = self._slots[(size, window)]
        if size > count:
            z = np.concatenate([z, np.zeros((size - count, *z.shape[1:]), np.float32)])
            mask = np.concatenate([mask, np.zeros((size - count, *mask.shape[1:]), np.float32)])
        self.warm()  # once per thread (on CUDA a thread replays only graphs it captured)
        self._replay(slot, z, mask, options)
        # A copy: on the CPU the bound output's array is the buffer the next run overwrites.
        audio: npt.NDArray[np.float32] = np.array(slot.audio.numpy().reshape(size, -1)[:count])
        return audio
