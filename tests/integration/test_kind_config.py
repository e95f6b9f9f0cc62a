"""The kind cluster config (hack/kind/cluster.yaml) against kind's own v1alpha4 types.

No Docker engine runs here, so kind itself cannot. `kind-config-check` (hack/kind/check,
built by `make tools` against the kind release in versions.env) decodes a config as
that release does: apiVersion and kind, then a strict decode that refuses unknown
fields and wrong types, then kind's defaulting. It prints the defaulted config as JSON.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import REPO, load_example
from ttsfleet.cluster import toolchain

CONFIG = REPO / "hack" / "kind" / "cluster.yaml"
NODE_IMAGE = re.compile(r"^kindest/node:(v1\.\d+)\.\d+@sha256:[0-9a-f]{64}$")


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(toolchain.binary("kind-config-check")), str(path)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def decoded() -> dict[str, Any]:
    result = check(CONFIG)
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def test_the_checker_is_built_against_the_kind_release_in_versions_env() -> None:
    go_mod = (REPO / "hack" / "kind" / "check" / "go.mod").read_text()
    required = re.search(r"^\s*sigs.k8s.io/kind (v\S+)$", go_mod, re.MULTILINE)
    assert required is not None
    assert required[1] == toolchain.versions()["KIND_VERSION"]


def test_the_config_is_a_control_plane_and_two_workers_on_one_pinned_image(
    decoded: dict[str, Any],
) -> None:
    nodes = decoded["nodes"]
    assert [n["role"] for n in nodes] == ["control-plane", "worker", "worker"]
    images = {n["image"] for n in nodes}
    assert len(images) == 1, images
    pinned = NODE_IMAGE.match(images.pop())
    assert pinned is not None, "a kindest/node tag pinned by its sha256 digest"
    minor = toolchain.kubernetes_version().rsplit(".", 1)[0]
    assert pinned[1] == minor, "the node image runs the project's Kubernetes minor"


def test_the_cpu_example_lands_on_the_first_worker_only(decoded: dict[str, Any]) -> None:
    """docs/kind.md loads the Triton image into ttsfleet-worker alone: the fleet's
    nodeSelector must pick that node (kind names workers in order) and no other."""
    example = load_example(REPO / "examples" / "local-cpu.yaml")
    selector = example["spec"]["placement"]["nodeSelector"].items()
    fits = [i for i, n in enumerate(decoded["nodes"]) if selector <= n.get("labels", {}).items()]
    workers = [i for i, n in enumerate(decoded["nodes"]) if n["role"] == "worker"]
    assert fits == workers[:1]
    assert len(workers) >= 2, "room for two operator pods on different nodes"


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Sets `value` at a dotted path of the config; a number is a list index."""

    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = doc
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[last] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_set("workers", 2), "workers: unknown field"),
        (_set("nodes.1.label", {"ttsfleet.io/local": "true"}), "nodes[1].label: unknown field"),
        (_set("nodes.1.labels", ["ttsfleet.io/local=true"]), "nodes[1].labels: wrong type"),
        (_set("networking", {"apiServerPort": "6443/tcp"}), "networking.apiServerPort: wrong type"),
        (_set("apiVersion", "kind.x-k8s.io/v1alpha3"), 'apiVersion: "kind.x-k8s.io/v1alpha3"'),
        (_set("kind", "Config"), 'kind: "Config" is not "Cluster"'),
    ],
    ids=["top-level-field", "node-field", "node-type", "networking-type", "apiversion", "kind"],
)
def test_a_broken_copy_is_refused_naming_the_field(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], None], expected: str
) -> None:
    doc: dict[str, Any] = yaml.safe_load(CONFIG.read_text())
    mutate(doc)
    broken = tmp_path / "cluster.yaml"
    broken.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = check(broken)
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"{broken}: {expected}" in result.stderr, result.stderr
