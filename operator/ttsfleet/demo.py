"""`make demo`: the main job on the local default, end to end.

Local cluster with simulated GPU nodes and a local node -> the CRD -> the
operator -> a `TtsDeployment` on the local node -> a real Triton pod serving
the voice -> a WAV of a sentence. Whatever is already up is reused.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ttsfleet import client, harness, kube
from ttsfleet.api import crd
from ttsfleet.api import v1alpha1 as api
from ttsfleet.cluster import local
from ttsfleet.cluster.pool import load_pool_file

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "local-cpu.yaml"
SENTENCE = (
    "Hello from ttsfleet. This sentence was synthesized by a Triton pod on your local "
    "cluster, streamed to you one sentence at a time."
)


@dataclass
class DemoResult:
    cluster: local.ClusterRecord
    name: str
    address: str
    wav: Path
    speech: client.Result
    seconds: float


def _start_operator(record: local.ClusterRecord) -> None:
    log = record.dir / "operator.log"
    with log.open("ab") as out:
        subprocess.Popen(
            [sys.executable, "-m", "ttsfleet", "operator", "--kubeconfig", str(record.kubeconfig),
             "--metrics-port", "0", "--health-port", "0",
             "--prometheus-url", local.prometheus_url(record)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip


def _wait(what: str, probe: Callable[[], Any], timeout: float) -> Any:
    try:
        return harness.wait_for(what, probe, timeout=timeout, every=0.5)
    except AssertionError as err:  # the harness's timeout, said as the CLI says errors
        raise local.ClusterError(str(err)) from None


def run(cluster: str, output: Path, say: Callable[[str], None] = print) -> DemoResult:
    start = time.monotonic()
    up = local.up(cluster, load_pool_file(None), reuse=True)
    record = up.record
    say(f"{'Started' if up.created else 'Reusing'} cluster {cluster} ({record.kubeconfig})")
    for warning in up.warnings:
        say(f"warning: {warning}")
    api_client = kube.api_client(record.kubeconfig)
    kube.apply(api_client, [crd.crd()], "ttsfleet-demo")
    crd_name = f"{api.PLURAL}.{api.GROUP}"
    _wait("the TtsDeployment CRD", lambda: harness.crd_established(api_client, crd_name), 60)
    if not local.running(cluster, " operator "):
        _start_operator(record)
        say(f"Started the operator (log: {record.dir / 'operator.log'})")
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"]["namespace"] = "default"
    kube.apply(api_client, [doc], "ttsfleet-demo")
    name = doc["metadata"]["name"]
    say(f"Applied TtsDeployment {name}; waiting for a Triton pod to serve the voice...")

    def endpoints() -> list[str]:
        obj = kube.get_custom(api_client, api.GROUP, api.VERSION, api.PLURAL, "default", name)
        ready = any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in ((obj or {}).get("status") or {}).get("conditions") or []
        )
        return kube.ready_endpoints(api_client, "default", name, "grpc") if ready else []

    address = _wait(f"TtsDeployment {name} to be Ready", endpoints, 300)[0]
    speech = client.stream(address, SENTENCE)
    client.write_wav(output, speech.audio, speech.sample_rate)
    return DemoResult(record, name, address, output, speech, time.monotonic() - start)
