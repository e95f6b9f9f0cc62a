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

from ttsfleet.gateway.auth import AuthConfig, ConfigError

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

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class Route(_Model):
    models: tuple[str, ...] = Field(min_length=1)
    voices: tuple[str, ...] = Field(
        default=(), description="Names callers may give as `voice`; the engine's own always work."
    )
    fleet: Fleet


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
    cache_bytes: int = Field(
        default=64 * 1024 * 1024, ge=0, alias="cacheBytes",
        description="Memory for replies spoken before, replayed at once; 0 turns it off.",
    )  # fmt: skip

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
        return self

    def route(self, model: str) -> Route | None:
        return next((r for r in self.routes if model in r.models), None)

    def fleets(self) -> dict[str, Fleet]:
        return {route.fleet.key: route.fleet for route in self.routes}


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
