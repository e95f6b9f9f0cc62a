"""The traffic shares, published for real deployments' global front doors. Pure.

- An external-dns `DNSEndpoint` (externaldns.k8s.io/v1alpha1): one record per region
  taking traffic, all under `publish.hostname`, each with its region as
  `setIdentifier` and its weight (`aws/weight`; other providers read their own
  provider-specific key), so weighted DNS sends each region its share. A region at
  0 % has no record: resolvers stop getting its address after one TTL.
- A Gateway API `HTTPRoute` (gateway.networking.k8s.io/v1, v1.6 types) attached to
  the given Gateways: this region's TtsGateway Service and one ExternalName Service per
  peer as backendRefs, weighted by share (a region at 0 % keeps its backendRef at
  weight 0).

The weights are `traffic.published_weights` of the region weights and the agent's view.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from ttsfleet.api import v1alpha1 as api

Manifest = dict[str, Any]

DNS_API = "externaldns.k8s.io/v1alpha1"
ROUTE_API = "gateway.networking.k8s.io/v1"


def _host(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return str(parts.hostname), parts.port or (443 if parts.scheme == "https" else 80)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def dns_endpoint(spec: api.TtsRegionSpec, weights: Mapping[str, int], meta: Manifest) -> Manifest:
    """A DNSEndpoint with a weighted record per region whose weight is above 0."""
    publish = spec.publish
    assert publish is not None and spec.gateway_url is not None
    urls = {spec.region: spec.gateway_url} | {p.name: p.gateway_url for p in spec.peers}
    endpoints = []
    for region, url in urls.items():
        if weights.get(region, 0) <= 0:
            continue
        host, _ = _host(url)
        endpoints.append(
            {
                "dnsName": publish.hostname,
                "recordType": "A" if _is_ip(host) else "CNAME",
                "targets": [host],
                "recordTTL": publish.record_ttl,
                "setIdentifier": region,
                "providerSpecific": [{"name": "aws/weight", "value": str(weights[region])}],
            }
        )
    return {"apiVersion": DNS_API, "kind": "DNSEndpoint", "metadata": meta,
            "spec": {"endpoints": endpoints}}  # fmt: skip


def peer_service_name(child: str, peer: str) -> str:
    return f"{child}-peer-{peer}"[:63].rstrip("-")


def http_route(spec: api.TtsRegionSpec, weights: Mapping[str, int], meta: Manifest,
               gateway_service: str, gateway_port: int) -> list[Manifest]:  # fmt: skip
    """ExternalName Services for the peers, and the HTTPRoute that weighs them with this
    region's own gateway Service."""
    publish = spec.publish
    assert publish is not None
    child = meta["name"]
    services = []
    backends = [{"kind": "Service", "name": gateway_service, "port": gateway_port,
                 "weight": weights.get(spec.region, 0)}]  # fmt: skip
    for peer in spec.peers:
        host, port = _host(peer.gateway_url)
        name = peer_service_name(child, peer.name)
        services.append(
            {
                "apiVersion": "v1", "kind": "Service", "metadata": meta | {"name": name},
                "spec": {"type": "ExternalName", "externalName": host,
                         "ports": [{"name": "http", "port": port, "protocol": "TCP"}]},
            }
        )  # fmt: skip
        backends.append(
            {"kind": "Service", "name": name, "port": port, "weight": weights.get(peer.name, 0)}
        )
    parents = [p.wire() for p in publish.http_route_parents]
    route = {
        "apiVersion": ROUTE_API,
        "kind": "HTTPRoute",
        "metadata": meta,
        "spec": {
            "parentRefs": parents,
            "hostnames": [publish.hostname],
            "rules": [{"backendRefs": backends}],
        },
    }
    return [*services, route]
