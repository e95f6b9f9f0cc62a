"""The local runner's program for the Redis image the operator runs for a gateway: the
container the operator renders, run as Debian's redis-server, answers on the address it
was given and only there, and the runner's TCP readiness probe sees it."""

from __future__ import annotations

import ipaddress
import subprocess
import time
from pathlib import Path

import redis

from ttsfleet.api import v1alpha1 as api
from ttsfleet.cluster import images, local, runner
from ttsfleet.resources import gateway as gw


def redis_container() -> dict[str, object]:
    body = {
        "metadata": {"name": "speech", "namespace": "voice", "uid": "u-1"},
        "spec": {
            "routes": [{"models": ["tts-1"], "fleet": "joe"}],
            "rateLimits": {
                "tiers": [{"name": "free", "requestsPerSecond": 1, "requestBurst": 1}],
                "defaultTier": "free",
                "managedRedis": {"maxMemoryMiB": 16},
            },
        },
    }
    (deployment, *_) = gw.redis_children(gw.Gateway.from_body(body))
    container: dict[str, object] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def test_the_redis_image_runs_as_redis_server_on_the_pods_address(tmp_path: Path) -> None:
    container = redis_container()
    assert container["image"] == api.DEFAULT_REDIS_IMAGE
    port = local.free_port()
    # The pod's port is Redis's own (6379) in a pod's network; here, on loopback, a free one.
    args = [str(a) for a in container["args"]]  # type: ignore[attr-defined]
    args[args.index("--port") + 1] = str(port)
    ports = [{"name": "redis", "containerPort": port}]
    container = container | {"args": args, "ports": ports}
    command = images.local_command(container, {}, tmp_path, "127.0.0.1", "u-1")
    assert Path(command.argv[0]).name == "redis-server"
    assert not runner._probe(container, ipaddress.IPv4Address("127.0.0.1"))  # not yet up
    process = subprocess.Popen(command.wrapped(), env=command.env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not runner._probe(container, ipaddress.IPv4Address("127.0.0.1")):
            assert process.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server never listened"
            time.sleep(0.05)
        client = redis.Redis(port=port)
        assert client.ping()
        config = client.config_get("*")
        assert config["bind"] == "127.0.0.1"  # the pod's address, not the container's 0.0.0.0
        assert config["save"] == "" and config["appendonly"] == "no"
        assert int(config["maxmemory"]) == 16 * 1024 * 1024
        assert Path(config["dir"]).resolve() == (tmp_path / "data").resolve()
        client.close()
    finally:
        process.terminate()
        process.wait(10)
