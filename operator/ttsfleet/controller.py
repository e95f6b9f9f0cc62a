"""The `Controller`: everything one operator holds for one cluster connection.

It owns the API client, the per-object reconcile locks, the fleets it looks at again
(not Ready yet, waiting for a node that can hold them, failed), the node cache and the
autoscaler's state, and runs the background loops. Two controllers share nothing, so
a test (or a process) can hold several. The kopf handlers (handlers.py) only look it
up in their `memo` and call it; the manager (manager.py) makes one per term of
leadership, starts it when this replica leads and stops it when it no longer does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ttsfleet import kube
from ttsfleet.api import v1alpha1 as api
from ttsfleet.autoscale.loop import RegionView
from ttsfleet.autoscale.metrics import PrometheusSource
from ttsfleet.autoscale.tick import AUTOSCALE_SECONDS, Ticker
from ttsfleet.reconcile import (
    NodeCache,
    Outcome,
    forget_gateway,
    reconcile,
    reconcile_gateway,
    reconcile_region,
)
from ttsfleet.resources.common import DEPLOYMENT_LABEL
from ttsfleet.resources.gateway import GATEWAY_LABEL, NODE_READER, OWNER_NAMESPACE_LABEL
from ttsfleet.resources.region import REGION_LABEL

log = logging.getLogger("ttsfleet.operator")
Key = tuple[str, str]

# Not Ready yet: looked at again every RECHECK_SECONDS (a pod the scheduler cannot place
# changes no Deployment, so no event would say CapacityExhausted). Waiting for a node
# that holds them: planned again every REPLAN_SECONDS (GPU nodes that join send no event
# here). A reconcile that failed: applied again at the next re-check (kopf logs an
# `on.event` handler's error and drops the event; it does not retry it).
RECHECK_SECONDS = 5.0
REPLAN_SECONDS = 15.0


class OperatorMetrics:
    """The operator's Prometheus metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.reconciles = Counter(
            "ttsfleet_operator_reconciles_total", "Reconciles of TtsDeployments.", ["result"],
            registry=self.registry,
        )  # fmt: skip
        self.reconcile_seconds = Histogram(
            "ttsfleet_operator_reconcile_duration_seconds",
            "Time one reconcile takes.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.scale_writes = Counter(
            "ttsfleet_operator_scale_writes_total", "Replica changes by the autoscaler.",
            registry=self.registry,
        )  # fmt: skip
        self.autoscaler_ticks = Counter(
            "ttsfleet_operator_autoscaler_ticks_total",
            "Autoscaler ticks completed: each decided on every builtin-scaled fleet.",
            registry=self.registry,
        )
        self.is_leader = Gauge(
            "ttsfleet_operator_is_leader",
            "1 while this replica holds the leader Lease and acts, 0 while it stands by.",
            registry=self.registry,
        )
        self.leader = Gauge(
            "ttsfleet_operator_leader_info",
            "1, labelled with the identity of the replica that holds the Lease as this "
            "replica last read it (no sample while none holds it).",
            ["identity"],
            registry=self.registry,
        )
        self.leader_transitions = Counter(
            "ttsfleet_operator_leader_transitions_total",
            "Times this replica became leader or stopped leading.",
            ["to"],
            registry=self.registry,
        )


@dataclass
class _Loop:
    name: str
    every: float
    step: Callable[[], None]
    thread: threading.Thread | None = None
    errors: int = field(default=0)


class Controller:
    """Reconciles TtsDeployments and runs the autoscaler, for one cluster connection."""

    def __init__(
        self,
        api_client: client.ApiClient,
        metrics: OperatorMetrics,
        *,
        prometheus_url: str | None = None,
        namespaces: list[str] | None = None,
        node_ttl: float = 15.0,
        gateway_node_reader: str = NODE_READER,
    ) -> None:
        self.api = api_client
        self.metrics = metrics
        self.namespaces = list(namespaces or [])
        self.nodes = NodeCache(node_ttl)
        self.locks: defaultdict[Key, threading.Lock] = defaultdict(threading.Lock)
        self.not_ready: set[Key] = set()
        self.unplaced: set[Key] = set()
        self.failed: set[Key] = set()
        # TtsGateways: the fleets each one routes to (a fleet's change re-routes them),
        # and those not Ready yet or whose last reconcile failed (looked at again).
        self.gateway_node_reader = gateway_node_reader
        self.gateway_fleets: dict[Key, frozenset[str]] = {}
        self.gateway_locks: defaultdict[Key, threading.Lock] = defaultdict(threading.Lock)
        self.gateways_pending: set[Key] = set()
        # TtsRegions whose agent is not running yet or whose reconcile failed.
        self.region_locks: defaultdict[Key, threading.Lock] = defaultdict(threading.Lock)
        self.regions_pending: set[Key] = set()
        source = PrometheusSource(prometheus_url) if prometheus_url else None
        self.autoscaler = Ticker(
            api_client, source, self.namespaces, metrics.scale_writes, metrics.autoscaler_ticks,
            lambda namespace, name: self.reconcile(namespace, name, apply=False),
            self.region_views,
        )  # fmt: skip
        self._stop = threading.Event()
        self._last_replan = time.monotonic()
        self._loops = [
            _Loop("recheck", RECHECK_SECONDS, self.recheck),
            _Loop("autoscaler", AUTOSCALE_SECONDS, self.autoscaler.tick),
        ]

    # ---- what the kopf handlers call -------------------------------------------------
    def on_tts_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        if event_type == "DELETED":
            self.forget(key)
        else:
            observed = (body.get("status") or {}).get("observedGeneration")
            # None: the first sight after start (a restart re-applies everything once).
            apply = event_type is None or observed != meta.get("generation")
            self.reconcile(*key, apply=apply)
        self._reroute(*key)

    def _reroute(self, namespace: str, fleet: str) -> None:
        """Re-apply the gateways that route to `namespace/fleet` (its voice, its
        readiness or its existence changed)."""
        for key, fleets in list(self.gateway_fleets.items()):
            if key[0] == namespace and fleet in fleets:
                self.reconcile_gateway(*key)

    def on_gateway_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        if event_type == "DELETED":
            self.gateway_fleets.pop(key, None)
            self.gateways_pending.discard(key)
            forget_gateway(self.api, *key)
            return
        self.reconcile_gateway(*key)

    def on_region_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        """A TtsRegion changed (its spec, or the agent's view in its status): apply its
        agent, then its gateway's config (residency, and the regions taking traffic)."""
        meta = body.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        gateway = str((body.get("spec") or {}).get("gateway") or "")
        if event_type == "DELETED":
            self.regions_pending.discard(key)
        else:
            self.reconcile_region(*key)
        if gateway and kube.get_custom(
            self.api, api.GROUP, api.VERSION, api.GATEWAY_PLURAL, key[0], gateway
        ):
            self.reconcile_gateway(key[0], gateway)

    def reconcile_region(self, namespace: str, name: str) -> Outcome | None:
        """Reconcile one TtsRegion from a fresh read, one reconcile of it at a time."""
        key = (namespace, name)
        with self.region_locks[key]:
            try:
                body = kube.get_custom(
                    self.api, api.GROUP, api.VERSION, api.REGION_PLURAL, namespace, name
                )
                outcome = reconcile_region(self.api, body)
            except Exception:
                self.regions_pending.add(key)
                self.metrics.reconciles.labels(result="error").inc()
                raise
            if outcome.gone:
                self.regions_pending.discard(key)
                return outcome
            if outcome.ready or outcome.stalled_reason:
                self.regions_pending.discard(key)
            else:
                self.regions_pending.add(key)
        result = "stalled" if outcome.stalled_reason else "ok"
        self.metrics.reconciles.labels(result=result).inc()
        return outcome

    def region_views(self) -> list[RegionView]:
        """The TtsRegions the autoscaler raises floors for: each with its agent's view and
        the fleets its gateway routes to (those this controller has reconciled)."""
        views = []
        namespaces: list[str | None] = [*self.namespaces] or [None]
        for namespace in namespaces:
            try:
                regions = kube.list_custom(
                    self.api, api.GROUP, api.VERSION, api.REGION_PLURAL, namespace
                )
            except ApiException as err:
                if err.status == 404:  # the TtsRegion CRD is not installed
                    return []
                raise
            for region in regions:
                spec, seen = region.get("spec") or {}, (region.get("status") or {}).get("regions")
                ns = region["metadata"]["namespace"]
                fleets = self.gateway_fleets.get((ns, str(spec.get("gateway"))), frozenset())
                if seen and spec.get("region"):
                    keys = frozenset((ns, f) for f in fleets)
                    views.append(RegionView(str(spec["region"]), seen, keys))
        return views

    def on_child_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        """A child changed: re-apply its owner if it was deleted or edited by hand, and
        refresh the owner's status (a Deployment's status is how readiness arrives)."""
        meta = body.get("metadata") or {}
        name = (meta.get("labels") or {}).get(DEPLOYMENT_LABEL)
        namespace = meta.get("namespace")
        gateway = (meta.get("labels") or {}).get(GATEWAY_LABEL)
        region = (meta.get("labels") or {}).get(REGION_LABEL)
        if region and namespace:
            self.reconcile_region(namespace, region)
            return
        if gateway and namespace:
            self.reconcile_gateway(namespace, gateway)
            return
        if not name or not namespace:
            return
        if event_type == "DELETED":
            self.reconcile(namespace, name, apply=True)
        else:
            self.reconcile(namespace, name, apply=False, live_child=body)

    # ---- reconcile -------------------------------------------------------------------
    def reconcile(
        self, namespace: str, name: str, *, apply: bool, live_child: dict[str, Any] | None = None
    ) -> Outcome | None:
        """Reconcile one TtsDeployment, one reconcile of it at a time, from a fresh read.

        Events about it and its children arrive on several workers at once; reading it
        again under its lock means each reconcile starts from what the last one wrote.
        A failure is recorded and applied again at the next re-check, then raised.
        """
        key = (namespace, name)
        with self.locks[key]:  # the bookkeeping too: a later reconcile's word wins
            try:
                body = kube.get_custom(self.api, api.GROUP, api.VERSION, api.PLURAL, *key)
                outcome = reconcile(
                    self.api, body, self.nodes, apply=apply or key in self.failed,
                    live_child=live_child, metrics=self.autoscaler.conditions.get(key),
                )  # fmt: skip
            except Exception:
                self.failed.add(key)
                self.metrics.reconciles.labels(result="error").inc()
                raise
            self.failed.discard(key)
            if outcome.gone:
                self.forget(key)
                return outcome
            if outcome.ready or outcome.stalled_reason:
                self.not_ready.discard(key)
            else:
                self.not_ready.add(key)
            if outcome.stalled_reason == "PlacementUnavailable":
                self.unplaced.add(key)  # nodes may come that hold it
            else:
                self.unplaced.discard(key)
        result = "stalled" if outcome.stalled_reason else "ok"
        self.metrics.reconciles.labels(result=result).inc()
        self.metrics.reconcile_seconds.observe(outcome.seconds)
        return outcome

    def reconcile_gateway(self, namespace: str, name: str) -> Outcome | None:
        """Reconcile one TtsGateway from a fresh read, one reconcile of it at a time."""
        key = (namespace, name)
        with self.gateway_locks[key]:
            try:
                body = kube.get_custom(
                    self.api, api.GROUP, api.VERSION, api.GATEWAY_PLURAL, namespace, name
                )
                outcome = reconcile_gateway(self.api, body, self.gateway_node_reader)
            except Exception:
                self.gateways_pending.add(key)
                self.metrics.reconciles.labels(result="error").inc()
                raise
            if outcome.gone:
                self.gateway_fleets.pop(key, None)
                self.gateways_pending.discard(key)
                return outcome
            routes = ((body or {}).get("spec") or {}).get("routes") or []
            self.gateway_fleets[key] = frozenset(
                str(name) for r in routes for name in (r.get("fleet"), r.get("fallback")) if name
            )
            if outcome.ready or outcome.stalled_reason:
                self.gateways_pending.discard(key)
            else:
                self.gateways_pending.add(key)
        result = "stalled" if outcome.stalled_reason else "ok"
        self.metrics.reconciles.labels(result=result).inc()
        return outcome

    def sweep_gateway_bindings(self) -> None:
        """Delete the ClusterRoleBindings of gateways deleted while no operator watched."""
        bindings = kube.list_objects(
            self.api, "rbac.authorization.k8s.io/v1", "ClusterRoleBinding", None,
            selector=f"{OWNER_NAMESPACE_LABEL},{GATEWAY_LABEL}",
        )  # fmt: skip
        for binding in bindings:
            labels = binding["metadata"].get("labels") or {}
            namespace, name = labels[OWNER_NAMESPACE_LABEL], labels[GATEWAY_LABEL]
            gone = kube.get_custom(
                self.api, api.GROUP, api.VERSION, api.GATEWAY_PLURAL, namespace, name
            )
            if gone is None:
                forget_gateway(self.api, namespace, name)

    def forget(self, key: Key) -> None:
        for remembered in (self.not_ready, self.unplaced, self.failed):
            remembered.discard(key)
        self.autoscaler.forget(key)

    def recheck(self) -> None:
        """Look again at what no event will bring back: see RECHECK_SECONDS."""
        replan = time.monotonic() - self._last_replan >= REPLAN_SECONDS
        if replan:
            self._last_replan = time.monotonic()
        work = [(k, False) for k in list(self.not_ready)]
        work += [(k, True) for k in list(self.failed)]
        work += [(k, True) for k in (list(self.unplaced) if replan else [])]
        for what, pending, again in (
            ("gateway", self.gateways_pending, self.reconcile_gateway),
            ("region", self.regions_pending, self.reconcile_region),
        ):
            for key in list(pending):
                try:
                    again(*key)
                except kube.NotLeaderError:
                    return
                except Exception:
                    log.exception("Re-checking %s %s/%s failed", what, *key)
        if replan:
            try:
                self.sweep_gateway_bindings()
            except kube.NotLeaderError:
                return
            except Exception:
                log.exception("Sweeping the bindings of deleted gateways failed")
        for key, apply in work:
            if self._stop.is_set():
                return
            try:
                self.reconcile(*key, apply=apply)
            except kube.NotLeaderError:
                return  # refused, not failed: the manager ends the term if it must
            except Exception:
                log.exception("Re-checking %s/%s failed", *key)

    # ---- background loops ------------------------------------------------------------
    def start(self) -> None:
        """Start the re-check and autoscaler loops (daemon threads)."""
        for loop in self._loops:
            loop.thread = threading.Thread(
                target=self._run, args=(loop,), name=loop.name, daemon=True
            )
            loop.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loops: none starts another step; a step under way is waited for."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for loop in self._loops:
            if loop.thread is not None:
                loop.thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _run(self, loop: _Loop) -> None:
        while not self._stop.wait(loop.every):
            try:
                loop.step()
            except kube.NotLeaderError:
                # A write refused by the fence: skip this step. The loop lives as long
                # as the controller; the manager stops it when the term ends.
                continue
            except Exception:
                loop.errors += 1
                log.exception("The %s loop failed; trying again", loop.name)
