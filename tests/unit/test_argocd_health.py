"""The Argo CD health check of TtsDeployment, run by a real Lua interpreter (lupa).

Argo CD runs the script with the object in the global `obj` and reads the table it
returns; so do these tests.
"""

from __future__ import annotations

from typing import Any

import lupa
import pytest

from tests.helpers import REPO

SCRIPT = REPO / "charts" / "tts-operator" / "docs" / "argocd-health.lua"
Manifest = dict[str, Any]


def to_lua(runtime: Any, value: Any) -> Any:
    """A Python value as Lua sees it: dicts and lists become tables (lists 1-based)."""
    if isinstance(value, dict):
        return runtime.table_from({k: to_lua(runtime, v) for k, v in value.items()})
    if isinstance(value, list):
        return runtime.table_from([to_lua(runtime, v) for v in value])
    return value


def health(obj: Manifest) -> dict[str, str]:
    """Run the script on `obj` as Argo CD does; returns {"status", "message"}."""
    runtime = lupa.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = to_lua(runtime, obj)
    # The script's top level returns the table, as Argo CD expects: run it as a chunk.
    result = runtime.execute(SCRIPT.read_text())
    return {str(k): str(v) for k, v in result.items()}


def condition(kind: str, status: str, reason: str = "", message: str = "") -> dict[str, str]:
    return {"type": kind, "status": status, "reason": reason, "message": message}


def tts(*conditions: dict[str, str], generation: int = 2, observed: int | None = 2) -> Manifest:
    status: Manifest = {"conditions": list(conditions)}
    if observed is not None:
        status["observedGeneration"] = observed
    return {
        "apiVersion": "ttsfleet.io/v1alpha1",
        "kind": "TtsDeployment",
        "metadata": {"name": "joe", "namespace": "voices", "generation": generation},
        "status": status,
    }


READY = [
    condition("Ready", "True", "ReplicasReady", "2/2 replicas ready"),
    condition("Reconciling", "False", "Reconciled", "children match the spec"),
    condition("Stalled", "False", "Reconciled"),
    condition("MetricsUnavailable", "Unknown", "NotRead", "not read yet"),
    condition("CapacityExhausted", "False", "Scheduled", "every replica has a node"),
]


def test_ready_is_healthy() -> None:
    assert health(tts(*READY)) == {"status": "Healthy", "message": "2/2 replicas ready"}


def test_metrics_unavailable_alone_does_not_degrade() -> None:
    conditions = [c for c in READY if c["type"] != "MetricsUnavailable"]
    conditions.append(condition("MetricsUnavailable", "True", "NoSamples", "no samples"))
    assert health(tts(*conditions))["status"] == "Healthy"


def test_no_status_is_progressing() -> None:
    obj = tts()
    del obj["status"]
    assert health(obj)["status"] == "Progressing"


def test_a_status_without_observed_generation_is_progressing() -> None:
    assert health(tts(*READY, observed=None))["status"] == "Progressing"


def test_a_status_older_than_the_spec_is_progressing_even_if_it_said_ready() -> None:
    result = health(tts(*READY, generation=3, observed=2))
    assert result["status"] == "Progressing"
    assert "generation 3" in result["message"]


def test_stalled_is_degraded_with_its_message() -> None:
    message = "placement.mode auto is not available yet: set placement.mode to whole, mig"
    obj = tts(
        condition("Ready", "False", "PlacementUnavailable", message),
        condition("Reconciling", "False", "PlacementUnavailable", "waiting for the spec"),
        condition("Stalled", "True", "PlacementUnavailable", message),
        condition("CapacityExhausted", "Unknown", "PlacementUnavailable", "nothing scheduled"),
    )
    assert health(obj) == {"status": "Degraded", "message": message}


def test_stalled_with_no_message_names_its_reason() -> None:
    obj = tts(condition("Stalled", "True", "InvalidSpec"))
    assert health(obj) == {"status": "Degraded", "message": "InvalidSpec"}


def test_capacity_exhausted_is_degraded_with_its_message() -> None:
    message = "no capacity for 4 of 20 replicas: 0/7 nodes are available"
    obj = tts(
        condition("Ready", "False", "WaitingForCapacity", "16/20 replicas ready"),
        condition("Reconciling", "True", "WaitingForCapacity", "16/20 replicas ready"),
        condition("Stalled", "False", "Progressing"),
        condition("CapacityExhausted", "True", "Unschedulable", message),
    )
    assert health(obj) == {"status": "Degraded", "message": message}


def test_stalled_wins_over_capacity_exhausted() -> None:
    obj = tts(
        condition("Stalled", "True", "InvalidSpec", "spec.maxReplicas: too small"),
        condition("CapacityExhausted", "True", "Unschedulable", "no capacity"),
    )
    assert health(obj) == {"status": "Degraded", "message": "spec.maxReplicas: too small"}


def test_reconciling_is_progressing_with_its_message() -> None:
    obj = tts(
        condition("Ready", "False", "RollingOut", "1/2 replicas ready"),
        condition("Reconciling", "True", "RollingOut", "1/2 replicas ready"),
        condition("Stalled", "False", "Progressing"),
        condition("CapacityExhausted", "False", "Scheduled", "every replica has a node"),
    )
    assert health(obj) == {"status": "Progressing", "message": "1/2 replicas ready"}


@pytest.mark.parametrize(
    "conditions",
    [[], [condition("Ready", "False", "X", "x"), condition("Reconciling", "False", "Y", "y")]],
    ids=["no-conditions", "nothing-true"],
)
def test_otherwise_it_waits_for_status(conditions: list[dict[str, str]]) -> None:
    assert health(tts(*conditions)) == {"status": "Progressing", "message": "Waiting for status"}


def test_the_script_is_plain_lua_51() -> None:
    """Argo CD runs gopher-lua (Lua 5.1): none of the later syntax."""
    text = SCRIPT.read_text()
    for later in ("goto ", "//", "<const>", "<close>", "&", "|", "~ ", ">>", "<<"):
        code = "\n".join(line.split("--", 1)[0] for line in text.splitlines())
        assert later not in code, later
