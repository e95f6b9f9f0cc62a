"""The speech WebSocket in front of a real tritonserver, driven as a voice agent drives
it: text in pieces, several contexts on one socket, barge-in, and bad input."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from ttsfleet.harness import TritonProcess, wait_for
from ttsfleet.triton import contract

from .test_gateway import Setup, gateway_config
from .test_gateway import seconds as decoded_seconds

IDLE_SECONDS = 3
FIRST = "The first sentence is spoken while the rest is still being written."
SETTINGS = {"model": "tts-1", "voice": "alloy"}
LONG = " ".join(
    f"This is sentence number {n}, which the caller will interrupt before its end."
    for n in range(12)
)


class WsSetup(Setup):
    def write(self, endpoints: list[str], **extra: Any) -> None:
        extra.setdefault("websocketIdleSeconds", IDLE_SECONDS)
        self.gateway.configure(gateway_config(endpoints, self.jwks, **extra))

    def connect(self, query: str = "", **headers: str) -> ClientConnection:
        url = self.gateway.url.replace("http://", "ws://") + "/v1/audio/speech/stream" + query
        return connect(url, additional_headers=headers, open_timeout=10, close_timeout=5)

    @contextmanager
    def session(self) -> Iterator[ClientConnection]:
        """A socket authenticated as a browser does: the token in the first message."""
        with self.connect() as socket:
            socket.send(json.dumps({"type": "auth", "token": self.token()}))
            assert receive(socket) == {"type": "ready"}
            yield socket


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, triton: TritonProcess) -> Iterator[WsSetup]:
    made = WsSetup(tmp_path_factory.mktemp("gateway-ws"), triton)
    made.gateway.start()
    yield made
    made.gateway.stop()


def receive(socket: ClientConnection, timeout: float = 30) -> dict[str, Any]:
    message = json.loads(socket.recv(timeout=timeout))
    assert isinstance(message, dict)
    return message


def send(socket: ClientConnection, kind: str, context: str | None = None, **fields: Any) -> None:
    message = {"type": kind} | ({"context_id": context} if context else {}) | fields
    socket.send(json.dumps(message))


def until_done(
    socket: ClientConnection, context: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The audio messages of `context` until its `done` (others are skipped)."""
    chunks: list[dict[str, Any]] = []
    while True:
        message = receive(socket)
        if message.get("context_id") != context:
            continue
        assert message["type"] in ("audio", "done"), message
        if message["type"] == "done":
            return chunks, message
        chunks.append(message)


def joined(chunks: list[dict[str, Any]]) -> bytes:
    assert [c["sequence"] for c in chunks] == list(range(len(chunks)))  # in order, none lost
    return b"".join(base64.b64decode(c["audio"]) for c in chunks)


def seconds(data: bytes, fmt: str) -> float:
    if fmt == "pcm":
        return len(data) / 2 / 24_000
    return decoded_seconds(data, {"opus": "ogg", "aac": "adts"}.get(fmt, fmt))


def http_seconds(ws: WsSetup, text: str) -> float:
    body = SETTINGS | {"input": text, "response_format": "pcm"}
    response = httpx2.post(
        f"{ws.gateway.url}/v1/audio/speech", json=body, timeout=60,
        headers={"authorization": f"Bearer {ws.token()}"},
    )  # fmt: skip
    assert response.status_code == 200
    return seconds(response.content, "pcm")


def test_text_in_pieces_is_spoken_sentence_by_sentence_before_it_is_all_there(
    ws: WsSetup,
) -> None:
    with ws.session() as socket:
        send(socket, "continue", "a", **SETTINGS, response_format="wav", text=FIRST[:20])
        send(socket, "continue", "a", text=FIRST[20:] + " And the second one is ")
        # Audio comes for the first sentence with the context still open and the
        # second sentence unfinished.
        first = receive(socket)
        assert first["type"] == "audio" and first["context_id"] == "a" and first["sequence"] == 0
        send(socket, "continue", "a", text="only written now.")
        send(socket, "close", "a")
        chunks, done = until_done(socket, "a")
    data = joined([first, *chunks])
    assert data[:4] == b"RIFF" and data.count(b"RIFF") == 1  # one header for the context
    assert done["reason"] == "completed" and done["usage"]["output_tokens"] > 0
    expected = http_seconds(ws, FIRST + " And the second one is only written now.")
    assert seconds(data, "wav") == pytest.approx(expected, rel=0.15)


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "pcm"])
def test_each_context_is_one_stream_of_its_own_format(ws: WsSetup, fmt: str) -> None:
    with ws.session() as socket:
        send(socket, "continue", "x", **SETTINGS, response_format=fmt, text=FIRST + " Two. ")
        send(socket, "close", "x")
        chunks, done = until_done(socket, "x")
    assert done["reason"] == "completed"
    expected = http_seconds(ws, FIRST + " Two.")
    assert seconds(joined(chunks), fmt) == pytest.approx(expected, abs=0.1 + 0.05 * expected)


def test_contexts_on_one_socket_interleave_and_each_ends_with_done(ws: WsSetup) -> None:
    with ws.session() as socket:
        send(socket, "continue", "left", **SETTINGS, response_format="pcm", text=FIRST + " ")
        send(socket, "continue", "right", **SETTINGS, response_format="mp3", text="Hello. ")
        send(socket, "close", "left")
        send(socket, "close", "right")
        chunks: dict[str, list[dict[str, Any]]] = {"left": [], "right": []}
        done: dict[str, dict[str, Any]] = {}
        while len(done) < 2:
            message = receive(socket)
            assert message["context_id"] not in done, "audio after done"
            if message["type"] == "done":
                done[message["context_id"]] = message
            else:
                chunks[message["context_id"]].append(message)
    assert {d["reason"] for d in done.values()} == {"completed"}
    assert seconds(joined(chunks["left"]), "pcm") > seconds(joined(chunks["right"]), "mp3") > 0.3


def test_flush_speaks_what_is_buffered_and_the_context_goes_on(ws: WsSetup) -> None:
    with ws.session() as socket:
        send(socket, "continue", "f", **SETTINGS, response_format="mp3", text="No full stop yet")
        with pytest.raises(TimeoutError):  # an unfinished sentence waits for more text
            socket.recv(timeout=1.0)
        send(socket, "flush", "f")
        flushed = [receive(socket)]
        while True:  # everything of the flushed text, the encoder's tail included
            try:
                flushed.append(receive(socket, timeout=1.0))
            except TimeoutError:
                break
        assert all(m["type"] == "audio" for m in flushed)
        heard = seconds(joined(flushed), "mp3")
        assert heard >= http_seconds(ws, "No full stop yet")
        send(socket, "continue", "f", text="Then more. ")
        send(socket, "close", "f")
        chunks, done = until_done(socket, "f")
    assert done["reason"] == "completed" and chunks
    assert chunks[0]["sequence"] == len(flushed)  # one stream: the sequence goes on


def inflight(triton: TritonProcess) -> float:
    return triton.metric(contract.INFLIGHT_STREAMS, model=contract.STREAM_MODEL)


def test_cancel_stops_that_context_at_once_and_its_triton_stream(
    ws: WsSetup, triton: TritonProcess
) -> None:
    with ws.session() as socket:
        send(socket, "continue", "talk", **SETTINGS, response_format="pcm", text=LONG)
        send(socket, "close", "talk")
        send(socket, "continue", "other", **SETTINGS, response_format="pcm", text=FIRST)
        send(socket, "close", "other")
        while (message := receive(socket))["context_id"] != "talk":
            pass
        assert message["type"] == "audio"
        send(socket, "cancel", "talk")
        while (message := receive(socket))["type"] != "done" or message["context_id"] != "talk":
            pass
        assert message["reason"] == "cancelled"
        # Nothing more of the cancelled context; the other one goes on to its end.
        while (later := receive(socket))["type"] != "done":
            assert later["context_id"] == "other"
        assert later["context_id"] == "other" and later["reason"] == "completed"
        send(socket, "ping")
        assert receive(socket) == {"type": "pong"}
        wait_for("the cancelled stream to end on Triton", lambda: inflight(triton) == 0, timeout=5)
        seen = ws.gateway.metric(contract.GATEWAY_CONTEXTS, fleet="speech/joe", reason="cancelled")
    assert seen >= 1
    # Twelve sentences make ~40 s of audio (20 tokens a second): far less was spoken.
    assert message["usage"]["output_tokens"] < 20 * 10


def test_a_disconnect_cancels_every_triton_stream_the_socket_held(
    ws: WsSetup, triton: TritonProcess
) -> None:
    with ws.session() as socket:
        for context in ("one", "two", "three"):
            send(socket, "continue", context, **SETTINGS, response_format="mp3", text=LONG)
            send(socket, "close", context)
        assert receive(socket)["type"] == "audio"
        assert ws.gateway.metric(contract.GATEWAY_WEBSOCKETS) >= 1
        assert inflight(triton) >= 1
    wait_for("Triton's streams to end", lambda: inflight(triton) == 0, timeout=5)
    wait_for(
        "the gateway's streams to end",
        lambda: (
            ws.gateway.metric(contract.GATEWAY_INFLIGHT_STREAMS, fleet="speech/joe") == 0
            and ws.gateway.metric(contract.GATEWAY_WEBSOCKETS) == 0
        ),
        timeout=5,
    )


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"type": "continue", "context_id": "c", "model": "tts-1", "voice": "nobody"}, "voice"),
        ({"type": "continue", "context_id": "c", "model": "nope", "voice": "alloy"}, "model"),
        (
            {"type": "continue", "context_id": "c", **SETTINGS, "response_format": "ogg"},
            "response_format",
        ),
        ({"type": "continue", "context_id": "c", **SETTINGS, "speed": 9}, "speed"),
        ({"type": "continue", "context_id": "c", **SETTINGS, "text": 7}, "text"),
        ({"type": "continue", "context_id": "c", **SETTINGS, "text": "a\0b. "}, "text"),
        ({"type": "continue", "context_id": "c", **SETTINGS, "text": "\ud800 lone. "}, "text"),
        ({"type": "continue", **SETTINGS, "text": "hi"}, "context_id"),
        ({"type": "shout", "context_id": "c"}, "type"),
        ({"type": "flush", "context_id": "nobody"}, "context_id"),
        ({"type": "continue", "context_id": "c", **SETTINGS, "text": "a" * 5000}, "text"),
    ],
)
def test_bad_messages_get_errors_naming_the_field_and_the_socket_stays(
    ws: WsSetup, message: dict[str, Any], param: str
) -> None:
    with ws.session() as socket:
        socket.send(json.dumps(message))
        error = receive(socket)
        assert error["type"] == "error" and error["error"]["param"] == param, error
        assert error["error"]["message"]
        send(socket, "ping")
        assert receive(socket) == {"type": "pong"}


def test_a_refused_first_message_opens_no_context(ws: WsSetup) -> None:
    with ws.session() as socket:
        send(socket, "continue", "big", **SETTINGS, text="a " * 3000)
        assert receive(socket)["error"]["code"] == "string_above_max_length"
        send(socket, "flush", "big")
        assert receive(socket)["error"]["message"].startswith("No open context 'big'")


def test_a_contexts_settings_are_fixed_by_its_first_message(ws: WsSetup) -> None:
    with ws.session() as socket:
        send(socket, "continue", "s", **SETTINGS, response_format="pcm", text="Hello")
        send(socket, "continue", "s", response_format="mp3", text=" there.")
        error = receive(socket)
        assert error["type"] == "error" and error["error"]["param"] == "response_format"
        send(socket, "cancel", "s")
        assert receive(socket)["type"] == "done"
        for raw in ("not json", "[1, 2]"):
            socket.send(raw)
            assert receive(socket)["type"] == "error"
        socket.send(b"\x00\x01")
        assert "binary" in receive(socket)["error"]["message"]


def closed_with(socket: ClientConnection) -> tuple[dict[str, Any], int]:
    error = receive(socket)
    with pytest.raises(ConnectionClosed) as closed:
        socket.recv(timeout=10)
    assert closed.value.rcvd is not None
    return error, closed.value.rcvd.code


@pytest.mark.parametrize(
    "first",
    [
        {"type": "continue", "context_id": "c", **SETTINGS, "text": "Let me in."},
        {"type": "auth", "token": "not-a-jwt"},
        {"type": "auth"},
    ],
)
def test_without_a_valid_token_first_nothing_is_spoken(ws: WsSetup, first: dict[str, Any]) -> None:
    with ws.connect() as socket:
        socket.send(json.dumps(first))
        error, code = closed_with(socket)
    assert error["type"] == "error" and error["error"]["code"] == "invalid_api_key"
    assert code == 1008


def test_expired_and_foreign_tokens_are_refused(ws: WsSetup) -> None:
    from ttsfleet.gateway import auth  # noqa: PLC0415

    for token in (ws.token(ttl_seconds=-120), ws.token(key=auth.new_signing_key())):
        with ws.connect() as socket:
            socket.send(json.dumps({"type": "auth", "token": token}))
            error, code = closed_with(socket)
        assert code == 1008 and error["error"]["code"] == "invalid_api_key"


def test_an_authorization_header_works_for_clients_that_can_send_one(ws: WsSetup) -> None:
    with ws.connect(authorization=f"Bearer {ws.token()}") as socket:
        assert receive(socket) == {"type": "ready"}


def test_a_ticket_from_an_authenticated_call_opens_one_socket_once(ws: WsSetup) -> None:
    tickets = f"{ws.gateway.url}/v1/audio/speech/tickets"
    assert httpx2.post(tickets).status_code == 401
    issued = httpx2.post(tickets, headers={"authorization": f"Bearer {ws.token()}"})
    assert issued.status_code == 200
    ticket = issued.json()["ticket"]
    assert issued.json()["url"].endswith(f"?ticket={ticket}")
    with ws.connect(f"?ticket={ticket}") as socket:
        assert receive(socket) == {"type": "ready"}
        send(socket, "continue", "t", **SETTINGS, response_format="pcm", text="Ticketed. ")
        send(socket, "close", "t")
        assert until_done(socket, "t")[1]["reason"] == "completed"
    forged = ticket[:-4] + ("AAAA" if not ticket.endswith("AAAA") else "BBBB")
    for used in (ticket, forged):  # a ticket is good once; a forged one never
        with ws.connect(f"?ticket={used}") as socket:
            error, code = closed_with(socket)
        assert code == 1008 and error["error"]["param"] == "ticket"


def test_an_idle_socket_is_closed_with_the_reason(ws: WsSetup) -> None:
    with ws.session() as socket:
        started = time.monotonic()
        error, code = closed_with(socket)
    assert error["error"]["code"] == "idle_timeout" and code == 1000
    assert time.monotonic() - started >= IDLE_SECONDS - 0.5


def test_the_documented_example_session_plays_as_written(ws: WsSetup) -> None:
    """docs/speech-websocket.md's example, replayed: each gateway line comes, in order
    (audio messages beyond the ones shown may come between them)."""
    doc = (Path(__file__).parents[2] / "docs/speech-websocket.md").read_text()
    session = doc.split("## An example session", 1)[1].split("```")[1]
    lines = [line for line in session.splitlines() if line[:2] in ("> ", "< ")]
    assert len(lines) >= 10
    with ws.connect() as socket:
        for line in lines:
            message = json.loads(line[2:])
            if line.startswith("> "):
                if message["type"] == "auth":
                    message["token"] = ws.token()
                socket.send(json.dumps(message))
                continue
            want = (message["type"], message.get("context_id"))
            while (got := receive(socket))["type"] != want[0] or got.get("context_id") != want[1]:
                assert got["type"] == "audio", f"expected {want}, got {got}"
            if "reason" in message:
                assert got["reason"] == message["reason"]
