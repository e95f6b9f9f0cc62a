"""Real speech through the cluster: a TtsDeployment on the local node is served by a
real tritonserver in the node's network namespace, found through its EndpointSlices."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
import wave
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cluster, ttsfleet, wait_for
from tests.helpers import REPO
from ttsfleet import kube
from ttsfleet.autoscale.metrics import MetricsUnavailableError, PrometheusSource, Signals
from ttsfleet.cluster import local
from ttsfleet.cluster import nodes as cluster_nodes

pytestmark = pytest.mark.usefixtures("operator")
EXAMPLE = REPO / "examples" / "local-cpu.yaml"


def pods(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    out = cluster.kubectl(
        "get", "pods", "-n", namespace, "-l", "ttsfleet.io/deployment=joe-local", "-o", "json"
    )
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def serving(cluster: Cluster, namespace: str, count: int) -> list[str]:
    def ready() -> list[str]:
        found = kube.ready_endpoints(cluster.api, namespace, "joe-local", "grpc")
        return found if len(found) == count else []

    try:
        result: list[str] = wait_for(f"{count} ready endpoint(s)", ready, timeout=120)
    except AssertionError:
        print(cluster.kubectl("get", "pods", "-A", "-o", "wide"))
        runner = local.runner_dir(cluster.name)
        print((runner / "runner.log").read_text()[-3000:])
        for log in runner.glob("pods/*/container.log"):
            print(log, log.read_text()[-2000:])
        raise
    return result


def test_say_speaks_through_a_real_triton_pod(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLE))
    (address,) = serving(cluster, namespace, 1)
    pod = pods(cluster, namespace)[0]
    assert pod["spec"]["nodeName"] == "local-0"
    assert address == f"{pod['status']['podIP']}:8001"
    out = tmp_path / "hello.wav"
    result = ttsfleet(
        "say", "Hello from the local node. It really speaks.", "--target", "joe-local",
        "-n", namespace, "--cluster", cluster.name, "-o", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "time to first audio" in result.stdout and "RTF" in result.stdout
    with wave.open(str(out)) as wav:
        assert wav.getframerate() == 22050
        assert wav.getnframes() / wav.getframerate() > 1.5


def test_bench_loads_a_deployment_by_name_through_its_watched_endpoints(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLE))
    serving(cluster, namespace, 1)
    out = tmp_path / "bench.json"
    result = ttsfleet(
        "bench", "--target", "joe-local", "-n", namespace, "--cluster", cluster.name,
        "--concurrency", "1", "--seconds", "3", "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (level,) = json.loads(out.read_text())["levels"]
    assert level["requests"] > 0 and level["errors"] == 0


def test_a_deleted_pod_stops_its_process_and_a_new_one_serves(
    cluster: Cluster, namespace: str
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLE))
    serving(cluster, namespace, 1)
    old = pods(cluster, namespace)[0]
    uid = old["metadata"]["uid"]

    def running(pod_uid: str) -> bool:
        return any(pod_uid in local.cmdline(pid) for pid in local.processes(cluster.name))

    assert running(uid)
    cluster.kubectl("delete", "pod", "-n", namespace, old["metadata"]["name"], "--wait=true")
    wait_for("the old pod's process to end", lambda: not running(uid), timeout=60)
    (address,) = serving(cluster, namespace, 1)
    assert address.split(":")[0] != "" and pods(cluster, namespace)[0]["metadata"]["uid"] != uid


def test_scaling_up_adds_an_endpoint_that_serves(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLE))
    serving(cluster, namespace, 1)
    cluster.kubectl("scale", "-n", namespace, "ttsd/joe-local", "--replicas=2")
    addresses = serving(cluster, namespace, 2)
    assert len(set(addresses)) == 2
    for address in addresses:
        result = ttsfleet("say", "One of two.", "--target", address, "-o", "/dev/null")
        assert result.returncode == 0, result.stderr


def test_clients_skip_endpoints_on_simulated_nodes(cluster: Cluster, namespace: str) -> None:
    # The MIG example runs on kwok nodes: its EndpointSlice lists ready endpoints with no
    # host behind them.
    cluster.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "joe-mig.yaml"))

    def simulated_endpoints() -> list[str]:
        out = cluster.kubectl(
            "get", "endpointslices", "-n", namespace, "-l", "kubernetes.io/service-name=joe",
            "-o", "json",
        )  # fmt: skip
        return [
            e["nodeName"]
            for item in json.loads(out)["items"]
            for e in item.get("endpoints") or []
            if (e.get("conditions") or {}).get("ready")
        ]

    nodes = wait_for("a ready endpoint on a simulated node", simulated_endpoints, timeout=60)
    assert set(nodes) <= cluster_nodes.simulated_nodes(cluster.api)
    assert kube.ready_endpoints(cluster.api, namespace, "joe", "grpc") == []
    result = ttsfleet(
        "say", "hello", "--target", "joe", "-n", namespace, "--kubeconfig", str(cluster.kubeconfig)
    )
    assert result.returncode == 1
    assert "has no ready endpoints" in result.stderr


def prometheus(cluster: Cluster, path: str) -> dict[str, Any]:
    record = local.load(cluster.name)
    assert record is not None and record.prometheus_port
    url = f"{local.prometheus_url(record)}{path}"
    with urllib.request.urlopen(url, timeout=5) as response:
        doc: dict[str, Any] = json.loads(response.read())
        return doc


def test_prometheus_scrapes_only_the_pods_that_really_run(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLE))
    cluster.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "joe-mig.yaml"))
    (address,) = serving(cluster, namespace, 1)
    assert ttsfleet("say", "Count me.", "--target", address, "-o", "/dev/null").returncode == 0
    query = "/api/v1/query?query=" + urllib.parse.quote(
        f'nv_inference_request_success{{namespace="{namespace}"}}'
    )

    def scraped() -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = prometheus(cluster, query)["data"]["result"]
        return [r for r in results if float(r["value"][1]) >= 1]

    (sample,) = wait_for("the request in Prometheus", scraped, timeout=60)
    assert sample["metric"]["deployment"] == "joe-local"
    assert sample["metric"]["pod"].startswith("joe-local-")
    # Only pods on local nodes are targets: the MIG replicas on kwok nodes are not.
    targets = prometheus(cluster, "/api/v1/targets")["data"]["activeTargets"]
    ours = [t for t in targets if t["labels"].get("namespace") == namespace]
    assert {t["labels"]["deployment"] for t in ours} == {"joe-local"}
    assert all(t["health"] == "up" for t in ours)


def test_the_metrics_source_reads_every_signal_of_a_serving_fleet(
    cluster: Cluster, namespace: str
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLE))
    (address,) = serving(cluster, namespace, 1)
    record = local.load(cluster.name)
    assert record is not None
    source = PrometheusSource(local.prometheus_url(record))

    def measured() -> Signals | None:
        ttsfleet("say", "Measure me. Twice over.", "--target", address, "-o", "/dev/null")
        signals = source.signals().get((namespace, "joe-local"))
        return signals if signals and signals.ttfa_p95_seconds is not None else None

    signals = wait_for("the fleet's signals in Prometheus", measured, timeout=60, every=1)
    assert 0 < signals.ttfa_p95_seconds < 5
    assert signals.queue_seconds_per_request is not None
    # Idle again: nothing pending, no stream open (once the last scrape has seen it end).
    wait_for(
        "an idle fleet in Prometheus",
        lambda: (
            (s := source.signals()[(namespace, "joe-local")]).pending_requests == 0
            and s.open_streams == 0
        ),
        timeout=30,
    )
    # The history the predicted floor reads: a range query over the last minutes.
    now = datetime.now(UTC)
    peaks = source.peaks(now - timedelta(minutes=5), now)
    assert peaks[(namespace, "joe-local")] >= 0
    # Prometheus gone: the source says so instead of returning nothing.
    gone = PrometheusSource(f"http://127.0.0.1:{local.free_port()}")
    with pytest.raises(MetricsUnavailableError, match="Prometheus at"):
        gone.signals()
    with pytest.raises(MetricsUnavailableError, match="Prometheus at"):
        gone.peaks(now - timedelta(minutes=5), now)
