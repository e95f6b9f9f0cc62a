"""Traffic traces: requests per second over time, built in or read from a CSV file.

A trace is a list of (t_s, requests_per_s) points, linearly interpolated between them.
The built-in ones are deterministic (seeded) and scaled by their peak:
- `diurnal`: 24 h, a day-shaped curve from 10 % of the peak at 04:00 to the peak at 16:00,
  with +-5 % seeded noise per minute;
- `spike`: 1 h, 500 req/s, then x10 within 30 s at 15 min, held 10 min, back within 30 s;
- `flash-crowd`: 1 h, 300 req/s, x13 within 10 s at 10 min, decaying back (tau 10 min);
- `ramp`: 2 h, linear from 200 to 5,000 req/s over an hour, held 30 min, down in 30 min.
A CSV file has the header `t_s,requests_per_s` and one row per second or coarser.
"""

from __future__ import annotations

import bisect
import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path

HEADER = ("t_s", "requests_per_s")


class TraceError(ValueError):
    """A trace that cannot be read; the message names the problem and where."""


@dataclass(frozen=True)
class Trace:
    name: str
    points: tuple[tuple[float, float], ...]  # (t_s, requests_per_s), t strictly increasing

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


BUILTIN = {"diurnal": diurnal, "spike": spike, "flash-crowd": flash_crowd, "ramp": ramp}


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
    return Trace(path.stem, tuple(points))


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
