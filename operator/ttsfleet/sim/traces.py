"""Traffic traces: requests per second over time, built in or read from a CSV file.

A trace is a list of (t_s, requests_per_s) points, linearly interpolated between them.
The built-in ones are deterministic (seeded) and scaled by their peak:
- `diurnal`: 24 h, a day-shaped curve from 10 % of the peak at 04:00 to the peak at 16:00,
  with +-5 % seeded noise per minute;
- `spike`: 1 h, 500 req/s, then x10 within 30 s at 15 min, held 10 min, back within 30 s;
- `flash-crowd`: 1 h, 300 req/s, x13 within 10 s at 10 min, decaying back (tau 10 min);
- `ramp`: 2 h, linear from 200 to 5,000 req/s over an hour, held 30 min, down in 30 min;
- `<each>-noisy`: the same at 1 s resolution with jitter, short bursts, and an
  outage followed by a retry surge (`noisy`).
A CSV file has the header `t_s,requests_per_s` and one row per second or coarser.
"""

from __future__ import annotations

import bisect
import csv
import functools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HEADER = ("t_s", "requests_per_s")


class TraceError(ValueError):
    """A trace that cannot be read; the message names the problem and where."""


@dataclass(frozen=True)
class Trace:
    name: str
    points: tuple[tuple[float, float], ...]  # (t_s, requests_per_s), t strictly increasing
    # Read from traffic (a CSV file): the simulator replays it request by request (its
    # per-second noise is already in it; see `des`).
    per_request: bool = False

    @property
    def duration_s(self) -> float:
        return self.points[-1][0]

    @property
    def peak(self) -> float:
        return max(r for _, r in self.points)

    def rate(self, t: float) -> float:
        """Requests per second at t, linearly interpolated (held beyond the ends)."""
        times = [p[0] for p in self.points]
        return _interpolate(self.points, times, t)

    def sampled(self, tick_s: float) -> list[float]:
        """The rate at the middle of every tick from 0 to the end (fast, one pass)."""
        n = max(1, math.ceil(self.duration_s / tick_s))
        times = [p[0] for p in self.points]
        return [_interpolate(self.points, times, (i + 0.5) * tick_s) for i in range(n)]


def _interpolate(points: tuple[tuple[float, float], ...], times: list[float], t: float) -> float:
    if t <= times[0]:
        return points[0][1]
    if t >= times[-1]:
        return points[-1][1]
    i = bisect.bisect_right(times, t)
    (t0, r0), (t1, r1) = points[i - 1], points[i]
    return r0 + (r1 - r0) * (t - t0) / (t1 - t0)


def diurnal(peak: float = 4000.0, seed: int = 1) -> Trace:
    rng = random.Random(seed)  # noqa: S311 - a seeded model, not secrets
    points = []
    for minute in range(24 * 60 + 1):
        t = minute * 60.0
        shape = 0.5 - 0.5 * math.cos(2 * math.pi * (t - 4 * 3600) / 86400)  # 0 at 04:00
        noise = 1.0 + rng.uniform(-0.05, 0.05)
        points.append((t, peak * (0.1 + 0.9 * shape) * noise))
    return Trace("diurnal", tuple(points))


def spike(peak: float = 3000.0) -> Trace:
    base = peak / 10
    return Trace(
        "spike",
        ((0.0, base), (900.0, base), (930.0, peak), (1530.0, peak), (1560.0, base), (3600.0, base)),
    )


def flash_crowd(peak: float = 3000.0) -> Trace:
    base = peak / 13.33
    points = [(0.0, base), (600.0, base)]
    for s in range(10, 3001, 10):  # up within 10 s, then an exponential decay
        points.append((600.0 + s, base + (peak - base) * math.exp(-(s - 10) / 600)))
    return Trace("flash-crowd", tuple(points))


def ramp(peak: float = 3000.0) -> Trace:
    low = peak / 25
    return Trace("ramp", ((0.0, low), (3600.0, peak), (5400.0, peak), (7200.0, low)))


JITTER_SIGMA = 0.15  # per-second lognormal noise on the rate
BURSTS_PER_HOUR = 4
BURST_SECONDS = (10, 40)
BURST_RISE = (0.5, 1.5)  # +50 % to +150 % of the rate under it
OUTAGE_S = 60.0  # traffic stops (an upstream outage) ...
OUTAGE_LEFT = 0.05  # ... to this share of it ...
RETRY_S = 30.0  # ... and the requests it held back come back within this, on top


def noisy(base: Trace, seed: int = 11) -> Trace:
    """`base` at 1 s resolution with what real traffic adds, seeded: per-second jitter
    (lognormal, sigma JITTER_SIGMA, mean 1), short bursts (BURSTS_PER_HOUR on average,
    10-40 s, +50-150 %), and one short outage (OUTAGE_S at 5 % of the rate, in the
    middle third) followed by a retry surge that brings the held-back requests back
    within RETRY_S. Named `<base>-noisy`."""
    rng = random.Random(seed)  # noqa: S311 - a seeded model, not secrets
    n = max(2, math.ceil(base.duration_s))
    times = [p[0] for p in base.points]
    rates = [_interpolate(base.points, times, float(t)) for t in range(n + 1)]
    factor = [1.0] * len(rates)
    for _ in range(max(1, round(BURSTS_PER_HOUR * base.duration_s / 3600))):
        start, length = rng.randrange(len(rates)), rng.randint(*BURST_SECONDS)
        rise = rng.uniform(*BURST_RISE)
        for t in range(start, min(len(rates), start + length)):
            factor[t] += rise
    mu = -(JITTER_SIGMA**2) / 2  # E[lognormal] = 1
    out = [r * f * rng.lognormvariate(mu, JITTER_SIGMA) for r, f in zip(rates, factor, strict=True)]
    begin = rng.randrange(n // 3, 2 * n // 3)
    held = 0.0
    for t in range(begin, min(len(out), begin + round(OUTAGE_S))):
        held += out[t] * (1 - OUTAGE_LEFT)
        out[t] *= OUTAGE_LEFT
    after = begin + round(OUTAGE_S)
    for t in range(after, min(len(out), after + round(RETRY_S))):
        out[t] += held / RETRY_S
    return Trace(f"{base.name}-noisy", tuple((float(t), r) for t, r in enumerate(out)))


BASES: dict[str, Callable[[], Trace]] = {
    "diurnal": diurnal, "spike": spike, "flash-crowd": flash_crowd, "ramp": ramp,
}  # fmt: skip


def _noisy_of(make: Callable[[], Trace]) -> Trace:
    return noisy(make())


BUILTIN = BASES | {
    f"{name}-noisy": functools.partial(_noisy_of, make) for name, make in BASES.items()
}
# What each built-in trace tests: slow change (an autoscaler should track it as well as
# foresight would) or steps (only the transient can differ); a noisy variant as its base.
KINDS = {"diurnal": "slow", "ramp": "slow", "spike": "step", "flash-crowd": "step"}
KINDS |= {f"{name}-noisy": kind for name, kind in KINDS.items()}


def read_csv(path: Path) -> Trace:
    """A trace from a CSV file with the header `t_s,requests_per_s`."""
    try:
        text = path.read_text()
    except OSError as err:
        raise TraceError(f"cannot read trace {path}: {err.strerror}") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows or tuple(c.strip() for c in rows[0]) != HEADER:
        found = ",".join(rows[0]) if rows else "an empty file"
        raise TraceError(f"{path}: the header must be `{','.join(HEADER)}`, found `{found}`")
    points: list[tuple[float, float]] = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2:
            raise TraceError(f"{path} line {line}: expected 2 columns, found {len(row)}")
        try:
            t, r = float(row[0]), float(row[1])
        except ValueError:
            raise TraceError(f"{path} line {line}: not numbers: {','.join(row)}") from None
        if not (math.isfinite(t) and math.isfinite(r)) or r < 0:
            raise TraceError(f"{path} line {line}: requests_per_s must be finite and >= 0")
        if points and t <= points[-1][0]:
            raise TraceError(f"{path} line {line}: t_s must increase ({t} after {points[-1][0]})")
        points.append((t, r))
    if len(points) < 2:
        raise TraceError(f"{path}: needs at least 2 rows of `{','.join(HEADER)}`")
    if points[0][0] != 0:
        points.insert(0, (0.0, points[0][1]))
    return Trace(path.stem, tuple(points), per_request=True)


def load(name_or_path: str) -> Trace:
    """A built-in trace by name, or a CSV file; the error names the choices."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]()
    path = Path(name_or_path)
    if path.suffix.lower() == ".csv" or path.exists():
        return read_csv(path)
    raise TraceError(
        f"unknown trace {name_or_path!r}: use one of {', '.join(BUILTIN)} or a CSV file "
        f"with the header `{','.join(HEADER)}`"
    )
