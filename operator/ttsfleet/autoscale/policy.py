"""recommend(snapshot, policy, state, now): how many replicas a TTS fleet should have.

Pure: no I/O, no clock. Time comes in as `now` (seconds), so tests and the simulator
drive a synthetic clock. Every decision keeps its reason.

Signals, each turned into the replicas it asks for against the spec's targets:
- pending requests per replica (Triton's `nv_inference_pending_request_count`, plus
  the live streams the chunked engine holds before their first audio,
  `ttsfleet_waiting_streams`: its scheduler takes every request at once),
- queue time per request (rate of `nv_inference_queue_duration_us` over successes),
- time to first audio p95 (`ttsfleet_time_to_first_audio_seconds`),
- open streams (`ttsfleet_inflight_streams`), against `streamsPerReplica`.
The desired size is the largest of them. The proportional ones (queue time, TTFA)
scale from `Snapshot.serving_replicas` (the Ready replicas) when the caller gives it.

Knative-style windows: the stable window averages what the signals asked for over
the last `stable_window` seconds; the panic window looks at the last `panic_window`
seconds, and when that asks for `panic_threshold` times the current size or more,
the fleet scales up at once to what the newest reading asks for (no rate limit) and
does not scale down until the panic has been quiet for a stable window. Outside a
panic, a change within `tolerance` (10 %) of the current size is held as noise, and
a scale-up goes at most x2 per decision. Down: by `max_scale_down_step` or
`max_scale_down_fraction` of the fleet, whichever is more, after a scale-down delay
(the largest stable-window recommendation of the last `scale_down_delay` seconds
wins, so a dip does not cut streams); then min/max and floors (scheduled,
predicted). With no metrics it holds the current size and says so: it never scales
down because it cannot see.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import NamedTuple


@dataclass(frozen=True)
class Snapshot:
    """What Prometheus said about one fleet at one time (None: not measured)."""

    ready_replicas: int
    pending_requests: float | None = None
    queue_seconds_per_request: float | None = None
    ttfa_p95_seconds: float | None = None
    open_streams: float | None = None
    # Requests completed per second (rate of nv_inference_request_success): with the
    # change of requests in the fleet, the arrival rate.
    completed_per_second: float | None = None
    # Ready replicas behind the measurements (None: ready_replicas). The proportional
    # signals (queue time, TTFA) scale from these: replicas still starting have not
    # changed the measurements yet, and counting them compounds every scale-up.
    serving_replicas: int | None = None

    @property
    def serving(self) -> int:
        """The replicas behind the measurements (`serving_replicas`, else the Ready ones)."""
        return self.ready_replicas if self.serving_replicas is None else self.serving_replicas

    @property
    def has_metrics(self) -> bool:
        return any(
            v is not None
            for v in (
                self.pending_requests,
                self.queue_seconds_per_request,
                self.ttfa_p95_seconds,
                self.open_streams,
            )
        )


@dataclass(frozen=True)
class Policy:
    min_replicas: int = 1
    max_replicas: int = 8
    queue_depth_per_replica: float = 4.0
    queue_seconds_target: float = 0.1
    ttfa_target_seconds: float = 0.3
    streams_per_replica: int = 16
    stable_window: float = 60.0
    panic_window: float = 6.0
    panic_threshold: float = 2.0
    max_scale_up_rate: float = 2.0  # outside a panic, at most x2 per decision (and +1)
    max_scale_down_step: int = 1  # replicas removed per decision, at most (see the next)
    max_scale_down_fraction: float = 0.05  # or this share of the fleet, when that is more
    scale_down_delay: float = 120.0
    tolerance: float = 0.1  # outside panic, hold while within 10 % of the current size
    rate_learning: float = 0.2  # weight of a new reading of the rate a replica carries
    # Reversals (a move against the last one) are where flaps come from (two turns
    # within `reversal_window`): see `_reversal`. 0 turns that guard off.
    reversal_window: float = 600.0  # a move down against a rise waits this long after a turn
    # A move up against a descent needs the fleet short this long (the operator: 3/4 of
    # the stable window).
    short_seconds: float = 45.0
    step_ratio: float = 4.0  # ... or a step: asking for this many times the fleet at once
    lull_share: float = 0.25  # arrivals below this share of the stable ask: a lull (outage)
    # The trend: the stable ask's slope over `trend_window` (readings every `trend_every`
    # seconds). On a rise the size is what the trend asks for `lead_seconds` ahead (the
    # stable window's mean lags by half of it, a new replica takes its cold start); on a
    # fall the scale-down delay holds what it held, less the fall over the delay.
    trend_window: float = 600.0
    trend_every: float = 30.0
    lead_seconds: float = 60.0
    floor: int = 0  # scheduled or predicted floor, computed by the caller
    floor_reason: str = ""  # why that floor (named in the decision when it binds)


@dataclass(frozen=True)
class State:
    """What recommend() remembers between calls (returned anew, never mutated)."""

    observations: tuple[tuple[float, float], ...] = ()  # (time, replicas the signals asked for)
    recommendations: tuple[tuple[float, int], ...] = ()  # (time, what the signals asked, bounded)
    panic_until: float | None = None
    in_system: tuple[tuple[float, float], ...] = ()  # (time, requests queued + streaming)
    # Requests per second one replica carries at the targets, learned outside panics.
    replica_rate: float | None = None
    direction: int = 0  # of the last change recommended: +1 up, -1 down, 0 none yet
    turned_at: float | None = None  # when the last change against the one before it came
    short_since: float | None = None  # over the targets with the queue growing since then
    short_from: float = 0.0  # requests in the fleet (queued and streaming) at short_since
    wanting_since: float | None = None  # asking for more than the fleet since then
    trend: tuple[tuple[float, float], ...] = ()  # (time, stable ask), every trend_every
    lull_at: float | None = None  # when arrivals were last far below the stable ask in a lull
    steady_since: float | None = None  # arrivals not far below the stable ask since then


@dataclass(frozen=True)
class Recommendation:
    replicas: int
    reason: str
    signals: dict[str, float] = field(default_factory=dict)
    panic: bool = False
    state: State = field(default_factory=State)


def signal_replicas(snapshot: Snapshot, policy: Policy) -> dict[str, float]:
    """Replicas each signal asks for (fractional), from the metrics present."""
    serving = snapshot.serving
    current = max(serving, 1)
    asks: dict[str, float] = {}
    if snapshot.pending_requests is not None:
        asks["queue_depth"] = snapshot.pending_requests / policy.queue_depth_per_replica
    if snapshot.queue_seconds_per_request is not None:
        asks["queue_time"] = (
            current * snapshot.queue_seconds_per_request / policy.queue_seconds_target
        )
    if snapshot.ttfa_p95_seconds is not None:
        asks["ttfa_p95"] = current * snapshot.ttfa_p95_seconds / policy.ttfa_target_seconds
    if snapshot.open_streams is not None:
        asks["open_streams"] = snapshot.open_streams / policy.streams_per_replica
    return asks


def _mean_since(samples: tuple[tuple[float, float], ...], since: float) -> float | None:
    recent = [v for t, v in samples if t >= since]
    return sum(recent) / len(recent) if recent else None


def _within_tolerance(desired: int, current: int, lowest: int, policy: Policy) -> bool:
    """A change of at most `tolerance` of a size that is within the bounds."""
    in_bounds = lowest <= current <= policy.max_replicas
    return in_bounds and 0 < abs(desired - current) <= policy.tolerance * current


def _hold_without_metrics(current: int, policy: Policy, state: State) -> Recommendation:
    """Blind: keep the size (never down), or lift it to a floor, which needs no metrics."""
    held = min(max(current, policy.min_replicas, policy.floor), policy.max_replicas)
    lifted = policy.floor > max(current, policy.min_replicas)
    why = policy.floor_reason or f"floor {held}" if lifted else f"holding {held} replicas"
    return Recommendation(
        held, f"metrics unavailable: {why} (never scaling down blind)", state=state
    )


# The share of its saturated rate a replica is sized for once the fleet was seen
# saturated: below it, most balancers' queues stay short (p2c's need at the SLO is 0.88).
SATURATED_SHARE = 0.8
# A replica's rate is learned while the signals ask for this share of the replicas
# serving: at or near the targets. Below them a latency says little about the rate at
# the target (behind a power-of-two-choices balancer it stays flat, then turns steep):
# learned from 0.7, the rate rose while the fleet ran well under its targets, the fleet
# was cut, and came back up a minute later (4 flaps an hour on diurnal behind p2c).
LEARN_BAND = (0.9, 1.3)
RATE_WINDOW = 10.0  # seconds over which arrivals are read (autoscale/metrics.py WINDOW)


def arrival_rate(
    snapshot: Snapshot, history: tuple[tuple[float, float], ...], now: float
) -> tuple[float | None, tuple[tuple[float, float], ...]]:
    """Requests arriving per second (completions plus the growth of the requests in the
    fleet over RATE_WINDOW), and the history of requests in the fleet to keep."""
    parts = (snapshot.pending_requests, snapshot.open_streams)
    if snapshot.completed_per_second is None or all(v is None for v in parts):
        return None, ()
    inside = sum(v for v in parts if v is not None)
    kept = (*((t, v) for t, v in history if t >= now - RATE_WINDOW), (now, inside))
    t0, v0 = kept[0]
    growth = (inside - v0) / (now - t0) if now > t0 else 0.0
    return max(0.0, snapshot.completed_per_second + growth), kept


class Asks(NamedTuple):
    asks: dict[str, float]  # what each driver asks for
    reported: dict[str, float]  # what every signal asks for (in the status)
    in_system: tuple[tuple[float, float], ...]  # requests in the fleet, to keep
    replica_rate: float | None  # the rate a replica carries at the targets
    short_since: float | None  # since when the fleet is over its targets, queue growing
    short_from: float  # requests in the fleet then


def _replica_rate(
    snapshot: Snapshot,
    policy: Policy,
    state: State,
    now: float,
    arrivals: float | None,
    measured: float,
    serving: int,
) -> tuple[float | None, float | None, float]:
    """The rate a replica carries at the targets, since when the fleet has been short
    (over its targets, its queue never back below where it was then), and that queue."""
    calm = state.panic_until is None or now >= state.panic_until
    replica_rate = state.replica_rate
    # Learned while the fleet is near its targets (what the signals ask for within 30 %
    # of the replicas serving).
    if calm and arrivals and serving > 0 and LEARN_BAND[0] <= measured / serving <= LEARN_BAND[1]:
        seen = arrivals / measured
        replica_rate = (
            seen
            if replica_rate is None
            else (replica_rate + policy.rate_learning * (seen - replica_rate))
        )
    completed = snapshot.completed_per_second
    inside = sum(v for v in (snapshot.pending_requests, snapshot.open_streams) if v is not None)
    over = bool(calm and completed and arrivals and serving > 0
                and measured > (1 + policy.tolerance) * serving)  # fmt: skip
    short_since = None
    if over and state.short_since is not None and inside >= state.short_from:
        short_since = state.short_since  # still over, and the queue not below where it was
    elif over and arrivals is not None and completed is not None and arrivals > completed:
        short_since = now  # over the targets with the queue growing: it may be short
    if replica_rate and completed and short_since is not None:  # noqa: SIM102
        if now - short_since >= policy.stable_window:
            # Over the targets with the queue growing for a whole stable window (not a
            # burst's backlog), the replicas are saturated: at its targets a replica
            # carries less than it completes now. A rate learned above that (a latency
            # read as if it grew in proportion to the load: flat, then a cliff) would
            # size the fleet at or past saturation for good.
            replica_rate = min(replica_rate, SATURATED_SHARE * completed / serving)
    return replica_rate, short_since, inside if short_since == now else state.short_from


def _asks(snapshot: Snapshot, policy: Policy, state: State, now: float) -> Asks:
    """What each driver asks for, what every signal asks for (reported), the
    requests-in-the-fleet history and the rate a replica carries (see `recommend`)."""
    asks = signal_replicas(snapshot, policy)
    reported = dict(asks)
    arrivals, in_system = arrival_rate(snapshot, state.in_system, now)
    serving = snapshot.serving
    replica_rate, short_since, short_from = _replica_rate(
        snapshot, policy, state, now, arrivals, max(asks.values()), serving
    )
    if replica_rate and arrivals is not None:
        # Arrivals drive the size once a replica's rate is known: the time signals read
        # the queue's delay, which grows without bound while the fleet is short, and
        # the queue's length asks for a replica per few queued requests; the arrivals
        # (the queue's growth counted in them) grow only with the load. Open streams stay:
        # streamsPerReplica is what a replica must hold.
        reported["arrivals"] = arrivals / replica_rate
        asks = {"arrivals": arrivals / replica_rate} | (
            {"open_streams": asks["open_streams"]} if "open_streams" in asks else {}
        )
    return Asks(asks, reported, in_system, replica_rate, short_since, short_from)


def _trend(trend: tuple[tuple[float, float], ...]) -> float:
    """The stable ask's slope (replicas per second): the median of the slopes between
    neighbouring readings. A rise moves every one of them; a step or a burst moves one
    or two, which the median leaves out (slopes between every two readings, Theil-Sen,
    read a step in the middle of the window as a rise). 0 before MIN_TREND readings."""
    if len(trend) < MIN_TREND:
        return 0.0
    slopes = sorted((v1 - v0) / (t1 - t0) for (t0, v0), (t1, v1) in itertools.pairwise(trend))
    return slopes[len(slopes) // 2]


def _readings(
    trend: tuple[tuple[float, float], ...], stable: float, policy: Policy, now: float
) -> tuple[tuple[float, float], ...]:
    """The trend's readings of the stable ask: one every `trend_every` seconds, those of
    the last `trend_window` kept."""
    if trend and now - trend[-1][0] < policy.trend_every:
        return trend
    return (*((t, v) for t, v in trend if t >= now - policy.trend_window), (now, stable))


MIN_TREND = 10  # readings: a step, smeared by the stable window, moves two or three


@dataclass(frozen=True)
class _Urgency:
    """Why capacity may go up against a descent at once."""

    streams: bool  # open streams over streamsPerReplica
    saturated: bool  # over the targets with the queue growing for a stable window
    short_for: float  # seconds the signals have asked for more than the fleet


def _reversal(
    desired: int, current: int, why: str, urgency: _Urgency, lull: bool, policy: Policy,
    state: State, now: float,
) -> tuple[int, str]:  # fmt: skip
    """Hold a move that would turn the fleet back soon after a turn, or on noise.

    Two turns within `reversal_window` are a flap. A move *up* against a descent costs
    misses when held, so it is held only while it may be a burst (bursts last seconds
    to tens of seconds; a replica takes `cold_start` to help): it goes once the fleet
    has been short for `short_seconds`, at once for a step (`step_ratio` times the
    fleet) or for streams over capacity or a saturated fleet. A move *down* against a
    rise costs only replica-hours when held: it waits until `reversal_window` after the
    last turn. During a lull (arrivals far below the stable ask: an outage upstream)
    and the scale-down delay after it, nothing goes down: the traffic comes back, with its
    retries on top."""
    guarded = policy.reversal_window > 0
    if desired > current and state.direction < 0 and guarded:
        urgent = (
            urgency.streams or urgency.saturated or urgency.short_for >= policy.short_seconds
            or desired >= policy.step_ratio * current
        )  # fmt: skip
        if not urgent:
            return current, why + (
                f"; holding {current}: against the descent, short for "
                f"{urgency.short_for:.0f}s of {policy.short_seconds:.0f}s (a burst?)"
            )
    if desired < current and lull:
        return current, why + f"; holding {current}: arrivals fell away (an outage?)"
    recent = state.turned_at is not None and now - state.turned_at < policy.reversal_window
    if desired < current and state.direction > 0 and recent and guarded:
        return current, why + (
            f"; holding {current}: within {policy.reversal_window:.0f}s of the last turn"
        )
    return desired, why


def _lull(
    fell_away: bool, policy: Policy, state: State, now: float
) -> tuple[float | None, float | None]:
    """When arrivals last fell away in a lull, and since when they have not fallen away.

    A lull (an upstream outage) begins where arrivals fall far below the stable ask
    after a stable window without that, and goes on while they stay down. Traffic that
    comes in bursts with gaps between them falls away every few seconds: that is its
    shape, not an outage, and a lull that began there and never ended held whatever
    fleet it found (a burst's panic, for half an hour on a production trace)."""
    if not fell_away:
        return state.lull_at, now if state.steady_since is None else state.steady_since
    going_on = state.lull_at is not None and now - state.lull_at < policy.scale_down_delay
    steady = state.steady_since is not None and now - state.steady_since >= policy.stable_window
    return (now if going_on or steady else state.lull_at), None


def _stable_size(driver: str, stable: float, slope: float, policy: Policy) -> tuple[int, str]:
    """What the stable window asks for, ahead along a rise by `lead_seconds`."""
    why = f"{driver} asks for {stable:.1f} replicas over the last {policy.stable_window:.0f}s"
    if slope <= 0:
        return math.ceil(stable), why
    desired = math.ceil(stable + slope * policy.lead_seconds)
    return desired, why + (
        f", rising {slope * 60:.1f} a minute: {desired} in {policy.lead_seconds:.0f}s"
    )


def _panic_size(
    asked: float, driver: str, panicking_now: float, lull: bool, policy: Policy,
    current: int, serving: int, held: list[int],
) -> tuple[int, str]:  # fmt: skip
    """What a panic asks for. From the newest reading: the window's mean still holds the
    readings from before the step, and every second short of capacity adds to the
    backlog. `held`: what the stable window asked over the scale-down delay."""
    desired = max(math.ceil(asked), current)
    why = (
        f"panic: {driver} asks for {asked:.1f} replicas "
        f"({panicking_now:.1f} over the last {policy.panic_window:.0f}s)"
    )
    if driver in ("queue_time", "ttfa_p95"):
        # No replica rate learned yet: a time signal is no measure of the load (it
        # explodes under backlog), so it asks for at most panic_threshold squared
        # times the replicas serving (the ones its readings come from: a panic each
        # decision must not compound while the new ones start).
        cap = max(current, serving + 1, math.ceil(serving * policy.panic_threshold**2))
        if desired > cap:
            desired, why = cap, why + f"; at most {cap} until a replica's rate is known"
    if lull and held:
        # A retry surge drains requests held back by an outage: not a new rate.
        cap = max(current, math.ceil(max(held) * (1 + policy.tolerance)))
        if desired > cap:
            desired, why = cap, why + f"; after a lull, sized as before it: {cap}"
    return desired, why


def _scale_down_delay(
    desired: int, current: int, slope: float, why: str, policy: Policy, held: list[int]
) -> tuple[int, str]:
    """While anything in the last delay seconds (`held`) asked for more, keep it (on a
    fall, less the fall over the delay: the delay is against dips, not the trend)."""
    if desired < current and held and max(held) > desired:
        keep = min(max(held), current)
        if slope < 0:
            keep = max(desired, min(keep, math.ceil(max(held) + slope * policy.scale_down_delay)))
        desired = keep
        why += f"; holding {keep} for the {policy.scale_down_delay:.0f}s scale-down delay"
    return desired, why


def _not_below_trend(
    desired: int, current: int, stable: float, slope: float, why: str, policy: Policy
) -> tuple[int, str]:
    """Never down below where a rise goes within the reversal window: it goes on after a
    burst's overshoot is trimmed, and going back up that soon would be a flap."""
    if desired < current and slope > 0:
        projected = min(math.ceil(stable + slope * policy.reversal_window), current)
        if projected > desired:
            desired = projected
            why += f"; rising {slope * 60:.1f} replicas a minute: not below {projected}"
    return desired, why


def _rate_limited(
    desired: int, current: int, panic: bool, why: str, policy: Policy
) -> tuple[int, str]:
    """Rate limits (none up in a panic, as Knative's default 1000x), and maxReplicas."""
    if desired > current and not panic:
        ceiling = max(current + 1, math.ceil(current * policy.max_scale_up_rate))
        if desired > ceiling:
            desired, why = ceiling, why + f"; scale-up limited to {ceiling}"
    elif desired < current:
        step = max(policy.max_scale_down_step, math.floor(current * policy.max_scale_down_fraction))
        step_floor = current - step
        if desired < step_floor:
            desired, why = step_floor, why + f"; scale-down limited to {step_floor}"
    return min(desired, policy.max_replicas), why


def _turn(state: State, desired: int, current: int, now: float) -> tuple[int, float | None]:
    """The direction to remember and the time of the last turn, after this decision."""
    move = (desired > current) - (desired < current)
    if move and state.direction and move != state.direction:
        return move, now
    return move or state.direction, state.turned_at


def recommend(snapshot: Snapshot, policy: Policy, state: State, now: float) -> Recommendation:
    """The replicas the fleet should have now, and why."""
    current = snapshot.ready_replicas
    if not snapshot.has_metrics:
        return _hold_without_metrics(current, policy, state)
    asks, reported, in_system, replica_rate, short_since, short_from = _asks(
        snapshot, policy, state, now
    )
    driver, asked = max(asks.items(), key=lambda kv: kv[1])
    keep = now - max(policy.stable_window, policy.scale_down_delay)
    observations = (*((t, v) for t, v in state.observations if t >= keep), (now, asked))
    stable = _mean_since(observations, now - policy.stable_window) or asked
    panicking_now = _mean_since(observations, now - policy.panic_window) or asked
    trend = _readings(state.trend, stable, policy, now)
    slope = _trend(trend)
    panic_until = state.panic_until
    fell_away = "arrivals" in asks and asks["arrivals"] < policy.lull_share * stable
    lull_at, steady_since = _lull(fell_away, policy, state, now)
    lull = lull_at is not None and now - lull_at < policy.scale_down_delay
    if current > 0 and panicking_now >= policy.panic_threshold * current:
        panic_until = now + policy.stable_window
    panic = panic_until is not None and now < panic_until
    recent = tuple((t, r) for t, r in state.recommendations if t >= now - policy.scale_down_delay)
    held = [r for _, r in recent]

    if panic:
        desired, why = _panic_size(
            asked, driver, panicking_now, lull, policy, current, snapshot.serving, held
        )
    else:
        desired, why = _stable_size(driver, stable, slope, policy)

    # Bounds and floors on what the signals ask for: this is what is remembered.
    lowest = max(policy.min_replicas, policy.floor)
    if desired < lowest:
        desired = lowest
        named = policy.floor_reason or f"floor {lowest}"
        why += f"; {named}" if policy.floor > policy.min_replicas else f"; minReplicas {lowest}"
    if desired > policy.max_replicas:
        desired = policy.max_replicas
        why += f"; maxReplicas {policy.max_replicas}"
    # Remembered for the scale-down delay: the stable window's ask, not a panic's, so a
    # panic's overshoot (sized while a backlog drains) is not held for the whole delay.
    raw = min(max(math.ceil(stable), lowest), policy.max_replicas)

    # Tolerance: a change within it is noise, not a need (HPA's 10 % band).
    # Not for open streams above capacity: streamsPerReplica is what a replica must hold.
    short_of_streams = driver == "open_streams" and desired > current
    if not panic and not short_of_streams and _within_tolerance(desired, current, lowest, policy):
        why += f"; within {policy.tolerance:.0%} of {current}: holding"
        desired = current

    desired, why = _scale_down_delay(desired, current, slope, why, policy, held)
    desired, why = _not_below_trend(desired, current, stable, slope, why, policy)
    wanting = asked > (1 + policy.tolerance) * current
    wanting_since = (state.wanting_since or now) if wanting else None
    saturated = short_since is not None and now - short_since >= policy.stable_window
    urgency = _Urgency(
        short_of_streams, saturated, 0.0 if wanting_since is None else now - wanting_since
    )
    desired, why = _reversal(desired, current, why, urgency, lull, policy, state, now)

    desired, why = _rate_limited(desired, current, panic, why, policy)

    recommendations = (*recent, (now, raw))
    direction, turned_at = _turn(state, desired, current, now)
    new_state = replace(
        state, observations=observations, recommendations=recommendations,
        panic_until=panic_until, in_system=in_system, replica_rate=replica_rate,
        direction=direction, turned_at=turned_at, short_since=short_since,
        short_from=short_from, wanting_since=wanting_since, trend=trend, lull_at=lull_at,
        steady_since=steady_since,
    )  # fmt: skip
    signals = {k: round(v, 3) for k, v in reported.items()}
    return Recommendation(desired, why, signals, panic, new_state)
