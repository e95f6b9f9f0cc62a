"""The built-in autoscaler's tick and what it writes.

Every `AUTOSCALE_SECONDS` the leader reads every fleet's signals from Prometheus (four
grouped queries, one more for each replica's open streams), asks the pure
`Autoscaler.decide` (loop.py, over `recommend()` in policy.py) for each
`scaling.mode: builtin` fleet, and carries out the decisions: pod deletion costs just
before a scale-down, the scale subresource, an Event per scale, and
`status.autoscaling`. What it last said per fleet (the MetricsUnavailable condition,
the floor, the last five scales) is this object's state, so it lives as long as one
term of leadership.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from prometheus_client import Counter

from ttsfleet import kube
from ttsfleet.api import v1alpha1 as api
from ttsfleet.autoscale.floors import NONE, Floor, floor
from ttsfleet.autoscale.loop import (
    DELETION_COST,
    Autoscaler,
    Decision,
    MetricsCondition,
    RegionView,
    history_windows,
    predicted_floors,
    region_floors,
)
from ttsfleet.autoscale.metrics import (
    Key,
    MetricsUnavailableError,
    PodStreams,
    PrometheusSource,
    Signals,
)

log = logging.getLogger("ttsfleet.autoscaler")

AUTOSCALE_SECONDS = 2.0
PREDICT_SECONDS = 60.0  # the predicted floors look at past days: once a minute is plenty
SIGNAL_NAMES = ("queue_depth", "queue_time", "ttfa_p95", "open_streams", "arrivals")
NO_PROMETHEUS = "no Prometheus configured: start the operator with --prometheus-url"

Manifest = dict[str, Any]


class Ticker:
    """One term's autoscaler: its policy state, and what it last reported per fleet.

    `refresh(namespace, name)` re-reconciles a fleet whose MetricsUnavailable condition
    or floor changed, so its conditions say it too.
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        source: PrometheusSource | None,
        namespaces: list[str],
        scaled: Counter,
        ticks: Counter,
        refresh: Callable[[str, str], Any],
        regions: Callable[[], list[RegionView]] | None = None,
    ) -> None:
        self.api = api_client
        self.source = source
        self.namespaces = namespaces
        self.scaled = scaled
        self.ticks = ticks
        self.refresh = refresh
        self.regions = regions  # TtsRegions in front of fleets (their floors), if any
        self.autoscaler = Autoscaler()
        self.conditions: dict[Key, MetricsCondition] = {}
        self.floors: dict[Key, Floor] = {}
        self.recent: dict[Key, deque[dict[str, Any]]] = {}
        self._predicted: tuple[float, dict[Key, Floor]] = (-math.inf, {})

    def forget(self, key: Key) -> None:
        """A fleet was deleted: nothing of it is kept."""
        for remembered in (self.conditions, self.floors, self.recent):
            remembered.pop(key, None)

    def tick(self) -> None:
        namespaces: list[str | None] = [*self.namespaces] or [None]
        objects = [
            o
            for ns in namespaces
            for o in kube.list_custom(self.api, api.GROUP, api.VERSION, api.PLURAL, ns)
        ]
        signals: dict[Key, Signals] | None = None
        error: str | None = NO_PROMETHEUS
        pod_streams: PodStreams | None = None
        if self.source is not None:
            try:
                signals, error = self.source.signals(), None
            except MetricsUnavailableError as err:
                error = str(err)
        if self.source is not None and signals is not None:
            try:
                pod_streams = self.source.pod_streams()
            except MetricsUnavailableError as err:
                log.warning("No open streams per pod this tick: %s", err)
        by_key = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in objects}
        wall = datetime.now(UTC)
        floors = self._predicted_floors(objects, wall)
        if self.regions is not None:
            for key, made in region_floors(objects, signals, self.regions()).items():
                floors[key] = floor(floors.get(key, NONE), made)
        decisions = self.autoscaler.decide(
            objects, signals, error, time.monotonic(), pod_streams, wall=wall, predicted=floors,
        )  # fmt: skip
        for decision in decisions:
            try:
                self._carry_out(decision, by_key[decision.key], wall)
            except kube.NotLeaderError:
                raise  # the term is over: nothing more is written
            except Exception:
                # One fleet's failure (deleted meanwhile, a refused write) skips only that
                # fleet; forgetting what was reported makes the next tick report it again.
                self.conditions.pop(decision.key, None)
                self.floors.pop(decision.key, None)
                log.exception("Autoscaling %s/%s failed", *decision.key)
        self.ticks.inc()  # every fleet was decided on (and its writes tried) once more

    def _predicted_floors(self, objects: list[Manifest], wall: datetime) -> dict[Key, Floor]:
        """Predicted floors from range queries over past days, refreshed once a minute."""
        at, floors = self._predicted
        if self.source is None or time.monotonic() - at < PREDICT_SECONDS:
            return dict(floors)
        peaks = {}
        for window in history_windows(objects, wall):
            try:
                peaks[window] = self.source.peaks(*window)
            except MetricsUnavailableError as err:
                log.warning("No history for the predicted floors: %s", err)
                return dict(floors)  # keep the last ones, try again next tick
        self._predicted = (time.monotonic(), predicted_floors(objects, wall, peaks))
        return dict(self._predicted[1])

    def _carry_out(self, decision: Decision, body: Manifest, wall: datetime) -> None:
        """Write one decision: deletion costs, the scale, an Event, status.autoscaling."""
        namespace, name = key = decision.key
        changed = (self.conditions.get(key), self.floors.get(key)) != (
            decision.metrics,
            decision.floor,
        )
        self.conditions[key] = decision.metrics
        self.floors[key] = decision.floor
        rec = decision.recommendation
        if decision.scale_down and decision.deletion_costs:
            self._write_deletion_costs(decision)  # the idlest replicas go first
        if decision.scale:
            kube.scale_custom(self.api, api.GROUP, api.VERSION, api.PLURAL, namespace, name,
                              rec.replicas)  # fmt: skip
            self.scaled.inc()
            message = f"Scaled from {decision.current} to {rec.replicas}: {rec.reason}"
            kube.post_event(self.api, body, "Normal", "Scaled", message)
            log.info("%s/%s: %s", namespace, name, message)
        if not (decision.scale or changed):
            return
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
            recent = self.recent.setdefault(key, deque(maxlen=5))
            recent.append(
                {"time": stamp, "from": decision.current, "to": rec.replicas,
                 "reason": rec.reason}
            )  # fmt: skip
            autoscaling["recentScales"] = list(recent)
        kube.patch_custom_status(
            self.api, api.GROUP, api.VERSION, api.PLURAL, namespace, name,
            {"autoscaling": autoscaling},
        )  # fmt: skip
        self.refresh(namespace, name)  # the conditions say it too

    def _write_deletion_costs(self, decision: Decision) -> None:
        """Annotate the fleet's pods with their deletion costs (merge patch of that key only)."""
        namespace, _ = decision.key
        written = {}
        for pod, cost in decision.deletion_costs.items():
            try:
                kube.annotate_pod(self.api, namespace, pod, {DELETION_COST: str(cost)})
            except kube.NotLeaderError:
                raise
            except Exception as err:  # a refused patch must not stop the scale write
                log.warning("Could not set the deletion cost of pod %s/%s: %s", namespace, pod,
                            err)  # fmt: skip
                continue
            written[pod] = cost  # or the pod is gone: nothing to write again either way
        self.autoscaler.annotated(decision.key, written)
