"""The one module that talks to Prometheus: every fleet's signals, one query per signal.

Each query groups by `namespace` and `deployment` (the labels the scrape config puts
on every Triton sample), so one tick costs five queries (the four signals and the
completion rate the policy reads arrivals from) however many TtsDeployments there
are. A signal with no samples for a fleet is None, and a
Prometheus that does not answer raises `MetricsUnavailableError`: the policy then
holds the size and the operator says so.

One more query, per pod (`POD_STREAMS`), gives each replica's open streams: the
operator turns them into pod deletion costs so that a scale-down removes the
idlest replicas first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ttsfleet.triton import contract

Key = tuple[str, str]  # (namespace, TtsDeployment name)
WINDOW = "10s"


def _by_fleet(metric: str) -> str:
    return f"sum by (namespace, deployment) ({metric})"


# Requests waiting: in Triton's queue (the sentence engine's) plus live streams the
# chunked engine's scheduler holds before their first audio; either alone where the
# other is not exported.
_TRITON_PENDING, _WAITING = (
    _by_fleet(contract.PENDING_REQUESTS),
    _by_fleet(contract.WAITING_STREAMS),
)
QUERIES = {
    "pending_requests": f"({_TRITON_PENDING} + {_WAITING}) or {_TRITON_PENDING} or {_WAITING}",
    "queue_seconds_per_request": (
        f"sum by (namespace, deployment) (rate({contract.QUEUE_DURATION_US}[{WINDOW}])) / 1e6"
        f" / clamp_min(sum by (namespace, deployment) (rate({contract.REQUEST_SUCCESS}[{WINDOW}])),"
        " 1e-9)"
    ),
    "ttfa_p95_seconds": (
        "histogram_quantile(0.95, sum by (namespace, deployment, le) "
        f"(rate({contract.TIME_TO_FIRST_AUDIO}_bucket[{WINDOW}])))"
    ),
    "open_streams": f"sum by (namespace, deployment) ({contract.INFLIGHT_STREAMS})",
    "completed_per_second": (
        f"sum by (namespace, deployment) (rate({contract.REQUEST_SUCCESS}[{WINDOW}]))"
    ),
}

# Open streams of every fleet over a past window (a range query): the predicted floor.
HISTORY = f"sum by (namespace, deployment) ({contract.INFLIGHT_STREAMS})"
HISTORY_STEP_SECONDS = 30

# Open streams of every replica (the scrape config's `pod` label): drain order.
POD_STREAMS = f"sum by (namespace, deployment, pod) ({contract.INFLIGHT_STREAMS})"
PodStreams = dict[Key, dict[str, float]]  # fleet -> pod name -> open streams


class MetricsUnavailableError(RuntimeError):
    """Prometheus did not answer; the message says what failed."""


@dataclass(frozen=True)
class Signals:
    pending_requests: float | None = None
    queue_seconds_per_request: float | None = None
    ttfa_p95_seconds: float | None = None
    open_streams: float | None = None
    completed_per_second: float | None = None


def parse(results: Mapping[str, list[dict[str, Any]]]) -> dict[Key, Signals]:
    """Signals per fleet from instant-query results (signal -> Prometheus vector). Pure."""
    values: dict[Key, dict[str, float]] = {}
    for signal, vector in results.items():
        for sample in vector:
            labels = sample.get("metric", {})
            key = (labels.get("namespace", ""), labels.get("deployment", ""))
            value = float(sample["value"][1])
            if key[1] and not math.isnan(value):  # NaN: no traffic in the window, not measured
                values.setdefault(key, {})[signal] = value
    return {key: Signals(**fields) for key, fields in values.items()}


def parse_pod_streams(vector: list[dict[str, Any]]) -> PodStreams:
    """Open streams per pod, per fleet, from the `POD_STREAMS` instant vector. Pure."""
    out: PodStreams = {}
    for sample in vector:
        labels = sample.get("metric", {})
        key = (labels.get("namespace", ""), labels.get("deployment", ""))
        pod = labels.get("pod", "")
        value = float(sample["value"][1])
        if key[1] and pod and not math.isnan(value):
            out.setdefault(key, {})[pod] = value
    return out


def parse_peaks(matrix: list[dict[str, Any]]) -> dict[Key, float]:
    """The peak of each fleet's series in a range-query result (a matrix). Pure."""
    out: dict[Key, float] = {}
    for series in matrix:
        labels = series.get("metric", {})
        key = (labels.get("namespace", ""), labels.get("deployment", ""))
        values = [float(v) for _, v in series.get("values", [])]
        values = [v for v in values if not math.isnan(v)]
        if key[1] and values:
            out[key] = max(out.get(key, 0.0), *values)
    return out


class PrometheusSource:
    """Signals of every fleet from a Prometheus server (prometheus-api-client)."""

    def __init__(self, url: str, timeout: int = 2) -> None:
        import requests  # noqa: PLC0415 - operator only
        from prometheus_api_client import PrometheusConnect  # noqa: PLC0415

        self.url = url
        session = requests.Session()
        session.trust_env = False  # straight to Prometheus, never through a proxy
        self._prometheus = PrometheusConnect(
            url=url, disable_ssl=True, timeout=timeout, session=session
        )

    def _query(self, query: str) -> list[dict[str, Any]]:
        try:
            vector: list[dict[str, Any]] = self._prometheus.custom_query(query)
        except Exception as err:  # connection refused, timeouts, HTTP errors
            raise MetricsUnavailableError(f"Prometheus at {self.url}: {err}") from err
        return vector

    def signals(self) -> dict[Key, Signals]:
        return parse({signal: self._query(query) for signal, query in QUERIES.items()})

    def pod_streams(self) -> PodStreams:
        """Open streams of every replica Prometheus scrapes, per fleet."""
        return parse_pod_streams(self._query(POD_STREAMS))

    def peaks(self, start: datetime, end: datetime) -> dict[Key, float]:
        """Each fleet's peak open streams between `start` and `end` (one range query)."""
        try:
            matrix: list[dict[str, Any]] = self._prometheus.custom_query_range(
                HISTORY, start_time=start, end_time=end, step=str(HISTORY_STEP_SECONDS)
            )
        except Exception as err:  # connection refused, timeouts, HTTP errors
            raise MetricsUnavailableError(f"Prometheus at {self.url}: {err}") from err
        return parse_peaks(matrix)
