"""`make demo`: the main job on the local default, end to end.

Local cluster with simulated GPU nodes and a local node -> the CRDs -> the
operator -> a `TtsDeployment` on the local node -> a real Triton pod serving
the voice -> a WAV of a sentence; then a `TtsGateway` in front of it -> the same
voice through OpenAI's speech API, with the official `openai` client -> an MP3.
Whatever is already up is reused.
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
from ttsfleet.cluster import local, tokens
from ttsfleet.cluster.pool import load_pool_file

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "local-cpu.yaml"
GATEWAY_EXAMPLE = REPO / "examples" / "local-gateway.yaml"
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
    gateway_url: str
    mp3: Path


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
    kube.apply(api_client, [crd.crd(), crd.gateway_crd()], "ttsfleet-demo")
    for plural in (api.PLURAL, api.GATEWAY_PLURAL):
        crd_name = f"{plural}.{api.GROUP}"

        def established(name: str = crd_name) -> bool:
            return harness.crd_established(api_client, name)

        _wait(f"the {crd_name} CRD", established, 60)
    if not local.running(cluster, " operator "):
        _start_operator(record)
        say(f"Started the operator (log: {record.dir / 'operator.log'})")
    doc = yaml.safe_load(EXAMPLE.read_text())
    gateway = yaml.safe_load(GATEWAY_EXAMPLE.read_text())
    for made in doc, gateway:
        made["metadata"]["namespace"] = "default"
    secret = tokens.jwks_secret(cluster, "default")
    kube.apply(api_client, [doc, secret, gateway], "ttsfleet-demo")
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

    service = f"{gateway['metadata']['name']}-gateway"
    say(f"Applied TtsGateway {gateway['metadata']['name']}; waiting for the speech API...")
    found = _wait(
        f"TtsGateway {gateway['metadata']['name']} to serve",
        lambda: kube.ready_endpoints(api_client, "default", service, "http"),
        180,
    )
    url = f"http://{found[0]}/v1"
    mp3 = output.with_suffix(".mp3")
    speak_openai(url, tokens.token(cluster), mp3)
    return DemoResult(record, name, address, output, speech, time.monotonic() - start, url, mp3)


def speak_openai(base_url: str, token: str, out: Path) -> None:
    """What a developer writes: OpenAI's client, the gateway's URL and a token."""
    import openai  # noqa: PLC0415 - a dev dependency; only the demo speaks this way

    speech = openai.OpenAI(base_url=base_url, api_key=token, max_retries=5)
    deadline = time.monotonic() + 30
    while True:
        try:
            response = speech.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCE)
            break
        except (openai.AuthenticationError, openai.InternalServerError):
            # A gateway reused from an earlier run re-reads a changed key within
            # seconds; a new one may not have seen the fleet's endpoint yet (503).
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    out.parent.mkdir(parents=True, exist_ok=True)
    response.write_to_file(out)
