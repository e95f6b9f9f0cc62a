"""Leader election through a `coordination.k8s.io/v1` Lease, in controller-runtime's scheme.

One replica holds the Lease and acts; the others stand by and take it over when the
holder stops renewing it. The record is client-go's: `holderIdentity`,
`leaseDurationSeconds`, `acquireTime`, `renewTime`, `leaseTransitions`, and every
write carries the `resourceVersion` it read, so two candidates can never both win.

Expiry is judged on the local clock, never on the holder's timestamps: a candidate
takes a Lease over only when it has seen the same record, unchanged, for a whole
lease duration (`observed_at` + duration). The holder stops acting once it has gone
`renew_deadline` without a successful renewal, counted from when the last good
renewal was *sent*; since the renew deadline is shorter than the lease duration, the
old leader has stopped writing before anyone else can start (`Leadership` is that
fence).

`decide` is pure; `Elector` holds what the last read showed and does the reads and
writes through `kube`.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ttsfleet import kube

log = logging.getLogger("ttsfleet.leader")

DEFAULT_LEASE_NAME = "ttsfleet-operator"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class ConfigError(ValueError):
    """Timings that cannot work together; the message names the flag and the fix."""


@dataclass(frozen=True)
class LeaseConfig:
    name: str
    namespace: str
    identity: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not self.identity:
            raise ConfigError("--leader-election-identity must not be empty")
        if not 0 < self.retry_period < self.renew_deadline:
            raise ConfigError(
                f"--retry-period ({self.retry_period:g}s) must be above 0 and below "
                f"--renew-deadline ({self.renew_deadline:g}s): lower it"
            )
        if self.renew_deadline >= self.lease_duration:
            raise ConfigError(
                f"--renew-deadline ({self.renew_deadline:g}s) must be below --lease-duration "
                f"({self.lease_duration:g}s), or an old leader could still write when a new "
                "one starts: lower it, or raise --lease-duration"
            )

    @property
    def request_timeout(self) -> float:
        """How long one Lease read or write may take: two tries fit in the renew deadline."""
        return max(1.0, min(self.renew_deadline / 2, 5.0))


def default_identity() -> str:
    """Host name and process id: two processes on one host differ (in a pod, the host
    name is the pod's name)."""
    return f"{socket.gethostname()}_{os.getpid()}"


def default_namespace() -> str:
    """Where the operator runs: POD_NAMESPACE (downward API), else the in-cluster
    ServiceAccount's namespace, else `default`."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


@dataclass(frozen=True)
class Record:
    """What a Lease says (its spec) and the version it was read at."""

    holder: str
    duration: float
    transitions: int
    acquire_time: str | None
    resource_version: str | None

    @classmethod
    def from_lease(cls, lease: dict[str, Any]) -> Record:
        spec = lease.get("spec") or {}
        return cls(
            holder=spec.get("holderIdentity") or "",
            duration=float(spec.get("leaseDurationSeconds") or 0),
            transitions=int(spec.get("leaseTransitions") or 0),
            acquire_time=spec.get("acquireTime"),
            resource_version=(lease.get("metadata") or {}).get("resourceVersion"),
        )


class Step(Enum):
    ACQUIRE = "acquire"  # take it: free, expired, or already ours after a restart of the loop
    RENEW = "renew"  # ours: write a new renewTime
    WAIT = "wait"  # held by a live holder


def decide(
    record: Record | None, identity: str, observed_at: float, now: float,
    *, lease_duration: float = 0.0, seen_one: bool = False,
) -> Step:  # fmt: skip
    """What a candidate does on reading `record` (None: no Lease).

    `observed_at` is when this candidate first saw this exact record (its local clock);
    a record unchanged for its own lease duration belongs to a holder that stopped. A
    Lease that is gone after this candidate `seen_one` (deleted by hand) may still have
    a leader acting on it: it is taken only once it has been gone for `lease_duration`.
    """
    if record is None:
        gone_long = now >= observed_at + lease_duration
        return Step.ACQUIRE if not seen_one or gone_long else Step.WAIT
    if not record.holder:
        return Step.ACQUIRE  # released by a leader that stopped
    if record.holder == identity:
        return Step.RENEW
    if now >= observed_at + record.duration:
        return Step.ACQUIRE
    return Step.WAIT


def _micro_time(moment: datetime) -> str:
    """A Kubernetes MicroTime."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Leadership:
    """The fence: whether this replica may write now.

    True only between a successful acquire/renew and `renew_deadline` after it was
    sent. It is read before every write (see `kube.api_client(fence=...)`), so a
    leader paused past its Lease (SIGSTOP, a long GC, a frozen VM) writes nothing when
    it wakes, even before its own loop has noticed.
    """

    def __init__(self, renew_deadline: float) -> None:
        self.renew_deadline = renew_deadline
        self._lock = threading.Lock()
        self._valid_until = -1.0

    def granted(self, sent_at: float) -> None:
        with self._lock:
            self._valid_until = max(self._valid_until, sent_at + self.renew_deadline)

    def revoke(self) -> None:
        with self._lock:
            self._valid_until = -1.0

    def held(self) -> bool:
        with self._lock:
            return time.monotonic() < self._valid_until


class Elector:
    """One candidate's view of the Lease, and its reads and writes of it.

    `api` must be a client whose writes are not fenced (the Lease is how the fence is
    lifted). Every call makes at most one read and one write, each bounded by the
    config's request timeout; API errors are logged and count as "not renewed".
    """

    def __init__(self, api: client.ApiClient, config: LeaseConfig, leadership: Leadership):
        self.api = api
        self.config = config
        self.leadership = leadership
        self._seen: tuple[str | None, float] = (None, 0.0)  # (resourceVersion, first seen)
        self._duration = config.lease_duration  # of the record last seen
        self.holder: str = ""
        self.reachable = True  # whether the last read of the Lease got an answer
        self._refused = False  # whether the last write of the Lease failed
        self._seen_one = False  # whether a Lease was ever read

    def try_acquire_or_renew(self) -> bool:
        """Read the Lease and take or renew it when `decide` says so; True if ours now."""
        cfg = self.config
        sent_at = time.monotonic()
        try:
            lease = kube.read_lease(self.api, cfg.namespace, cfg.name, cfg.request_timeout)
        except Exception as err:  # any failure to read is "not renewed"
            if self.reachable:  # once per outage, not every retry period
                log.warning("Could not read Lease %s/%s: %s", cfg.namespace, cfg.name, err)
            self.reachable = False
            return False
        if not self.reachable:
            log.info("Lease %s/%s can be read again", cfg.namespace, cfg.name)
            self.reachable = True
        record = Record.from_lease(lease) if lease is not None else None
        now = time.monotonic()
        version = record.resource_version if record else None
        if version != self._seen[0]:
            self._seen = (version, now)
        self.holder = record.holder if record else ""
        self._duration = record.duration if record else cfg.lease_duration
        step = decide(
            record, cfg.identity, self._seen[1], now,
            lease_duration=cfg.lease_duration, seen_one=self._seen_one,
        )  # fmt: skip
        self._seen_one = self._seen_one or record is not None
        self._refused = False
        if step == Step.WAIT:
            return False
        moment = _micro_time(datetime.now(UTC))
        ours = record is not None and record.holder == cfg.identity
        spec = {
            "holderIdentity": cfg.identity,
            # Rounded up: a standby must never wait less than this leader's fence lasts.
            "leaseDurationSeconds": math.ceil(cfg.lease_duration),
            "acquireTime": record.acquire_time if ours and record else moment,
            "renewTime": moment,
            "leaseTransitions": (record.transitions if record else 0) + (0 if ours else 1),
        }
        if record is None:
            spec["leaseTransitions"] = 0
        try:
            written = kube.write_lease(
                self.api, cfg.namespace, cfg.name, spec, version, cfg.request_timeout
            )
        except ApiException as err:
            self._refused = True
            if err.status == 409:  # someone else wrote it first: read again next time
                log.info("Lost the race for Lease %s/%s", cfg.namespace, cfg.name)
            else:
                log.warning("Could not write Lease %s/%s: %s", cfg.namespace, cfg.name, err)
            return False
        except Exception as err:  # timeouts, refused connections
            self._refused = True
            log.warning("Could not write Lease %s/%s: %s", cfg.namespace, cfg.name, err)
            return False
        self._seen = (Record.from_lease(written).resource_version, time.monotonic())
        self.holder = cfg.identity
        self.leadership.granted(sent_at)
        return True

    def release(self) -> bool:
        """Give the Lease up (holder emptied, duration 1 s), so a standby takes it at once.

        Only when it is still ours; the fence is dropped first, so nothing this process
        writes can follow the release. True when released.
        """
        self.leadership.revoke()
        cfg = self.config
        try:
            lease = kube.read_lease(self.api, cfg.namespace, cfg.name, cfg.request_timeout)
            record = Record.from_lease(lease) if lease is not None else None
            if record is None or record.holder != cfg.identity:
                return False
            moment = _micro_time(datetime.now(UTC))
            spec = {
                "holderIdentity": None,
                "leaseDurationSeconds": 1,
                "acquireTime": None,
                "renewTime": moment,
                "leaseTransitions": record.transitions,
            }
            kube.write_lease(
                self.api, cfg.namespace, cfg.name, spec, record.resource_version,
                cfg.request_timeout,
            )  # fmt: skip
        except Exception as err:  # the Lease then simply expires
            log.warning("Could not release Lease %s/%s: %s", cfg.namespace, cfg.name, err)
            return False
        self.holder = ""
        log.info("Released Lease %s/%s", cfg.namespace, cfg.name)
        return True

    def next_look(self) -> float:
        """Seconds until a standby should read the Lease again: a retry period, or less
        when the record last seen expires sooner (so a takeover waits no extra period)."""
        if not self.reachable or self._refused:
            return self.config.retry_period
        expiry = self._seen[1] + self._duration - time.monotonic()
        return min(self.config.retry_period, max(0.05, expiry))
