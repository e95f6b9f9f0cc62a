"""Which replica gets a request: power-of-two choices on outstanding work. Pure.

Each replica's outstanding work is what the gateway has sent it and not yet had back:
queued characters of text (a long paragraph weighs more than "Hello"), this request's
included, weighed by how fast that replica has lately been (its peak-EWMA time to
first audio, as Finagle's and Linkerd's balancers weigh open requests by latency), so
that a replica on a slow or sick node costs more per character; open streams break
ties. A replica not yet measured counts at the mean of those measured. `choose` samples two
distinct usable replicas and takes the one with less outstanding work (Mitzenmacher's
power of two choices, Envoy's `least_request`): near the best of a full scan, with no
herd on one replica when many gateways decide at once on stale counts.

Session affinity: a request with a session key goes to the replica that rendezvous
hashing gives that key (the same replica while the fleet is the same; only the
sessions of a replica that leaves move), unless that replica has more than
`affinity_slack` x the mean outstanding work plus one request's worth: then it is
treated as a request without a session (bounded-load consistent hashing), so a hot
session cannot sink a replica.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Load:
    """What the gateway has outstanding at one replica, and how fast it has been."""

    characters: int = 0
    streams: int = 0
    latency: float = 0.0  # seconds: recent time to first audio (peak EWMA); 0: unknown


IDLE = Load()


def _costs(
    pool: Sequence[str], load: Mapping[str, Load], request_characters: int
) -> dict[str, tuple[float, int]]:
    known = [entry.latency for entry in load.values() if entry.latency > 0]
    default = sum(known) / len(known) if known else 1.0
    costs = {}
    for candidate in pool:
        here = load.get(candidate, IDLE)
        latency = here.latency if here.latency > 0 else default
        costs[candidate] = (latency * (here.characters + max(request_characters, 1)), here.streams)
    return costs


def peak_ewma(current: float, sample: float, elapsed: float, decay_seconds: float) -> float:
    """A latency estimate that jumps up to a slower sample at once and comes down to
    faster ones over `decay_seconds` (Finagle's peak EWMA): a replica that slows down
    is avoided at its first slow answer, and trusted again only as it proves fast."""
    if current <= 0 or sample >= current:
        return sample
    weight = math.exp(-max(elapsed, 0.0) / decay_seconds)
    return current * weight + sample * (1 - weight)


def choose(
    candidates: Sequence[str],
    load: Mapping[str, Load],
    rng: random.Random,
    *,
    session: str | None = None,
    exclude: frozenset[str] = frozenset(),
    affinity_slack: float = 1.25,
    request_characters: int = 0,
) -> str | None:
    """The replica for one request, among `candidates` (usable: not ejected) minus
    `exclude` (e.g. the one a retried request already failed on); None if none."""
    pool = [c for c in candidates if c not in exclude]
    if not pool:
        return None
    if session is not None:
        home = max(pool, key=lambda c: _weight(session, c))
        mean = sum(load.get(c, IDLE).characters for c in pool) / len(pool)
        bound = affinity_slack * mean + max(request_characters, 1)
        if load.get(home, IDLE).characters <= bound:
            return home
    if len(pool) == 1:
        return pool[0]
    first, second = rng.sample(pool, 2)
    costs = _costs(pool, load, request_characters)
    return min(first, second, key=costs.__getitem__)


def _weight(session: str, replica: str) -> int:
    """Rendezvous (highest random weight) hashing: stable, and only the sessions of a
    replica that leaves move when the fleet changes."""
    digest = hashlib.blake2b(f"{session}\0{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def round_robin(candidates: Sequence[str], counter: int) -> str | None:
    """The baseline `choose` is measured against: the `counter`-th replica in turn."""
    return candidates[counter % len(candidates)] if candidates else None
