"""A client region's Envoy: its static bootstrap and the EDS file the operator rewrites.

The bootstrap (written once) holds a listener, one route with retries that move to the
next priority (`previous_priorities`) and to another host (`previous_hosts`) on a
refused connection, a reset, a 5xx or a 421 (a residency refusal), and one cluster of
the regions' gateways whose endpoints come from a file (file-based EDS). Outlier
detection may eject every host (`max_ejection_percent: 100`), so a whole region goes
within a few requests, before the quorum has spoken.

The EDS file holds `traffic.priorities` as localities (one per region) with their
priority and weight. Envoy applies a file replaced by rename within milliseconds and
ignores one rewritten in place, so `write_atomic` writes aside and renames.

Gateways may be HTTPS: each endpoint carries its gateway's host name, the route
rewrites the Host header to it, and an HTTPS endpoint is matched (by its metadata) to a
TLS transport socket that sends that name as SNI (`auto_host_sni`) and checks the
certificate against it (`auto_sni_san_validation`) and against `ca_file` (by default the
image's system bundle; a private CA through `TtsRegion.spec.envoy.caConfigMapRef`).
HTTP and HTTPS gateways can be mixed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ttsfleet.failover.traffic import Level

CLUSTER = "gateways"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
_CLA = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


# The Envoy image's (Ubuntu's) bundle of public CAs.
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"
_TLS_MATCH = "envoy.transport_socket_match"


@dataclass(frozen=True)
class Upstream:
    """A gateway as an EDS endpoint: where to connect, and what to call it."""

    ip: str
    port: int
    host: str  # the URL's host name: the Host header, SNI and the name its certificate holds
    tls: bool


def upstream(url: str) -> Upstream:
    """A gateway URL as an endpoint; a host name is resolved now (EDS takes addresses)."""
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"{url!r} has no host")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    try:
        ipaddress.ip_address(parts.hostname)
        ip = parts.hostname
    except ValueError:
        info = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
        ip = str(info[0][4][0])
    return Upstream(ip, port, parts.hostname, tls)


READY_PATH = "/envoy/ready"  # answered by Envoy on its listener, never forwarded


def bootstrap(node: str, port: int, admin_port: int, eds_path: Path, *,
              host: str = "127.0.0.1", retries: int = 3, consecutive_5xx: int = 2,
              ejection_seconds: float = 10.0,
              ca_file: str = SYSTEM_CA) -> dict[str, Any]:  # fmt: skip
    """Envoy's bootstrap for client region `node`: listener on host:port, admin on loopback."""
    retry = {
        "retry_on": "connect-failure,refused-stream,reset,5xx,retriable-status-codes",
        "retriable_status_codes": [421],
        "num_retries": retries,
        "retry_priority": {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.priority."
                "previous_priorities.v3.PreviousPrioritiesConfig",
                "update_frequency": 1,
            },
        },
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.retry.host."
                    "previous_hosts.v3.PreviousHostsPredicate"
                },
            }
        ],
        "host_selection_retry_max_attempts": 5,
    }
    manager = {
        "@type": f"{_HCM}.HttpConnectionManager",
        "stat_prefix": "speech",
        "codec_type": "AUTO",
        "stream_idle_timeout": "300s",
        "route_config": {
            "name": "speech",
            "virtual_hosts": [
                {
                    "name": "speech",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            # Speech streams for as long as it speaks: no route timeout.
                            "route": {
                                "cluster": CLUSTER,
                                "timeout": "0s",
                                "retry_policy": retry,
                                # The gateway's own name (its endpoint's), for its
                                # virtual host and, on HTTPS, SNI and the certificate.
                                "auto_host_rewrite": True,
                            },
                        }
                    ],
                }
            ],
        },
        "http_filters": [
            {
                # Answers READY_PATH itself: what a kubelet's readiness probe reaches on
                # the pod IP (the admin endpoint stays on loopback).
                "name": "envoy.filters.http.health_check",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http."
                    "health_check.v3.HealthCheck",
                    "pass_through_mode": False,
                    "headers": [{"name": ":path", "string_match": {"exact": READY_PATH}}],
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    cluster = {
        "name": CLUSTER,
        "type": "EDS",
        "connect_timeout": "0.5s",
        "eds_cluster_config": {
            "eds_config": {
                "path_config_source": {"path": str(eds_path)},
                "resource_api_version": "V3",
            }
        },
        "common_lb_config": {"locality_weighted_lb_config": {}},
        "outlier_detection": {
            "consecutive_5xx": consecutive_5xx,
            "consecutive_gateway_failure": consecutive_5xx,
            "consecutive_local_origin_failure": consecutive_5xx,
            "split_external_local_origin_errors": True,
            "interval": "1s",
            "base_ejection_time": f"{ejection_seconds}s",
            "max_ejection_percent": 100,
        },
        # HTTPS endpoints (metadata tls: true) get TLS; the rest plain HTTP.
        "transport_socket_matches": [
            {
                "name": "https",
                "match": {"tls": True},
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls."
                        "v3.UpstreamTlsContext",
                        "common_tls_context": {
                            "validation_context": {"trusted_ca": {"filename": ca_file}}
                        },
                        # SNI from the endpoint's host name (not the client's Host), and
                        # the certificate checked against that name.
                        "auto_host_sni": True,
                        "auto_sni_san_validation": True,
                    },
                },
            }
        ],
    }
    return {
        "node": {"id": node, "cluster": "ttsfleet-edge"},
        "admin": {"address": _socket("127.0.0.1", admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "speech",
                    "address": _socket(host, port),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [cluster],
        },
    }


def bootstrap_admin_port(path: Path) -> int:
    """The admin port of a bootstrap file written by `bootstrap`."""
    doc = json.loads(path.read_text())
    return int(doc["admin"]["address"]["socket_address"]["port_value"])


def load_assignment(levels: Sequence[Level], upstreams: Mapping[str, Upstream],
                    version: str) -> dict[str, Any]:  # fmt: skip
    """The EDS file for `levels` (see `traffic.priorities`): one locality per region."""
    endpoints = []
    for priority, level in enumerate(levels):
        for region, weight in level:
            gateway = upstreams[region]
            endpoint = {"address": _socket(gateway.ip, gateway.port), "hostname": gateway.host}
            lb_endpoint: dict[str, Any] = {"endpoint": endpoint, "load_balancing_weight": 1}
            if gateway.tls:
                lb_endpoint["metadata"] = {"filter_metadata": {_TLS_MATCH: {"tls": True}}}
            endpoints.append(
                {
                    "locality": {"region": region},
                    "priority": priority,
                    "load_balancing_weight": weight,
                    "lb_endpoints": [lb_endpoint],
                }
            )
    return {
        "version_info": version,
        "resources": [
            {
                "@type": _CLA,
                "cluster_name": CLUSTER,
                "endpoints": endpoints,
                # A priority level takes all its traffic until its hosts are all unhealthy
                # (1 host per region); the default 1.4 would already spill at 72 %.
                "policy": {"overprovisioning_factor": 100},
            }
        ],
    }


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def write_atomic(path: Path, document: dict[str, Any]) -> None:
    """Write aside, then rename over `path`: Envoy sees the whole file or the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{os.getpid()}.new")
    staged.write_text(json.dumps(document, indent=1))
    staged.replace(path)
