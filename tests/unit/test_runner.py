"""The local runner's kubelet rules: restart by restartPolicy, phase, terminated state."""

from __future__ import annotations

from pathlib import Path

import pytest

from ttsfleet.cluster import images
from ttsfleet.cluster.runner import (
    ContainerProcess,
    pod_phase,
    pods_phase,
    restart_wanted,
    terminated_state,
)


@pytest.mark.parametrize(
    ("policy", "exit_code", "restart"),
    [
        ("Always", 0, True),
        ("Always", 1, True),
        ("OnFailure", 0, False),
        ("OnFailure", 1, True),
        ("OnFailure", 137, True),
        ("Never", 0, False),
        ("Never", 1, False),
    ],
)
def test_restart_follows_the_restart_policy(policy: str, exit_code: int, restart: bool) -> None:
    assert restart_wanted(policy, exit_code) is restart


def test_an_exit_is_reported_as_a_runtime_does() -> None:
    done = terminated_state(0, "t0", "t1", "ttsfleet-local://7")
    assert (done["exitCode"], done["reason"]) == (0, "Completed")
    assert (done["startedAt"], done["finishedAt"], done["containerID"]) == (
        "t0",
        "t1",
        "ttsfleet-local://7",
    )
    assert terminated_state(1, "", "", "")["reason"] == "Error"
    killed = terminated_state(-9, "", "", "")  # Popen's returncode for SIGKILL
    assert (killed["exitCode"], killed["reason"]) == (137, "Error")


def test_the_phase_is_kubelets() -> None:
    ok, failed = {"exitCode": 0}, {"exitCode": 2}
    assert pod_phase("Always", running=False, terminated=None, exited_before=False) == "Pending"
    assert pod_phase("Never", running=True, terminated=None, exited_before=False) == "Running"
    # Waiting to be restarted after an exit: still Running, as kubelet reports it.
    assert pod_phase("Always", running=False, terminated=None, exited_before=True) == "Running"
    assert pod_phase("OnFailure", running=False, terminated=None, exited_before=True) == "Running"
    assert pod_phase("OnFailure", running=False, terminated=ok, exited_before=False) == "Succeeded"
    assert pod_phase("Never", running=False, terminated=ok, exited_before=False) == "Succeeded"
    assert pod_phase("Never", running=False, terminated=failed, exited_before=True) == "Failed"


def test_a_gateway_binds_its_pod_ip_where_pods_share_a_node_namespace() -> None:
    """Two gateway replicas on one local node would both take 0.0.0.0:8080 there."""
    container = {"image": "ttsfleet/gateway:dev", "args": ["gateway", "--config=/c.json"]}
    argv = images.local_command(container, {}, Path("/nonexistent"), "10.32.4.5").argv
    assert argv[-1] == "--host=10.32.4.5"
    chosen = {"image": "ttsfleet/gateway:dev", "args": ["gateway", "--host=127.0.0.1"]}
    assert "--host=10.32.4.5" not in images.local_command(chosen, {}, Path("/x"), "10.0.0.1").argv
    agent = {"image": "ttsfleet/gateway:dev", "args": ["region", "--spec=/s.json"]}
    assert images.local_command(agent, {}, Path("/x"), "10.32.4.6").argv[-1] == "--host=10.32.4.6"


def test_a_pod_of_several_containers_is_done_when_every_one_is() -> None:
    ok, failed = {"exitCode": 0}, {"exitCode": 1}
    agent, envoy = ContainerProcess("agent", "a.log"), ContainerProcess("envoy", "e.log")
    assert pods_phase("Always", [agent, envoy]) == "Pending"
    agent.ever_started = True  # one ran (and waits for its restart): the pod runs
    assert pods_phase("Always", [agent, envoy]) == "Running"
    agent.terminated = ok  # one done for good, the other not started yet: still running
    assert pods_phase("OnFailure", [agent, envoy]) == "Running"
    envoy.terminated = failed
    assert pods_phase("Never", [agent, envoy]) == "Failed"
    envoy.terminated = ok
    assert pods_phase("Never", [agent, envoy]) == "Succeeded"


def test_the_envoy_image_runs_the_wheels_envoy_at_its_volumes_paths(tmp_path: Path) -> None:
    spec = tmp_path / "spec"
    container = {
        "name": "envoy", "image": "docker.io/envoyproxy/envoy:v1.40.0",
        "args": ["-c", "/etc/ttsfleet/region/envoy.json"],
        "volumeMounts": [{"name": "spec", "mountPath": "/etc/ttsfleet/region"}],
    }  # fmt: skip
    command = images.local_command(container, {"spec": spec}, tmp_path, "10.32.4.5")
    assert Path(command.argv[0]).name == "envoy" and Path(command.argv[0]).exists()
    assert command.argv[1:] == ["-c", "/etc/ttsfleet/region/envoy.json", "--disable-hot-restart"]
    assert command.binds == [(spec, "/etc/ttsfleet/region")]
    with pytest.raises(images.NotRunnableLocallyError, match="envoy command"):
        images.local_command(container | {"command": ["sh"]}, {"spec": spec}, tmp_path, "10.0.0.1")
