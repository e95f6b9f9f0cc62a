"""What one gateway serves: its routes, fleets and auth, from one JSON document.

The operator renders it from a `TtsGateway` into a ConfigMap that the gateway's pods
mount (`ttsfleet gateway --config FILE` re-reads it when it changes); tests and
`make bench-gateway` write it by hand, with fixed `endpoints` instead of a fleet's
EndpointSlices.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ttsfleet.api.v1alpha1 import ResidencySet
from ttsfleet.gateway.auth import AuthConfig, ConfigError
from ttsfleet.routing import breaker
from ttsfleet.routing.limits import Rate

MAX_INPUT_CHARACTERS = 4096  # OpenAI's limit on `input`


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Fleet(_Model):
    """Where a route's replicas are: a TtsDeployment's Service, or fixed addresses."""

    namespace: str = "default"
    name: str
    service: str = Field(default="", description="The Service whose EndpointSlices to watch.")
    port: str = Field(default="grpc", description="The Service's port name for Triton gRPC.")
    voice: str = Field(description="The voice the fleet's engine serves.")
    version: str = Field(
        default="", description="The fleet's model (image and precision): part of a cache key."
    )
    endpoints: tuple[str, ...] | None = Field(
        default=None, description="Fixed host:port addresses instead of watching the Service."
    )
    max_streams_per_replica: int | None = Field(
        default=None, ge=1, alias="maxStreamsPerReplica",
        description="A replica's queue limit: when every replica has this many streams open, "
        "new requests are shed (503 with Retry-After, or the route's fallback) at once.",
    )  # fmt: skip

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class Route(_Model):
    models: tuple[str, ...] = Field(min_length=1)
    voices: tuple[str, ...] = Field(
        default=(), description="Names callers may give as `voice`; the engine's own always work."
    )
    fleet: Fleet
    fallback: Fleet | None = Field(
        default=None,
        description="Where requests go while the fleet's breaker is open, the fleet has no "
        "ready replica, or all its replicas are over their queue limit.",
    )


class Tier(_Model):
    """What a tenant may send: requests and characters, each a sustained rate with a
    burst, and how many speech streams it may have open at once."""

    name: str = Field(min_length=1)
    requests_per_second: float = Field(gt=0, alias="requestsPerSecond")
    request_burst: int = Field(ge=1, alias="requestBurst")
    characters_per_second: float | None = Field(default=None, gt=0, alias="charactersPerSecond")
    character_burst: int | None = Field(default=None, ge=1, alias="characterBurst")
    concurrent_streams: int | None = Field(default=None, ge=1, alias="concurrentStreams")

    @model_validator(mode="after")
    def _characters_whole(self) -> Tier:
        if (self.characters_per_second is None) != (self.character_burst is None):
            raise ValueError(
                f"tier {self.name!r}: give both charactersPerSecond and characterBurst, or neither"
            )
        return self

    @property
    def requests(self) -> Rate:
        return Rate(self.requests_per_second, self.request_burst)

    @property
    def characters(self) -> Rate | None:
        if self.characters_per_second is None or self.character_burst is None:
            return None
        return Rate(self.characters_per_second, self.character_burst)


class ServiceRef(_Model):
    """A Service whose ready endpoint the gateway uses (through its EndpointSlices)."""

    namespace: str
    name: str
    port: str = Field(description="The Service's port name.")


class RateLimits(_Model):
    tiers: tuple[Tier, ...] = Field(min_length=1)
    default_tier: str = Field(alias="defaultTier", description="The tier of unlisted tenants.")
    tenants: dict[str, str] = Field(default_factory=dict, description="Tenant -> tier name.")
    redis_url: str | None = Field(
        default=None, alias="redisUrl", pattern=r"^(redis|rediss|unix)://",
        description="Where limits are shared by all replicas; without it each replica limits "
        "on its own at localShare.",
    )  # fmt: skip
    redis_service: ServiceRef | None = Field(
        default=None, alias="redisService",
        description="A Redis found through a Service's EndpointSlices (the one the operator "
        "runs for the gateway), instead of redisUrl.",
    )  # fmt: skip
    local_share: float = Field(
        default=1.0, gt=0, le=1, alias="localShare",
        description="The share of each limit one replica enforces on its own while Redis "
        "cannot be reached (1 / replicas keeps the fleet of gateways within the limit).",
    )  # fmt: skip
    stream_lease_seconds: float = Field(default=30.0, ge=3, alias="streamLeaseSeconds")

    @model_validator(mode="after")
    def _tiers_known(self) -> RateLimits:
        if self.redis_url is not None and self.redis_service is not None:
            raise ValueError("rateLimits: give redisUrl or redisService, not both")
        names = [tier.name for tier in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError("rateLimits.tiers: each tier needs its own name")
        for where, name in [("defaultTier", self.default_tier)] + [
            (f"tenants.{tenant}", tier) for tenant, tier in self.tenants.items()
        ]:
            if name not in names:
                raise ValueError(
                    f"rateLimits.{where}: no tier is named {name!r}: use one of {', '.join(names)}"
                )
        return self

    def tier_of(self, tenant: str) -> Tier:
        name = self.tenants.get(tenant, self.default_tier)
        return next(tier for tier in self.tiers if tier.name == name)


class Breaker(_Model):
    """When a fleet's breaker opens (per fleet; see `ttsfleet.routing.breaker`)."""

    window_seconds: int = Field(default=10, ge=1, le=300, alias="windowSeconds")
    min_requests: int = Field(default=5, ge=1, alias="minRequests")
    error_rate: float = Field(default=0.5, gt=0, le=1, alias="errorRate")
    slow_seconds: float = Field(
        default=2.0, gt=0, alias="slowSeconds",
        description="A first audio later than this counts as slow (the request queued).",
    )  # fmt: skip
    slow_rate: float = Field(default=0.8, gt=0, le=1, alias="slowRate")
    open_seconds: float = Field(default=2.0, gt=0, alias="openSeconds")
    max_open_seconds: float = Field(default=8.0, gt=0, alias="maxOpenSeconds")
    probes: int = Field(default=3, ge=1, le=100)

    def policy(self) -> breaker.Policy:
        return breaker.Policy(
            window_seconds=self.window_seconds, min_requests=self.min_requests,
            error_rate=self.error_rate, slow_seconds=self.slow_seconds,
            slow_rate=self.slow_rate, open_seconds=self.open_seconds,
            max_open_seconds=max(self.max_open_seconds, self.open_seconds), probes=self.probes,
        )  # fmt: skip


class Auth(_Model):
    issuer: str
    audiences: tuple[str, ...] = Field(min_length=1)
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    tenant_claim: str = Field(default="tenant", alias="tenantClaim")
    scope_claim: str = Field(default="scope", alias="scopeClaim")
    required_scopes: tuple[str, ...] = Field(default=("speech",), alias="requiredScopes")
    leeway_seconds: float = Field(default=30.0, ge=0, le=300, alias="leewaySeconds")
    jwks_file: str | None = Field(default=None, alias="jwksFile")
    jwks_url: str | None = Field(default=None, alias="jwksUrl")
    refresh_seconds: float = Field(default=300.0, ge=5, alias="refreshSeconds")
    ticket_key_file: str | None = Field(
        default=None, alias="ticketKeyFile",
        description="The key WebSocket tickets are signed with, shared by all replicas; "
        "without it each replica makes its own (tickets redeem only where issued).",
    )  # fmt: skip

    @model_validator(mode="after")
    def _one_key_source(self) -> Auth:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("auth needs exactly one of jwksFile and jwksUrl")
        return self

    def verifier_config(self) -> AuthConfig:
        return AuthConfig(
            issuer=self.issuer, audiences=self.audiences, algorithms=self.algorithms,
            tenant_claim=self.tenant_claim, scope_claim=self.scope_claim,
            leeway_seconds=self.leeway_seconds,
        )  # fmt: skip


class Tls(_Model):
    """TLS on the gateway's listener: a PEM certificate (chain) and its key, re-read when
    they change (a renewed cert-manager Secret): new connections get the new one."""

    cert_file: str = Field(alias="certFile")
    key_file: str = Field(alias="keyFile")


class Region(_Model):
    """The region this gateway serves in (from its `TtsRegion`): tenants pinned to sets of
    regions are refused here unless this region is in their set (ttsfleet.failover)."""

    name: str = Field(min_length=1)
    healthy: tuple[str, ...] = Field(
        default=(), description="Regions taking traffic now, as the region's operator sees it."
    )
    residency: tuple[ResidencySet, ...] = ()


class GatewayConfig(_Model):
    routes: tuple[Route, ...] = Field(min_length=1)
    auth: Auth | None = Field(
        default=None, description="JWT bearer auth; without it the API is open to anyone."
    )
    balancer: Literal["least-outstanding", "round-robin"] = Field(
        default="least-outstanding",
        description="Power-of-two choices on outstanding work, or the round-robin baseline.",
    )
    max_input_characters: int = Field(
        default=MAX_INPUT_CHARACTERS, ge=1, le=MAX_INPUT_CHARACTERS, alias="maxInputCharacters"
    )
    first_audio_timeout_seconds: float = Field(
        default=10.0, gt=0, alias="firstAudioTimeoutSeconds",
        description="A replica with no audio by then has failed; the request is retried.",
    )  # fmt: skip
    request_timeout_seconds: float = Field(default=120.0, gt=0, alias="requestTimeoutSeconds")
    websocket_idle_seconds: float = Field(
        default=60.0, gt=0, alias="websocketIdleSeconds",
        description="A WebSocket with no message and no open context for this long is closed.",
    )  # fmt: skip
    rate_limits: RateLimits | None = Field(
        default=None, alias="rateLimits",
        description="Per-tenant limits (the tenant from the token; the client's address "
        "without auth); without them nobody is limited.",
    )  # fmt: skip
    breaker: Breaker = Field(default_factory=Breaker)
    tls: Tls | None = Field(
        default=None, description="HTTPS on the listener; turning it on or off needs a restart."
    )
    cache_bytes: int = Field(
        default=64 * 1024 * 1024, ge=0, alias="cacheBytes",
        description="Memory for replies spoken before, replayed at once; 0 turns it off.",
    )  # fmt: skip
    region: Region | None = Field(
        default=None,
        description="The gateway's region and the tenants' residency sets; every response "
        "names the region (x-ttsfleet-region).",
    )

    @model_validator(mode="after")
    def _models_unique(self) -> GatewayConfig:
        seen: dict[str, int] = {}
        for index, route in enumerate(self.routes):
            for model in route.models:
                if model in seen:
                    raise ValueError(
                        f"routes[{index}].models: {model!r} is already routed by "
                        f"routes[{seen[model]}]: give each model name one route"
                    )
                seen[model] = index
        for index, route in enumerate(self.routes):
            if route.fallback is not None and route.fallback.key == route.fleet.key:
                raise ValueError(
                    f"routes[{index}].fallback is the route's own fleet: name another one"
                )
        for tier in self.rate_limits.tiers if self.rate_limits else ():
            burst = tier.character_burst
            if burst is not None and burst < self.max_input_characters:
                raise ValueError(
                    f"rateLimits.tiers: tier {tier.name!r} has characterBurst "
                    f"{tier.character_burst}, below maxInputCharacters "
                    f"({self.max_input_characters}): a longest request could never pass; "
                    "raise characterBurst or lower maxInputCharacters"
                )
        return self

    def route(self, model: str) -> Route | None:
        return next((r for r in self.routes if model in r.models), None)

    def fleets(self) -> dict[str, Fleet]:
        """Every fleet a route leads to, fallbacks too."""
        out: dict[str, Fleet] = {}
        for route in self.routes:
            for fleet in (route.fleet, route.fallback):
                if fleet is not None:
                    out.setdefault(fleet.key, fleet)
        return out


def load(path: Path) -> GatewayConfig:
    """The config in `path`, or ConfigError naming what is wrong."""
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: {err}") from None
    return parse(document)


def parse(document: object) -> GatewayConfig:
    try:
        config = GatewayConfig.model_validate(document)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "config"
        raise ConfigError(f"{where}: {first['msg']}") from None
    if config.auth is not None:
        config.auth.verifier_config()  # raises ConfigError on an unsafe algorithm list
    return config
