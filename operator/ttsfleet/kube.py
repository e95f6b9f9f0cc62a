"""The one module that talks to the Kubernetes API.

Everything else builds plain manifests (dicts) and hands them here.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

log = logging.getLogger("ttsfleet.kube")

Manifest = dict[str, Any]


class NotLeaderError(RuntimeError):
    """A write refused before it left the process: this replica does not hold the Lease."""


_READS = frozenset({"GET", "HEAD", "OPTIONS"})


# (connect, read) seconds for a request that names none: an answer that never comes
# (a connection dropped without a word, seen in CI) must raise, not hold its thread.
DEFAULT_TIMEOUT = (10.0, 60.0)


class _BoundedApiClient(client.ApiClient):
    """An ApiClient whose every request has a timeout (`DEFAULT_TIMEOUT` where the call
    names none; watches name their own)."""

    def call_api(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("_request_timeout") is None:
            kwargs["_request_timeout"] = DEFAULT_TIMEOUT
        return super().call_api(*args, **kwargs)


class _FencedApiClient(_BoundedApiClient):
    """An ApiClient that sends a write only while `fence()` says so.

    Every request of the client, typed or dynamic, goes through `call_api`, where a
    write is refused at once. It is checked again on the connection, just before the
    request's first bytes are written (after any TLS handshake), so that a thread that
    passed the first check and then waited (for a connection, for the GIL, or paused
    with its process) sends nothing once the fence has closed. Reads, watches
    included, always go out.
    """

    def __init__(self, configuration: client.Configuration, fence: Callable[[], bool]) -> None:
        super().__init__(configuration)
        self._fence = fence
        pools = self.rest_client.pool_manager.pool_classes_by_scheme
        self.rest_client.pool_manager.pool_classes_by_scheme = {
            scheme: _fenced_pool(pool, fence) for scheme, pool in pools.items()
        }

    def call_api(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        _check(self._fence, method, url)
        return super().call_api(method, url, *args, **kwargs)


def _check(fence: Callable[[], bool], method: str, url: str) -> None:
    if method.upper() not in _READS and not fence():
        raise NotLeaderError(f"not the leader: {method} {url} was not sent")


def _fenced_pool(pool: type[Any], fence: Callable[[], bool]) -> type[Any]:
    """`pool` (a urllib3 connection pool class) whose connections check `fence` last."""
    base = pool.ConnectionCls

    class FencedConnection(base):  # type: ignore[misc, valid-type]
        def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> None:
            _check(fence, method, url)
            super().request(method, url, *args, **kwargs)

    return type(f"Fenced{pool.__name__}", (pool,), {"ConnectionCls": FencedConnection})


def _unless_missing(call: Callable[[], Any]) -> Any:
    """`call()`'s answer, or None when the apiserver says 404 Not Found."""
    try:
        return call()
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def _unless_exists(call: Callable[[], Any]) -> bool:
    """Whether `call()` created its object: False when the apiserver says 409 Conflict
    (one of that name exists, left as it is)."""
    try:
        call()
    except ApiException as err:
        if err.status == 409:
            return False
        raise
    return True


def api_client(
    kubeconfig: Path | None = None,
    pool_size: int = 32,
    *,
    fence: Callable[[], bool] | None = None,
    user_agent: str | None = None,
) -> client.ApiClient:
    """A client for the cluster of `kubeconfig`, else in-cluster config, else the default.

    With `fence`, writes are sent only while it returns True (`NotLeaderError`
    otherwise). `user_agent` names the caller in the apiserver's audit log.
    """
    configuration = client.Configuration()
    if kubeconfig is not None:
        config.load_kube_config(
            config_file=str(kubeconfig), client_configuration=configuration, persist_config=False
        )
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration, persist_config=False)
    configuration.connection_pool_maxsize = pool_size
    api = (
        _BoundedApiClient(configuration)
        if fence is None
        else _FencedApiClient(configuration, fence)
    )
    if user_agent:
        api.user_agent = user_agent
    return api


def readyz(api: client.ApiClient, timeout: float = 2.0) -> bool:
    """Whether the apiserver answers its readiness endpoint."""
    try:
        response = api.call_api("GET", f"{api.configuration.host}/readyz", _request_timeout=timeout)
    except Exception:  # urllib3 and the client raise unrelated hierarchies
        return False
    return bool(response.status == 200)


def create_node(api: client.ApiClient, node: Manifest) -> bool:
    """Create a Node; False (and nothing changed) when one of that name exists."""
    core: Any = client.CoreV1Api(api)  # takes plain dicts as bodies
    return _unless_exists(lambda: core.create_node(body=node, _preload_content=False))


def read_node(
    api: client.ApiClient, name: str, timeout: tuple[float, float] = (3, 5)
) -> Manifest | None:
    """A Node as a plain dict, or None when it does not exist. Bounded by `timeout`
    (connect, read): an answer that never comes raises instead of holding the caller."""
    core: Any = client.CoreV1Api(api)
    response = _unless_missing(
        lambda: core.read_node(name, _preload_content=False, _request_timeout=timeout)
    )
    if response is None:
        return None
    node: Manifest = json.loads(response.data)
    return node


def list_nodes(api: client.ApiClient, selector: str = "") -> list[Manifest]:
    """Every Node, or those matching a label `selector`."""
    core: Any = client.CoreV1Api(api)
    response = core.list_node(label_selector=selector or None, _preload_content=False)
    items: list[Manifest] = json.loads(response.data)["items"]
    return items


def patch_node_status(api: client.ApiClient, name: str, status: Manifest) -> bool:
    """Merge `status` into a Node's status subresource; False when the node is gone."""
    core: Any = client.CoreV1Api(api)
    patch = {"status": status}
    return (
        _unless_missing(lambda: core.patch_node_status(name, patch, _preload_content=False))
        is not None
    )


def renew_node_lease(api: client.ApiClient, node: str, duration_seconds: int) -> None:
    """Renew the node's Lease in kube-node-lease now (creating it the first time), as a
    kubelet's heartbeat does: the node lifecycle controller reads its renewTime."""
    leases: Any = client.CoordinationV1Api(api)
    spec = {
        "holderIdentity": node,
        "leaseDurationSeconds": duration_seconds,
        "renewTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    try:
        leases.patch_namespaced_lease(
            node, "kube-node-lease", {"spec": spec}, _preload_content=False
        )
    except ApiException as err:
        if err.status != 404:
            raise
        body = {"metadata": {"name": node, "namespace": "kube-node-lease"}, "spec": spec}
        leases.create_namespaced_lease("kube-node-lease", body, _preload_content=False)


def list_node_pods(api: client.ApiClient, node: str) -> list[Manifest]:
    """Every pod bound to `node`, in all namespaces, finished ones included."""
    core: Any = client.CoreV1Api(api)
    response = core.list_pod_for_all_namespaces(
        field_selector=f"spec.nodeName={node}", _preload_content=False
    )
    items: list[Manifest] = json.loads(response.data)["items"]
    return items


def patch_pod_status(api: client.ApiClient, namespace: str, name: str, status: Manifest) -> bool:
    """JSON-merge-patch a pod's status subresource; False when the pod is gone.

    A JSON merge patch replaces lists whole (podIPs, conditions, containerStatuses): a
    strategic merge would append a new pod IP to an old one, which the apiserver refuses.
    """
    core: Any = client.CoreV1Api(api)
    return _unless_missing(
        lambda: core.patch_namespaced_pod_status(
            name, namespace, {"status": status},
            _content_type="application/merge-patch+json", _preload_content=False,
        )
    ) is not None  # fmt: skip


def delete_pod(api: client.ApiClient, namespace: str, name: str, grace_seconds: int) -> bool:
    """Delete a pod with that grace period (0: at once, as only its kubelet may once its
    containers have stopped); False when it was already gone."""
    core: Any = client.CoreV1Api(api)
    return _unless_missing(
        lambda: core.delete_namespaced_pod(
            name, namespace, grace_period_seconds=grace_seconds, _preload_content=False
        )
    ) is not None  # fmt: skip


def config_map_data(api: client.ApiClient, namespace: str, name: str) -> dict[str, str]:
    """A ConfigMap's `data` (its text keys)."""
    core: Any = client.CoreV1Api(api)
    response = core.read_namespaced_config_map(name, namespace, _preload_content=False)
    data: dict[str, str] = json.loads(response.data).get("data") or {}
    return data


_dynamic_clients: weakref.WeakKeyDictionary[client.ApiClient, Any] = weakref.WeakKeyDictionary()
_dynamic_lock = threading.Lock()


def dynamic_client(api: client.ApiClient) -> Any:
    """The DynamicClient of `api` (made once: discovery is costly), with its own cache file.

    The default discovery cache is keyed on the host alone, so a cluster recreated
    on the same port would read a stale one. Made under a lock: two made at once (the
    first reconciles of a term, on many threads) would write one cache file together.
    """
    with _dynamic_lock:
        dyn = _dynamic_clients.get(api)
        if dyn is None:
            cache_file = _discovery_dir() / f"{id(api)}.json"
            dyn = DynamicClient(api, cache_file=str(cache_file))
            _dynamic_clients[api] = dyn
        return dyn


@functools.cache
def _discovery_dir() -> Path:
    """One temporary directory per process for discovery caches, removed at exit."""
    directory = Path(tempfile.mkdtemp(prefix="ttsfleet-discovery-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def apply(api: client.ApiClient, manifests: Iterable[Manifest], field_manager: str) -> None:
    """Server-side apply of whole objects under one field manager."""
    dyn = dynamic_client(api)
    for manifest in manifests:
        resource = dyn.resources.get(api_version=manifest["apiVersion"], kind=manifest["kind"])
        namespace = manifest["metadata"].get("namespace")
        resource.server_side_apply(
            body=manifest, namespace=namespace, field_manager=field_manager, force_conflicts=True
        )


def create_if_absent(api: client.ApiClient, manifest: Manifest) -> bool:
    """Create an object unless one of its name exists (left as it is); True if created."""
    resource = dynamic_client(api).resources.get(
        api_version=manifest["apiVersion"], kind=manifest["kind"]
    )
    namespace = manifest["metadata"].get("namespace")
    return _unless_exists(lambda: resource.create(body=manifest, namespace=namespace))


def get(
    api: client.ApiClient, api_version: str, kind: str, name: str, namespace: str | None
) -> Manifest | None:
    """An object as a plain dict, or None when it does not exist."""
    resource = dynamic_client(api).resources.get(api_version=api_version, kind=kind)
    found = _unless_missing(lambda: resource.get(name=name, namespace=namespace))
    if found is None:
        return None
    obj: Manifest = found.to_dict()
    return obj


def delete_object(
    api: client.ApiClient, api_version: str, kind: str, name: str, namespace: str | None = None
) -> bool:
    """Delete an object; False if it was already gone."""
    resource = dynamic_client(api).resources.get(api_version=api_version, kind=kind)
    return _unless_missing(lambda: resource.delete(name=name, namespace=namespace)) is not None


def list_pods(api: client.ApiClient, namespace: str, selector: str) -> list[Manifest]:
    core: Any = client.CoreV1Api(api)
    response = core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
    items: list[Manifest] = json.loads(response.data)["items"]
    return items


def list_bound_pods(api: client.ApiClient) -> list[Manifest]:
    """Every pod in the cluster that the scheduler has placed and that has not finished."""
    core: Any = client.CoreV1Api(api)
    selector = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"
    response = core.list_pod_for_all_namespaces(field_selector=selector, _preload_content=False)
    items: list[Manifest] = json.loads(response.data)["items"]
    return items


def patch_custom_status(
    api: client.ApiClient, group: str, version: str, plural: str, namespace: str, name: str,
    status: Manifest,
) -> None:  # fmt: skip
    """Merge-patch the status subresource of a custom object."""
    custom: Any = client.CustomObjectsApi(api)
    custom.patch_namespaced_custom_object_status(
        group, version, namespace, plural, name, {"status": status}
    )


def scale_custom(
    api: client.ApiClient, group: str, version: str, plural: str, namespace: str, name: str,
    replicas: int,
) -> None:  # fmt: skip
    """Write replicas through the scale subresource, as `kubectl scale` does."""
    custom: Any = client.CustomObjectsApi(api)
    custom.patch_namespaced_custom_object_scale(
        group, version, namespace, plural, name, {"spec": {"replicas": replicas}}
    )


def get_custom(
    api: client.ApiClient, group: str, version: str, plural: str, namespace: str, name: str
) -> Manifest | None:
    custom: Any = client.CustomObjectsApi(api)
    obj: Manifest | None = _unless_missing(
        lambda: custom.get_namespaced_custom_object(group, version, namespace, plural, name)
    )
    return obj


def post_event(
    api: client.ApiClient, involved: Manifest, event_type: str, reason: str, message: str
) -> None:
    """Record an Event about `involved` (a full object with apiVersion, kind and metadata)."""
    meta = involved["metadata"]
    now = datetime.now(UTC)
    core: Any = client.CoreV1Api(api)
    core.create_namespaced_event(
        meta["namespace"],
        {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved["apiVersion"],
                "kind": involved["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "ttsfleet-operator"},
            "firstTimestamp": now.isoformat(),
            "lastTimestamp": now.isoformat(),
            "count": 1,
        },
    )


def ready_endpoints(api: client.ApiClient, namespace: str, service: str, port: str) -> list[str]:
    """host:port of every ready endpoint of `service`'s named `port`, from its EndpointSlices.

    Only endpoints on nodes whose pods have a network behind their IPs are returned
    (`has_pod_network`): those on nodes kwok simulates, those that name no node and those
    whose node cannot be read are left out, for nothing may ever connect to them. Reads
    the slices, then only the distinct nodes that their ready endpoints name.
    """
    discovery: Any = client.DiscoveryV1Api(api)
    response = discovery.list_namespaced_endpoint_slice(
        namespace, label_selector=f"kubernetes.io/service-name={service}", _preload_content=False
    )
    slices = json.loads(response.data)["items"]
    return _reachable(api, _slice_endpoints(slices, port), {})


def _slice_endpoints(slices: Iterable[Manifest], port: str) -> list[tuple[str, str]]:
    """(node, host:port) of each ready endpoint's named `port` in `slices`."""
    candidates: list[tuple[str, str]] = []
    for item in slices:
        number = next((p["port"] for p in item.get("ports") or [] if p.get("name") == port), None)
        if number is None:
            continue
        for endpoint in item.get("endpoints") or []:
            node = endpoint.get("nodeName")
            if node and (endpoint.get("conditions") or {}).get("ready"):
                candidates += [(node, f"{address}:{number}") for address in endpoint["addresses"]]
    return candidates


def _reachable(
    api: client.ApiClient,
    candidates: list[tuple[str, str]],
    known: dict[str, bool],
    timeout: tuple[float, float] = (3, 5),
) -> list[str]:
    """The addresses of `candidates` on nodes with a pod network; `known` caches nodes.
    A node that cannot be read (gone, or not yet readable: RBAC just granted) is left
    out and not cached."""
    for name in {node for node, _ in candidates} - known.keys():
        try:
            found = read_node(api, name, timeout)
        except ApiException as err:
            log.warning("cannot read node %s (%s %s): its endpoints are left out until it can be",
                        name, err.status, err.reason)  # fmt: skip
            continue
        except Exception as err:  # no answer in time (seen: a read that never returned)
            log.warning("cannot read node %s (%r): its endpoints are left out until it can be",
                        name, err)  # fmt: skip
            continue
        if found is None:
            log.warning("node %s is not there: its endpoints are left out", name)
            continue
        known[name] = has_pod_network(found)
    return sorted({address for node, address in candidates if known.get(node)})


# Seen in the e2e suite on a cluster that had run other tests: a watch on EndpointSlices
# that never delivered the change making a new pod ready (the slice was ready, the
# watch's reader waited in its next chunk); a relist found it. Relisting this often
# bounds such a miss; a list of one Service's slices is cheap.
RELIST_SECONDS = 10


class EndpointWatch:
    """A Service's ready endpoints kept current by a watch on its EndpointSlices.

    A daemon thread lists the slices, then watches them from that resourceVersion,
    relisting after an expired watch or an error (after `retry_seconds`), and at least
    every `RELIST_SECONDS` (a watch that went quiet without closing, a missed event:
    neither lasts longer than that). Each change
    of the address list (filtered as `ready_endpoints` filters) is passed to
    `on_change`, from the watch thread; `addresses()` reads the latest. For `ttsfleet
    say`, `ttsfleet bench` and the gateway.
    """

    def __init__(
        self, api: client.ApiClient, namespace: str, service: str, port: str = "grpc",
        on_change: Callable[[list[str]], None] | None = None, retry_seconds: float = 1.0,
    ) -> None:  # fmt: skip
        self.api, self.namespace, self.service, self.port = api, namespace, service, port
        self.on_change = on_change
        self._retry = retry_seconds
        self._addresses: list[str] = []
        self._listed = threading.Event()
        self._stop = threading.Event()
        self._nodes: dict[str, bool] = {}
        self._watch: Any = None
        self._thread = threading.Thread(
            target=self._run, name=f"endpoints-{namespace}/{service}", daemon=True
        )

    def start(self) -> EndpointWatch:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching and wait (up to `timeout`) for the thread to end: its open
        response is closed, so a read blocked on it returns at once (a process that
        exits with the thread still reading can abort in the interpreter's teardown)."""
        self._stop.set()
        stream = self._watch
        if stream is not None:
            stream.stop()
            response = getattr(stream, "_resp", None)  # the kubernetes client's open watch
            if response is not None:
                with contextlib.suppress(Exception):
                    response.close()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def addresses(self) -> list[str]:
        return list(self._addresses)

    def wait_listed(self, timeout: float) -> bool:
        """Whether the first list arrived within `timeout` seconds."""
        return self._listed.wait(timeout)

    def _publish(self, slices: dict[str, Manifest]) -> bool:
        """Pass on the addresses; False if some endpoint's node could not be read (the
        caller lists again soon: no slice event may come to try it again)."""
        candidates = _slice_endpoints(slices.values(), self.port)
        addresses = _reachable(self.api, candidates, self._nodes)
        if self._stop.is_set():  # stopped while listing: a newer watch speaks now
            return True
        changed = addresses != self._addresses or not self._listed.is_set()
        if changed:
            log.info("endpoints of %s/%s: %s (of %d ready)", self.namespace, self.service,
                     addresses, len(candidates))  # fmt: skip
        self._addresses = addresses
        self._listed.set()
        if changed and self.on_change is not None:
            self.on_change(addresses)
        return all(node in self._nodes for node, _ in candidates)

    def _run(self) -> None:
        from kubernetes import watch  # noqa: PLC0415

        discovery: Any = client.DiscoveryV1Api(self.api)
        selector = f"kubernetes.io/service-name={self.service}"
        while not self._stop.is_set():
            try:
                listed = discovery.list_namespaced_endpoint_slice(
                    self.namespace, label_selector=selector, _preload_content=False,
                    _request_timeout=(10, 30),
                )  # fmt: skip
                document = json.loads(listed.data)
                slices = {i["metadata"]["name"]: i for i in document["items"]}
                if not self._publish(slices):
                    self._stop.wait(self._retry)
                    continue
                version = document["metadata"]["resourceVersion"]
                stream = self._watch = watch.Watch()
                if self._stop.is_set():
                    break
                for event in stream.stream(
                    discovery.list_namespaced_endpoint_slice, self.namespace,
                    label_selector=selector, resource_version=version,
                    timeout_seconds=RELIST_SECONDS, allow_watch_bookmarks=True,
                    _request_timeout=(10, RELIST_SECONDS + 20),  # nothing read: relist
                ):  # fmt: skip
                    if self._stop.is_set():
                        stream.stop()
                        break
                    item = self.api.sanitize_for_serialization(event["object"])
                    if event["type"] == "ERROR" or not isinstance(item, dict):
                        break  # expired: list again
                    if event["type"] == "BOOKMARK":
                        continue
                    name = item["metadata"]["name"]
                    if event["type"] == "DELETED":
                        slices.pop(name, None)
                    else:
                        slices[name] = item
                    if not self._publish(slices):
                        stream.stop()
                        self._stop.wait(self._retry)
                        break
            except Exception as err:  # the apiserver restarting or unreachable: list again
                log.warning("watch of %s/%s: %r; listing again", self.namespace, self.service, err)
                self._stop.wait(self._retry)


# kwok marks the nodes it simulates with this annotation, in any cluster that runs it.
_SIMULATED_NODE_ANNOTATION = "kwok.x-k8s.io/node"


def has_pod_network(node: Manifest) -> bool:
    """Whether pod IPs on `node` have a host behind them: not on nodes kwok simulates,
    whose pods' IPs are made up. `ready_endpoints` applies it, so that no client that
    connects to pods by IP can reach a simulated one."""
    annotations = node.get("metadata", {}).get("annotations") or {}
    return _SIMULATED_NODE_ANNOTATION not in annotations


def list_custom(
    api: client.ApiClient, group: str, version: str, plural: str, namespace: str | None = None
) -> list[Manifest]:
    """Every object of a custom resource, in `namespace` or in all of them."""
    custom: Any = client.CustomObjectsApi(api)
    if namespace:
        response = custom.list_namespaced_custom_object(
            group, version, namespace, plural, _preload_content=False
        )
    else:
        response = custom.list_cluster_custom_object(group, version, plural, _preload_content=False)
    items: list[Manifest] = json.loads(response.data)["items"]
    return items


def annotate_pod(
    api: client.ApiClient, namespace: str, name: str, annotations: dict[str, str]
) -> bool:
    """Merge-patch `annotations` onto a pod, touching no other field; False when it is gone."""
    core: Any = client.CoreV1Api(api)
    return _unless_missing(
        lambda: core.patch_namespaced_pod(
            name, namespace, {"metadata": {"annotations": annotations}},
            _content_type="application/merge-patch+json",
        )
    ) is not None  # fmt: skip


def annotate_node(api: client.ApiClient, name: str, annotations: dict[str, str | None]) -> None:
    """Merge-patch `annotations` onto a Node (None removes a key), touching no other field."""
    core: Any = client.CoreV1Api(api)
    core.patch_node(
        name,
        {"metadata": {"annotations": annotations}},
        _content_type="application/merge-patch+json",
    )


def read_lease(api: client.ApiClient, namespace: str, name: str, timeout: float) -> Manifest | None:
    """A coordination.k8s.io Lease as a plain dict, or None when there is none."""
    leases: Any = client.CoordinationV1Api(api)
    response = _unless_missing(
        lambda: leases.read_namespaced_lease(
            name, namespace, _preload_content=False, _request_timeout=timeout
        )
    )
    if response is None:
        return None
    lease: Manifest = json.loads(response.data)
    return lease


def write_lease(
    api: client.ApiClient, namespace: str, name: str, spec: Manifest,
    resource_version: str | None, timeout: float,
) -> Manifest:  # fmt: skip
    """Create the Lease (`resource_version` None) or replace it at exactly that version
    (409 Conflict when someone else wrote it since): the optimistic lock of an election."""
    leases: Any = client.CoordinationV1Api(api)
    metadata: Manifest = {"name": name, "namespace": namespace}
    body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
            "spec": spec}  # fmt: skip
    if resource_version is None:
        response = leases.create_namespaced_lease(
            namespace, body, _preload_content=False, _request_timeout=timeout
        )
    else:
        metadata["resourceVersion"] = resource_version
        response = leases.replace_namespaced_lease(
            name, namespace, body, _preload_content=False, _request_timeout=timeout
        )
    lease: Manifest = json.loads(response.data)
    return lease


def list_objects(
    api: client.ApiClient, api_version: str, kind: str, namespace: str | None, selector: str = ""
) -> list[Manifest]:
    """Every object of a kind (in `namespace`, or all), matching a label `selector`."""
    resource = dynamic_client(api).resources.get(api_version=api_version, kind=kind)
    found = resource.get(namespace=namespace, label_selector=selector or None)
    items: list[Manifest] = found.to_dict()["items"]
    return items


def create_custom(
    api: client.ApiClient, group: str, version: str, plural: str, namespace: str, body: Manifest
) -> Manifest:
    custom: Any = client.CustomObjectsApi(api)
    created: Manifest = custom.create_namespaced_custom_object(
        group, version, namespace, plural, body
    )
    return created


def create_namespace(api: client.ApiClient, name: str) -> None:
    """Create a namespace and wait for nothing; `namespace_ready` says when pods may go in."""
    core: Any = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name}})


def namespace_ready(api: client.ApiClient, name: str) -> bool:
    """Whether the namespace's default ServiceAccount exists (pods are refused before)."""
    core: Any = client.CoreV1Api(api)
    return bool(core.list_namespaced_service_account(name).items)


def delete_namespace(api: client.ApiClient, name: str) -> None:
    core: Any = client.CoreV1Api(api)
    try:
        core.delete_namespace(name)
    except ApiException as err:
        if err.status != 404:
            raise


def request_token(
    api: client.ApiClient, namespace: str, service_account: str, seconds: int,
    pod: Manifest | None = None, audiences: list[str] | None = None,
) -> str:  # fmt: skip
    """A ServiceAccount token (TokenRequest); bound to `pod` when given, as the kubelet
    mounts it (the apiserver then names the pod in the user's extra info)."""
    core: Any = client.CoreV1Api(api)
    spec: Manifest = {"expirationSeconds": seconds}
    if audiences:
        spec["audiences"] = audiences
    if pod is not None:
        meta = pod["metadata"]
        spec["boundObjectRef"] = {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                  "uid": meta["uid"]}  # fmt: skip
    response = core.create_namespaced_service_account_token(
        service_account, namespace, {"spec": spec}, _preload_content=False
    )
    token: str = json.loads(response.data)["status"]["token"]
    return token
