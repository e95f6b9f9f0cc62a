"""Which nodes' pod IPs a client may connect to: the simulated ones never."""

from __future__ import annotations

from ttsfleet import kube
from ttsfleet.cluster import nodes
from ttsfleet.cluster.pool import LOCAL_LABEL, load_pool_file, render_nodes


def test_only_the_local_nodes_have_a_pod_network() -> None:
    rendered = render_nodes(load_pool_file(None), "v1.34.2")
    assert any(nodes.is_simulated(n) for n in rendered)
    assert any(not nodes.is_simulated(n) for n in rendered)
    for node in rendered:
        local = node["metadata"]["labels"].get(LOCAL_LABEL) == "true"
        # The endpoint filter (kube) and the pool (cluster) agree on every node.
        assert kube.has_pod_network(node) is local is (not nodes.is_simulated(node))


def test_a_node_without_annotations_has_a_pod_network() -> None:
    assert kube.has_pod_network({"metadata": {"name": "worker-1"}})


def test_readiness_is_the_ready_condition() -> None:
    def node(status: str) -> dict[str, object]:
        return {"status": {"conditions": [{"type": "Ready", "status": status}]}}

    assert nodes.node_is_ready(node("True"))
    assert not nodes.node_is_ready(node("Unknown"))
    assert not nodes.node_is_ready({"status": {}})


def test_an_apiserver_that_never_answers_a_node_read_leaves_its_endpoints_out() -> None:
    """Seen in CI: a node read that never returned held a gateway's EndpointSlice watch,
    so it never learned its Redis. The read is bounded: the node's endpoints are left
    out (and retried), nothing waits forever."""
    import socket  # noqa: PLC0415

    from kubernetes import client  # noqa: PLC0415

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts, never answers
    config = client.Configuration()
    config.host = f"http://127.0.0.1:{silent.getsockname()[1]}"
    api = client.ApiClient(config)
    try:
        candidates = [("local-0", "10.16.3.6:6379")]
        assert kube._reachable(api, candidates, {}, timeout=(1, 0.5)) == []
    finally:
        silent.close()
