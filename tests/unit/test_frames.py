"""The frame part on fixed shapes (`serving.frames`): what a GPU captures as one CUDA
graph per shape, run here on the CPU with the same code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest

from ttsfleet.serving import streaming, variants
from ttsfleet.serving.engine import RequestError
from ttsfleet.serving.frames import FixedFrames, fixed_model

VOICE = "en_US-joe-medium"
TEXT = "Your order number is 4512, and it ships on Friday. Thanks for calling!"


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("split")
    streaming.build_split(VOICE, directory)
    return directory


def windows(engine: streaming.ChunkedSynthesizer, length: int) -> tuple[Any, Any]:
    found = [w for w in engine.windows(TEXT * 3) if w[streaming.SPLIT_POINT[0]].shape[2] == length]
    return (
        np.concatenate([w[streaming.SPLIT_POINT[0]] for w in found]),
        np.concatenate([w[streaming.SPLIT_POINT[1]] for w in found]),
    )


def test_fixed_shapes_make_what_the_frame_part_makes_on_any_batch(split: Path) -> None:
    engine = streaming.ChunkedSynthesizer(VOICE, split)
    paths = streaming.split_paths(VOICE, split)
    fixed = FixedFrames(paths.frames, (streaming.WINDOW,), (1, 2, 4), engine.hop)
    z, mask = windows(engine, streaming.WINDOW)
    assert len(z) >= 5
    for count in (1, 2, 3, 5):  # 3 is padded to 4; 5 runs as 4 + 1
        (expected,) = engine._frames.run(
            ["output"],
            {streaming.SPLIT_POINT[0]: z[:count], streaming.SPLIT_POINT[1]: mask[:count]},
        )
        got = fixed.run(z[:count], mask[:count])
        assert got.shape == (count, streaming.WINDOW * engine.hop)
        assert np.abs(got - expected.reshape(count, -1)).max() <= 1e-5
    with pytest.raises(RequestError, match="no compiled frame-part shape for 60-frame windows"):
        fixed.run(z[:, :, :60], mask[:, :, :60])


def test_with_fixed_shapes_no_shape_arithmetic_is_left_to_run(split: Path, tmp_path: Path) -> None:
    """What CUDA graph capture needs: every node a device kernel, none computing shapes
    on the host at run time. onnxruntime folds them all once the input shapes are fixed."""
    frames = streaming.split_paths(VOICE, split).frames
    host_side = {"Shape", "ConstantOfShape", "Range", "NonZero", "Expand"}

    def left(model: bytes | str) -> set[str]:
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
        onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        ops = {n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node}
        return ops & host_side

    assert left(str(frames))  # on any shape the shapes are worked out at each run
    assert left(fixed_model(frames, 8, streaming.WINDOW)) == set()


def test_the_fp16_frame_part_the_split_builds_passes_the_gate(split: Path) -> None:
    """The file a GPU instance loads, and a CPU one for fp16 (onnxruntime computes it
    through float32 there): within the gate of the FP32 frame part."""
    paths = streaming.split_paths(VOICE, split)
    assert paths.frames_fp16.stat().st_size < 0.6 * paths.frames.stat().st_size
    full = streaming.ChunkedSynthesizer(VOICE, split)
    half = streaming.ChunkedSynthesizer(VOICE, split, precision="fp16")
    distances = []
    for sentence in variants.GATE_SENTENCES:
        expected = np.concatenate(list(full.chunks(sentence)))
        got = np.concatenate(list(half.chunks(sentence)))
        assert len(got) == len(expected)
        distances.append(variants.audio_distance_db(expected, got, 22050))
    assert float(np.mean(distances)) < variants.MAX_MEL_DISTANCE_DB


def test_a_gpu_engine_without_onnxruntime_gpu_is_refused_not_run_on_the_cpu(split: Path) -> None:
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider: benchmarks/gpu_bench.py covers it")
    with pytest.raises(RequestError, match="needs onnxruntime-gpu"):
        streaming.ChunkedSynthesizer(VOICE, split, precision="fp16", device="cuda")


def test_each_device_runs_only_the_precisions_that_earn_their_place_there(split: Path) -> None:
    with pytest.raises(RequestError, match="runs fp32, fp16 on cuda, not int8: use fp16 on GPUs"):
        streaming.ChunkedSynthesizer(VOICE, split, precision="int8", device="cuda")
    # The default precision, fp16, is served by the chunked engine on a CPU too.
    half = streaming.ChunkedSynthesizer(VOICE, split, precision="fp16")
    assert half.precision == "fp16" and len(half.synthesize("Half the weights.")) > 10_000


def test_a_gpu_instance_runs_one_lane_a_cpu_instance_as_many_as_asked() -> None:
    """A GPU's CUDA graphs are captured by the thread that replays them, and two threads
    capturing at once would break the capture: one lane on a GPU, whatever is asked."""
    import json  # noqa: PLC0415

    from ttsfleet.serving.backend import lanes  # noqa: PLC0415

    config = json.dumps({"parameters": {"lanes": {"string_value": "3"}}})
    assert lanes({"model_config": config, "model_instance_kind": "CPU"}) == 3
    assert lanes({"model_config": config, "model_instance_kind": "GPU"}) == 1


def test_work_is_cut_short_on_cpu_instances_unless_the_config_says_not() -> None:
    import json  # noqa: PLC0415

    from ttsfleet.serving.backend import cut_short  # noqa: PLC0415

    def args(kind: str, value: str | None = None) -> dict[str, str]:
        params = {} if value is None else {"cut_short": {"string_value": value}}
        return {"model_config": json.dumps({"parameters": params}), "model_instance_kind": kind}

    assert cut_short(args("CPU")) and not cut_short(args("CPU", "false"))
    assert not cut_short(args("GPU")) and not cut_short(args("GPU", "true"))
    with pytest.raises(RequestError, match="cut_short 'maybe' must be true or false"):
        cut_short(args("CPU", "maybe"))
