"""Where the locally built binaries of the real components live.

`hack/tools.sh` builds them once into `~/.cache/ttsfleet/bin/<name>-<version>/`;
both read the versions from `versions.env`, shipped in this package.
"""

from __future__ import annotations

import os
from functools import cache
from importlib import resources
from pathlib import Path

# binary -> (directory prefix, version key in versions.env)
_BINARIES: dict[str, tuple[str, str]] = {
    "kube-apiserver": ("k8s", "KUBERNETES_VERSION"),
    "kube-controller-manager": ("k8s", "KUBERNETES_VERSION"),
    "kube-scheduler": ("k8s", "KUBERNETES_VERSION"),
    "kubectl": ("k8s", "KUBERNETES_VERSION"),
    "etcd": ("etcd", "ETCD_VERSION"),
    "kwok": ("kwok", "KWOK_VERSION"),
    "kwokctl": ("kwok", "KWOK_VERSION"),
    "helm": ("helm", "HELM_VERSION"),
    "prometheus": ("prometheus", "PROMETHEUS_VERSION"),
    "kind-config-check": ("kind", "KIND_VERSION"),  # hack/kind/check, against kind's types
}


class MissingToolError(RuntimeError):
    """A binary that has not been built yet."""


@cache
def versions() -> dict[str, str]:
    text = (resources.files("ttsfleet.cluster") / "versions.env").read_text()
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs if not key.startswith("#")}


def cache_dir() -> Path:
    return Path(os.environ.get("TTSFLEET_CACHE", Path.home() / ".cache" / "ttsfleet"))


def kubernetes_version() -> str:
    return versions()["KUBERNETES_VERSION"]


def binary(name: str) -> Path:
    """The path of a built binary; a clear error if it is not built yet."""
    prefix, key = _BINARIES[name]
    version = versions()[key]
    if prefix == "helm":  # built against our Kubernetes version (see hack/tools.sh)
        version += f"+k8s-{kubernetes_version()}"
    path = cache_dir() / "bin" / f"{prefix}-{version}" / name
    if not os.access(path, os.X_OK):
        raise MissingToolError(
            f"{name} {version} is not built yet: "
            f"run `make tools` (it builds it once into {path.parent})"
        )
    return path


def published_crds() -> list[Path]:
    """The CRDs of the objects a TtsRegion publishes (Gateway API's Gateway and HTTPRoute,
    external-dns's DNSEndpoint), fetched by `make tools` from their Go modules."""
    found = []
    for prefix, key in (("gateway-api-crds", "GATEWAY_API_VERSION"),
                        ("external-dns-crds", "EXTERNAL_DNS_VERSION")):  # fmt: skip
        directory = cache_dir() / "bin" / f"{prefix}-{versions()[key]}"
        files = sorted(directory.glob("*.yaml"))
        if not files:
            raise MissingToolError(f"{prefix} are not fetched yet: run `make tools`")
        found += files
    return found


def bin_dirs() -> list[Path]:
    """The directories of the binaries built so far, for PATH (kubectl's first)."""
    found: list[Path] = []
    for name in _BINARIES:
        try:
            directory = binary(name).parent
        except MissingToolError:
            continue
        if directory not in found:
            found.append(directory)
    return found
