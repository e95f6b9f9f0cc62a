"""The agent's loop: read NVML, annotate the Node, serve the latest figures as metrics."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from urllib3.exceptions import HTTPError

from ttsfleet import kube
from ttsfleet.agent import inventory
from ttsfleet.agent.nvml import NoDriver, Nvml, NVMLError

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 30.0
DEFAULT_METRICS_PORT = 9402


class NoGpu(Exception):  # noqa: N818 - a state, not a failure: the agent exits 0
    """There is no NVIDIA GPU here; the message says why, in one line."""


class AgentError(Exception):
    """A pass failed: NVML or the Kubernetes API refused."""


@dataclass(frozen=True)
class Settings:
    """How the agent runs; `node` None means read and report, publish nothing."""

    node: str | None = None
    interval: float = DEFAULT_INTERVAL
    metrics_port: int | None = DEFAULT_METRICS_PORT
    once: bool = False
    source: str = "nvml"
    synthetic: bool = False


def start(nvml: Nvml) -> None:
    """nvmlInit, or NoGpu where there is no driver or no GPU."""
    try:
        nvml.nvmlInit()
    except NoDriver as err:
        raise NoGpu(
            f"no NVIDIA GPU on this node: nvmlInit failed with {err}; nothing to publish"
        ) from None
    except NVMLError as err:
        raise AgentError(f"NVML failed to start: {err}") from None
    count = nvml.nvmlDeviceGetCount()
    if count == 0:
        nvml.nvmlShutdown()
        raise NoGpu("no NVIDIA GPU on this node: NVML reports 0 devices; nothing to publish")


class Agent:
    """One node's agent: each `step` reads NVML once and publishes what changed."""

    def __init__(self, nvml: Nvml, settings: Settings, api: client.ApiClient | None = None) -> None:
        self.nvml = nvml
        self.settings = settings
        self.api = api
        self.latest: inventory.Inventory | None = None
        self.last_read: float | None = None
        self.reads = {"ok": 0, "error": 0}
        self.patches = 0
        self._notes: list[str] = []

    def step(self) -> inventory.Inventory:
        """Read, then annotate the Node when its annotations would change."""
        try:
            found = inventory.read(self.nvml, self.settings.source, self.settings.synthetic)
        except NVMLError as err:
            self.reads["error"] += 1
            raise AgentError(f"reading NVML failed: {err}") from None
        self.latest, self.last_read = found, time.time()
        self.reads["ok"] += 1
        if self.settings.node is not None and self.api is not None:
            self._publish(self.api, self.settings.node, found)
        return found

    def _publish(self, api: client.ApiClient, node: str, found: inventory.Inventory) -> None:
        wanted = inventory.node_annotations(found)
        if not all(k.startswith(inventory.ANNOTATION_PREFIX) for k in wanted):
            raise AssertionError("the agent writes ttsfleet.io/ annotations only")
        try:
            current = kube.get(api, "v1", "Node", node, None)
            if current is None:
                raise AgentError(f"Node {node} does not exist")
            labels = current["metadata"].get("labels") or {}
            notes = inventory.label_notes(found, labels)
            for note in notes if notes != self._notes else []:
                log.warning("NVIDIA's labels on Node %s disagree with NVML: %s", node, note)
            self._notes = notes
            have = current["metadata"].get("annotations") or {}
            changed: dict[str, str | None] = {k: v for k, v in wanted.items() if have.get(k) != v}
            if changed:
                kube.annotate_node(api, node, changed)
                self.patches += 1
                log.info("Annotated Node %s: %s", node, ", ".join(sorted(changed)))
        except ApiException as err:
            raise AgentError(f"the Kubernetes API refused: {err.status} {err.reason}") from None
        except HTTPError as err:
            raise AgentError(f"the Kubernetes API is unreachable: {err}") from None

    def loop(self, stop: threading.Event) -> None:
        """Step every `interval` seconds until `stop` is set; a failed pass is logged."""
        while not stop.is_set():
            try:
                self.step()
            except AgentError as err:
                log.error("%s", err)
            stop.wait(self.settings.interval)


class AgentCollector(Collector):
    """The latest inventory's samples, and the agent's own counters."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        reads = CounterMetricFamily(
            "ttsfleet_agent_reads", "NVML reads by result.", labels=["result"]
        )
        for result, count in self.agent.reads.items():
            reads.add_metric([result], count)
        yield reads
        yield CounterMetricFamily(
            "ttsfleet_agent_node_patches", "Patches of the Node's annotations.",
            value=self.agent.patches,
        )  # fmt: skip
        if self.agent.last_read is not None:
            yield GaugeMetricFamily(
                "ttsfleet_agent_last_read_timestamp_seconds",
                "When NVML was last read successfully (Unix time).",
                value=self.agent.last_read,
            )
        if self.agent.latest is not None:
            yield from families(inventory.samples(self.agent.latest))


def families(samples: list[inventory.Sample]) -> Iterator[Metric]:
    """Gauge families of `samples`, one per metric name, in METRICS order."""
    for name, help_text in inventory.METRICS.items():
        mine = [s for s in samples if s.name == name]
        if not mine:
            continue
        family = GaugeMetricFamily(name, help_text, labels=[k for k, _ in mine[0].labels])
        for s in mine:
            family.add_metric([v for _, v in s.labels], s.value)
        yield family


def run(
    nvml: Nvml, settings: Settings, api: client.ApiClient | None, say: Callable[[str], None] = print
) -> None:
    """Run the agent as `settings` say. Raises NoGpu (exit 0) or AgentError."""
    start(nvml)
    agent = Agent(nvml, settings, api)
    try:
        if settings.once:
            found = agent.step()
            say(json.dumps(inventory.node_annotations(found), indent=2, sort_keys=True))
            return
        if settings.metrics_port is not None:
            registry = CollectorRegistry()
            registry.register(AgentCollector(agent))
            start_http_server(settings.metrics_port, registry=registry)
        target = f"Node {settings.node}" if settings.node else "no Node (no --node)"
        log.info(
            "Reading %s every %gs for %s; metrics on port %s",
            settings.source, settings.interval, target, settings.metrics_port,
        )  # fmt: skip
        stop = threading.Event()
        _stop_on_signals(stop)
        agent.loop(stop)
    finally:
        nvml.nvmlShutdown()


def idle(metrics_port: int | None) -> None:
    """Where there is no GPU: stay up (a DaemonSet pod that exited would be restarted
    for ever), serving `ttsfleet_agent_gpu_present 0` on the metrics port so that the
    pod's probes, which read /metrics, see a live agent with nothing to publish."""
    if metrics_port is not None:
        registry = CollectorRegistry()
        Gauge(
            "ttsfleet_agent_gpu_present", "1 when NVML found a GPU on this node, else 0.",
            registry=registry,
        ).set(0)  # fmt: skip
        start_http_server(metrics_port, registry=registry)
    stop = threading.Event()
    _stop_on_signals(stop)
    stop.wait()


def _stop_on_signals(stop: threading.Event) -> None:
    import signal  # noqa: PLC0415 - only the long-running mode handles signals

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
