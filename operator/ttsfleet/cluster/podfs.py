"""A local pod's files and environment, as kubelet gives them to a container.

- Volumes: `configMap`, `secret`, `downwardAPI`, `projected` (service-account token,
  ConfigMaps, Secrets, the downward API) and `emptyDir`, written into a directory per
  volume. `Volumes.sync` writes them again: files whose content changed are replaced
  atomically (written aside, renamed), so a process re-reading a file sees the old or
  the new content, never half of one; ConfigMap and Secret changes reach running pods.
  A projected token is requested bound to the pod, and again after 80 % of its life.
- Environment: `value`, `fieldRef` (metadata.name, .namespace, .uid, spec.nodeName,
  .serviceAccountName, status.podIP, .hostIP), `secretKeyRef`, `configMapKeyRef`
  (`optional` honoured), and the `KUBERNETES_SERVICE_*` variables in-cluster clients
  read.

Reads go through `Source` (the runner's API client in production; a test may give the
real API too): this module does no I/O against the cluster itself.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

Manifest = dict[str, Any]
TOKEN_REFRESH_SHARE = 0.8


class PodSetupError(RuntimeError):
    """What a pod needs and cannot have (a missing ConfigMap, key or Secret)."""


class Source(Protocol):
    def config_map(self, namespace: str, name: str) -> dict[str, str] | None: ...

    def secret(self, namespace: str, name: str) -> dict[str, bytes] | None: ...

    def token(self, pod: Manifest, audience: str | None, seconds: int) -> str: ...


def field_value(pod: Manifest, path: str) -> str:
    """A pod's downward-API `fieldPath`."""
    meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
    values = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
    }
    for prefix, source in (
        ("metadata.labels['", "labels"),
        ("metadata.annotations['", "annotations"),
    ):
        if path.startswith(prefix) and path.endswith("']"):
            return str((meta.get(source) or {}).get(path[len(prefix) : -2], ""))
    if path not in values:
        raise PodSetupError(f"fieldRef {path} is not supported by the local runner")
    return str(values[path] or "")


def _keys(
    data: dict[str, Any], items: list[Manifest] | None, what: str, optional: bool
) -> dict[str, Any]:
    """`data` as files: every key, or the `items` (key -> path) asked for."""
    if not items:
        return dict(data)
    out = {}
    for item in items:
        if item["key"] not in data:
            if optional:
                continue
            raise PodSetupError(f"{what} has no key {item['key']!r}")
        out[item["path"]] = data[item["key"]]
    return out


@dataclass
class Volumes:
    """The volumes of one pod, under `root/<volume name>/`."""

    pod: Manifest
    root: Path
    source: Source
    clock: Callable[[], float] = time.time
    _tokens: dict[str, tuple[float, float]] = field(default_factory=dict)  # file -> (at, life)

    def sync(self) -> dict[str, Path]:
        """Write every volume's files (changed ones only); volume name -> its directory."""
        out: dict[str, Path] = {}
        for volume in self.pod["spec"].get("volumes") or []:
            target = self.root / volume["name"]
            target.mkdir(parents=True, exist_ok=True)
            files = self._files(volume, target)
            for relative, content in files.items():
                _write(target / relative, content)
            out[volume["name"]] = target
        return out

    def _files(self, volume: Manifest, target: Path) -> dict[str, str | bytes]:
        namespace = self.pod["metadata"]["namespace"]
        if "configMap" in volume:
            return self._config_map(namespace, volume["configMap"])
        if "secret" in volume:
            return self._secret(namespace, volume["secret"])
        if "downwardAPI" in volume:
            return self._downward(volume["downwardAPI"].get("items") or [])
        if "projected" in volume:
            files: dict[str, str | bytes] = {}
            for source in volume["projected"].get("sources") or []:
                if "serviceAccountToken" in source:
                    files |= self._token(source["serviceAccountToken"], target)
                elif "configMap" in source:
                    files |= self._config_map(namespace, source["configMap"])
                elif "secret" in source:
                    files |= self._secret(namespace, source["secret"])
                elif "downwardAPI" in source:
                    files |= self._downward(source["downwardAPI"].get("items") or [])
            return files
        return {}  # emptyDir: the directory itself

    def _config_map(self, namespace: str, ref: Manifest) -> dict[str, str | bytes]:
        return self._files_of(self.source.config_map, "ConfigMap", namespace, ref["name"], ref)

    def _secret(self, namespace: str, ref: Manifest) -> dict[str, str | bytes]:
        name = ref.get("secretName") or ref.get("name") or ""
        return self._files_of(self.source.secret, "Secret", namespace, name, ref)

    @staticmethod
    def _files_of(
        read: Callable[[str, str], dict[str, Any] | None], kind: str, namespace: str,
        name: str, ref: Manifest,
    ) -> dict[str, str | bytes]:  # fmt: skip
        """A ConfigMap's or Secret's keys as files (`items`: only those, renamed)."""
        data = read(namespace, name)
        optional = bool(ref.get("optional"))
        if data is None:
            if optional:
                return {}
            raise PodSetupError(f"{kind} {namespace}/{name} does not exist")
        return _keys(data, ref.get("items"), f"{kind} {namespace}/{name}", optional)

    def _downward(self, items: list[Manifest]) -> dict[str, str | bytes]:
        return {
            item["path"]: field_value(self.pod, item["fieldRef"]["fieldPath"])
            for item in items
            if "fieldRef" in item
        }

    def _token(self, ref: Manifest, target: Path) -> dict[str, str | bytes]:
        path = ref.get("path") or "token"
        seconds = int(ref.get("expirationSeconds") or 3607)
        at, life = self._tokens.get(path, (0.0, 0.0))
        if (target / path).exists() and self.clock() < at + TOKEN_REFRESH_SHARE * life:
            return {}  # the token written before is still fresh
        token = self.source.token(self.pod, ref.get("audience"), seconds)
        self._tokens[path] = (self.clock(), float(seconds))
        return {path: token}


def _write(path: Path, content: str | bytes) -> None:
    data = content.encode() if isinstance(content, str) else content
    if path.exists() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.new")
    staged.write_bytes(data)
    staged.replace(path)


def environment(container: Manifest, pod: Manifest, source: Source) -> dict[str, str]:
    """The container's `env`, resolved as kubelet resolves it."""
    namespace = pod["metadata"]["namespace"]
    out: dict[str, str] = {}
    for entry in container.get("env") or []:
        name = entry["name"]
        if "value" in entry:
            out[name] = str(entry["value"])
            continue
        ref = entry.get("valueFrom") or {}
        if "fieldRef" in ref:
            out[name] = field_value(pod, ref["fieldRef"]["fieldPath"])
        elif "secretKeyRef" in ref:
            value = _ref(source.secret, namespace, ref["secretKeyRef"], "Secret")
            if value is not None:
                out[name] = value.decode() if isinstance(value, bytes) else value
        elif "configMapKeyRef" in ref:
            found = _ref(source.config_map, namespace, ref["configMapKeyRef"], "ConfigMap")
            if found is not None:
                out[name] = str(found)
        else:
            raise PodSetupError(f"env {name}: only value, fieldRef, secretKeyRef and "
                                "configMapKeyRef are supported by the local runner")  # fmt: skip
    return out


def _ref(
    read: Callable[[str, str], dict[str, Any] | None], namespace: str, ref: Manifest, kind: str
) -> Any:
    data = read(namespace, ref["name"])
    if data is None or ref["key"] not in data:
        if ref.get("optional"):
            return None
        what = "does not exist" if data is None else f"has no key {ref['key']!r}"
        raise PodSetupError(f"{kind} {namespace}/{ref['name']} {what}")
    return data[ref["key"]]


def decode_secret(secret: Manifest) -> dict[str, bytes]:
    """A Secret's `data` (base64) and `stringData`, as bytes."""
    out = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    out |= {k: str(v).encode() for k, v in (secret.get("stringData") or {}).items()}
    return out
