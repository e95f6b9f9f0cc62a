"""Write (or check) every generated file: `make manifests`.

- `crds/ttsfleet.io_ttsdeployments.yaml`, `..._ttsgateways.yaml` and `..._ttsregions.yaml`, the
  chart's copies and
  `docs/api-reference.md`, from the typed models;
- `triton_models/<model>/config.pbtxt`, from the same generator the operator's
  ConfigMaps use (defaults: CPU, FP32, one instance).

    python -m ttsfleet.manifests [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

from ttsfleet.api import crd
from ttsfleet.triton.config import ModelConfig, render

CRD_FILE = "ttsfleet.io_ttsdeployments.yaml"
GATEWAY_CRD_FILE = "ttsfleet.io_ttsgateways.yaml"
REGION_CRD_FILE = "ttsfleet.io_ttsregions.yaml"


def generated() -> dict[str, str]:
    """Relative path -> content of every generated file."""
    crd_text = crd.render()
    gateway_text = crd.render(crd.gateway_crd())
    region_text = crd.render(crd.region_crd())
    files = {
        f"crds/{CRD_FILE}": crd_text,
        f"charts/tts-operator/crds/{CRD_FILE}": crd_text,
        f"crds/{GATEWAY_CRD_FILE}": gateway_text,
        f"charts/tts-operator/crds/{GATEWAY_CRD_FILE}": gateway_text,
        f"crds/{REGION_CRD_FILE}": region_text,
        f"charts/tts-operator/crds/{REGION_CRD_FILE}": region_text,
        "docs/api-reference.md": crd.reference(),
    }
    for streaming in (True, False):
        config = ModelConfig(streaming=streaming, cache=not streaming)
        files[f"triton_models/{config.name}/config.pbtxt"] = render(config)
    return files


def main(argv: list[str]) -> int:
    root = Path.cwd()
    check = "--check" in argv
    stale = []
    for rel, content in generated().items():
        path = root / rel
        if path.exists() and path.read_text() == content:
            continue
        stale.append(rel)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    if check and stale:
        names = ", ".join(stale)
        print(f"generated files are stale: {names}: run `make manifests`", file=sys.stderr)
        return 1
    for rel in stale:
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
