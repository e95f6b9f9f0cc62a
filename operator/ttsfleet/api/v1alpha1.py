"""`ttsfleet.io/v1alpha1` `TtsDeployment`: the typed spec and status.

These models are the one source of truth. `ttsfleet.api.crd` turns them into the
CRD's OpenAPI schema (with the CEL rules declared here), and the operator parses
objects with them. Field names are camelCase on the wire.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from ttsfleet.gpu.catalog import GPUS
from ttsfleet.triton import contract

GROUP = "ttsfleet.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TtsDeployment"
PLURAL = "ttsdeployments"
SINGULAR = "ttsdeployment"
SHORT_NAMES = ["ttsd"]

DEFAULT_IMAGE = f"{contract.IMAGE_REPOSITORY}:0.1.0"
DEFAULT_VOICE = "en_US-joe-medium"
# Every MIG profile of every GPU ttsfleet knows, for the schema's enum.
MIG_PROFILES = sorted({p.name for g in GPUS.values() for p in g.mig_profiles})

# A Kubernetes quantity: `2`, `500m`, `8Gi`.
Quantity = Annotated[
    int | str,
    WithJsonSchema(
        {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}
    ),
]


def rule(expression: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """A CEL validation rule; its message names the field and the fix."""
    out = {"rule": expression, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )
    # CEL rules of this object, in the CRD as x-kubernetes-validations.
    cel: ClassVar[list[dict[str, str]]] = []

    def wire(self) -> dict[str, Any]:
        """The object as it appears in the API (camelCase, unset optionals left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


# INT8 is a CPU engine (static QDQ of the frame part, VNNI kernels): no GPU placement runs
# it, and `mode: auto` places it on CPU (resources/placement.py).
INT8_ON_GPU = (
    "spec.model.precision int8 runs on CPU only: set precision fp16 for GPU placements"
    " (whole, mig, shared), or set spec.placement.mode to cpu or auto"
)

INT8_SENTENCE = (
    "spec.model.precision int8 is served by the chunked engine only (its frame part in "
    "static INT8): set spec.runtime.engine to chunked (the default), or use fp32"
)


class Engine(StrEnum):
    CHUNKED = "chunked"
    SENTENCE = "sentence"


class PlacementMode(StrEnum):
    WHOLE = "whole"
    MIG = "mig"
    SHARED = "shared"
    CPU = "cpu"
    AUTO = "auto"


GPU_FREE_MODES = (PlacementMode.CPU, PlacementMode.AUTO)


class ScalingMode(StrEnum):
    BUILTIN = "builtin"
    EXTERNAL = "external"
    MANUAL = "manual"


class ModelSpec(_Model):
    """Which voice to serve, and in which precision."""

    voice: str = Field(
        default=DEFAULT_VOICE,
        pattern=r"^[a-z]{2,3}_[A-Z]{2}-[a-z0-9_]+-(x_low|low|medium|high)$",
        max_length=100,
        description="Piper voice name, <language>_<REGION>-<name>-<quality>.",
    )
    precision: Precision = Field(
        default=Precision.FP16, description="Numeric precision of the model variant served."
    )


class BatchingSpec(_Model):
    """Triton dynamic batching (non-streaming deployments)."""

    max_batch_size: int = Field(default=8, ge=1, le=256, description="Largest batch Triton forms.")
    max_queue_delay_microseconds: int = Field(
        default=2000, ge=0, le=1_000_000, description="How long a request may wait for a batch."
    )


class CacheSpec(_Model):
    """Triton's response cache (non-streaming deployments)."""

    size_mib: int = Field(
        default=256, ge=1, le=65536, alias="sizeMiB", description="Response cache size in MiB."
    )


class Resources(_Model):
    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)


class RuntimeSpec(_Model):
    """The Triton server container."""

    cel: ClassVar[list[dict[str, str]]] = [
        rule(
            "!has(self.extraArgs) || !self.extraArgs.exists(a, a.startsWith('--model-repository')"
            " || a.startsWith('--http-port') || a.startsWith('--grpc-port')"
            " || a.startsWith('--metrics-port'))",
            "spec.runtime.extraArgs must not set --model-repository or the ports:"
            " the operator sets them; remove those arguments",
            ".extraArgs",
        ),
        rule(
            "!has(self.resources)"
            " || ((!has(self.resources.limits)"
            " || !self.resources.limits.exists(k, k.startsWith('nvidia.com/')))"
            " && (!has(self.resources.requests)"
            " || !self.resources.requests.exists(k, k.startsWith('nvidia.com/'))))",
            "spec.runtime.resources must not name nvidia.com/ resources:"
            " spec.placement sets them; remove them",
            ".resources",
        ),
    ]

    image: str = Field(
        default=DEFAULT_IMAGE,
        min_length=1,
        max_length=512,
        description="Triton image with the model repository.",
    )
    resources: Resources = Field(default_factory=Resources, description="CPU and memory.")
    instances: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Triton model instances; derived from the placement if unset.",
    )
    extra_args: list[str] = Field(
        default_factory=list, max_length=32, description="More tritonserver arguments."
    )
    graceful_drain_seconds: int = Field(
        default=30, ge=0, le=3600, description="Time open streams get to finish when a pod stops."
    )
    engine: Engine = Field(
        default=Engine.CHUNKED,
        description="How the models make audio: chunked (the voice split in two, one "
        "deadline-aware scheduler per model instance running every stream's chunks, the "
        "first audio after a short first window, live streams before bulk, a cancel "
        "honoured at the next chunk; fp32, fp16 and int8 on CPU instances, others fall back to "
        "sentence) or sentence (a sentence at a time, one request after another; kept "
        "until the chunked engine's figures are all in). benchmarks/results/serving.json "
        "has both, side by side.",
    )


class Toleration(_Model):
    key: str | None = Field(default=None, max_length=253)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(default=None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class PlacementSpec(_Model):
    """Where replicas run: whole GPUs, MIG slices, shared (time-sliced) GPUs, or CPU."""

    cel: ClassVar[list[dict[str, str]]] = [
        rule(
            "self.mode != 'mig' || has(self.profile)",
            "spec.placement.profile is required when spec.placement.mode is mig:"
            " set a MIG profile such as 1g.10gb",
        ),
        rule(
            "self.mode == 'mig' || !has(self.profile)",
            "spec.placement.profile applies only to mode mig: remove it or set mode: mig",
            ".profile",
        ),
        rule(
            "self.mode == 'mig' || !has(self.migStrategy)",
            "spec.placement.migStrategy applies only to mode mig: remove it or set mode: mig",
            ".migStrategy",
        ),
        rule(
            "self.mode == 'whole' || !has(self.gpus)",
            "spec.placement.gpus applies only to mode whole: remove it or set mode: whole",
            ".gpus",
        ),
        rule(
            "self.mode in ['whole', 'shared'] || !has(self.product)",
            "spec.placement.product applies only to modes whole and shared:"
            " remove it, or use a profile with mode mig",
            ".product",
        ),
    ]

    mode: PlacementMode = Field(
        default=PlacementMode.AUTO,
        description="whole, mig, shared, cpu, or auto: the cheapest slice the cluster offers"
        " that holds streamsPerReplica (see docs/placement.md).",
    )
    gpus: int | None = Field(default=None, ge=1, le=8, description="GPUs per replica (mode whole).")
    product: str | None = Field(
        default=None,
        max_length=63,
        pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$",
        description="GPU product as GPU Feature Discovery labels it, e.g. NVIDIA-L4.",
    )
    profile: Literal[tuple(MIG_PROFILES)] | None = Field(  # type: ignore[valid-type]
        default=None, description="MIG profile per replica (mode mig), e.g. 1g.10gb."
    )
    mig_strategy: Literal["mixed", "single"] | None = Field(
        default=None, description="The device plugin's MIG strategy (mode mig); mixed if unset."
    )
    streams_per_replica: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Concurrent streams one replica must hold: sizes the slice under mode auto"
        " and is checked against an explicit MIG profile.",
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)


class ScalingTargets(_Model):
    queue_depth_per_replica: int = Field(
        default=4, ge=1, le=10000, description="Pending requests per replica to aim for."
    )
    time_to_first_audio_ms: int = Field(
        default=300,
        ge=10,
        le=60000,
        alias="timeToFirstAudioMs",
        description="Time to first audio (p95) to aim for, in milliseconds.",
    )


_CLOCK = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"
_ZONE = r"^[A-Za-z][-A-Za-z0-9_+/]*$"


def known_zone(value: str) -> str:
    """`value` if it names an IANA time zone; else an error saying what to use."""
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as err:
        raise ValueError(
            f"unknown time zone {value!r}: use an IANA name such as Europe/Berlin or UTC"
        ) from err
    return value


Day = Literal["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


class ScheduleSpec(_Model):
    """A weekly window with a floor: at least `minReplicas` from `start` to `end`."""

    cel: ClassVar[list[dict[str, str]]] = [
        rule(
            "self.start != self.end",
            "spec.scaling.schedules[].end must differ from start: a window needs a length"
            " (an end before the start crosses midnight)",
            ".end",
        )
    ]

    name: str | None = Field(default=None, max_length=63, description="What the window is for.")
    days: list[Day] = Field(
        default_factory=list, max_length=7, description="Days the window starts on; empty: daily."
    )
    start: str = Field(pattern=_CLOCK, description="Start, HH:MM in timeZone.")
    end: str = Field(pattern=_CLOCK, description="End, HH:MM; before start crosses midnight.")
    time_zone: str = Field(
        default="UTC",
        max_length=64,
        pattern=_ZONE,
        description="IANA time zone of start and end, e.g. Europe/Berlin.",
    )
    min_replicas: int = Field(ge=0, le=10000, description="Replicas kept while the window is on.")

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        return known_zone(value)


class PredictiveSpec(_Model):
    """A floor from the same time of past days or weeks (Prometheus history)."""

    period: Literal["day", "week"] = Field(
        default="day", description="Compare with past days or weeks."
    )
    periods: int = Field(default=3, ge=1, le=8, description="How many past periods to look at.")
    lookahead_minutes: int = Field(
        default=15, ge=1, le=180, description="How far ahead of now each past window reaches."
    )
    headroom_percent: int = Field(
        default=10, ge=0, le=200, description="Added to the busiest past window's open streams."
    )
    time_zone: str = Field(
        default="UTC",
        max_length=64,
        pattern=_ZONE,
        description="IANA time zone whose days and weeks are compared (daylight saving).",
    )

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        return known_zone(value)


class ScalingSpec(_Model):
    cel: ClassVar[list[dict[str, str]]] = [
        rule(
            "self.panicWindowSeconds < self.stableWindowSeconds",
            "spec.scaling.panicWindowSeconds must be shorter than stableWindowSeconds:"
            " shorten the panic window or lengthen the stable one",
            ".panicWindowSeconds",
        )
    ]

    mode: ScalingMode = Field(
        default=ScalingMode.BUILTIN,
        description="builtin (ttsfleet's autoscaler), external (HPA/KEDA) or manual.",
    )
    targets: ScalingTargets = Field(default_factory=ScalingTargets)
    stable_window_seconds: int = Field(
        default=60, ge=2, le=3600, description="Signals are averaged over this window."
    )
    panic_window_seconds: int = Field(
        default=6, ge=1, le=600, description="A burst over this window scales up at once."
    )
    scale_down_delay_seconds: int = Field(
        default=120, ge=0, le=3600, description="Scale down only after this long without need."
    )
    reversal_window_seconds: int = Field(
        default=600, ge=0, le=3600,
        description="The flap guard: a scale-down against a rise waits this long after the "
        "last turn (a scale event against the one before it), a scale-up against a descent "
        "waits until the fleet has been short for 3/4 of the stable window (a burst is gone "
        "by then) unless the load is a step (4x the fleet); 0 turns it off.",
    )  # fmt: skip
    schedules: list[ScheduleSpec] = Field(
        default_factory=list,
        max_length=16,
        description="Scheduled floors: time windows with a minimum size (capped by maxReplicas).",
    )
    predictive: PredictiveSpec | None = Field(
        default=None, description="A predicted floor from past days or weeks; off if unset."
    )
    region_reserve: float = Field(
        default=1.0, ge=0, le=1,
        description="With a TtsRegion in front: the share of a lost peer's load this fleet "
        "holds capacity for in steady state (1: N/(N-1) of its own, static stability; 0: "
        "none). Taking over a lost peer's load raises the floor whatever it says.",
    )  # fmt: skip


class TtsDeploymentSpec(_Model):
    cel: ClassVar[list[dict[str, str]]] = [
        rule(
            "self.minReplicas <= self.maxReplicas",
            "spec.minReplicas must not exceed spec.maxReplicas:"
            " lower minReplicas or raise maxReplicas",
            ".minReplicas",
        ),
        rule(
            "!has(self.replicas) || (self.replicas >= self.minReplicas"
            " && self.replicas <= self.maxReplicas)",
            "spec.replicas must lie between spec.minReplicas and spec.maxReplicas:"
            " scale within them or change the bounds",
            ".replicas",
        ),
        rule(
            "!has(self.batching) || !self.streaming",
            "spec.batching applies only when spec.streaming is false (streams are not batched):"
            " remove batching or set streaming: false",
            ".batching",
        ),
        rule(
            "!has(self.cache) || !self.streaming",
            "spec.cache applies only when spec.streaming is false (streams are not cached):"
            " remove cache or set streaming: false",
            ".cache",
        ),
        rule(
            "self.model.precision != 'int8' || self.placement.mode in ['cpu', 'auto']",
            INT8_ON_GPU,
            ".model.precision",
        ),
        rule(
            "self.model.precision != 'int8' || self.runtime.engine == 'chunked'",
            INT8_SENTENCE,
            ".model.precision",
        ),
    ]

    model: ModelSpec = Field(default_factory=ModelSpec)
    streaming: bool = Field(
        default=True, description="Serve the streaming model (audio in sentence chunks over gRPC)."
    )
    batching: BatchingSpec | None = None
    cache: CacheSpec | None = None
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    placement: PlacementSpec = Field(default_factory=PlacementSpec)
    replicas: int | None = Field(
        default=None,
        ge=0,
        le=1000,
        description="Replicas now (the scale subresource); minReplicas if unset.",
    )
    min_replicas: int = Field(default=1, ge=0, le=1000)
    max_replicas: int = Field(default=4, ge=1, le=1000)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)

    @property
    def desired_replicas(self) -> int:
        return self.min_replicas if self.replicas is None else self.replicas

    @model_validator(mode="after")
    def _int8_runs_on_cpu(self) -> TtsDeploymentSpec:
        # The CRD refuses this; an object stored before that rule is reported Stalled.
        if self.model.precision == Precision.INT8 and self.placement.mode not in GPU_FREE_MODES:
            raise ValueError(INT8_ON_GPU)
        if self.model.precision == Precision.INT8 and self.runtime.engine != Engine.CHUNKED:
            raise ValueError(INT8_SENTENCE)
        return self


class Condition(_Model):
    model_config = ConfigDict(extra="allow")

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class Endpoints(_Model):
    http: str | None = None
    grpc: str | None = None
    metrics: str | None = None


class TtsDeploymentStatus(_Model):
    model_config = ConfigDict(extra="allow")

    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    replicas: int = 0
    ready_replicas: int = 0
    desired_replicas: int = 0
    selector: str | None = None
    precision: str | None = None
    placement: str | None = None
    endpoints: Endpoints | None = None


# ---- TtsGateway: the speech API in front of TtsDeployments -----------------------------------

GATEWAY_KIND = "TtsGateway"
GATEWAY_PLURAL = "ttsgateways"
GATEWAY_SINGULAR = "ttsgateway"
GATEWAY_SHORT_NAMES = ["ttsgw"]
DEFAULT_GATEWAY_IMAGE = "ttsfleet/gateway:0.1.0"
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# OpenAI-style model and voice names: `tts-1`, `gpt-4o-mini-tts`, `alloy`, a Piper name.
API_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
ApiName = Annotated[str, Field(pattern=API_NAME_PATTERN, max_length=64)]


class GatewayRoute(_Model):
    """Requests for these `model` names go to one TtsDeployment."""

    cel: ClassVar[list[dict[str, str]]] = [
        rule(
            "!has(self.fallback) || self.fallback != self.fleet",
            "spec.routes[].fallback names the route's own fleet: name another TtsDeployment "
            "(a simpler or CPU voice) or leave it out",
            ".fallback",
        ),
    ]

    models: list[ApiName] = Field(
        min_length=1, max_length=16, description="`model` names routed here, e.g. tts-1."
    )
    fleet: str = Field(
        pattern=NAME_PATTERN, max_length=40,
        description="The TtsDeployment (in this namespace) that serves them.",
    )  # fmt: skip
    voices: list[ApiName] = Field(
        default_factory=list, max_length=32,
        description="`voice` names callers may use (e.g. alloy); the fleet's own voice always "
        "works. All speak with the fleet's voice.",
    )  # fmt: skip
    fallback: str | None = Field(
        default=None, pattern=NAME_PATTERN, max_length=40,
        description="A TtsDeployment (in this namespace) that speaks instead while the fleet's "
        "circuit breaker is open, it has no ready replica, or every replica is at its queue "
        "limit (the response says so in X-TtsFleet-Fallback). Without it those requests get "
        "503 with Retry-After.",
    )  # fmt: skip
    max_streams_per_replica: int | None = Field(
        default=None, ge=1, le=1024,
        description="A replica's queue limit: when every replica of the fleet has this many "
        "streams open, new requests go to the fallback or get 503 at once instead of queueing "
        "past the SLO (WebSocket contexts already speaking are never cut).",
    )  # fmt: skip


class SecretKeyRef(_Model):
    name: str = Field(pattern=NAME_PATTERN, max_length=253)
    key: str = Field(default="jwks.json", pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)


class JwtAlgorithm(StrEnum):
    RS256 = "RS256"
    RS384 = "RS384"
    RS512 = "RS512"
    PS256 = "PS256"
    ES256 = "ES256"
    ES384 = "ES384"
    EDDSA = "EdDSA"
    HS256 = "HS256"
    HS384 = "HS384"
    HS512 = "HS512"


class GatewayAuth(_Model):
    """JWT bearer tokens: who may call, and as which tenant."""

    cel: ClassVar[list[dict[str, str]]] = [
        rule(
            "has(self.jwksSecretRef) != has(self.jwksUrl)",
            "spec.auth needs exactly one of jwksSecretRef and jwksUrl: keep one",
        ),
        rule(
            "!has(self.algorithms) || !(self.algorithms.exists(a, a.startsWith('HS'))"
            " && self.algorithms.exists(a, !a.startsWith('HS')))",
            "spec.auth.algorithms mixes HS* with asymmetric algorithms (a public key could be "
            "used as an HMAC secret): keep one family",
            ".algorithms",
        ),
    ]

    issuer: str = Field(min_length=1, max_length=512, description="Required `iss` of tokens.")
    audiences: list[str] = Field(
        min_length=1, max_length=8, description="Accepted `aud` values (one must match)."
    )
    algorithms: list[JwtAlgorithm] = Field(
        default=[JwtAlgorithm.RS256, JwtAlgorithm.ES256],
        min_length=1, max_length=10, description="Accepted signature algorithms (never none).",
    )  # fmt: skip
    jwks_secret_ref: SecretKeyRef | None = Field(
        default=None, description="A Secret key holding the JWKS (re-read when it changes)."
    )
    jwks_url: str | None = Field(
        default=None, pattern=r"^https?://", max_length=2048,
        description="A JWKS URL, fetched in the background every refreshSeconds.",
    )  # fmt: skip
    tenant_claim: str = Field(default="tenant", max_length=64)
    scope_claim: str = Field(default="scope", max_length=64)
    required_scopes: list[str] = Field(
        default=["speech"], max_length=8, description="Scopes a token must carry."
    )
    leeway_seconds: int = Field(default=30, ge=0, le=300, description="Clock skew allowed.")
    refresh_seconds: int = Field(default=300, ge=5, le=86400)


class RateTier(_Model):
    """What one tenant may send: requests and characters, each a sustained rate and a
    burst (GCRA), and speech streams open at once."""

    cel: ClassVar[list[dict[str, str]]] = [
        rule(
            "has(self.charactersPerSecond) == has(self.characterBurst)",
            "give both charactersPerSecond and characterBurst, or neither",
        ),
    ]

    name: str = Field(pattern=NAME_PATTERN, max_length=63)
    requests_per_second: float = Field(gt=0, le=1e6, description="Sustained requests a second.")
    request_burst: int = Field(ge=1, le=1_000_000, description="Requests at once.")
    characters_per_second: float | None = Field(default=None, gt=0, le=1e9)
    character_burst: int | None = Field(
        default=None, ge=1, le=1_000_000_000,
        description="Characters at once; at least maxInputCharacters.",
    )  # fmt: skip
    concurrent_streams: int | None = Field(
        default=None, ge=1, le=100_000,
        description="Speech streams (requests and WebSocket contexts) open at once.",
    )  # fmt: skip


DEFAULT_REDIS_IMAGE = "redis:7.0.15"


class ManagedRedis(_Model):
    """A Redis the operator runs for one gateway: one pod, nothing on disk (limits are
    seconds long; a restarted Redis starts empty and every limit is whole again)."""

    image: str = Field(default=DEFAULT_REDIS_IMAGE, min_length=1, max_length=512)
    max_memory_mi_b: int = Field(
        default=64, ge=8, le=65536, alias="maxMemoryMiB",
        description="Redis's maxmemory; the least recently used keys go first past it.",
    )  # fmt: skip
    resources: Resources = Field(
        default_factory=lambda: Resources(
            requests={"cpu": "100m", "memory": "96Mi"}, limits={"memory": "256Mi"}
        )
    )


class GatewayRateLimits(_Model):
    """Per-tenant limits (the tenant from the token's tenant claim; the client's address
    without auth), shared by every gateway replica through Redis."""

    cel: ClassVar[list[dict[str, str]]] = [
        rule(
            "!(has(self.redisUrl) && has(self.managedRedis))",
            "spec.rateLimits: give redisUrl (a Redis you run) or managedRedis (one the "
            "operator runs), not both",
        ),
        rule(
            "self.tiers.all(a, self.tiers.exists_one(b, b.name == a.name))",
            "spec.rateLimits.tiers: two tiers share a name: give each its own",
            ".tiers",
        ),
        rule(
            "self.tiers.exists(t, t.name == self.defaultTier)",
            "spec.rateLimits.defaultTier names no tier: use one of spec.rateLimits.tiers[].name",
            ".defaultTier",
        ),
        rule(
            "!has(self.tenants) || self.tenants.all(k, "
            "self.tiers.exists(t, t.name == self.tenants[k]))",
            "spec.rateLimits.tenants: a tenant's tier names no tier: use one of "
            "spec.rateLimits.tiers[].name",
            ".tenants",
        ),
    ]

    tiers: list[RateTier] = Field(min_length=1, max_length=32)
    default_tier: str = Field(
        pattern=NAME_PATTERN, max_length=63, description="The tier of tenants not listed."
    )
    tenants: dict[str, Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]] = Field(
        default_factory=dict,
        description="Tenant -> tier name, for the tenants not in the default tier.",
        json_schema_extra={"maxProperties": 1000},
    )  # fmt: skip
    redis_url: str | None = Field(
        default=None, pattern=r"^(redis|rediss)://", max_length=2048,
        description="The Redis all replicas share limits through. Without it (or "
        "managedRedis), or while it cannot be reached, each replica limits on its own at "
        "1 / replicas of every limit.",
    )  # fmt: skip
    managed_redis: ManagedRedis | None = Field(
        default=None,
        description="The operator runs a Redis for this gateway (`{}` for the defaults) and "
        "the replicas share limits through it.",
    )


class GatewayBreaker(_Model):
    """Each fleet's circuit breaker: opened by failures or slow first audio."""

    window_seconds: int = Field(default=10, ge=1, le=300)
    min_requests: int = Field(default=5, ge=1, le=100_000)
    error_rate: float = Field(default=0.5, gt=0, le=1)
    slow_seconds: float = Field(
        default=2.0, gt=0, le=60,
        description="A first audio later than this counts as slow (it queued).",
    )  # fmt: skip
    slow_rate: float = Field(default=0.8, gt=0, le=1)
    open_seconds: float = Field(default=2.0, gt=0, le=600)
    max_open_seconds: float = Field(default=8.0, gt=0, le=3600)
    probes: int = Field(default=3, ge=1, le=100)


class GatewayTls(_Model):
    """HTTPS on the gateway's listener."""

    secret_name: str = Field(
        pattern=NAME_PATTERN, max_length=253,
        description="A kubernetes.io/tls Secret (tls.crt, tls.key), e.g. a cert-manager "
        "Certificate's: a renewed one is loaded by the running pods.",
    )  # fmt: skip


class Balancer(StrEnum):
    LEAST_OUTSTANDING = "least-outstanding"
    ROUND_ROBIN = "round-robin"


class TtsGatewaySpec(_Model):
    cel: ClassVar[list[dict[str, str]]] = [
        rule(
            "!has(self.rateLimits) || self.rateLimits.tiers.all(t, !has(t.characterBurst) "
            "|| t.characterBurst >= self.maxInputCharacters)",
            "spec.rateLimits.tiers[].characterBurst is below spec.maxInputCharacters, so the "
            "longest request could never pass: raise characterBurst or lower "
            "maxInputCharacters",
            ".rateLimits",
        ),
    ]
    replicas: int = Field(default=2, ge=0, le=100, description="Gateway pods.")
    image: str = Field(default=DEFAULT_GATEWAY_IMAGE, min_length=1, max_length=512)
    routes: list[GatewayRoute] = Field(min_length=1, max_length=32)
    auth: GatewayAuth | None = Field(
        default=None, description="Without it, anyone who reaches the Service may call it."
    )
    balancer: Balancer = Field(
        default=Balancer.LEAST_OUTSTANDING,
        description="Power-of-two choices on outstanding characters, or round robin.",
    )
    max_input_characters: int = Field(default=4096, ge=1, le=4096)
    rate_limits: GatewayRateLimits | None = Field(
        default=None, description="Per-tenant rate limits; without them nobody is limited."
    )
    breaker: GatewayBreaker = Field(default_factory=GatewayBreaker)
    tls: GatewayTls | None = Field(
        default=None, description="HTTPS on the listener (the Service's port 443); off: HTTP."
    )
    cache_mi_b: int = Field(
        default=64, ge=0, le=16384, alias="cacheMiB",
        description="Memory per gateway pod for replies spoken before, replayed at once; 0: off.",
    )  # fmt: skip
    resources: Resources = Field(
        default_factory=lambda: Resources(
            requests={"cpu": "250m", "memory": "256Mi"}, limits={"memory": "1Gi"}
        )
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=16)

    def fleet_names(self) -> list[str]:
        """The TtsDeployments the routes lead to, fallbacks too, each once."""
        names = [n for r in self.routes for n in (r.fleet, r.fallback) if n is not None]
        return list(dict.fromkeys(names))

    def duplicate_model(self) -> tuple[int, str] | None:
        """(route index, model) of the first model name routed twice, or None."""
        seen: set[str] = set()
        for index, route in enumerate(self.routes):
            for model in route.models:
                if model in seen:
                    return index, model
                seen.add(model)
        return None


class GatewayFleet(_Model):
    name: str
    ready: bool = False
    ready_replicas: int = 0


class GatewayRedis(_Model):
    """The Redis the operator runs for a gateway (managedRedis)."""

    service: str
    ready: bool = False


class TtsGatewayStatus(_Model):
    model_config = ConfigDict(extra="allow")

    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    replicas: int = 0
    ready_replicas: int = 0
    url: str | None = Field(default=None, description="The speech API's base URL in-cluster.")
    fleets: list[GatewayFleet] = Field(default_factory=list)
    redis: GatewayRedis | None = Field(
        default=None, description="The Redis the operator runs for the gateway, if it does."
    )


# ---- TtsRegion: this cluster's region, its peers, failover and residency --------------------

REGION_KIND = "TtsRegion"
REGION_PLURAL = "ttsregions"
REGION_SINGULAR = "ttsregion"
REGION_SHORT_NAMES = ["ttsr"]
REGION_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_URL = r"^https?://[^\s]+$"


class TokenRef(_Model):
    name: str = Field(pattern=NAME_PATTERN, max_length=253)
    key: str = Field(default="token", pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)


class FailoverMode(StrEnum):
    ACTIVE_ACTIVE = "active-active"
    ACTIVE_STANDBY = "active-standby"


class RegionPeer(_Model):
    """Another region, as this region reaches it."""

    name: str = Field(pattern=REGION_PATTERN, max_length=63, description="The peer's region name.")
    gateway_url: str = Field(
        pattern=_URL, max_length=2048,
        description="The peer's speech API (its TtsGateway behind its load balancer): probes "
        "and this region's Envoy reach the peer there.",
    )  # fmt: skip
    status_url: str | None = Field(
        default=None, pattern=_URL, max_length=2048,
        description="The peer operator's status endpoint: its own view of every region.",
    )  # fmt: skip
    weight: int = Field(
        default=100, ge=1, le=10000,
        description="Its share of traffic in active-active (relative to the other regions').",
    )  # fmt: skip
    standby: bool = Field(
        default=False,
        description="active-standby: this peer takes traffic only when every active region "
        "nearer in the list is down.",
    )


class RegionDetection(_Model):
    """When a region counts as down: probes by each observer, and a quorum of them."""

    cel: ClassVar[list[dict[str, str]]] = [
        rule(
            "self.recoverAfter >= self.failuresToDown",
            "spec.detection.recoverAfter is below failuresToDown, so a region could come "
            "back faster than it went: raise recoverAfter",
        ),
    ]
    probe_interval_seconds: float = Field(
        default=2.0, ge=0.5, le=60,
        description="How often each observer sends a tiny real synthesis through a gateway.",
    )  # fmt: skip
    probe_timeout_ms: int = Field(
        default=1500, ge=50, le=30000,
        description="A probe without its first audio by then has failed.",
    )  # fmt: skip
    ttfa_threshold_ms: int = Field(
        default=800, ge=10, le=30000,
        description="A probe whose first audio came later than this counts as a failure.",
    )  # fmt: skip
    error_rate_threshold: float = Field(
        default=0.5, gt=0, le=1,
        description="A region whose gateway answered this share of its requests with 5xx "
        "(over the last failuresToDown probe intervals) counts as failing.",
    )  # fmt: skip
    failures_to_down: int = Field(
        default=3, ge=1, le=20,
        description="Consecutive failed probes before an observer votes a region down.",
    )  # fmt: skip
    recover_after: int = Field(
        default=5, ge=1, le=100,
        description="Consecutive good probes before an observer votes a region up again.",
    )  # fmt: skip
    witness_url: str | None = Field(
        default=None, pattern=_URL, max_length=2048,
        description="With two regions, a witness outside both (`ttsfleet witness`) whose "
        "vote breaks the tie; ignored with three or more.",
    )  # fmt: skip
    probe_model: str = Field(
        default="tts-1", pattern=API_NAME_PATTERN,
        description="The model the probe asks every gateway for (one of its routes).",
    )  # fmt: skip
    probe_voice: str = Field(default="alloy", pattern=API_NAME_PATTERN)
    probe_token_secret_ref: TokenRef | None = Field(
        default=None,
        description="A Secret key holding the bearer token probes send (gateways with JWT auth).",
    )


class RegionFailback(_Model):
    cel: ClassVar[list[dict[str, str]]] = [
        rule(
            "self.steps.all(s, s >= 1 && s <= 100) && self.steps[self.steps.size() - 1] == 100",
            "spec.failback.steps must be percentages in 1..100 ending at 100: "
            "for example [10, 25, 50, 100]",
            ".steps",
        ),
        rule(
            "self.steps.isSorted() && self.steps.all(s, self.steps.exists_one(t, t == s))",
            "spec.failback.steps must increase: for example [10, 25, 50, 100]",
            ".steps",
        ),
    ]
    stabilisation_seconds: int = Field(
        default=60, ge=0, le=86400,
        description="How long a returning region must stay healthy before traffic goes back.",
    )  # fmt: skip
    steps: list[int] = Field(
        default=[10, 25, 50, 100], min_length=1, max_length=8,
        description="The share (%) of its own traffic a returning region takes at each step.",
    )  # fmt: skip
    step_seconds: int = Field(
        default=30, ge=1, le=3600,
        description="Time at each step; the next step needs the region healthy throughout.",
    )  # fmt: skip
    backoff: float = Field(
        default=2.0, ge=1, le=10,
        description="A region that fails again during failback, or within maxWindowSeconds "
        "of its last return, has its stabilisation window multiplied by this.",
    )  # fmt: skip
    max_window_seconds: int = Field(
        default=600, ge=0, le=86400,
        description="The longest a lengthened window gets, and how long after its return a "
        "region's relapse still lengthens it.",
    )  # fmt: skip


class ResidencySet(_Model):
    """Tenants (the gateway's tenant claim) whose speech is only made in these regions."""

    name: str = Field(pattern=REGION_PATTERN, max_length=63, description="For messages: eu, in…")
    tenants: list[str] = Field(min_length=1, max_length=1000)
    regions: list[str] = Field(min_length=1, max_length=16)


class ParentRef(_Model):
    name: str = Field(pattern=NAME_PATTERN, max_length=253)
    namespace: str | None = Field(default=None, pattern=NAME_PATTERN, max_length=63)
    section_name: str | None = Field(default=None, pattern=NAME_PATTERN, max_length=253)


class RegionPublish(_Model):
    """The traffic shares, published for a global front door: weighted DNS records
    (external-dns DNSEndpoint) and/or Gateway API HTTPRoute backend weights."""

    hostname: str = Field(
        pattern=r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+$",
        max_length=253, description="The name clients resolve, e.g. speech.example.com.",
    )  # fmt: skip
    dns_endpoint: bool = Field(
        default=True,
        description="A DNSEndpoint with one weighted record per region taking traffic "
        "(setIdentifier = region; aws/weight), kept in step with the agent's view.",
    )
    record_ttl: int = Field(default=30, ge=1, le=86400, description="Seconds; short for failover.")
    http_route_parents: list[ParentRef] = Field(
        default_factory=list, max_length=8,
        description="Gateways (Gateway API) to attach an HTTPRoute to: this region's gateway "
        "Service and an ExternalName Service per peer, weighted by traffic share.",
    )  # fmt: skip


class CaBundleRef(_Model):
    name: str = Field(pattern=NAME_PATTERN, max_length=253)
    key: str = Field(default="ca.crt", pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)


class RegionEnvoy(_Model):
    image: str = Field(default="envoyproxy/envoy:v1.40.0", min_length=1, max_length=512)
    port: int = Field(default=10000, ge=1024, le=65535, description="The speech listener.")
    ca_config_map_ref: CaBundleRef | None = Field(
        default=None,
        alias="caConfigMapRef",
        description="A ConfigMap key holding the CA certificates (PEM) Envoy trusts for "
        "HTTPS gateways (a private CA, as cert-manager's trust-manager distributes); unset: "
        "the Envoy image's public CA bundle. Envoy sends each gateway URL's host name as "
        "SNI and checks the certificate against it.",
    )


class TtsRegionSpec(_Model):
    cel: ClassVar[list[dict[str, str]]] = [
        rule(
            "self.peers.all(p, p.name != self.region)",
            "spec.peers lists this region itself (spec.region): remove it from peers",
            ".peers",
        ),
        rule(
            "self.peers.all(p, self.peers.exists_one(q, q.name == p.name))",
            "spec.peers names a region twice: keep one entry per region",
            ".peers",
        ),
        rule(
            "self.peers.size() != 1 || has(self.detection.witnessUrl)",
            "two regions cannot break a tie between themselves: set "
            "spec.detection.witnessUrl (a witness outside both), or add a third region",
            ".detection",
        ),
        rule(
            "self.residency.all(s, s.regions.all(r, r == self.region || "
            "self.peers.exists(p, p.name == r)))",
            "spec.residency[].regions names a region that is neither spec.region nor in "
            "spec.peers: add the peer or fix the name",
            ".residency",
        ),
        rule(
            "!has(self.publish) || !self.publish.dnsEndpoint || has(self.gatewayUrl)",
            "spec.publish.dnsEndpoint needs spec.gatewayUrl (this region's public address, "
            "the target of its record): set it, or set dnsEndpoint: false",
            ".publish",
        ),
        rule(
            "self.mode != 'active-standby' || self.peers.exists(p, p.standby)",
            "spec.mode is active-standby but no peer has standby: true: mark the standby "
            "region(s) or use active-active",
            ".mode",
        ),
    ]
    region: str = Field(
        pattern=REGION_PATTERN, max_length=63, description="This cluster's region name."
    )
    gateway: str = Field(
        pattern=NAME_PATTERN, max_length=63,
        description="The TtsGateway (in this namespace) that is this region's front door.",
    )  # fmt: skip
    weight: int = Field(
        default=100, ge=1, le=10000, description="This region's share of traffic (active-active)."
    )
    peers: list[RegionPeer] = Field(
        min_length=1, max_length=15,
        description="The other regions, nearest first: a client region's traffic fails over "
        "in this order.",
    )  # fmt: skip
    mode: FailoverMode = Field(default=FailoverMode.ACTIVE_ACTIVE)
    detection: RegionDetection = Field(default_factory=RegionDetection)
    failback: RegionFailback = Field(default_factory=RegionFailback)
    residency: list[ResidencySet] = Field(
        default_factory=list, max_length=64,
        description="Tenants pinned to regions; every gateway refuses to serve them elsewhere.",
    )  # fmt: skip
    gateway_url: str | None = Field(
        default=None, pattern=_URL, max_length=2048,
        description="This region's own gateway as its agent probes it; unset: the "
        "TtsGateway's in-cluster Service.",
    )  # fmt: skip
    image: str = Field(
        default=DEFAULT_GATEWAY_IMAGE, min_length=1, max_length=512,
        description="The image of the region agent (`ttsfleet region`): the gateway's.",
    )  # fmt: skip
    publish: RegionPublish | None = Field(
        default=None, description="Publish the traffic shares for DNS and Gateway API."
    )
    envoy: RegionEnvoy | None = Field(
        default=None,
        description="Run this region's clients' Envoy beside the agent, which programs it "
        "through an EDS file on a shared volume (replaced by rename); unset: no Envoy.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Nodes the agent's pod (and its Envoy) may run on."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=16, description="Taints the agent's pod tolerates."
    )

    def regions(self) -> list[str]:
        """Every region, this one first, then the peers nearest first."""
        return [self.region, *(p.name for p in self.peers)]


class RegionState(StrEnum):
    HEALTHY = "Healthy"
    SUSPECT = "Suspect"
    DOWN = "Down"
    STABILISING = "Stabilising"
    RAMPING = "Ramping"


class PeerStatus(_Model):
    model_config = ConfigDict(extra="allow")

    name: str
    state: RegionState = RegionState.HEALTHY
    traffic_percent: int = Field(default=100, description="Share of its own traffic it takes.")
    since: str | None = None
    down_votes: list[str] = Field(default_factory=list, description="Observers that see it down.")
    message: str = ""


class TtsRegionStatus(_Model):
    model_config = ConfigDict(extra="allow")

    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    regions: list[PeerStatus] = Field(
        default_factory=list, description="Every region's state as this region's agent sees it."
    )
    status_url: str | None = Field(
        default=None, description="The agent's votes in-cluster: what peers name as statusUrl."
    )
