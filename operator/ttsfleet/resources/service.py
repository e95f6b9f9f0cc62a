"""The Service: its EndpointSlices are how clients and Prometheus find the pods."""

from __future__ import annotations

from ttsfleet.resources.common import Manifest, TtsObject, child, selector_labels
from ttsfleet.triton import contract


def build_service(tts: TtsObject) -> Manifest:
    ports = [
        {"name": "http", "port": contract.HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
        {
            "name": "grpc",
            "port": contract.GRPC_PORT,
            "targetPort": "grpc",
            "protocol": "TCP",
            "appProtocol": "grpc",
        },
        {
            "name": "metrics",
            "port": contract.METRICS_PORT,
            "targetPort": "metrics",
            "protocol": "TCP",
        },
    ]
    spec = {"type": "ClusterIP", "selector": selector_labels(tts), "ports": ports}
    return child(tts, "v1", "Service", tts.name, {"spec": spec})


def endpoints(tts: TtsObject) -> dict[str, str]:
    host = f"{tts.name}.{tts.namespace}.svc"
    return {
        "http": f"http://{host}:{contract.HTTP_PORT}",
        "grpc": f"{host}:{contract.GRPC_PORT}",
        "metrics": f"http://{host}:{contract.METRICS_PORT}/metrics",
    }
