"""Leader election's pure part: who may take the Lease, and the fence on writes."""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path

import pytest

from ttsfleet import kube
from ttsfleet.leader import ConfigError, Leadership, LeaseConfig, Record, Step, decide


def record(holder: str, duration: float = 15, version: str = "7") -> Record:
    return Record(holder, duration, 3, "2026-12-06T10:00:00.000000Z", version)


def test_a_missing_or_released_lease_is_taken_at_once() -> None:
    assert decide(None, "b", observed_at=100, now=100) == Step.ACQUIRE
    assert decide(record(""), "b", observed_at=100, now=100) == Step.ACQUIRE


def test_a_live_holder_is_waited_for_until_its_record_is_a_lease_duration_old() -> None:
    held = record("a", duration=15)
    assert decide(held, "b", observed_at=100, now=100) == Step.WAIT
    assert decide(held, "b", observed_at=100, now=114.9) == Step.WAIT
    assert decide(held, "b", observed_at=100, now=115) == Step.ACQUIRE
    # The holder's own duration counts, not ours.
    assert decide(record("a", duration=60), "b", observed_at=100, now=130) == Step.WAIT


def test_a_lease_gone_after_it_was_seen_is_waited_for_a_lease_duration() -> None:
    """Deleted by hand, its leader may still act: wait as for an unrenewed record; a
    candidate that never saw one (a fresh install) creates it at once."""
    assert decide(None, "b", observed_at=100, now=101, lease_duration=15, seen_one=True) == (
        Step.WAIT
    )
    assert decide(None, "b", observed_at=100, now=115, lease_duration=15, seen_one=True) == (
        Step.ACQUIRE
    )
    assert decide(None, "b", observed_at=100, now=100, lease_duration=15) == Step.ACQUIRE


def test_our_own_record_is_renewed_whatever_its_age() -> None:
    """After an apiserver outage the old leader finds its own record: nobody else took it."""
    assert decide(record("a"), "a", observed_at=0, now=1000) == Step.RENEW


@pytest.mark.parametrize(
    ("duration", "deadline", "retry", "flag"),
    [
        (15, 15, 2, "--renew-deadline"),
        (15, 20, 2, "--renew-deadline"),
        (15, 10, 10, "--retry-period"),
        (15, 10, 0, "--retry-period"),
    ],
)
def test_timings_that_cannot_work_name_the_flag(
    duration: float, deadline: float, retry: float, flag: str
) -> None:
    with pytest.raises(ConfigError, match=flag):
        LeaseConfig("l", "ns", "me", duration, deadline, retry)


def test_the_fence_holds_for_the_renew_deadline_after_the_renewal_was_sent() -> None:
    fence = Leadership(renew_deadline=1.0)
    assert not fence.held()
    sent = time.monotonic()
    fence.granted(sent)
    assert fence.held()
    time.sleep(1.05)  # a paused process wakes past its deadline: no write goes out
    assert not fence.held()
    fence.granted(time.monotonic())
    fence.revoke()
    assert not fence.held()


def test_a_fenced_client_refuses_writes_before_they_leave_but_reads_go_out(
    tmp_path: Path,
) -> None:
    """No apiserver is needed to see the refusal: the write never reaches the network
    (the kubeconfig points at a closed port on loopback)."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\nusers: [{name: u, user: {}}]\n"
    )
    fence = Leadership(renew_deadline=10)
    api = kube.api_client(kubeconfig, fence=fence.held)
    with pytest.raises(kube.NotLeaderError, match="not the leader: PATCH"):
        kube.scale_custom(api, "ttsfleet.io", "v1alpha1", "ttsdeployments", "ns", "joe", 3)
    with pytest.raises(kube.NotLeaderError):
        kube.post_event(
            api, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "n"}},
            "Normal", "X", "y",
        )  # fmt: skip
    # A read is sent (and fails on the closed port: it was not refused by the fence).
    with pytest.raises(Exception) as read:  # any transport error
        kube.get_custom(api, "ttsfleet.io", "v1alpha1", "ttsdeployments", "ns", "joe")
    assert not isinstance(read.value, kube.NotLeaderError)


def test_a_write_that_passed_the_first_check_is_stopped_on_the_connection(
    tmp_path: Path,
) -> None:
    """A thread that passed `call_api`'s check and then waited (for a connection, the
    GIL, or with its process paused) while the Lease lapsed sends nothing: the
    connection checks again just before the first byte. A loopback server counts what
    arrives."""
    arrived: list[str] = []

    class Count(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            arrived.append("GET")
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def do_PATCH(self) -> None:
            arrived.append("PATCH")
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Count)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        kubeconfig = tmp_path / "kubeconfig"
        url = f"http://127.0.0.1:{server.server_address[1]}"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
            f"clusters: [{{name: c, cluster: {{server: '{url}'}}}}]\n"
            "contexts: [{name: c, context: {cluster: c, user: u}}]\nusers: [{name: u, user: {}}]\n"
        )
        fence = Leadership(renew_deadline=10)
        api = kube.api_client(kubeconfig, fence=fence.held)
        # Straight to the transport, as a request past call_api's check would be.
        with pytest.raises(kube.NotLeaderError):
            api.rest_client.request("PATCH", f"{url}/apis/x", body={})
        api.rest_client.request("GET", f"{url}/version")
        fence.granted(time.monotonic())
        api.rest_client.request("PATCH", f"{url}/apis/x", body={})
    finally:
        server.shutdown()
    assert arrived == ["GET", "PATCH"]  # the refused PATCH never reached the server
