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
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ttsfleet.failover.traffic import Level

CLUSTER = "gateways"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
_CLA = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


def address(url: str) -> tuple[str, int]:
    """(IP, port) of a gateway URL; a host name is resolved now (EDS takes addresses)."""
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"{url!r} has no host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        ipaddress.ip_address(parts.hostname)
        return parts.hostname, port
    except ValueError:
        info = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
        return str(info[0][4][0]), port


def bootstrap(node: str, port: int, admin_port: int, eds_path: Path, *,
              host: str = "127.0.0.1", retries: int = 3, consecutive_5xx: int = 2,
              ejection_seconds: float = 10.0) -> dict[str, Any]:  # fmt: skip
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
                            "route": {"cluster": CLUSTER, "timeout": "0s", "retry_policy": retry},
                        }
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
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


def load_assignment(levels: Sequence[Level], addresses: Mapping[str, tuple[str, int]],
                    version: str) -> dict[str, Any]:  # fmt: skip
    """The EDS file for `levels` (see `traffic.priorities`): one locality per region."""
    endpoints = []
    for priority, level in enumerate(levels):
        for region, weight in level:
            ip, port = addresses[region]
            endpoint = {"address": _socket(ip, port)}
            endpoints.append(
                {
                    "locality": {"region": region},
                    "priority": priority,
                    "load_balancing_weight": weight,
                    "lb_endpoints": [{"endpoint": endpoint, "load_balancing_weight": 1}],
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
