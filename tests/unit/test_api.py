"""The CRD comes from the typed models, stays small, and says what the API promises."""

from __future__ import annotations

import yaml

from tests.helpers import EXAMPLES, GATEWAY_EXAMPLES, REGION_EXAMPLES, REPO, load_example
from ttsfleet import manifests
from ttsfleet.api import crd
from ttsfleet.api.v1alpha1 import TtsDeploymentSpec, TtsGatewaySpec, TtsRegionSpec


def test_generated_files_are_up_to_date() -> None:
    """CI fails on drift: regenerate with `make manifests` and commit the result."""
    for rel, content in manifests.generated().items():
        assert (REPO / rel).read_text() == content, f"{rel} is stale: run `make manifests`"


def test_the_crd_fits_client_side_apply() -> None:
    # kubectl's client-side apply keeps the whole object in an annotation (256 KiB).
    assert len(crd.render().encode()) < 64 * 1024


def test_the_crd_has_scale_status_and_printer_columns() -> None:
    doc = yaml.safe_load(crd.render())
    version = doc["spec"]["versions"][0]
    assert doc["spec"]["names"]["shortNames"] == ["ttsd"]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert "status" in version["subresources"]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Ready", "Replicas", "Precision", "Placement", "Age"]


def test_every_example_parses_with_the_models() -> None:
    assert EXAMPLES
    for path in EXAMPLES:
        doc = load_example(path)
        assert doc["apiVersion"] == "ttsfleet.io/v1alpha1"
        TtsDeploymentSpec.model_validate(doc["spec"])


def test_every_region_example_parses_and_fronts_an_example_gateway() -> None:
    assert REGION_EXAMPLES
    gateways = {load_example(path)["metadata"]["name"] for path in GATEWAY_EXAMPLES}
    for path in REGION_EXAMPLES:
        spec = TtsRegionSpec.model_validate(load_example(path)["spec"])
        assert spec.gateway in gateways, path.name


def test_every_gateway_example_parses_and_routes_to_an_example_fleet() -> None:
    assert GATEWAY_EXAMPLES
    fleets = {load_example(path)["metadata"]["name"] for path in EXAMPLES}
    for path in GATEWAY_EXAMPLES:
        spec = TtsGatewaySpec.model_validate(load_example(path)["spec"])
        assert {route.fleet for route in spec.routes} <= fleets, path.name
