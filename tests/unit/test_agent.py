"""The node agent against NVML inventories replayed through the same port as pynvml.

The inventories in tests/data/nvml are synthetic (no GPU here): each says so in its
"synthetic" and "source" fields. The no-GPU path runs against the real pynvml.
"""

from __future__ import annotations

import ctypes
import importlib.util
import inspect
import json
import re
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import pynvml
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from typer.testing import CliRunner

from tests.helpers import REPO
from ttsfleet import kube
from ttsfleet.agent import inventory, nvml, replay, run
from ttsfleet.cli import app
from ttsfleet.cluster import local
from ttsfleet.harness import http_ok, metric_value, wait_for

DATA = REPO / "tests" / "data" / "nvml"
INVENTORIES = sorted(DATA.glob("*.json"))
H100 = DATA / "h100-mig-all-balanced.json"
L4 = DATA / "l4.json"
PENDING = DATA / "h100-mig-pending.json"
CAPTURED = DATA / "h100-captured.json"  # a real H100, MIG disabled
BALANCED = {"1g.10gb": 2, "2g.20gb": 1, "3g.40gb": 1}
MUTATING = re.compile(r"nvml\w*(Set|Create|Destroy|Reset|Clear)\w*")


def read(path: Path) -> inventory.Inventory:
    source = replay.Replay.from_file(path)
    source.nvmlInit()
    try:
        return inventory.read(source, "replay", source.synthetic)
    finally:
        source.nvmlShutdown()


def capture_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("capture_nvml", REPO / "hack" / "capture-nvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", INVENTORIES, ids=[p.stem for p in INVENTORIES])
def test_every_inventory_says_whether_it_is_synthetic_and_where_it_comes_from(path: Path) -> None:
    data = json.loads(path.read_text())
    assert isinstance(data["synthetic"], bool)
    assert len(data["source"]) > 40
    if data["synthetic"]:
        assert data["source"].startswith("Synthetic:")
    # Anything with a MIG layout that was not captured from a MIG GPU is synthetic.
    if any(d.get("gpuInstances") for d in data["devices"]):
        assert data["synthetic"] or "Captured by hack/capture-nvml.py" in data["source"]


def test_h100_in_mig_mode_reports_the_all_balanced_layout_from_nvml() -> None:
    found = read(H100)
    assert found.synthetic and found.driver_version == "550.127.05"
    assert len(found.gpus) == 8
    for gpu in found.gpus:
        assert gpu.product == "NVIDIA H100 80GB HBM3"
        assert gpu.mig_current is True and gpu.mig_pending is True
        assert gpu.mig_layout == BALANCED
        # NVML reports no whole-GPU utilisation in MIG mode.
        assert gpu.utilization_gpu_percent is None
        assert gpu.memory_total_bytes == 81559 * 1024 * 1024
        assert [i.placement_start for i in gpu.instances] == [0, 1, 2, 4]
    profiles = {p.name: p for p in found.gpus[0].profiles}
    # The profiles come from nvmlDeviceGetGpuInstanceProfileInfo, not from a table.
    assert sorted(profiles) == [
        "1g.10gb", "1g.10gb+me", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb",
    ]  # fmt: skip
    assert profiles["3g.40gb"].slices == 3
    assert profiles["3g.40gb"].max_instances == 2
    assert profiles["1g.20gb"].multiprocessors == 26
    assert found.mig_layout == {"1g.10gb": 16, "2g.20gb": 8, "3g.40gb": 8}


def test_h100_annotations_carry_the_layout_per_gpu_and_in_total() -> None:
    notes = inventory.node_annotations(read(H100))
    assert notes[inventory.GPU_COUNT] == "8"
    assert notes[inventory.GPU_PRODUCT] == "NVIDIA H100 80GB HBM3"
    assert notes[inventory.MIG_MODE] == "enabled"
    assert notes[inventory.MIG_PENDING] == "false"
    assert json.loads(notes[inventory.MIG_LAYOUT]) == {"1g.10gb": 16, "2g.20gb": 8, "3g.40gb": 8}
    gpus = json.loads(notes[inventory.GPUS])
    assert [g["index"] for g in gpus] == list(range(8))
    assert all(g["migLayout"] == BALANCED for g in gpus)
    assert gpus[0]["migMode"] == {"current": "enabled", "pending": "enabled"}
    assert gpus[0]["memoryMiB"] == 81559
    assert notes[inventory.SOURCE] == "replay, synthetic"


def test_a_captured_h100_replays_to_what_the_live_agent_published_on_it() -> None:
    """The live agent on that H100 (NVML through pynvml, 2026-11-25) published exactly
    these annotations; its replayed capture must give the same, but for the source."""
    gpus = [
        {
            "index": 0,
            "memoryMiB": 81559,
            "migLayout": {},
            "migMode": {"current": "disabled", "pending": "disabled"},
            "product": "NVIDIA H100 80GB HBM3",
            "uuid": "GPU-c9a986ed-e512-e51f-02fc-38b1418c8a27",
        }
    ]
    live = {
        inventory.GPU_COUNT: "1",
        inventory.GPU_PRODUCT: "NVIDIA H100 80GB HBM3",
        inventory.DRIVER_VERSION: "580.159.04",
        inventory.MIG_MODE: "disabled",
        inventory.MIG_PENDING: "false",
        inventory.MIG_LAYOUT: "{}",
        inventory.GPUS: json.dumps(gpus, sort_keys=True),
    }
    notes = inventory.node_annotations(read(CAPTURED))
    assert notes.pop(inventory.SOURCE) == "replay"
    assert notes == live
    samples = {s.name: s.value for s in inventory.samples(read(CAPTURED))}
    assert samples["ttsfleet_agent_gpu_memory_used_bytes"] == 503316480
    assert samples["ttsfleet_agent_gpu_mig_enabled"] == 0


def test_l4_without_mig() -> None:
    found = read(L4)
    assert [g.mig_current for g in found.gpus] == [None] * 4
    assert all(g.mig_layout == {} and g.profiles == () for g in found.gpus)
    notes = inventory.node_annotations(found)
    assert notes[inventory.MIG_MODE] == "unsupported"
    assert notes[inventory.MIG_PENDING] == "false"
    assert notes[inventory.MIG_LAYOUT] == "{}"
    assert notes[inventory.GPU_PRODUCT] == "NVIDIA L4"
    samples = {(s.name, dict(s.labels).get("gpu")): s.value for s in inventory.samples(found)}
    assert samples[("ttsfleet_agent_gpu_utilization_ratio", "0")] == pytest.approx(0.37)
    assert samples[("ttsfleet_agent_gpu_memory_activity_ratio", "3")] == pytest.approx(0.64)
    assert not any(name == "ttsfleet_agent_gpu_mig_enabled" for name, _ in samples)
    assert not any(name == "ttsfleet_agent_mig_instances" for name, _ in samples)


def test_a_pending_mig_change_is_reported_and_not_acted_on() -> None:
    found = read(PENDING)
    (gpu,) = found.gpus
    assert (gpu.mig_current, gpu.mig_pending) == (False, True)
    assert gpu.mig_change_pending and gpu.profiles == ()
    notes = inventory.node_annotations(found)
    assert notes[inventory.MIG_MODE] == "disabled"
    assert notes[inventory.MIG_PENDING] == "true"
    assert json.loads(notes[inventory.GPUS])[0]["migMode"] == {
        "current": "disabled",
        "pending": "enabled",
    }
    mig = {
        dict(s.labels)["mode"]: s.value
        for s in inventory.samples(found)
        if s.name == "ttsfleet_agent_gpu_mig_enabled"
    }
    assert mig == {"current": 0.0, "pending": 1.0}
    # NVIDIA's labels are read: MIG manager saying "success" while a change is pending is odd.
    assert inventory.label_notes(found, {"nvidia.com/mig.config.state": "success"})
    assert not inventory.label_notes(found, {"nvidia.com/mig.config.state": "pending"})


def test_label_notes_compare_gfd_product_label_with_nvml() -> None:
    found = read(H100)
    assert not inventory.label_notes(
        found, {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3-MIG-1g.10gb"}
    )
    (note,) = inventory.label_notes(found, {"nvidia.com/gpu.product": "NVIDIA-L4"})
    assert "NVIDIA-L4" in note


@pytest.mark.parametrize(
    ("raw", "slices", "memory", "name"),
    [
        (b"MIG 1g.10gb", 1, 9984, "1g.10gb"),
        (b"MIG 1g.10gb+me", 1, 9984, "1g.10gb+me"),
        (b"", 1, 9984, "1g.10gb"),
        (b"", 3, 40448, "3g.40gb"),
        (b"", 1, 4864, "1g.5gb"),
    ],
)
def test_profile_names(raw: bytes, slices: int, memory: int, name: str) -> None:
    assert inventory.profile_name(raw, slices, memory) == name


@pytest.mark.parametrize("path", INVENTORIES, ids=[p.stem for p in INVENTORIES])
def test_metric_samples_are_declared_and_unique(path: Path) -> None:
    samples = inventory.samples(read(path))
    assert {s.name for s in samples} <= set(inventory.METRICS)
    keys = [(s.name, s.labels) for s in samples]
    assert len(keys) == len(set(keys))


def test_the_metrics_endpoint_text() -> None:
    source = replay.Replay.from_file(H100)
    source.nvmlInit()
    agent = run.Agent(source, run.Settings())
    agent.step()
    registry = CollectorRegistry()
    registry.register(run.AgentCollector(agent))
    text = generate_latest(registry).decode()
    uuid = read(H100).gpus[0].uuid
    assert f'ttsfleet_agent_mig_instances{{gpu="0",profile="1g.10gb",uuid="{uuid}"}} 2.0' in text
    assert f'ttsfleet_agent_mig_instances{{gpu="0",profile="7g.80gb",uuid="{uuid}"}} 0.0' in text
    assert "ttsfleet_agent_gpus 8.0" in text
    assert 'ttsfleet_agent_reads_total{result="ok"} 1.0' in text
    assert "ttsfleet_agent_last_read_timestamp_seconds" in text
    assert 'product="NVIDIA H100 80GB HBM3"' in text


class FakeNode:
    """kube.get and kube.annotate_node on one Node kept in memory."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.node: dict[str, Any] = {
            "metadata": {"name": "h100-0", "labels": dict(labels), "annotations": {"a": "b"}}
        }
        self.patches: list[dict[str, str | None]] = []

    def get(self, api: Any, api_version: str, kind: str, name: str, ns: str | None) -> Any:
        assert (api_version, kind, name, ns) == ("v1", "Node", "h100-0", None)
        return json.loads(json.dumps(self.node))

    def annotate(self, api: Any, name: str, annotations: dict[str, str | None]) -> None:
        self.patches.append(dict(annotations))
        self.node["metadata"]["annotations"].update(annotations)


def test_the_agent_annotates_only_ttsfleet_keys_and_only_on_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gfd = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/mig.strategy": "mixed"}
    fake = FakeNode(gfd)
    monkeypatch.setattr(kube, "get", fake.get)
    monkeypatch.setattr(kube, "annotate_node", fake.annotate)
    source = replay.Replay.from_file(H100)
    source.nvmlInit()
    agent = run.Agent(source, run.Settings(node="h100-0"), api=object())  # type: ignore[arg-type]
    agent.step()
    agent.step()
    assert len(fake.patches) == 1 and agent.patches == 1
    (patch,) = fake.patches
    assert set(patch) == set(inventory.ANNOTATIONS)
    assert all(k.startswith("ttsfleet.io/") for k in patch)
    assert fake.node["metadata"]["labels"] == gfd
    assert fake.node["metadata"]["annotations"]["a"] == "b"


def test_a_failed_nvml_read_is_an_agent_error() -> None:
    source = replay.Replay.from_file(L4)  # never initialised: NVML answers Uninitialized
    agent = run.Agent(source, run.Settings())
    with pytest.raises(run.AgentError, match="Uninitialized"):
        agent.step()
    assert agent.reads == {"ok": 0, "error": 1}


@pytest.mark.parametrize(
    "call",
    [
        "nvmlDeviceSetMigMode",
        "nvmlDeviceCreateGpuInstance",
        "nvmlDeviceCreateGpuInstanceWithPlacement",
        "nvmlGpuInstanceDestroy",
        "nvmlGpuInstanceCreateComputeInstance",
        "nvmlDeviceResetGpuLockedClocks",
        "nvmlDeviceClearEccErrorCounts",
    ],
)
def test_a_mutating_call_on_the_replay_raises(call: str) -> None:
    source = replay.Replay.from_file(H100)
    source.nvmlInit()
    assert hasattr(pynvml, call)
    with pytest.raises(replay.ReadOnlyError, match=call):
        getattr(source, call)(source.nvmlDeviceGetHandleByIndex(0), 0)


def test_the_port_names_only_read_calls_that_pynvml_has() -> None:
    names = [n for n in vars(nvml.Nvml) if n.startswith("nvml")]
    assert len(names) == 13
    for name in names:
        assert callable(getattr(pynvml, name)), name
        assert re.fullmatch(r"nvml(Init|Shutdown|\w*Get\w*)", name), name
        assert callable(getattr(replay.Replay, name)), name


@pytest.mark.parametrize(
    "path",
    [
        *sorted((REPO / "operator" / "ttsfleet" / "agent").glob("*.py")),
        REPO / "hack" / "capture-nvml.py",
    ],
    ids=lambda p: p.name,
)
def test_no_source_names_a_mutating_nvml_function(path: Path) -> None:
    assert not MUTATING.findall(path.read_text()), path


def test_replay_behaves_like_nvml_before_init_and_on_bad_input(tmp_path: Path) -> None:
    source = replay.Replay.from_file(L4)
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        source.nvmlDeviceGetCount()
    source.nvmlInit()
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        source.nvmlDeviceGetHandleByIndex(4)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        source.nvmlDeviceGetMigMode(source.nvmlDeviceGetHandleByIndex(0))
    bad = tmp_path / "bad.json"
    bad.write_text('{"devices": []}')
    with pytest.raises(replay.ReplayError, match="source, synthetic, driverVersion"):
        replay.Replay.from_file(bad)


def test_gpu_instances_fill_pynvmls_own_ctypes_buffers() -> None:
    source = replay.Replay.from_file(H100)
    source.nvmlInit()
    device = source.nvmlDeviceGetHandleByIndex(1)
    handles = nvml.gpu_instances(source, device, 0, 7)
    assert len(handles) == 2
    assert all(isinstance(h, pynvml.c_nvmlGpuInstance_t) for h in handles)
    infos = [source.nvmlGpuInstanceGetInfo(h) for h in handles]
    assert [(i.id, i.profileId, i.placement.start) for i in infos] == [(9, 0, 0), (10, 0, 1)]
    assert isinstance(infos[0], pynvml.c_nvmlGpuInstanceInfo_t)
    assert ctypes.sizeof(infos[0]) > 0


@pytest.mark.parametrize("path", INVENTORIES, ids=[p.stem for p in INVENTORIES])
def test_the_capture_script_writes_what_the_replay_reads(path: Path) -> None:
    capture = capture_module()
    source = replay.Replay.from_file(path)
    source.nvmlInit()
    recorded = capture.capture(source, "round trip")
    original = json.loads(path.read_text())
    assert recorded["devices"] == original["devices"]
    assert recorded["driverVersion"] == original["driverVersion"]
    assert recorded["synthetic"] is False
    assert recorded["source"].startswith("Captured by hack/capture-nvml.py")


def _has_nvml() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.mark.skipif(_has_nvml(), reason="this machine has an NVIDIA driver")
def test_without_a_gpu_the_agent_says_so_in_one_line_and_exits_0() -> None:
    with pytest.raises(run.NoGpu, match=r"^no NVIDIA GPU on this node: nvmlInit failed with"):
        run.start(nvml.default())
    result = CliRunner().invoke(app, ["agent", "--once"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (
        "no NVIDIA GPU on this node: nvmlInit failed with NVML Shared Library Not Found; "
        "nothing to publish"
    )


def test_zero_devices_is_no_gpu_too() -> None:
    empty = replay.Replay({"source": "x", "synthetic": True, "driverVersion": "1", "devices": []})
    with pytest.raises(run.NoGpu, match="0 devices"):
        run.start(empty)


def test_the_cli_replays_an_inventory_once_and_prints_the_annotations() -> None:
    result = CliRunner().invoke(app, ["agent", "--once", "--replay", str(PENDING)])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed[inventory.MIG_PENDING] == "true"
    assert printed[inventory.SOURCE] == "replay of h100-mig-pending.json, synthetic"


def test_the_cli_refuses_a_broken_inventory(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    result = CliRunner().invoke(app, ["agent", "--once", "--replay", str(broken)])
    assert result.exit_code == 1
    assert "cannot read the NVML inventory" in result.output


def test_the_protocol_matches_pynvml_signatures() -> None:
    for name in [n for n in vars(nvml.Nvml) if n.startswith("nvml")]:
        mine = list(inspect.signature(getattr(nvml.Nvml, name)).parameters)[1:]
        theirs = list(inspect.signature(getattr(pynvml, name)).parameters)
        assert theirs[: len(mine)] == mine, name


def test_the_loop_steps_until_stopped_and_survives_a_failed_pass() -> None:
    source = replay.Replay.from_file(L4)
    agent = run.Agent(source, run.Settings(interval=0))
    stop = threading.Event()
    passes: list[int] = []

    def step() -> inventory.Inventory:
        passes.append(1)
        if len(passes) == 1:
            raise run.AgentError("the first pass fails")
        stop.set()
        return read(L4)

    agent.step = step  # type: ignore[method-assign]
    agent.loop(stop)
    assert len(passes) == 2


@pytest.mark.skipif(_has_nvml(), reason="this machine has an NVIDIA driver")
def test_without_a_gpu_the_daemon_stays_up_idle_instead_of_crash_looping() -> None:
    """Still running, and /metrics (what the chart's probes read) answers, so that the
    kubelet does not restart it for failing its liveness probe either."""
    port = local.free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ttsfleet"), "agent", "--metrics-port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        wait_for("the idle agent's /metrics", lambda: http_ok(url), timeout=30)
        assert metric_value(url, "ttsfleet_agent_gpu_present") == 0
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=2)  # still running: a DaemonSet pod stays Running
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert "no NVIDIA GPU on this node" in out
