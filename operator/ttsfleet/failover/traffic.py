"""Where a client region's requests go, and how much capacity each region holds for others.

Envoy (one per client region) gets one priority level per live region, nearest first
for that client region; standby regions come after every active one. A region that is
Down or Stabilising is left out; a Ramping region that is the nearest live one shares
level 0 with the nearest region at 100 %, weighted by its step. Envoy's outlier
detection and `previous_priorities` retries react within requests; these levels are
what holds once the quorum has spoken.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ttsfleet.autoscale.floors import Floor

Level = list[tuple[str, int]]  # (region, locality weight) in one priority level


def priorities(order: Sequence[str], percent: Mapping[str, int],
               standby: frozenset[str] = frozenset()) -> list[Level]:  # fmt: skip
    """Priority levels for one client region.

    `order` lists the regions nearest first for that client region (its own first);
    `percent` is each region's share of its own traffic (0: out, see `Failback.percent`).
    """
    ranked = [r for r in order if r not in standby] + [r for r in order if r in standby]
    live = [r for r in ranked if percent.get(r, 0) > 0]
    full = [r for r in live if percent[r] >= 100]
    if not live:
        return []
    first = live[0]
    if percent[first] < 100 and full:
        back = full[0]
        head: Level = [(first, percent[first]), (back, 100 - percent[first])]
        return [head, *([(r, 100)] for r in live if r not in (first, back))]
    return [[(r, 100)] for r in live]


def published_weights(weights: Mapping[str, int], percent: Mapping[str, int],
                      standby: frozenset[str] = frozenset()) -> dict[str, int]:  # fmt: skip
    """Weights for global DNS (external-dns `DNSEndpoint`) and Gateway API backends.

    Each live active region keeps its weight scaled by its share; a standby region gets
    weight only while no active region is live. Every region is listed (0: out).
    """
    actives = [r for r in weights if r not in standby and percent.get(r, 0) > 0]
    out: dict[str, int] = {}
    for region, weight in weights.items():
        share = percent.get(region, 0)
        if region in standby and actives:
            share = 0
        out[region] = math.ceil(weight * share / 100) if share else 0
    return out


def reserve(own: float, peers: Mapping[str, float], share: float = 1.0) -> float:
    """The load a region provisions for in steady state (static stability).

    Its own load plus its part of the largest peer's, were that peer lost and its load
    split evenly over the other survivors: with N equal regions, `own * N / (N-1)`.
    `share` scales the reserve (0: none, 1: the full N/(N-1)).
    """
    if not peers or share <= 0:
        return own
    return own + share * max(peers.values()) / len(peers)


def takeover(lost: float, survivors: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """Split a lost region's last known load over survivors, by their free capacity.

    `survivors` maps region -> (capacity, load) in the same unit (streams). A survivor
    takes lost * free / total free; what no free capacity covers is split by capacity.
    """
    free = {r: max(cap - load, 0.0) for r, (cap, load) in survivors.items()}
    total_free = sum(free.values())
    if total_free >= lost and total_free > 0:
        return {r: lost * f / total_free for r, f in free.items()}
    rest = lost - total_free
    total_cap = sum(cap for cap, _ in survivors.values())
    if total_cap <= 0:
        even = rest / len(survivors) if survivors else 0.0
        return {r: free[r] + even for r in survivors}
    return {r: free[r] + rest * cap / total_cap for r, (cap, _) in survivors.items()}


@dataclass(frozen=True)
class Needs:
    """What a region must carry, in streams: its own load, the reserve for a peer's
    loss (static stability, at share 1, from every region's last known load), and the
    lost peers' load it takes on now."""

    region: str
    own: float = 0.0
    reserve: float = 0.0
    takeover: float = 0.0
    lost: tuple[str, ...] = ()


def needs(here: str, view: Sequence[Mapping[str, Any]]) -> Needs:
    """`here`'s needs from a region agent's view (`status.regions`: each region's
    `trafficPercent` and last known `streams`). A region at 0 % is lost; its last known
    load is split over the survivors by free capacity, each provisioned N/(N-1)."""
    load = {str(r["name"]): float(r.get("streams") or 0.0) for r in view}
    lost = tuple(str(r["name"]) for r in view if int(r.get("trafficPercent", 100)) == 0)
    alive = [r for r in load if r not in lost]
    if here not in alive:
        return Needs(here, load.get(here, 0.0), lost=lost)

    def provisioned(region: str) -> float:  # steady state: every peer counts, lost or not
        return reserve(load[region], {p: load[p] for p in load if p != region})

    extra = provisioned(here) - load[here]
    taken = 0.0
    if lost:
        survivors = {r: (provisioned(r), load[r]) for r in alive}
        taken = takeover(sum(load[r] for r in lost), survivors)[here]
    return Needs(here, load[here], extra, taken, lost)


def fleet_parts(streams: Mapping[Any, float]) -> dict[Any, float]:
    """Each fleet's part of its region's load: its share of the open streams of the
    fleets behind the region's gateway (even while they are all idle)."""
    total = sum(streams.values())
    if total <= 0:
        return {k: 1.0 / len(streams) for k in streams}
    return {k: v / total for k, v in streams.items()}


def fleet_floor(needs: Needs, share: float, part: float, streams_per_replica: int) -> Floor:
    """A fleet's floor from its region's needs: its `part` (`fleet_parts`) of its
    region's own load plus the larger of its reserve share and what the region takes
    over now. The reserve held in steady state is what absorbs a loss: with equal
    regions a takeover needs no replica more than were there."""
    total = part * (needs.own + max(share * needs.reserve, needs.takeover))
    if needs.lost and needs.takeover > 0:
        reason = f"region {needs.region} takes over from {', '.join(needs.lost)}"
    elif share > 0 and needs.reserve > 0:
        reason = f"region {needs.region} holds capacity for a lost peer"
    else:
        return Floor(0, "")
    return floor(total, streams_per_replica, reason)


def floor(load: float, streams_per_replica: int, reason: str) -> Floor:
    """Replicas that carry `load` streams (a floor under the autoscaler)."""
    return Floor(math.ceil(load / streams_per_replica - 1e-9) if load > 0 else 0, reason)
