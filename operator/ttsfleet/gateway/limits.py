"""Per-tenant rate limits and concurrent-stream caps, shared by all gateway replicas
through Redis; each replica's own share of them while Redis cannot be reached.

One Lua script (`ADMIT`, run with EVALSHA) decides a request in one round trip,
atomically, on Redis's clock (gateways' clocks may differ): GCRA on requests and on
characters (`ttsfleet.routing.limits` is the same algorithm in Python), then a slot
among the tenant's concurrent streams, a sorted set of leases that the replica
holding them renews every `stream_lease_seconds / 3` (a replica that dies leaves
slots that expire by themselves). All or nothing: a refused request spends nothing.

When a Redis call fails or takes longer than `REDIS_TIMEOUT_SECONDS`, the replica
limits on its own for `REDIS_RETRY_SECONDS` before it tries Redis again: every rate
and cap at `local_share` of its size (the operator sets it to 1 / replicas, so the
fleet of gateways together still admits at most the limit). Nothing waits for a dead
Redis, and no tenant is ever unlimited.

Headers follow draft-ietf-httpapi-ratelimit-headers-09 (`RateLimit-Policy` and
`RateLimit`, structured fields; see docs/gateway-limits.md).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ttsfleet.routing.limits import Charge, Local, Rate, Verdict

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from ttsfleet.gateway.config import RateLimits, Tier

log = logging.getLogger("ttsfleet.gateway.limits")

REDIS_TIMEOUT_SECONDS = 0.25
REDIS_RETRY_SECONDS = 1.0
REQUESTS, CHARACTERS, STREAMS = "requests", "characters", "streams"

# KEYS: one per rate limit, then the tenant's streams (when capped).
# ARGV: n; per limit: interval, window, cost; then the cap (0: none), lease, member.
# Returns: allowed (1/0), the refused part's index (n+1: streams; 0: none), then per
# limit remaining, reset and retry-after, then streams open (after it, when admitted).
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n = tonumber(ARGV[1])
local out = {1, 0}
local tats = {}
for i = 1, n do
  local interval = tonumber(ARGV[3 * i - 1])
  local window = tonumber(ARGV[3 * i])
  local cost = tonumber(ARGV[3 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  local base = math.max(tat, now)
  local after = base + cost * interval
  local over = after - now - window
  if over > 1e-9 then
    out[1] = 0
    if out[2] == 0 then out[2] = i end
    table.insert(out, tostring(math.floor((window - (base - now)) / interval + 1e-9)))
    table.insert(out, tostring(base - now))
    table.insert(out, tostring(over))
  else
    tats[i] = after
    table.insert(out, tostring(math.floor((window - (after - now)) / interval + 1e-9)))
    table.insert(out, tostring(after - now))
    table.insert(out, '0')
  end
end
local cap = tonumber(ARGV[3 * n + 2])
local open = 0
if cap > 0 then
  local key = KEYS[n + 1]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  open = redis.call('ZCARD', key)
  if out[1] == 1 then
    if open >= cap then
      out[1] = 0
      out[2] = n + 1
    else
      redis.call('ZADD', key, now + tonumber(ARGV[3 * n + 3]), ARGV[3 * n + 4])
      redis.call('PEXPIRE', key, math.ceil(tonumber(ARGV[3 * n + 3]) * 1000))
      open = open + 1
    end
  end
end
if out[1] == 1 then
  for i = 1, n do
    redis.call('SET', KEYS[i], string.format('%.6f', tats[i]),
               'PX', math.ceil((tats[i] - now) * 1000) + 1000)
  end
end
table.insert(out, open)
return out
"""

# KEYS[1]: a tenant's streams; ARGV: lease, then the members to renew (if still held).
RENEW = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', until_, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) * 1000))
return 1
"""


@dataclass(frozen=True)
class Stream:
    """A slot among a tenant's concurrent streams, held until released."""

    key: str
    member: str
    shared: bool  # held in Redis (else in this replica's own count)


@dataclass(frozen=True)
class Admission:
    """A limiter's answer: allowed or not, and what the headers say."""

    tenant: str
    tier: Tier
    verdicts: dict[str, Verdict]
    open_streams: int | None = None  # after this request, when streams are capped
    refused: str | None = None  # REQUESTS, CHARACTERS or STREAMS
    stream: Stream | None = None
    local: bool = False

    @property
    def allowed(self) -> bool:
        return self.refused is None

    @property
    def retry_after(self) -> int:
        """Whole seconds to wait (Retry-After), at least 1."""
        verdict = self.verdicts.get(self.refused or "")
        return max(1, math.ceil(verdict.retry_after)) if verdict is not None else 1

    def headers(self) -> dict[str, str]:
        """RateLimit-Policy and RateLimit (draft-ietf-httpapi-ratelimit-headers-09)."""
        tier = self.tier
        policy, current = [], []
        for name, rate, unit in _rates(tier):
            quota = f'"{name}";q={int(rate.burst)};w={max(1, math.ceil(rate.window))}'
            policy.append(quota + (f';qu="{unit}"' if unit != REQUESTS else ""))
            verdict = self.verdicts.get(name)
            if verdict is not None:
                current.append(f'"{name}";r={verdict.remaining};t={math.ceil(verdict.reset)}')
        if tier.concurrent_streams is not None:
            policy.append(f'"{STREAMS}";q={tier.concurrent_streams};qu="concurrent-requests"')
            if self.open_streams is not None:
                left = max(0, tier.concurrent_streams - self.open_streams)
                current.append(f'"{STREAMS}";r={left}')
        headers = {"ratelimit-policy": ", ".join(policy), "ratelimit": ", ".join(current)}
        if not self.allowed:
            headers["retry-after"] = str(self.retry_after)
        return headers

    def message(self) -> str:
        tier = self.tier
        if self.refused == STREAMS:
            return (
                f"Tenant '{self.tenant}' already has {tier.concurrent_streams} speech streams "
                f"open, the most its tier '{tier.name}' allows: wait for one to finish"
            )
        rate = tier.requests if self.refused == REQUESTS else tier.characters
        assert rate is not None
        return (
            f"Rate limit reached for {self.refused} for tenant '{self.tenant}' (tier "
            f"'{tier.name}': {rate.per_second:g}/s sustained, bursts of {rate.burst:g}): "
            f"retry after {self.retry_after} s"
        )


def _key(tenant: str, kind: str) -> str:
    """A tenant's Redis key for `kind` (its braces: one Redis Cluster slot per tenant)."""
    return f"ttsfleet:rl:{{{tenant}}}:{kind}"


def _rates(tier: Tier) -> list[tuple[str, Rate, str]]:
    rates = [(REQUESTS, tier.requests, REQUESTS)]
    if tier.characters is not None:
        rates.append((CHARACTERS, tier.characters, CHARACTERS))
    return rates


@dataclass
class Limiter:
    config: RateLimits
    redis: Redis | None = None
    url: str | None = None  # where `redis` connects
    clock: Callable[[], float] = time.monotonic
    replica: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    local: Local = field(default_factory=Local)
    down_until: float = -math.inf
    held: dict[str, set[str]] = field(default_factory=dict)  # Redis stream keys -> members
    on_backend: Callable[[bool], None] | None = None  # told True when Redis is in use
    _was_shared: bool = True
    _ids: Any = field(default_factory=itertools.count)
    _scripts: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def connect(cls, config: RateLimits, url: str | None = None) -> Limiter:
        """A limiter on the Redis at `url` (connected lazily), or local only."""
        client = None
        if url:
            from redis.asyncio import Redis  # noqa: PLC0415 - only a gateway with Redis
            from redis.backoff import NoBackoff  # noqa: PLC0415
            from redis.retry import Retry  # noqa: PLC0415

            client = Redis.from_url(
                url, socket_timeout=REDIS_TIMEOUT_SECONDS,
                socket_connect_timeout=REDIS_TIMEOUT_SECONDS, retry=Retry(NoBackoff(), 0),
                health_check_interval=0,
            )  # fmt: skip
        return cls(config, client, url=url)

    def tier(self, tenant: str) -> Tier:
        return self.config.tier_of(tenant)

    @property
    def shared(self) -> bool:
        """Whether limits are shared through Redis now."""
        return self.redis is not None and self.clock() >= self.down_until

    async def admit(self, tenant: str, characters: int, *, stream: bool = True) -> Admission:
        """A request of `characters` (0: characters are charged later) for `tenant`,
        holding one of its stream slots when `stream` and the tier caps them."""
        tier = self.tier(tenant)
        charges = {REQUESTS: Charge(_key(tenant, "r"), tier.requests, 1)}
        if tier.characters is not None and characters:
            charges[CHARACTERS] = Charge(_key(tenant, "c"), tier.characters, characters)
        cap = tier.concurrent_streams if stream else None
        return await self._decide(tenant, tier, charges, cap)

    async def charge(self, tenant: str, characters: int) -> Admission:
        """More characters for a request already admitted (a WebSocket's text)."""
        tier = self.tier(tenant)
        if tier.characters is None:
            return Admission(tenant, tier, {})
        charge = Charge(_key(tenant, "c"), tier.characters, characters)
        return await self._decide(tenant, tier, {CHARACTERS: charge}, None)

    async def release(self, admission: Admission) -> None:
        """Give back the admission's stream slot (if it holds one)."""
        stream = admission.stream
        if stream is None:
            return
        if not stream.shared:
            self.local.close_stream(stream.key)
            return
        members = self.held.get(stream.key)
        if members is not None:
            members.discard(stream.member)
            if not members:
                del self.held[stream.key]
        if self.redis is not None and self.shared:
            try:
                await self.redis.zrem(stream.key, stream.member)
            except Exception as err:
                self._failed(err)

    async def _decide(
        self, tenant: str, tier: Tier, charges: dict[str, Charge], cap: int | None
    ) -> Admission:
        """`charges` (by limit name) and a stream slot when `cap`, all or nothing."""
        names = list(charges)
        streams_key = _key(tenant, "s")
        if self.redis is not None and self.shared:
            member = f"{self.replica}:{next(self._ids)}"
            try:
                reply = await self._admit_script(
                    list(charges.values()), streams_key, cap or 0, member
                )
            except Exception as err:
                self._failed(err)
            else:
                allowed, refused, *rest = reply
                verdicts = {
                    name: Verdict(
                        bool(allowed) or int(refused) != i + 1,
                        int(rest[3 * i]), float(rest[3 * i + 1]), float(rest[3 * i + 2]),
                    )
                    for i, name in enumerate(names)
                }  # fmt: skip
                opened = int(rest[-1]) if cap else None
                if not allowed:
                    which = STREAMS if int(refused) == len(charges) + 1 else names[int(refused) - 1]
                    return Admission(tenant, tier, verdicts, opened, which)
                held = None
                if cap:
                    held = Stream(streams_key, member, shared=True)
                    self.held.setdefault(streams_key, set()).add(member)
                return Admission(tenant, tier, verdicts, opened, stream=held)
        return self._decide_locally(tenant, tier, charges, streams_key, cap)

    def _decide_locally(
        self, tenant: str, tier: Tier, charges: dict[str, Charge], streams_key: str,
        cap: int | None,
    ) -> Admission:  # fmt: skip
        share = self.config.local_share
        opened = self.local.streams.get(streams_key, 0)
        if cap and opened >= max(1, math.floor(cap * share)):  # refused: nothing spent
            return Admission(tenant, tier, {}, opened, STREAMS, local=True)
        scaled = [Charge(c.key, c.rate.scaled(share), c.cost) for c in charges.values()]
        verdicts = dict(zip(charges, self.local.admit(scaled, self.clock()), strict=True))
        for name, verdict in verdicts.items():
            if not verdict.allowed:
                return Admission(tenant, tier, verdicts, refused=name, local=True)
        if not cap:
            return Admission(tenant, tier, verdicts, local=True)
        opened = self.local.open_stream(streams_key)
        stream = Stream(streams_key, "", shared=False)
        return Admission(tenant, tier, verdicts, opened, stream=stream, local=True)

    async def _admit_script(
        self, charges: list[Charge], streams_key: str, cap: int, member: str
    ) -> list[Any]:
        assert self.redis is not None
        keys = [c.key for c in charges] + ([streams_key] if cap else [])
        args: list[Any] = [len(charges)]
        for c in charges:
            args += [repr(c.rate.interval), repr(c.rate.window), c.cost]
        args += [cap, self.config.stream_lease_seconds, member]
        reply: list[Any] = await self._script(ADMIT)(keys=keys, args=args)
        if not self._was_shared:
            self._was_shared = True
            log.info("rate limits are shared through Redis again")
            if self.on_backend is not None:
                self.on_backend(True)
        return reply

    def _script(self, source: str) -> Any:
        """The script's EVALSHA caller (it loads the script when Redis lacks it)."""
        assert self.redis is not None
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.redis.register_script(source)
        return script

    def _failed(self, err: BaseException) -> None:
        self.down_until = self.clock() + REDIS_RETRY_SECONDS
        if self._was_shared:
            self._was_shared = False
            log.error(
                "Redis failed (%s): each gateway replica limits on its own at %.0f%% of every "
                "limit until it answers again", err or type(err).__name__,
                self.config.local_share * 100,
            )  # fmt: skip
            if self.on_backend is not None:
                self.on_backend(False)

    async def renew(self) -> None:
        """Renew the leases of the streams this replica holds in Redis."""
        if self.redis is None or not self.held or not self.shared:
            return
        script = self._script(RENEW)
        try:
            for key, members in list(self.held.items()):
                if members:
                    await script(keys=[key], args=[self.config.stream_lease_seconds, *members])
        except Exception as err:
            self._failed(err)

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
