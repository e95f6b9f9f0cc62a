"""A trace for `ttsfleet sim` from recorded arrivals: one request a row, with its time.

    python hack/arrivals_trace.py ARRIVALS.csv --scale 200 [--bucket 1] > trace.csv
    ttsfleet sim --trace trace.csv

Production arrival logs (for example the Azure LLM inference traces, a request a row
with a `TIMESTAMP` column) are far below a TTS fleet's scale; `--scale` multiplies the
rate of each `--bucket` seconds, keeping the shape: the gaps, the bursts. The simulator
replays the result as seeded Poisson arrivals on that rate. Times are ISO 8601
(fractions of a second beyond microseconds are dropped) or seconds.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path


def seconds(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        whole, _, fraction = value.strip().partition(".")
        return datetime.fromisoformat(f"{whole}.{fraction[:6]}" if fraction else whole).timestamp()


def trace(times: list[float], scale: float, bucket: float) -> list[tuple[float, float]]:
    """(start of each bucket, requests a second in it x scale), empty buckets included."""
    start = min(times)
    counts = Counter(int((t - start) // bucket) for t in times)
    return [(i * bucket, counts.get(i, 0) * scale / bucket) for i in range(max(counts) + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arrivals", type=Path)
    parser.add_argument("--column", default="TIMESTAMP", help="the column holding each time")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--bucket", type=float, default=1.0, help="seconds a row of the trace")
    args = parser.parse_args()
    with args.arrivals.open(newline="") as f:
        rows = csv.DictReader(f)
        if rows.fieldnames is None or args.column not in rows.fieldnames:
            sys.exit(f"{args.arrivals}: no column {args.column!r} (--column names it)")
        times = [seconds(row[args.column]) for row in rows]
    if not times:
        sys.exit(f"{args.arrivals}: no arrivals")
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(["t_s", "requests_per_s"])
    for t, rate in trace(times, args.scale, args.bucket):
        out.writerow([f"{t:g}", f"{rate:g}"])


if __name__ == "__main__":
    main()
