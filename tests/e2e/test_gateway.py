"""A TtsGateway on the local cluster: the operator makes it, the local runner runs it
as a real `ttsfleet gateway` pod that watches its fleet's EndpointSlices with its own
ServiceAccount, and the official openai client speaks through it."""

from __future__ import annotations

import io
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import av
import httpx2
import openai
import pytest
from websockets.sync.client import connect

from tests.conftest import Cluster, ttsfleet, wait_for
from tests.helpers import REPO, load_example
from ttsfleet import kube
from ttsfleet.api import v1alpha1 as api
from ttsfleet.cluster import local, tokens
from ttsfleet.gateway import auth
from ttsfleet.resources import gateway as gw
from ttsfleet.triton import contract

pytestmark = pytest.mark.usefixtures("operator")
FLEET = REPO / "examples" / "local-cpu.yaml"
GATEWAY = REPO / "examples" / "local-gateway.yaml"


def gateway(cluster: Cluster, namespace: str) -> dict[str, Any]:
    found = kube.get_custom(cluster.api, api.GROUP, api.VERSION, api.GATEWAY_PLURAL, namespace,
                            "speech")  # fmt: skip
    assert found is not None
    return found


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in obj["status"].get("conditions") or [] if c["type"] == kind)


def address(cluster: Cluster, namespace: str) -> str:
    def found() -> list[str]:
        return kube.ready_endpoints(cluster.api, namespace, "speech-gateway", "http")

    try:
        return str(wait_for("the gateway's ready endpoint", found, timeout=180)[0])
    except AssertionError:
        print(cluster.kubectl("get", "pods,ttsgw,ttsd", "-n", namespace, "-o", "wide"))
        runner = local.runner_dir(cluster.name)
        print((runner / "runner.log").read_text()[-3000:])
        for log in runner.glob("pods/*/container.log"):
            print(log, log.read_text()[-1500:])
        raise


def gateway_pods(cluster: Cluster, namespace: str, name: str = "speech") -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", f"ttsfleet.io/gateway={name}",
                          "-o", "json")  # fmt: skip
    return list(json.loads(out)["items"])


def gateway_pod(cluster: Cluster, namespace: str) -> dict[str, Any]:
    (pod,) = gateway_pods(cluster, namespace)
    return pod


def why(cluster: Cluster, namespace: str, name: str = "speech") -> str:
    """What a failed gateway test says: the gateway's status, the pods, the gateway's
    log (its endpoint watch says what it saw), the EndpointSlices and the runner's log."""
    pods = cluster.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False)
    status = cluster.kubectl("get", "ttsgw", name, "-n", namespace, "-o",
                             "jsonpath={.status}", check=False)  # fmt: skip
    runner = local.runner_dir(cluster.name)
    # The gateway prints its threads' stacks on SIGUSR1 (a watch stuck waiting shows).
    subprocess.run(["pkill", "-USR1", "-f", "ttsfleet gateway --config"], check=False)
    time.sleep(1)
    logs = ""
    for pod in gateway_pods(cluster, namespace, name):
        log = runner / "pods" / pod["metadata"]["uid"] / "container.log"
        logs += log.read_text()[-12000:] if log.exists() else "(none)"
    slices = cluster.kubectl("get", "endpointslices", "-n", namespace, "-o", "yaml",
                             check=False)  # fmt: skip
    runner_log = (runner / "runner.log").read_text()[-3000:]
    return (
        f"the gateway's status: {status}; pods:\n{pods}\nthe gateway's log:\n{logs}\n"
        f"the EndpointSlices:\n{slices}\nthe runner's log:\n{runner_log}"
    )


def test_a_gateway_speaks_for_its_fleet_and_follows_its_routes(
    cluster: Cluster, namespace: str
) -> None:
    kube.apply(cluster.api, [tokens.jwks_secret(cluster.name, namespace)], "pytest")
    cluster.kubectl("apply", "-n", namespace, "-f", str(FLEET), "-f", str(GATEWAY))
    base = f"http://{address(cluster, namespace)}/v1"
    token = ttsfleet("token", "--cluster", cluster.name, "--tenant", "acme")
    assert token.returncode == 0, token.stderr
    assert token.stdout.count("\n") == 1 and token.stdout.count(".") == 2  # only the JWT

    client = openai.OpenAI(base_url=base, api_key=token.stdout.strip())

    refused: list[str] = []

    def spoken() -> bytes | None:
        """The first speech, once the gateway's watch has seen a ready replica (503
        until then: the fleet's pod may still be starting)."""
        try:
            return client.audio.speech.create(
                model="tts-1", voice="alloy", input="Hello, cluster."
            ).content
        except openai.InternalServerError as err:
            refused[:] = [str(err)]
            return None

    try:
        content = wait_for("speech through the gateway", spoken, timeout=180)
    except AssertionError as err:
        said = why(cluster, namespace)
        raise AssertionError(f"{err}; the gateway said {refused}; {said}") from None
    with av.open(io.BytesIO(content), format="mp3") as container:
        samples = sum(f.samples for f in container.decode(audio=0))
    assert samples / 22_050 > 0.5

    stranger = auth.sign(auth.new_signing_key(), issuer=tokens.ISSUER,
                         audience=tokens.AUDIENCE, subject="x")  # fmt: skip
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key=stranger).models.list()

    obj = gateway(cluster, namespace)
    assert condition(obj, "Ready")["status"] == "True"
    secret = kube.get(cluster.api, "v1", "Secret", "speech-gateway-tickets", namespace)
    assert secret is not None
    ticket_key = secret["data"]
    assert obj["status"]["url"] == f"http://speech-gateway.{namespace}.svc/v1"
    assert obj["status"]["fleets"] == [{"name": "joe-local", "ready": True, "readyReplicas": 1}]
    table = cluster.kubectl("get", "-n", namespace, "ttsgw", "speech")
    assert table.split("\n")[0].split() == ["NAME", "READY", "REPLICAS", "URL", "AGE"]

    # A new route reaches the running pod through its ConfigMap: no restart.
    before = gateway_pod(cluster, namespace)
    doc = load_example(GATEWAY)
    doc["metadata"]["namespace"] = namespace
    doc["spec"]["routes"][0]["models"].append("narrator")
    kube.apply(cluster.api, [doc], "pytest")
    wait_for(
        "the new model on the running gateway",
        lambda: "narrator" in {m.id for m in client.models.list()},
        timeout=60,
    )
    after = gateway_pod(cluster, namespace)
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["status"]["containerStatuses"][0]["restartCount"] == 0
    client.audio.speech.create(model="narrator", voice="nova", input="New route.")

    # The ticket key was made once, and the reconciles since left it as it was; a ticket
    # from an authenticated call opens a WebSocket on the pod that mounts it.
    key = kube.get(cluster.api, "v1", "Secret", "speech-gateway-tickets", namespace)
    assert key is not None and key["data"] == ticket_key
    issued = httpx2.post(f"{base}/audio/speech/tickets",
                         headers={"authorization": f"Bearer {token.stdout.strip()}"})  # fmt: skip
    assert issued.status_code == 200, issued.text
    url = (
        base.replace("http://", "ws://") + f"/audio/speech/stream?ticket={issued.json()['ticket']}"
    )
    with connect(url, open_timeout=10) as socket:
        assert json.loads(socket.recv(timeout=10)) == {"type": "ready"}
        words = {"model": "narrator", "voice": "nova", "text": "Over a socket."}
        socket.send(json.dumps({"type": "continue", "context_id": "c"} | words))
        socket.send(json.dumps({"type": "close", "context_id": "c"}))
        while (message := json.loads(socket.recv(timeout=30)))["type"] != "done":
            assert message["type"] == "audio"
    assert message["reason"] == "completed"

    # A route to a fleet that does not exist is reported, and the others keep serving.
    doc["spec"]["routes"].append({"models": ["missing-model"], "fleet": "nobody"})
    kube.apply(cluster.api, [doc], "pytest")

    def stalled() -> dict[str, Any] | None:
        cond = condition(gateway(cluster, namespace), "Stalled")
        return cond if cond["status"] == "True" else None

    cond = wait_for("the gateway to report the missing fleet", stalled, timeout=30)
    assert "spec.routes[1].fleet" in cond["message"] and "nobody" in cond["message"]
    client.audio.speech.create(model="tts-1", voice="alloy", input="Still serving.")

    # Deleting the gateway removes its cluster-scoped binding too.
    binding = f"ttsfleet-gateway-{namespace}-speech"
    assert kube.get(cluster.api, "rbac.authorization.k8s.io/v1", "ClusterRoleBinding", binding,
                    None)  # fmt: skip
    cluster.kubectl("delete", "-n", namespace, "ttsgw", "speech")
    wait_for(
        "the ClusterRoleBinding to go",
        lambda: kube.get(cluster.api, "rbac.authorization.k8s.io/v1", "ClusterRoleBinding",
                         binding, None) is None,
        timeout=30,
    )  # fmt: skip


def test_the_demo_speaks_through_triton_and_through_the_speech_api(
    cluster: Cluster, tmp_path: Path
) -> None:
    """`make demo`'s command on this cluster (reusing its operator)."""
    out = tmp_path / "demo.wav"
    try:
        result = ttsfleet("demo", "--name", cluster.name, "--output", str(out))
        if result.returncode != 0:
            raise AssertionError(f"{result.stdout}{result.stderr}{why(cluster, 'default')}")
        lines = result.stdout.splitlines()
        gateway_lines = [line for line in lines if line.startswith("gateway: ")]
        assert len(gateway_lines) == 1
        assert gateway_lines[0].startswith("gateway: http://") and gateway_lines[0].endswith("/v1")
        assert any(line.startswith("Spoke") and ":8001" in line for line in lines)
        with av.open(str(out.with_suffix(".mp3"))) as container:
            samples = sum(f.samples for f in container.decode(audio=0))
        assert samples / 22_050 > 3.0
    finally:
        cluster.kubectl("delete", "-n", "default", "ttsgw,ttsd", "--all", "--wait=false")


def test_gateway_replicas_share_limits_through_the_redis_the_operator_runs(
    cluster: Cluster, namespace: str
) -> None:
    """managedRedis: the operator runs a Redis pod (the runner: Debian's redis-server),
    both gateway replicas find it through its Service's EndpointSlices, and a tenant's
    burst is counted once across them, again after the Redis pod is replaced; taking
    managedRedis out of the spec removes it. No fleet is needed: a request the limits
    admit gets 503 (no replica), one they refuse 429."""
    kube.apply(cluster.api, [tokens.jwks_secret(cluster.name, namespace)], "pytest")
    example = load_example(GATEWAY)["spec"]
    tier = {"name": "trial", "requestsPerSecond": 0.02, "requestBurst": 3}
    doc: dict[str, Any] = {
        "apiVersion": api.API_VERSION, "kind": api.GATEWAY_KIND,
        "metadata": {"name": "limited", "namespace": namespace},
        "spec": {
            "replicas": 2,
            "routes": [{"models": ["tts-1"], "fleet": "absent", "voices": ["alloy"]}],
            "rateLimits": {"tiers": [tier], "defaultTier": "trial", "managedRedis": {}},
            "auth": example["auth"],
            "nodeSelector": example["nodeSelector"],
            "tolerations": example["tolerations"],
        },
    }  # fmt: skip
    kube.apply(cluster.api, [doc], "pytest")

    def token(tenant: str) -> dict[str, str]:
        made = ttsfleet("token", "--cluster", cluster.name, "--tenant", tenant)
        assert made.returncode == 0, made.stderr
        return {"authorization": f"Bearer {made.stdout.strip()}"}

    def redis_ready() -> dict[str, Any] | None:
        found = kube.get_custom(cluster.api, api.GROUP, api.VERSION, api.GATEWAY_PLURAL,
                                namespace, "limited")  # fmt: skip
        redis = ((found or {}).get("status") or {}).get("redis") or {}
        return redis if redis.get("ready") else None

    def pods() -> list[str]:
        found = kube.ready_endpoints(cluster.api, namespace, "limited-gateway", "http")
        return found if len(found) == 2 else []

    speech = {"model": "tts-1", "voice": "alloy", "input": "Hello."}
    warm = token("warm")
    # The two replicas' addresses, once both are ready (kept: a replica's readiness may
    # blink under load while it still answers at its address).
    addresses: list[str] = []

    def shared_everywhere() -> bool:
        """Whether both replicas' limits went through Redis for a request just now (a
        replica that met a Redis gone away limits on its own for a second, then tries
        it again)."""
        gauge = f"{contract.GATEWAY_RATELIMIT_SHARED} 1.0"
        for pod in addresses:
            spoken = http.post(f"http://{pod}/v1/audio/speech", json=speech, headers=warm)
            assert spoken.status_code in (429, 503), spoken.text  # limited, or no replica
        return all(gauge in http.get(f"http://{pod}/metrics").text for pod in addresses)

    def burst(tenant: str) -> list[int]:
        """Eight requests from `tenant`, alternating between the two replicas: each one's
        status, and each carries the RateLimit fields (an admitted request that no
        replica could take too)."""
        headers = token(tenant)
        answers = [
            http.post(f"http://{addresses[i % 2]}/v1/audio/speech", json=speech,
                      headers=headers)
            for i in range(8)
        ]  # fmt: skip
        for answer in answers:
            assert answer.headers["ratelimit-policy"] == '"requests";q=3;w=150', answer.headers
            assert answer.headers["ratelimit"].startswith('"requests";r='), answer.headers
            assert "retry-after" in answer.headers
        return [answer.status_code for answer in answers]

    def fallbacks() -> int:
        """Times the replicas logged going on their own (a Redis call failed or took
        over its 0.25 s timeout: that replica limits alone for a second)."""
        runner = local.runner_dir(cluster.name)
        logs = (runner / "pods" / p["metadata"]["uid"] / "container.log"
                for p in gateway_pods(cluster, namespace, "limited"))  # fmt: skip
        return sum(log.read_text().count("Redis failed") for log in logs if log.exists())

    def shared_burst(tenant: str) -> list[int]:
        """A burst measured while both replicas used Redis throughout: one that met a
        fallback (seen on a loaded machine) says nothing of sharing, and is sent again
        with a new tenant once both share again."""
        before = fallbacks()
        codes = burst(tenant)
        if fallbacks() > before:
            wait_for("limits shared again on both", shared_everywhere, timeout=60)
            codes = burst(f"{tenant}-again")
        return codes

    with httpx2.Client(trust_env=False, timeout=10) as http:
        try:
            assert wait_for("the managed Redis", redis_ready, timeout=120) == {
                "service": "limited-gateway-redis", "ready": True,
            }  # fmt: skip
            addresses[:] = wait_for("two ready gateway replicas", pods, timeout=120)
            wait_for("limits shared through Redis on both", shared_everywhere, timeout=60)
        except AssertionError as err:
            raise AssertionError(f"{err}; {why(cluster, namespace, 'limited')}") from None
        codes = shared_burst("acme")
        assert sorted(codes) == [429] * 5 + [503] * 3, codes  # 3 admitted, not 2 x 3

        # A new Redis pod starts empty; both replicas follow it to its address.
        cluster.kubectl("delete", "pod", "-n", namespace, "-l", f"{gw.REDIS_LABEL}=limited",
                        "--wait=true")  # fmt: skip
        wait_for("a new Redis pod", redis_ready, timeout=120)
        wait_for("limits shared through the new Redis", shared_everywhere, timeout=60)
        codes = shared_burst("globex")
        assert sorted(codes) == [429] * 5 + [503] * 3, (
            f"{codes}; {why(cluster, namespace, 'limited')}"
        )

    doc["spec"]["rateLimits"].pop("managedRedis")
    kube.apply(cluster.api, [doc], "pytest")
    wait_for(
        "the Redis Deployment to go",
        lambda: kube.get(cluster.api, "apps/v1", "Deployment", "limited-gateway-redis",
                         namespace) is None,
        timeout=60,
    )  # fmt: skip
    found = kube.get_custom(cluster.api, api.GROUP, api.VERSION, api.GATEWAY_PLURAL, namespace,
                            "limited")  # fmt: skip
    assert found is not None and "redis" not in found["status"]
    assert kube.get(cluster.api, "v1", "Service", "limited-gateway-redis", namespace) is None
