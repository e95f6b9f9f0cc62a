"""Which replica gets a request: power-of-two choices on outstanding work. Pure.

Each replica's outstanding work is what the gateway has sent it and not yet had back:
queued characters of text (a long paragraph weighs more than "Hello"), with open
streams as the tie-break. `choose` samples two distinct usable replicas and takes the
one with less outstanding work (Mitzenmacher's power of two choices, Envoy's
`least_request`): near the best of a full scan, with no herd on one replica when many
gateways decide at once on stale counts.

Session affinity: a request with a session key goes to the replica that rendezvous
hashing gives that key (the same replica while the fleet is the same; only the
sessions of a replica that leaves move), unless that replica has more than
`affinity_slack` x the mean outstanding work plus one request's worth: then it is
treated as a request without a session (bounded-load consistent hashing), so a hot
session cannot sink a replica.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Load:
    """What the gateway has outstanding at one replica."""

    characters: int = 0
    streams: int = 0


IDLE = Load()


def _key(load: Load) -> tuple[int, int]:
    return (load.characters, load.streams)


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
    return min(first, second, key=lambda c: _key(load.get(c, IDLE)))


def _weight(session: str, replica: str) -> int:
    """Rendezvous (highest random weight) hashing: stable, and only the sessions of a
    replica that leaves move when the fleet changes."""
    digest = hashlib.blake2b(f"{session}\0{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def round_robin(candidates: Sequence[str], counter: int) -> str | None:
    """The baseline `choose` is measured against: the `counter`-th replica in turn."""
    return candidates[counter % len(candidates)] if candidates else None
