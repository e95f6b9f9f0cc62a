"""Data residency: a tenant pinned to a set of regions is never served outside it.

Every gateway decides for itself, whatever Envoy sent it: a pinned tenant reaching a
gateway outside its set is refused, with 421 (Misdirected Request: Envoy retries it at
the next priority) while a region of its set is healthy, and 503 naming the set when
none is, rather than failing over across the border.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from ttsfleet.api.v1alpha1 import ResidencySet


@dataclass(frozen=True)
class Decision:
    allowed: bool
    status: int = 200
    message: str = ""
    pinned: ResidencySet | None = None


def pinned(tenant: str, sets: Sequence[ResidencySet]) -> ResidencySet | None:
    """The set the tenant is pinned to (the first that lists it), or None."""
    return next((s for s in sets if tenant in s.tenants), None)


def decide(tenant: str, here: str, sets: Sequence[ResidencySet],
           healthy: Collection[str]) -> Decision:  # fmt: skip
    """May the gateway of region `here` serve `tenant`? `healthy`: regions taking traffic."""
    home = pinned(tenant, sets)
    if home is None or here in home.regions:
        return Decision(True, pinned=home)
    names = ", ".join(home.regions)
    up = [r for r in home.regions if r in healthy]
    if up:
        return Decision(
            False, 421,
            f"tenant {tenant!r} is pinned to residency set {home.name!r} ({names}); "
            f"this gateway is in {here!r}: send the request through {up[0]!r}",
            home,
        )  # fmt: skip
    return Decision(
        False, 503,
        f"tenant {tenant!r} is pinned to residency set {home.name!r} ({names}) and none of "
        "those regions is healthy; it is not served outside them: retry later",
        home,
    )  # fmt: skip
