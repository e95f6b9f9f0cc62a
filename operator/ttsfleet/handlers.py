"""The kopf layer: thin handlers that look up the `Controller` and call it.

Everything is level-based (`on.event`): the first sight of an object after start and
any change of its spec apply its children; a child deleted or edited by hand
re-applies its owner, and any child change refreshes the owner's status (a
Deployment's status is how readiness arrives). Pods are not watched: kopf filters
labels in the client, so a pod watch would read every pod of the cluster.

kopf keeps no state of its own on our objects (no progress or diff-base annotations,
no finalizers: owner references collect the children) and posts no Events. An error
raised by an `on.event` handler is logged by kopf and the event dropped (it is not
retried): the controller records the failure and applies the object again at its
next re-check.
"""

from __future__ import annotations

from typing import Any

import kopf

from ttsfleet.api import v1alpha1 as api
from ttsfleet.controller import Controller

MANAGED = {"app.kubernetes.io/managed-by": "ttsfleet"}
CHILDREN = (
    ("apps", "v1", "deployments"),
    ("", "v1", "services"),
    ("", "v1", "configmaps"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("networking.k8s.io", "v1", "networkpolicies"),
)


def _controller(memo: Any) -> Controller:
    controller: Controller = memo.controller
    return controller


@kopf.on.startup()
def _settings(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.enabled = False  # our own Events say what happened
    settings.execution.max_workers = 16
    # Bounded per-object workers: a burst of thousands of new objects waits in the
    # watch streams instead of as thousands of queued bodies in memory.
    settings.queueing.worker_limit = 64
    settings.queueing.idle_timeout = 2.0
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60


@kopf.on.login()
def _login(memo: Any, **_: Any) -> kopf.ConnectionInfo:
    """kopf talks to the cluster with the same credentials as the controller's client."""
    cfg = _controller(memo).api.configuration
    # "Bearer <token>" from a kubeconfig token or the in-cluster ServiceAccount
    # (this also runs the in-cluster refresh hook, so rotated tokens are picked up
    # when kopf logs in again); None with client certificates.
    header = cfg.get_api_key_with_prefix("BearerToken", alias="authorization") or ""
    token = header.removeprefix("Bearer ").strip()
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
        scheme="Bearer" if token else None,
        token=token or None,
    )


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL, id="ttsdeployment")
def tts_event(event: kopf.RawEvent, body: kopf.Body, memo: Any, **_: Any) -> None:
    _controller(memo).on_tts_event(event.get("type"), dict(body))


@kopf.on.event(api.GROUP, api.VERSION, api.GATEWAY_PLURAL, id="ttsgateway")
def gateway_event(event: kopf.RawEvent, body: kopf.Body, memo: Any, **_: Any) -> None:
    _controller(memo).on_gateway_event(event.get("type"), dict(body))


@kopf.on.event(api.GROUP, api.VERSION, api.REGION_PLURAL, id="ttsregion")
def region_event(event: kopf.RawEvent, body: kopf.Body, memo: Any, **_: Any) -> None:
    _controller(memo).on_region_event(event.get("type"), dict(body))


def child_event(event: kopf.RawEvent, body: kopf.Body, memo: Any, **_: Any) -> None:
    _controller(memo).on_child_event(event.get("type"), dict(body))


for _group, _version, _plural in CHILDREN:
    kopf.on.event(_group, _version, _plural, labels=MANAGED, id=f"child-{_plural}")(child_event)
