"""The kopf layer: thin handlers that read an object and call the reconciler.

Everything is level-based (`on.event`): the first sight of an object after start
and any change of its spec apply its children; a child deleted or edited by hand
re-applies its owner, and any child change refreshes the owner's status (a
Deployment's status is how readiness arrives); while an object is not Ready it is
looked at again every few seconds (unschedulable pods change no Deployment). Pods are
not watched: kopf filters labels in the client, so a pod watch would read every pod
of the cluster. Reconciles of one object never overlap.
kopf keeps no state of its own on our objects (no progress or diff-base
annotations, no finalizers: owner references collect the children).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict, deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kopf
from kubernetes import client
from prometheus_client import Counter, Histogram

from ttsfleet import kube
from ttsfleet.api import v1alpha1 as api
from ttsfleet.autoscale.floors import Floor
from ttsfleet.autoscale.loop import (
    DELETION_COST,
    Autoscaler,
    Decision,
    MetricsCondition,
    history_windows,
    predicted_floors,
)
from ttsfleet.autoscale.metrics import (
    MetricsUnavailableError,
    PodStreams,
    PrometheusSource,
    Signals,
)
from ttsfleet.reconcile import reconcile
from ttsfleet.resources.common import DEPLOYMENT_LABEL

log = logging.getLogger("ttsfleet.operator")

RECONCILES = Counter(
    "ttsfleet_operator_reconciles_total", "Reconciles of TtsDeployments.", ["result"]
)
RECONCILE_SECONDS = Histogram(
    "ttsfleet_operator_reconcile_duration_seconds",
    "Time one reconcile takes.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

MANAGED = {"app.kubernetes.io/managed-by": "ttsfleet"}
_state: dict[str, Any] = {}


def configure(
    kubeconfig: Path | None, prometheus_url: str | None = None, namespaces: list[str] | None = None
) -> None:
    """Called before kopf starts: the client our reconciler uses, where metrics are, and
    the namespaces watched (none: all)."""
    _state["api"] = kube.api_client(kubeconfig)
    _state["prometheus_url"] = prometheus_url
    _state["namespaces"] = namespaces or []


def _api() -> client.ApiClient:
    api_client: client.ApiClient = _state["api"]
    return api_client


@kopf.on.startup()
def _settings(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.enabled = False  # our own Events say what happened
    settings.execution.max_workers = 16
    # Bounded per-object workers: a burst of thousands of new objects waits in the
    # watch streams instead of as thousands of queued bodies in memory.
    settings.queueing.worker_limit = 64
    settings.queueing.idle_timeout = 2.0
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60


@kopf.on.login()
def _login(**_: Any) -> kopf.ConnectionInfo:
    """kopf talks to the cluster with the same credentials as our client."""
    cfg = _api().configuration
    # "Bearer <token>" from a kubeconfig token or the in-cluster ServiceAccount
    # (this also runs the in-cluster refresh hook, so rotated tokens are picked up
    # when kopf logs in again); None with client certificates.
    header = cfg.get_api_key_with_prefix("BearerToken", alias="authorization") or ""
    token = header.removeprefix("Bearer ").strip()
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
        scheme="Bearer" if token else None,
        token=token or None,
    )


_locks: dict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)


def _reconcile(
    namespace: str, name: str, apply: bool, live_child: dict[str, Any] | None = None
) -> None:
    """Reconcile one TtsDeployment, one reconcile of it at a time, from a fresh read.

    Events about it and its children arrive on several workers at once; reading it
    again under its lock means each reconcile starts from what the last one wrote.
    """
    with _locks[namespace, name]:
        body = kube.get_custom(_api(), api.GROUP, api.VERSION, api.PLURAL, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            _not_ready.discard((namespace, name))
            _unplaced.discard((namespace, name))
            return
        try:
            outcome = reconcile(
                _api(), body, apply=apply, live_child=live_child,
                metrics=_metrics.get((namespace, name)),
            )  # fmt: skip
        except Exception:
            RECONCILES.labels(result="error").inc()
            raise
    if outcome.ready or outcome.stalled_reason:
        _not_ready.discard((namespace, name))
    else:
        _not_ready.add((namespace, name))
    if outcome.stalled_reason == "PlacementUnavailable":
        _unplaced.add((namespace, name))  # nodes may come that hold it
    else:
        _unplaced.discard((namespace, name))
    RECONCILES.labels(result="stalled" if outcome.stalled_reason else "ok").inc()
    RECONCILE_SECONDS.observe(outcome.seconds)


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL, id="ttsdeployment")
def tts_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    if event.get("type") == "DELETED":
        key = (body.metadata.namespace or "", body.metadata.name or "")
        for remembered in (_metrics, _floors, _recent):
            remembered.pop(key, None)
        return
    observed = (body.get("status") or {}).get("observedGeneration")
    # None: the first sight after start (a restart re-applies everything once).
    apply = event.get("type") is None or observed != body.metadata.get("generation")
    _reconcile(body.metadata.namespace or "", body.metadata.name or "", apply)


def _owner_key(body: kopf.Body) -> tuple[str, str] | None:
    name = body.metadata.labels.get(DEPLOYMENT_LABEL)
    namespace = body.metadata.namespace
    return (namespace, name) if name and namespace else None


def child_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """A child changed: re-apply its owner if it was deleted or edited by hand, and
    refresh the owner's status (a Deployment's status is how readiness arrives).

    Server-side apply under our field manager forces, so a field someone else
    changed is taken back; content that is already right is not written again.
    """
    key = _owner_key(body)
    if key is None:
        return
    if event.get("type") == "DELETED":
        _reconcile(*key, apply=True)
    else:
        _reconcile(*key, apply=False, live_child=dict(body))


for _group, _version, _plural in (
    ("apps", "v1", "deployments"),
    ("", "v1", "services"),
    ("", "v1", "configmaps"),
    ("policy", "v1", "poddisruptionbudgets"),
):
    kopf.on.event(_group, _version, _plural, labels=MANAGED, id=f"child-{_plural}")(child_event)


# TtsDeployments that are not Ready, looked at again every few seconds: a pod the
# scheduler cannot place changes no Deployment, so no event would tell us
# (CapacityExhausted). A plain thread rather than a kopf timer: kopf puts a
# finalizer on every object with a timer, and deleting one while the operator is
# down would then hang.
_not_ready: set[tuple[str, str]] = set()
RECHECK_SECONDS = 5.0
# TtsDeployments that could not be placed (no node offers a slice that holds them),
# planned again, and applied if they now fit, every REPLAN_SECONDS: GPU nodes that
# join (a node pool scaled up, the GPU operator done labelling) send no event here.
_unplaced: set[tuple[str, str]] = set()
REPLAN_SECONDS = 15.0


def _recheck_forever(stop: threading.Event) -> None:
    last_replan = time.monotonic()
    while not stop.wait(RECHECK_SECONDS):
        replan = time.monotonic() - last_replan >= REPLAN_SECONDS
        if replan:
            last_replan = time.monotonic()
        for key, apply in [(k, False) for k in list(_not_ready)] + [
            (k, True) for k in (list(_unplaced) if replan else [])
        ]:
            try:
                _reconcile(*key, apply=apply)
            except Exception:
                log.exception("Re-checking %s/%s failed", *key)


# The built-in autoscaler: every AUTOSCALE_SECONDS, the signals of every fleet from
# Prometheus, a decision per `scaling.mode: builtin` object, scale writes through the
# scale subresource, an Event per scale, MetricsUnavailable and status.autoscaling,
# and each replica's open streams as its pod deletion cost (the idlest go first).
AUTOSCALE_SECONDS = 2.0
_metrics: dict[tuple[str, str], MetricsCondition] = {}
_floors: dict[tuple[str, str], Floor] = {}
SIGNAL_NAMES = ("queue_depth", "queue_time", "ttfa_p95", "open_streams")
SCALED = Counter("ttsfleet_operator_scale_writes_total", "Replica changes by the autoscaler.")


def _write_deletion_costs(autoscaler: Autoscaler, decision: Decision) -> None:
    """Annotate the fleet's pods with their deletion costs (merge patch of that key only)."""
    namespace, _ = decision.key
    written = {}
    for pod, cost in decision.deletion_costs.items():
        try:
            kube.annotate_pod(_api(), namespace, pod, {DELETION_COST: str(cost)})
        except Exception as err:  # a refused patch must not stop the scale write
            log.warning("Could not set the deletion cost of pod %s/%s: %s", namespace, pod, err)
            continue
        written[pod] = cost  # or the pod is gone: nothing to write again either way
    autoscaler.annotated(decision.key, written)


PREDICT_SECONDS = 60.0  # the predicted floors look at past days: once a minute is plenty
_predicted: dict[str, Any] = {"at": -math.inf, "floors": {}}
_recent: dict[tuple[str, str], deque[dict[str, Any]]] = {}


def _predicted_floors(
    source: PrometheusSource | None, objects: list[dict[str, Any]], wall: datetime
) -> dict[tuple[str, str], Floor]:
    """Predicted floors from range queries over past days, refreshed once a minute."""
    if source is None or time.monotonic() - _predicted["at"] < PREDICT_SECONDS:
        return dict(_predicted["floors"])
    peaks = {}
    for window in history_windows(objects, wall):
        try:
            peaks[window] = source.peaks(*window)
        except MetricsUnavailableError as err:
            log.warning("No history for the predicted floors: %s", err)
            return dict(_predicted["floors"])  # keep the last ones, try again next tick
    _predicted.update(at=time.monotonic(), floors=predicted_floors(objects, wall, peaks))
    return dict(_predicted["floors"])


def _autoscale_once(autoscaler: Autoscaler, source: PrometheusSource | None) -> None:
    namespaces = _state.get("namespaces") or [None]
    objects = [
        o
        for ns in namespaces
        for o in kube.list_custom(_api(), api.GROUP, api.VERSION, api.PLURAL, ns)
    ]
    signals: dict[tuple[str, str], Signals] | None = None
    error: str | None = "no Prometheus configured: start the operator with --prometheus-url"
    if source is not None:
        try:
            signals, error = source.signals(), None
        except MetricsUnavailableError as err:
            error = str(err)
    pod_streams: PodStreams | None = None
    if source is not None and signals is not None:
        try:
            pod_streams = source.pod_streams()
        except MetricsUnavailableError as err:
            log.warning("No open streams per pod this tick: %s", err)
    by_key = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in objects}
    wall = datetime.now(UTC)
    predicted = _predicted_floors(source, objects, wall)
    decisions = autoscaler.decide(
        objects, signals, error, time.monotonic(), pod_streams, wall=wall, predicted=predicted
    )
    for decision in decisions:
        try:
            _carry_out(autoscaler, decision, by_key[decision.key], wall)
        except Exception:
            # One fleet's failure (deleted meanwhile, a refused write) skips only that
            # fleet; forgetting what was reported makes the next tick report it again.
            _metrics.pop(decision.key, None)
            _floors.pop(decision.key, None)
            log.exception("Autoscaling %s/%s failed", *decision.key)


def _carry_out(
    autoscaler: Autoscaler, decision: Decision, body: dict[str, Any], wall: datetime
) -> None:
    """Write one decision: deletion costs, the scale, an Event, status.autoscaling."""
    namespace, name = decision.key
    changed = (_metrics.get(decision.key), _floors.get(decision.key)) != (
        decision.metrics,
        decision.floor,
    )
    _metrics[decision.key] = decision.metrics
    _floors[decision.key] = decision.floor
    rec = decision.recommendation
    if decision.scale_down and decision.deletion_costs:
        _write_deletion_costs(autoscaler, decision)  # the idlest replicas go first
    if decision.scale:
        kube.scale_custom(api_client := _api(), api.GROUP, api.VERSION, api.PLURAL,
                          namespace, name, rec.replicas)  # fmt: skip
        SCALED.inc()
        message = f"Scaled from {decision.current} to {rec.replicas}: {rec.reason}"
        kube.post_event(api_client, body, "Normal", "Scaled", message)
        log.info("%s/%s: %s", namespace, name, message)
    if decision.scale or changed:
        autoscaling: dict[str, Any] = {
            "desiredReplicas": rec.replicas,
            "currentReplicas": decision.current,
            "lastDecision": rec.reason,
            # Every signal, None when not measured: a merge patch keeps absent keys.
            "signals": {k: rec.signals.get(k) for k in SIGNAL_NAMES},
            "panic": rec.panic,
            "floor": {"replicas": decision.floor.replicas, "reason": decision.floor.reason},
        }
        if decision.scale:
            stamp = wall.strftime("%Y-%m-%dT%H:%M:%SZ")
            autoscaling["lastScaleTime"] = stamp
            recent = _recent.setdefault(decision.key, deque(maxlen=5))
            recent.append(
                {"time": stamp, "from": decision.current, "to": rec.replicas,
                 "reason": rec.reason}
            )  # fmt: skip
            autoscaling["recentScales"] = list(recent)
        kube.patch_custom_status(
            _api(), api.GROUP, api.VERSION, api.PLURAL, namespace, name,
            {"autoscaling": autoscaling},
        )  # fmt: skip
        _reconcile(namespace, name, apply=False)  # the conditions say it too


def _autoscale_forever(stop: threading.Event) -> None:
    url = _state.get("prometheus_url")
    source = PrometheusSource(url) if url else None
    autoscaler = Autoscaler()
    while not stop.wait(AUTOSCALE_SECONDS):
        try:
            _autoscale_once(autoscaler, source)
        except Exception:
            log.exception("Autoscaler tick failed")


@kopf.on.startup()
def _start_rechecks(**_: Any) -> None:
    stop = threading.Event()
    _state["stop"] = stop
    threading.Thread(target=_recheck_forever, args=(stop,), daemon=True, name="recheck").start()
    threading.Thread(
        target=_autoscale_forever, args=(stop,), daemon=True, name="autoscaler"
    ).start()


@kopf.on.cleanup()
def _stop_rechecks(**_: Any) -> None:
    stop = _state.get("stop")
    if stop is not None:
        stop.set()
