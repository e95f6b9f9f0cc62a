"""The nodes of a local cluster: made so that kwok takes their capacity, and watched.

What only kwok's simulated nodes need, built on `kube`'s plain Node calls (the one
module that talks to the API).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kubernetes import client

from ttsfleet import kube
from ttsfleet.cluster.pool import KWOK_ANNOTATION

Manifest = dict[str, Any]


def create_nodes(api: client.ApiClient, nodes: Sequence[Manifest], workers: int = 16) -> int:
    """Create Nodes, in parallel; those that already exist get the manifest's capacity
    and allocatable through their status subresource. Returns how many were created.

    kwok keeps a node's status from its creation and ignores an apply of the Node: new
    capacity reaches an existing node only through its status.
    """

    def create(node: Manifest) -> bool:
        if kube.create_node(api, node):
            return True
        resources = {k: node["status"][k] for k in ("capacity", "allocatable")}
        kube.patch_node_status(api, node["metadata"]["name"], resources)
        return False

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return sum(pool.map(create, nodes))


def is_simulated(node: Manifest) -> bool:
    """Whether kwok runs `node` (the pool file's GPU nodes), not the local runner."""
    return KWOK_ANNOTATION in (node.get("metadata", {}).get("annotations") or {})


def node_is_ready(node: Manifest) -> bool:
    conditions = node.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def ready_nodes(api: client.ApiClient) -> set[str]:
    """Names of the nodes whose Ready condition is True."""
    return {n["metadata"]["name"] for n in kube.list_nodes(api) if node_is_ready(n)}


def simulated_nodes(api: client.ApiClient) -> set[str]:
    """Names of the nodes kwok simulates: their pods' IPs have no host behind them."""
    return {n["metadata"]["name"] for n in kube.list_nodes(api) if is_simulated(n)}
