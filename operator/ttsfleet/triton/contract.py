"""The serving contract: model names, tensors, ports and metric names.

The client, the benchmarks, the autoscaler and the operator all read these
names from here.
"""

from __future__ import annotations

from dataclasses import dataclass

STREAM_MODEL = "tts_stream"
BATCH_MODEL = "tts_batch"
MODEL_REPOSITORY = "/models"

# The model image (triton.Dockerfile) and the voices it has installed: the operator
# refuses other voices on it, and serving.engine.voices() finds exactly these in a
# serving install (a test checks that the two agree).
IMAGE_REPOSITORY = "ttsfleet/triton-tts"
IMAGE_VOICES = ("en_US-joe-medium",)

HTTP_PORT = 8000
GRPC_PORT = 8001
METRICS_PORT = 8002


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str
    dims: tuple[int, ...]
    optional: bool = False


INPUTS = (
    Tensor("TEXT", "TYPE_STRING", (1,)),
    Tensor("VOICE", "TYPE_STRING", (1,), optional=True),
    Tensor("SPEAKING_RATE", "TYPE_FP32", (1,), optional=True),
    Tensor("FORMAT", "TYPE_STRING", (1,), optional=True),
    # "realtime" (a listener waits: tts_stream's default) or "bulk" (tts_batch's).
    Tensor("PRIORITY", "TYPE_STRING", (1,), optional=True),
)
PRIORITIES = ("realtime", "bulk")
OUTPUTS = (
    Tensor("AUDIO", "TYPE_INT16", (-1,)),
    Tensor("SAMPLE_RATE", "TYPE_INT32", (1,)),
)

# Metrics the autoscaler reads: Triton's own, and those the models export.
PENDING_REQUESTS = "nv_inference_pending_request_count"
QUEUE_DURATION_US = "nv_inference_queue_duration_us"
REQUEST_SUCCESS = "nv_inference_request_success"
TIME_TO_FIRST_AUDIO = "ttsfleet_time_to_first_audio_seconds"
AUDIO_SECONDS = "ttsfleet_audio_seconds_total"
INFLIGHT_STREAMS = "ttsfleet_inflight_streams"
# Live streams the chunked engine has taken and not yet answered with audio: its
# scheduler's queue, which Triton's pending count cannot see (every request is handed
# to the scheduler at once).
WAITING_STREAMS = "ttsfleet_waiting_streams"


def image_is(image: str, repository: str) -> bool:
    """Whether `image` is `repository`, from any registry, at any tag or digest."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:  # a tag (a registry's port sits before a slash)
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    return name == repository or name.endswith("/" + repository)


def is_model_image(image: str) -> bool:
    """Whether `image` is ttsfleet's model image, from any registry, at any tag or digest."""
    return image_is(image, IMAGE_REPOSITORY)


# Metrics the speech gateway exports, per fleet (`namespace/name`): what it has sent to
# a fleet and not had back, its own time to first audio, and its answers.
GATEWAY_INFLIGHT_STREAMS = "ttsfleet_gateway_inflight_streams"
GATEWAY_QUEUED_CHARACTERS = "ttsfleet_gateway_queued_characters"
GATEWAY_TIME_TO_FIRST_AUDIO = "ttsfleet_gateway_time_to_first_audio_seconds"
GATEWAY_REQUESTS = "ttsfleet_gateway_requests_total"
GATEWAY_RETRIES = "ttsfleet_gateway_retries_total"
GATEWAY_CACHE_REQUESTS = "ttsfleet_gateway_cache_requests_total"
GATEWAY_WEBSOCKETS = "ttsfleet_gateway_websockets"
GATEWAY_CONTEXTS = "ttsfleet_gateway_contexts_total"
GATEWAY_RATELIMITED = "ttsfleet_gateway_ratelimited_total"
GATEWAY_RATELIMIT_SHARED = "ttsfleet_gateway_ratelimit_shared"
GATEWAY_BREAKER_STATE = "ttsfleet_gateway_breaker_state"
GATEWAY_FALLBACKS = "ttsfleet_gateway_fallback_requests_total"
GATEWAY_SHED = "ttsfleet_gateway_shed_requests_total"
GATEWAY_RESIDENCY_REFUSED = "ttsfleet_gateway_residency_refused_total"
