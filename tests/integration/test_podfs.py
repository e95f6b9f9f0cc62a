"""A local pod's files and environment, read from the real apiserver as the local
runner reads them: ConfigMap, Secret, downward API and projected volumes, env refs."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.conftest import Cluster
from ttsfleet import kube
from ttsfleet.cluster import podfs
from ttsfleet.cluster.runner import KubeSource


def pod(namespace: str, cluster: Cluster, **spec: Any) -> dict[str, Any]:
    manifest = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "files", "namespace": namespace, "labels": {"app": "files"}},
        "spec": {
            "containers": [{"name": "c", "image": "ttsfleet/gateway:0.1.0"}],
            "automountServiceAccountToken": False,
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
        } | spec,
    }  # fmt: skip
    kube.apply(cluster.api, [manifest], "pytest")
    found = kube.get(cluster.api, "v1", "Pod", "files", namespace)
    assert found is not None
    return found


@pytest.fixture
def objects(cluster: Cluster, namespace: str) -> None:
    kube.apply(
        cluster.api,
        [
            {"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": "settings", "namespace": namespace},
             "data": {"gateway.json": '{"v": 1}', "mode": "fast"}},
            {"apiVersion": "v1", "kind": "Secret",
             "metadata": {"name": "keys", "namespace": namespace},
             "data": {"jwks.json": base64.b64encode(b'{"keys": []}').decode(),
                      "password": base64.b64encode(b"hunter2").decode()}},
        ],
        "pytest",
    )  # fmt: skip


@pytest.mark.usefixtures("objects")
def test_volumes_are_written_and_follow_their_configmap(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    made = pod(
        namespace, cluster,
        volumes=[
            {"name": "config", "configMap": {"name": "settings"}},
            {"name": "picked", "configMap": {"name": "settings",
                                             "items": [{"key": "mode", "path": "sub/m"}]}},
            {"name": "keys", "secret": {"secretName": "keys"}},
            {"name": "absent", "secret": {"secretName": "nope", "optional": True}},
            {"name": "info", "downwardAPI": {"items": [
                {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
                {"path": "app", "fieldRef": {"fieldPath": "metadata.labels['app']"}}]}},
            {"name": "api", "projected": {"sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}},
                {"configMap": {"name": "settings", "items": [{"key": "mode", "path": "m"}]}},
            ]}},
            {"name": "scratch", "emptyDir": {}},
        ],
    )  # fmt: skip
    volumes = podfs.Volumes(made, tmp_path, KubeSource(cluster.api))
    dirs = volumes.sync()
    assert (dirs["config"] / "gateway.json").read_text() == '{"v": 1}'
    assert (dirs["picked"] / "sub" / "m").read_text() == "fast"
    assert (dirs["keys"] / "password").read_bytes() == b"hunter2"
    assert list(dirs["absent"].iterdir()) == []
    assert (dirs["info"] / "name").read_text() == "files"
    assert (dirs["info"] / "app").read_text() == "files"
    token = (dirs["api"] / "token").read_text()
    claims = jwt.decode(token, options={"verify_signature": False})
    # Bound to the pod, as kubelet's projected tokens are.
    assert claims["kubernetes.io"]["pod"]["name"] == "files"
    assert (dirs["api"] / "m").read_text() == "fast"
    assert dirs["scratch"].is_dir()

    # A changed ConfigMap is written again (a new file, renamed in); the token is kept.
    before = (dirs["config"] / "gateway.json").stat().st_ino
    kube.apply(cluster.api, [{"apiVersion": "v1", "kind": "ConfigMap",
                              "metadata": {"name": "settings", "namespace": namespace},
                              "data": {"gateway.json": '{"v": 2}', "mode": "fast"}}],
               "pytest")  # fmt: skip
    volumes.sync()
    assert (dirs["config"] / "gateway.json").read_text() == '{"v": 2}'
    assert (dirs["config"] / "gateway.json").stat().st_ino != before
    assert (dirs["api"] / "token").read_text() == token


@pytest.mark.usefixtures("objects")
def test_env_is_resolved_as_kubelet_resolves_it(cluster: Cluster, namespace: str) -> None:
    made = pod(namespace, cluster)
    container = {"name": "c", "env": [
        {"name": "PLAIN", "value": "1"},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "password"}}},
        {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
        {"name": "MAYBE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "x",
                                                            "optional": True}}},
    ]}  # fmt: skip
    env = podfs.environment(container, made, KubeSource(cluster.api))
    assert env == {"PLAIN": "1", "POD": "files", "NS": namespace, "PASSWORD": "hunter2",
                   "MODE": "fast"}  # fmt: skip


@pytest.mark.usefixtures("objects")
def test_what_a_pod_needs_and_cannot_have_is_named(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    made = pod(namespace, cluster, volumes=[{"name": "v", "configMap": {"name": "missing"}}])
    with pytest.raises(podfs.PodSetupError, match=f"ConfigMap {namespace}/missing"):
        podfs.Volumes(made, tmp_path, KubeSource(cluster.api)).sync()
    container = {
        "name": "c",
        "env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "nope"}}}],
    }
    with pytest.raises(podfs.PodSetupError, match="has no key 'nope'"):
        podfs.environment(container, made, KubeSource(cluster.api))
