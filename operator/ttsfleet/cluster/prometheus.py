"""Prometheus for a local cluster: built from its Go module (Kubernetes service
discovery; Debian's 2.42 has it removed), scraping the Triton pods that really run.

Discovery is `role: pod` against the cluster's apiserver with node metadata
attached, and relabelling keeps only pods that carry `ttsfleet.io/deployment`, run
on a node labelled `ttsfleet.io/local=true` (kwok pods have no host behind their
IPs) and are Running, and only their `metrics` port. Samples get `namespace`,
`deployment` and `pod` labels, which is how the autoscaler joins them to their
TtsDeployment. It listens on loopback only.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from ttsfleet.cluster import toolchain
from ttsfleet.cluster.images import without_proxies

SCRAPE_INTERVAL = "1s"


def config(kubeconfig: Path) -> dict[str, Any]:
    def keep(label: str, regex: str) -> dict[str, Any]:
        return {"source_labels": [label], "regex": regex, "action": "keep"}

    def copy(label: str, target: str) -> dict[str, Any]:
        return {"source_labels": [label], "target_label": target}

    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [
            {
                "job_name": "ttsfleet-triton",
                "scrape_interval": SCRAPE_INTERVAL,
                "scrape_timeout": SCRAPE_INTERVAL,
                "kubernetes_sd_configs": [
                    {
                        "role": "pod",
                        "kubeconfig_file": str(kubeconfig),
                        "attach_metadata": {"node": True},
                    }
                ],
                "relabel_configs": [
                    keep("__meta_kubernetes_pod_label_ttsfleet_io_deployment", ".+"),
                    keep("__meta_kubernetes_node_label_ttsfleet_io_local", "true"),
                    keep("__meta_kubernetes_pod_phase", "Running"),
                    keep("__meta_kubernetes_pod_container_port_name", "metrics"),
                    copy("__meta_kubernetes_namespace", "namespace"),
                    copy("__meta_kubernetes_pod_label_ttsfleet_io_deployment", "deployment"),
                    copy("__meta_kubernetes_pod_name", "pod"),
                ],
            }
        ],
    }


def write_config(directory: Path, kubeconfig: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config(kubeconfig), sort_keys=False))
    return path


def start(directory: Path, kubeconfig: Path, port: int) -> subprocess.Popen[bytes]:
    """Start Prometheus in the background on 127.0.0.1:`port`, its data under `directory`."""
    path = write_config(directory, kubeconfig)
    with (directory / "prometheus.log").open("ab") as log:
        return subprocess.Popen(
            [
                str(toolchain.binary("prometheus")),
                f"--config.file={path}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=2d",
            ],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=without_proxies(os.environ),
        )  # fmt: skip
