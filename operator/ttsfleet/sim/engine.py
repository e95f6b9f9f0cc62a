"""The time-stepped fleet simulator: a fluid model per tick, autoscalers on their clocks.

Per tick of `tick_s` (1 s): arrivals lambda * dt join a fleet-wide backlog that the
ready replicas drain at their service rate (the fluid part, which carries overload);
below saturation the replicas' queues wait as the balancer makes them (the stochastic
part, see `service`). A trace read from traffic is replayed request by request instead
(`des.Replay`). Every request is accounted for: arrived = served + backlog.
From these come, per tick, the share of arrivals with TTFA under the SLO and the
signals an autoscaler reads:
- through Prometheus (scraped every `scrape_interval_s`, rates over `rate_window_s`,
  as `autoscale/metrics.py` queries them): Triton's pending requests, queue time per
  request, the TTFA p95 histogram, open streams;
- directly (metrics-server, Knative's queue-proxy): pod utilisation and concurrency.
An autoscaler decides every `period_s`; a new replica is Ready `cold_start_s` later;
a removed one stops at once (starting ones are cancelled first).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Protocol

from ttsfleet.sim.des import Replay, histogram_quantile
from ttsfleet.sim.service import ServiceModel, calibrated
from ttsfleet.sim.traces import Trace


@dataclass(frozen=True)
class SimConfig:
    slo_s: float = 0.3  # TTFA target: the spec's default timeToFirstAudioMs
    tick_s: float = 1.0
    cold_start_s: float = 30.0
    scrape_interval_s: float = 5.0
    rate_window_s: float = 10.0  # autoscale/metrics.py WINDOW
    min_replicas: int = 1
    # None: MAX_OVER_PEAK x what the trace's peak needs at the SLO (`bounded`), so the
    # bound never caps what a policy asks for on the way to the peak.
    max_replicas: int | None = None
    initial_replicas: int | None = None  # None: sized for the first second at the SLO
    oscillation_window_s: float = 600.0
    step_rise: float = 1.5  # a step: the rate grows by this factor within step_within_s
    step_within_s: float = 60.0
    # Per-request replay (`des.Replay`: Poisson arrivals on the trace's rate) instead of
    # the fluid model; None: replay the traces read from traffic (CSV files).
    replay: bool | None = None
    seed: int = 3  # of the replay's arrivals and request draws


MAX_OVER_PEAK = 4


def peak_need(trace: Trace, config: SimConfig, service: ServiceModel) -> int:
    """Replicas that hold the trace's peak at the SLO (`ServiceModel.need`)."""
    return service.need(trace.peak, config.slo_s)


def bounded(config: SimConfig, trace: Trace, service: ServiceModel) -> SimConfig:
    """`config` with its maxReplicas set (see SimConfig.max_replicas)."""
    if config.max_replicas is not None:
        return config
    need = MAX_OVER_PEAK * peak_need(trace, config, service)
    return replace(config, max_replicas=max(need, config.min_replicas))


def max_replicas(config: SimConfig) -> int:
    """The bound of a config `bounded` has seen."""
    if config.max_replicas is None:
        raise ValueError("config.max_replicas is unset: pass it through bounded() first")
    return config.max_replicas


class Scaler(Protocol):
    """An autoscaler: how often it decides, and what it decides from what it sees."""

    name: str
    period_s: float

    def decide(self, view: View, now: float, current: int, ready: int) -> int: ...


@dataclass
class Series:
    """Sampled every scrape interval: what a dashboard would show."""

    t_s: list[float] = field(default_factory=list)
    requests_per_s: list[float] = field(default_factory=list)
    replicas: list[int] = field(default_factory=list)
    ready_replicas: list[int] = field(default_factory=list)
    ttfa_p95_s: list[float | None] = field(default_factory=list)


@dataclass(frozen=True)
class Result:
    policy: str
    trace: str
    duration_s: float
    requests: float
    served: float
    backlog: float
    slo_misses: float
    replica_hours: float
    scale_events: tuple[tuple[float, int, int], ...]  # (t, from, to)
    oscillations: int
    reactions_s: tuple[float, ...]
    series: Series

    @property
    def slo_attainment(self) -> float:
        return 1 - self.slo_misses / self.requests if self.requests else 1.0

    @property
    def oscillations_per_hour(self) -> float:
        return self.oscillations / (self.duration_s / 3600)

    @property
    def reaction_s_p95(self) -> float | None:
        if not self.reactions_s:
            return None
        ordered = sorted(self.reactions_s)
        return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]

    def summary(self) -> dict[str, float | int | None]:
        return {
            "slo_attainment": round(self.slo_attainment, 5),
            "slo_misses": round(self.slo_misses),
            "replica_hours": round(self.replica_hours, 2),
            "oscillations_per_hour": round(self.oscillations_per_hour, 3),
            "reaction_s_p95": self.reaction_s_p95,
        }


@dataclass(frozen=True)
class Tick:
    arrivals: float
    waited: float  # arrivals * queue time
    busy: float  # replicas synthesizing, on average
    ready: int
    queued: float  # requests waiting (Triton's pending count)
    rho: float
    delay: float  # backlog delay
    served: float = 0.0  # requests completed
    buckets: tuple[int, ...] | None = None  # a replayed tick's TTFA histogram (des)


class View:
    """What an autoscaler can read at a time: per-tick history, seen the way it is served."""

    def __init__(self, config: SimConfig, service: ServiceModel) -> None:
        self.config, self.service = config, service
        self.dt = config.tick_s
        # Cumulative sums up to the end of tick i are at index i + 1.
        self.arrivals = [0.0]
        self.served = [0.0]  # completions (Triton's nv_inference_request_success)
        self.waited = [0.0]  # arrivals * queue time
        self.busy = [0.0]
        self.ready = [0.0]
        self.in_system = [0.0]
        self.rho_w = [0.0]  # arrivals * rho
        self.delay_w = [0.0]  # arrivals * backlog delay
        self.pending: list[float] = []  # gauge at the end of each tick
        self.buckets: list[list[float]] = []  # cumulative TTFA histograms (replay only)
        self.open_streams: list[float] = []
        self._p95_cache: dict[int, float | None] = {}

    def append(self, tick: Tick) -> None:
        """One more tick of what happened."""
        for sums, value in (
            (self.arrivals, tick.arrivals),
            (self.served, tick.served),
            (self.waited, tick.waited),
            (self.busy, tick.busy),
            (self.ready, tick.ready),
            (self.in_system, tick.queued + tick.busy),
            (self.rho_w, tick.arrivals * tick.rho),
            (self.delay_w, tick.arrivals * tick.delay),
        ):
            sums.append(sums[-1] + value)
        self.pending.append(tick.queued)
        if tick.buckets is not None:
            last = self.buckets[-1] if self.buckets else [0.0] * len(tick.buckets)
            if not self.buckets:
                self.buckets.append(last)
            self.buckets.append([a + b for a, b in zip(last, tick.buckets, strict=True)])
        self.open_streams.append(tick.busy)

    # Prometheus ---------------------------------------------------------------------
    def _scrapes(self, now: float, window: float) -> tuple[int, int] | None:
        """Tick indices (cumulative) of the first and last scrape in (now - window, now]."""
        every = self.config.scrape_interval_s
        last = math.floor(now / every + 1e-9) * every
        first = math.floor((now - window) / every + 1e-9) * every + every
        first = max(first, 0.0)
        if last - first < every - 1e-9:
            return None
        return round(first / self.dt), round(last / self.dt)

    def _gauge(self, values: list[float], now: float) -> float | None:
        every = self.config.scrape_interval_s
        last = round(math.floor(now / every + 1e-9) * every / self.dt)
        return values[last - 1] if last >= 1 and last - 1 < len(values) else None

    def pending_requests(self, now: float) -> float | None:
        """sum(nv_inference_pending_request_count) at the last scrape."""
        return self._gauge(self.pending, now)

    def open_stream_count(self, now: float) -> float | None:
        """sum(ttsfleet_inflight_streams) at the last scrape."""
        return self._gauge(self.open_streams, now)

    def completed_per_second(self, now: float, window: float | None = None) -> float | None:
        """rate(nv_inference_request_success) over the window."""
        span = self._scrapes(now, window or self.config.rate_window_s)
        if span is None:
            return None
        a, b = span
        return (self.served[b] - self.served[a]) / ((b - a) * self.dt)

    def queue_seconds(self, now: float, window: float | None = None) -> float | None:
        """rate(queue duration) / rate(successes) over the window; None without requests."""
        span = self._scrapes(now, window or self.config.rate_window_s)
        if span is None:
            return None
        a, b = span
        count = self.arrivals[b] - self.arrivals[a]
        return (self.waited[b] - self.waited[a]) / count if count > 1e-9 else None

    def ttfa_p95(self, now: float, window: float | None = None) -> float | None:
        """histogram_quantile(0.95, rate(TTFA buckets)) over the window."""
        span = self._scrapes(now, window or self.config.rate_window_s)
        if span is None:
            return None
        a, b = span
        if b in self._p95_cache:
            return self._p95_cache[b]
        count = self.arrivals[b] - self.arrivals[a]
        value = None
        if self.buckets:  # a replay: the histogram itself
            counts = [y - x for x, y in zip(self.buckets[a], self.buckets[b], strict=True)]
            value = histogram_quantile(0.95, counts)
        elif count > 1e-9:
            rho = (self.rho_w[b] - self.rho_w[a]) / count
            delay = (self.delay_w[b] - self.delay_w[a]) / count
            replicas = round((self.ready[b] - self.ready[a]) / (b - a))
            value = self.service.quantile(0.95, rho, delay, replicas)
        self._p95_cache[b] = value
        return value

    # Direct reads (metrics-server, queue-proxy) ------------------------------------------
    def _ticks(self, now: float, window: float) -> tuple[int, int]:
        b = min(round(now / self.dt), len(self.arrivals) - 1)
        return max(0, b - round(window / self.dt)), b

    def utilisation(self, now: float, window: float) -> float | None:
        """Busy share of the ready replicas over the last `window` seconds."""
        a, b = self._ticks(now, window)
        ready = self.ready[b] - self.ready[a]
        return (self.busy[b] - self.busy[a]) / ready if ready > 0 else None

    def concurrency(self, now: float, window: float) -> float | None:
        """Requests in the fleet (queued and in service), averaged over `window`."""
        a, b = self._ticks(now, window)
        return (self.in_system[b] - self.in_system[a]) / (b - a) if b > a else None


@dataclass
class Fleet:
    """Replicas asked for, Ready ones, and those starting (ready at, count), oldest first."""

    desired: int
    ready: int = -1
    starting: deque[tuple[float, int]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if self.ready < 0:
            self.ready = self.desired

    def become_ready(self, now: float) -> int:
        while self.starting and self.starting[0][0] <= now + 1e-9:
            self.ready += self.starting.popleft()[1]
        return self.ready

    def scale(self, want: int, ready_at: float) -> int:
        """Add replicas (Ready at `ready_at`) or remove them, starting ones first."""
        if want > self.desired:
            self.starting.append((ready_at, want - self.desired))
        else:
            cut = self.desired - want
            while cut and self.starting:
                at, count = self.starting.pop()
                if count > cut:
                    self.starting.append((at, count - cut))
                    cut = 0
                else:
                    cut -= count
            self.ready -= cut
        self.desired = want
        return self.ready


def serve(
    service: ServiceModel, slo: float, backlog: float, lam: float, ready: int, dt: float
) -> tuple[float, float, float, float, Tick]:
    """One tick of the fluid model: (arrivals, served, backlog after, share within the SLO,
    what the tick looked like)."""
    mu = service.replica_rate
    arrivals = lam * dt
    capacity = ready * mu
    if capacity > 0:
        served = min(backlog + arrivals, capacity * dt)
        after = backlog + arrivals - served
        rho = min(lam / capacity, 1.0)
        delay = (backlog + after) / 2 / capacity
        ok = service.within(slo, rho, delay, ready)
    else:
        served, after, rho, delay, ok = 0.0, backlog + arrivals, 1.0, 0.0, 0.0
    waiting = service.mean_wait(rho, ready)
    tick = Tick(
        arrivals, arrivals * (waiting + delay), served / (mu * dt), ready,
        after + lam * waiting, rho, delay, served,
    )  # fmt: skip
    return arrivals, served, after, ok, tick


def replayed(
    replay: Replay,
    service: ServiceModel,
    slo: float,
    lam: float,
    ready: int,
    now: float,
    dt: float,
) -> tuple[float, float, float, float, Tick]:
    """One tick of the per-request replay, in `serve`'s terms (backlog: requests arrived
    and not completed; the TTFA share counted, not modelled)."""
    t = replay.tick(lam, ready, now)
    ok = t.within / t.arrivals if t.arrivals else 1.0
    rho = min(1.0, lam / (ready * service.replica_rate)) if ready else 1.0
    busy = min(float(ready), t.busy_s / dt)
    tick = Tick(t.arrivals, t.waited_s, busy, ready, t.queued, rho, 0.0, t.served, t.buckets)
    return t.arrivals, t.served, t.in_system, ok, tick


def initial_size(trace: Trace, config: SimConfig, service: ServiceModel) -> int:
    if config.initial_replicas is not None:
        return config.initial_replicas
    need = service.need(trace.rate(0.0), config.slo_s)
    return min(max(need, config.min_replicas), max_replicas(config))


def simulate(
    trace: Trace,
    scaler: Scaler,
    config: SimConfig | None = None,
    service: ServiceModel | None = None,
) -> Result:
    """Run `scaler` against `trace`; deterministic."""
    service = service or calibrated()
    config = bounded(config or SimConfig(), trace, service)
    top = max_replicas(config)
    dt = config.tick_s
    rates = trace.sampled(dt)
    view = View(config, service)
    slo = config.slo_s
    fleet = Fleet(initial_size(trace, config, service))
    backlog = served_total = arrivals_total = misses = replica_seconds = 0.0
    events: list[tuple[float, int, int]] = []
    series = Series()
    decide_every = max(1, round(scaler.period_s / dt))
    replay = None
    if config.replay if config.replay is not None else trace.per_request:
        if not service.samples:
            raise ValueError("a replay needs the service model's samples (calibrated())")
        replay = Replay(service.samples, service.balancer, config.seed, slo, dt)
    record_every = max(1, round(config.scrape_interval_s / dt))
    ready_by_tick: list[int] = []
    for i, lam in enumerate(rates):
        now = i * dt
        ready = fleet.become_ready(now)
        if i and i % decide_every == 0:
            want = scaler.decide(view, now, fleet.desired, ready)
            want = min(max(want, config.min_replicas), top)
            if want != fleet.desired:
                events.append((now, fleet.desired, want))
                ready = fleet.scale(want, now + config.cold_start_s)
        desired = fleet.desired
        if replay is None:
            arrivals, served, after, ok, tick = serve(service, slo, backlog, lam, ready, dt)
        else:
            arrivals, served, after, ok, tick = replayed(replay, service, slo, lam, ready, now, dt)
        backlog = after
        arrivals_total += arrivals
        served_total += served
        misses += arrivals * (1 - ok)
        replica_seconds += desired * dt
        ready_by_tick.append(ready)
        view.append(tick)
        if (i + 1) % record_every == 0:
            end = (i + 1) * dt
            series.t_s.append(end)
            series.requests_per_s.append(lam)
            series.replicas.append(desired)
            series.ready_replicas.append(ready)
            series.ttfa_p95_s.append(view.ttfa_p95(end))
    duration = len(rates) * dt
    return Result(
        policy=scaler.name,
        trace=trace.name,
        duration_s=duration,
        requests=arrivals_total,
        served=served_total,
        backlog=backlog,
        slo_misses=misses,
        replica_hours=replica_seconds / 3600,
        scale_events=tuple(events),
        oscillations=count_oscillations(events, config.oscillation_window_s),
        reactions_s=reactions(rates, ready_by_tick, config, service),
        series=series,
    )


def count_oscillations(events: list[tuple[float, int, int]], window: float) -> int:
    """Flaps: the scale direction reverses and reverses back within `window` seconds.

    A reversal is a scale event in the other direction than the one before it; each
    reversal that comes less than `window` after the previous reversal counts once
    (up, down, up, or down, up, down, with the two turns close together). One
    correction after an overshoot (up, then down) is not a flap.
    """
    turns = [
        t1 for (_, a0, b0), (t1, a1, b1) in itertools.pairwise(events) if (b0 > a0) != (b1 > a1)
    ]
    return sum(1 for t0, t1 in itertools.pairwise(turns) if t1 - t0 < window)


def steps(rates: list[float], config: SimConfig) -> list[int]:
    """Onsets (tick indices) of rises by `step_rise` x within `step_within_s`.

    The onset is the last tick before the rate starts to climb (more than 1 % a tick),
    looked for within the step's window; a smooth rise with no such tick starts at the
    last tick before any rise. After a step, the next one is looked for once the rate
    stops rising.
    """
    within = max(1, round(config.step_within_s / config.tick_s))
    found: list[int] = []
    i = 0
    while i + 1 < len(rates):
        ahead = rates[i + 1 : i + 1 + within]
        if not (rates[i] > 0 and ahead and max(ahead) >= config.step_rise * rates[i]):
            i += 1
            continue
        onset, limit = i, min(len(rates) - 1, i + within)
        while onset < limit and rates[onset + 1] <= rates[onset] * 1.01:
            onset += 1
        if onset == limit:  # a smooth rise, no tick above 1 %: where it starts to rise at all
            onset = i
            while onset < limit and rates[onset + 1] <= rates[onset]:
                onset += 1
        found.append(onset)
        i = onset + 1
        while i + 1 < len(rates) and rates[i + 1] >= rates[i]:
            i += 1
    return found


def reactions(
    rates: list[float], ready: list[int], config: SimConfig, service: ServiceModel
) -> tuple[float, ...]:
    """Per step: seconds from its onset until, from the top of the rise on, the ready
    replicas reach 90 % of the need.

    The need at a tick is the replicas that hold a 95 % share of TTFAs under the SLO at
    that tick's load (`service.need`): one yardstick for every policy. A step never
    answered counts until the load falls to what the replicas carry, or the trace ends.
    """
    out = []
    within = max(1, round(config.step_within_s / config.tick_s))
    for onset in steps(rates, config):
        window = rates[onset : onset + within + 1]
        j = onset + window.index(max(window))  # the top of the rise
        while j < len(rates) and ready[j] < 0.9 * service.need(rates[j], config.slo_s):
            j += 1
        out.append((j - onset) * config.tick_s)
    return tuple(out)
