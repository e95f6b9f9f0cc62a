"""Small helpers shared by the suites."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent


def _examples(kind: str) -> list[Path]:
    return [
        path
        for path in sorted((REPO / "examples").glob("*.yaml"))
        if yaml.safe_load(path.read_text()).get("kind") == kind
    ]


EXAMPLES = _examples("TtsDeployment")
GATEWAY_EXAMPLES = _examples("TtsGateway")


class _LiteralDumper(yaml.SafeDumper):
    """Dumps multi-line strings as literal blocks, so golden files read like the real thing."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _str)


def dump_yaml(docs: list[Any]) -> str:
    return yaml.dump_all(docs, Dumper=_LiteralDumper, sort_keys=False, width=100)


def load_example(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc
