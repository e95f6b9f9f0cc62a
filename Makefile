# ttsfleet: `make demo` runs the main job locally, `make test` passes the tests.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PY := python3.11
VENV := .venv
BIN := $(VENV)/bin
CLUSTER ?= ttsfleet
PYTEST_ARGS ?=

.PHONY: help deps tools cluster cluster-down demo manifests lint fmt test test-unit bench-cluster bench-operator bench-serving bench-precision bench-placement bench-gpu bench-autoscale bench-sim bench-chaos bench-gateway bench-regions bench-regions-processes clean

help: ## List the targets.
	@grep -E '^[a-z.-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip==25.3
	$(BIN)/pip install -q -e '.[dev,serve,gateway,edge]'
	touch $@

.venv: $(VENV)/.installed ## Create the virtualenv (.venv/bin/ttsfleet is the CLI).

deps: ## Install the Debian packages that are missing.
	bash hack/deps.sh

tools: deps ## Build the control plane, etcd, kubectl, kwok, helm, Prometheus once (cached).
	bash hack/tools.sh build

cluster: tools .venv ## Start (or reuse) the local cluster with simulated GPU nodes.
	$(BIN)/ttsfleet cluster up --name $(CLUSTER) --reuse

cluster-down: .venv ## Stop the local cluster and remove all it made.
	$(BIN)/ttsfleet cluster down $(CLUSTER)

demo: deps tools .venv ## The main job locally: cluster, operator, a TtsDeployment, speech in out/demo.wav.
	$(BIN)/ttsfleet demo --name $(CLUSTER) --output out/demo.wav

manifests: .venv ## Regenerate the CRD, the chart's copy and the Triton configs from their sources.
	$(BIN)/python -m ttsfleet.manifests

lint: .venv ## ruff (lint and format check) and mypy.
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m ttsfleet.manifests --check

fmt: .venv ## Format and fix what ruff can.
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test-unit: .venv ## Unit tests only (no cluster, no builds).
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

test: deps tools .venv lint ## Everything: installs, lint, types, unit, integration and e2e tests.
	$(BIN)/pytest tests $(PYTEST_ARGS)

bench-cluster: tools .venv ## Measure builds, cluster start, memory, 1,000 nodes and pods (JSON).
	$(BIN)/python benchmarks/cluster_bench.py --out benchmarks/results/cluster.json

bench-operator: tools .venv ## Measure create->applied latency and 1,000 objects at scale (JSON).
	$(BIN)/python benchmarks/operator_bench.py --out benchmarks/results/operator.json

bench-serving: tools .venv ## TTFA by concurrency (chunked and sentence engines), bulk, through the demo cluster, batching, cache (JSON).
	$(BIN)/python benchmarks/serving_bench.py --out benchmarks/results/serving.json

bench-precision: .venv ## Build, measure and gate the FP32/FP16/INT8 variants (JSON).
	$(BIN)/python benchmarks/precision_bench.py --out benchmarks/results/precision.json

bench-placement: .venv ## Measure the planner's model footprint; placement table and density (JSON).
	$(BIN)/python benchmarks/placement_bench.py --out benchmarks/results/placement.json

bench-gpu: .venv ## The chunked engine on a GPU (onnxruntime-gpu): frame part, first chunk, memory, FP16 (JSON).
	$(BIN)/python benchmarks/gpu_bench.py --out benchmarks/results/gpu.json

bench-autoscale: tools .venv ## Breach -> scale write and TTFA around a scale-up on the real loop (JSON).
	$(BIN)/python benchmarks/autoscale_bench.py --out benchmarks/results/autoscale.json --run-out benchmarks/results/autoscale_run.json

bench-regions: .venv ## Three local clusters as regions: one lost, one flapping, one observer link cut (JSON; root).
	$(BIN)/python benchmarks/regions_bench.py --level clusters --out benchmarks/results/regions.json

bench-regions-processes: .venv ## The same scenarios at process level, in a netns of its own (JSON; root).
	bash hack/in-netns.sh ttsfleet-regions $(BIN)/python benchmarks/regions_bench.py --level processes --out benchmarks/results/regions_processes.json

bench-sim: .venv ## Simulate every trace with ttsfleet and its peers, check the goals (JSON).
	$(BIN)/python benchmarks/sim_bench.py --out benchmarks/results/sim.json

bench-chaos: tools .venv ## Kill and pause the leader of two operator replicas >= 10 times: failover (JSON).
	$(BIN)/python benchmarks/chaos_bench.py --out benchmarks/results/chaos.json

bench-gateway: deps tools .venv ## The speech gateway: added TTFA, auth, balancing, a replica killed, formats, sockets, barge-in, memory, cache (JSON).
	$(BIN)/python benchmarks/gateway_bench.py --out benchmarks/results/gateway.json

clean: ## Remove the virtualenv and caches of this checkout (not the built binaries).
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
