"""Schemathesis against the OpenAPI document the gateway serves, with a real tritonserver
behind it: valid requests (positive) and invalid ones (negative), from the document's
boundaries (the coverage phase) and at random (fuzzing). No 5xx but a documented 503,
and every response's status code, media type, body and headers as the document says.

Seeded and derandomized: a run sends the same requests every time, so a failure here
reproduces (its curl command is in the message). Schemathesis' pytest loader
(`schemathesis.pytest.from_fixture`) does not run on pytest 9 (it sets `Node._nodeid`),
so its engine, which the `st` CLI runs, runs here and its findings are asserted on."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from schemathesis import Config
from schemathesis.engine import events

from tests.integration.test_gateway import Setup
from ttsfleet.harness import TritonProcess

MAX_INPUT = 80  # short texts: a generated request synthesises in a fraction of a second
EXAMPLES = 100  # per operation in the fuzzing phase

# The checks that must have judged responses: a run in which one never did proves
# nothing about what it checks.
CHECKS = {
    "not_a_server_error", "status_code_conformance", "content_type_conformance",
    "response_schema_conformance", "response_headers_conformance",
    "negative_data_rejection", "positive_data_acceptance", "ignored_auth",
}  # fmt: skip


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, triton: TritonProcess) -> Iterator[Setup]:
    made = Setup(tmp_path_factory.mktemp("gateway-schema"), triton)
    made.write([triton.grpc_address], maxInputCharacters=MAX_INPUT)
    made.gateway.start()
    yield made
    made.gateway.stop()


def schemathesis_config(token: str) -> Config:
    return Config.from_dict(
        {
            "seed": 20260101,
            "headers": {"Authorization": f"Bearer {token}"},
            "generation": {
                "mode": "all",  # positive and negative
                "max-examples": EXAMPLES,
                "deterministic": True,
                "database": "none",  # nothing replayed from an earlier run
            },
            "checks": {
                # Every check, and: a documented 503 is an answer, not a crash (the
                # status code check still fails a 503 on an operation not documenting it).
                "not_a_server_error": {"expected-statuses": ["2XX", "3XX", "4XX", 503]},
            },
            "phases": {"stateful": {"enabled": False}},  # no links: nothing to chain
        }
    )


def test_the_gateway_answers_as_its_openapi_document_says(gateway: Setup) -> None:
    document = f"{gateway.gateway.url}/openapi.json"
    schema = schemathesis.openapi.from_url(document, config=schemathesis_config(gateway.token()))
    failures: list[str] = []
    errors: list[str] = []
    ran: set[str] = set()
    answers: Counter[tuple[str, int, str]] = Counter()  # operation, status, media type
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            for nodes in event.recorder.checks.values():
                for node in nodes:
                    ran.add(node.name)
                    if node.failure_info is not None:
                        failure = node.failure_info.failure
                        failures.append(
                            f"{failure.operation}: {node.name}: {failure.title}\n"
                            f"{failure.message}\n{node.failure_info.code_sample}"
                        )
            for interaction in event.recorder.interactions.values():
                if (response := interaction.response) is not None:
                    media = response.headers.get("content-type", [""])[0].split(";")[0]
                    answers[(event.recorder.label, response.status_code, media)] += 1
        elif isinstance(event, events.NonFatalError):
            errors.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            errors.append(repr(event.exception))
        elif isinstance(event, events.EngineFinished):
            failures += [f"{f.operation}: {f.title}\n{f.message}" for f in event.failures]
    summary = "\n".join(f"{n:4} {op} -> {code} {media}" for (op, code, media), n in answers.items())
    print(summary)  # shown with -rP: what the run sent and got
    assert errors == [], "\n\n".join(errors)
    assert failures == [], "\n\n".join(failures) + f"\n\nAll answers:\n{summary}"
    assert not CHECKS - ran, f"checks that never ran: {sorted(CHECKS - ran)}"
    # The run did what it is for: audio and events spoken, bad requests and tokens
    # refused, every operation called.
    speech = "POST /v1/audio/speech"
    for expected in [
        (speech, 200, "audio/mpeg"), (speech, 200, "text/event-stream"),
        (speech, 400, "application/json"), (speech, 401, "application/json"),
        ("GET /v1/models", 200, "application/json"), ("GET /v1/voices", 401, "application/json"),
        ("GET /healthz", 200, "text/plain"), ("GET /readyz", 200, "text/plain"),
        ("GET /metrics", 200, "text/plain"), ("GET /", 200, "text/html"),
    ]:  # fmt: skip
        assert answers[expected], f"never answered {expected}:\n{summary}"
    # A healthy replica behind: no 503 at all. One would be a request that made the
    # replica fail (a NUL in `input` did: 503, and the replica marked as failing).
    assert not [key for key in answers if key[1] == 503], summary


GOOD = b'{"model": "tts-1", "voice": "alloy", "input": "Fine."}'


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param(GOOD.replace(b"Fine.", b"a\\u0000b"), "input", id="NUL in input"),
        pytest.param(GOOD.replace(b"Fine.", b"\\ud800 lone"), "input", id="lone surrogate"),
        pytest.param(GOOD.replace(b'"tts-1"', b'"\\udfff"'), "model", id="surrogate model"),
        pytest.param(GOOD.replace(b'"alloy"', b'{"id": "\\ud800"}'), "voice", id="surrogate id"),
        pytest.param(GOOD[:-1] + b', "speed": 1' + b"0" * 400 + b"}", "speed", id="huge speed"),
        pytest.param(GOOD[:-1] + b', "n": ' + b"9" * 5000 + b"}", None, id="5000 digits"),
        pytest.param(b"[" * 5000 + b"]" * 5000, None, id="deep nesting"),
    ],
)  # fmt: skip
def test_bodies_json_allows_but_text_does_not_are_a_400(
    gateway: Setup, body: bytes, param: str | None
) -> None:
    """What schemathesis rarely generates, near what it found: 400 naming the field."""
    response = gateway.post(body)
    assert response.status_code == 400, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
