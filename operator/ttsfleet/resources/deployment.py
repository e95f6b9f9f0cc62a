"""The Deployment running Triton: ports, probes, GPU resources, drain, restricted security."""

from __future__ import annotations

from typing import Any

from ttsfleet.resources.common import (
    CONFIG_HASH_ANNOTATION,
    HASH_ANNOTATION,
    Manifest,
    TtsObject,
    child,
    configmap_name,
    labels,
    selector_labels,
)
from ttsfleet.resources.configmap import STREAM_CONFIG_KEY, models
from ttsfleet.resources.placement import Placement
from ttsfleet.triton import contract

# Seconds a stopping pod keeps serving after it leaves the EndpointSlices, so that
# clients and Prometheus see it go before it stops taking requests.
ENDPOINT_GRACE_SECONDS = 5
DEFAULT_RESOURCES = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}


def triton_args(tts: TtsObject, served: list[str]) -> list[str]:
    spec = tts.spec
    args = [
        f"--model-repository={contract.MODEL_REPOSITORY}",
        "--model-control-mode=explicit",
        *(f"--load-model={model}" for model in served),
        f"--http-port={contract.HTTP_PORT}",
        f"--grpc-port={contract.GRPC_PORT}",
        f"--metrics-port={contract.METRICS_PORT}",
        "--allow-metrics=true",
        "--metrics-config=histogram_latencies=true",
        # On SIGTERM Triton refuses new requests and lets open ones finish.
        f"--exit-timeout-secs={spec.runtime.graceful_drain_seconds}",
    ]
    if spec.cache is not None:
        args.append(f"--cache-config=local,size={spec.cache.size_mib * 1024 * 1024}")
    return args + list(spec.runtime.extra_args)


def _probe(path: str, period: int, failures: int) -> Manifest:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 2,
    }


def _resources(tts: TtsObject, gpu: dict[str, str]) -> Manifest:
    wanted = tts.spec.runtime.resources
    requests = {k: str(v) for k, v in (wanted.requests or DEFAULT_RESOURCES["requests"]).items()}
    limits = {k: str(v) for k, v in (wanted.limits or DEFAULT_RESOURCES["limits"]).items()}
    # Extended resources (GPUs, MIG slices) are requested through limits.
    return {"requests": requests, "limits": limits | gpu}


def build_deployment(tts: TtsObject, configmap: Manifest, placement: Placement) -> Manifest:
    spec = tts.spec
    served = models(tts)
    model = served[0]
    drain = spec.runtime.graceful_drain_seconds
    container: Manifest = {
        "name": "triton",
        "image": spec.runtime.image,
        "command": ["tritonserver"],
        "args": triton_args(tts, served),
        "ports": [
            {"name": "http", "containerPort": contract.HTTP_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": contract.GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": contract.METRICS_PORT, "protocol": "TCP"},
        ],
        "resources": _resources(tts, placement.resources),
        # Model load can take minutes on a cold node; readiness takes over after it.
        "startupProbe": _probe("/v2/health/ready", 5, 120),
        "readinessProbe": _probe("/v2/health/ready", 5, 2),
        "livenessProbe": _probe("/v2/health/live", 10, 3),
        "lifecycle": {"preStop": {"sleep": {"seconds": ENDPOINT_GRACE_SECONDS}}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
        },
        "volumeMounts": [
            {
                "name": "model-config",
                "mountPath": f"{contract.MODEL_REPOSITORY}/{model}/config.pbtxt",
                "subPath": "config.pbtxt",
                "readOnly": True,
            },
            *(
                {
                    "name": "model-config",
                    "mountPath": f"{contract.MODEL_REPOSITORY}/{other}/config.pbtxt",
                    "subPath": STREAM_CONFIG_KEY,
                    "readOnly": True,
                }
                for other in served[1:]
            ),
            # The Python backend talks to its stubs through shared memory.
            {"name": "shm", "mountPath": "/dev/shm"},  # noqa: S108 - in the container
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - in the container
        ],
    }
    pod_spec: Manifest = {
        "containers": [container],
        "terminationGracePeriodSeconds": drain + ENDPOINT_GRACE_SECONDS + 5,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "enableServiceLinks": False,
        "volumes": [
            {"name": "model-config", "configMap": {"name": configmap_name(tts)}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
        ],
    }
    if placement.node_selector:
        pod_spec["nodeSelector"] = placement.node_selector
    if placement.tolerations:
        pod_spec["tolerations"] = placement.tolerations
    if placement.affinity:
        pod_spec["affinity"] = placement.affinity
    template: dict[str, Any] = {
        "metadata": {
            "labels": labels(tts),
            # A new model config rolls the pods.
            "annotations": {
                CONFIG_HASH_ANNOTATION: configmap["metadata"]["annotations"][HASH_ANNOTATION]
            },
        },
        "spec": pod_spec,
    }
    body = {
        "spec": {
            "replicas": spec.desired_replicas,
            "selector": {"matchLabels": selector_labels(tts)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0},
            },
            "template": template,
        }
    }
    return child(tts, "apps/v1", "Deployment", tts.name, body)
