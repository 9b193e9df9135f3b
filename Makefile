# flux — developer entry points.  `make run` and `make test` are the two commands a newcomer
# needs: both install what is missing (system packages, the virtualenv, the compiled engine),
# start what is not running, and are safe to repeat.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
VAR    := .var
PYTEST_ARGS ?=

export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: run test lint system deps build bench bench-scale soak fuzz clean

## System packages (etcd, Docker engine, iptables, busybox-static...) — installed only if missing.
system:
	@scripts/setup-system.sh

## The virtualenv with the project (editable) and its test extras; redone when packaging changes.
$(STAMP): pyproject.toml setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

deps: system $(STAMP)

## Compile the Cython engine in place (a no-op when nothing changed).
build: deps
	@mkdir -p $(VAR)
	@flock $(VAR)/build.lock $(BIN)/python setup.py -q build_ext --inplace >$(VENV)/build.log 2>&1 || { cat $(VENV)/build.log >&2; exit 1; }
	@$(BIN)/python -c 'import flux._splice, flux._histogram' || { echo "make: the compiled modules flux._splice and flux._histogram do not import" >&2; exit 1; }

## Set up, start etcd and dockerd if needed, and run fluxd in the foreground, with the status
## page (and /metrics) on $(RUN_PAGE) unless ARGS or FLUX_LISTEN_PROMETHEUS name a listener.
RUN_PAGE ?= 127.0.0.1:9380
run: build
	@scripts/ensure-dockerd.sh
	@scripts/ensure-etcd.sh
	@set -- $(ARGS); \
	case " $$* " in *" -listen-prometheus"*|*" --listen-prometheus"*) listen=;; *) listen='$(RUN_PAGE)';; esac; \
	if [ -n "$${FLUX_LISTEN_PROMETHEUS:-}" ]; then listen=; fi; \
	if [ -n "$$listen" ]; then \
		echo "make run: the status page will be at http://$$listen/ (open it in a browser)"; \
		set -- -listen-prometheus "$$listen" "$$@"; \
	fi; \
	echo "$(BIN)/fluxd $$*"; \
	exec $(BIN)/fluxd "$$@"

## Set up and run every test against the real parts (etcd, Docker, iptables).
test: build
	@scripts/ensure-dockerd.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: build
	$(BIN)/python -m pytest tests/test_sourcecode.py

## Benchmarks: fluxd against direct, HAProxy and nginx (benchmarks/README.md), about 13 minutes;
## results in benchmarks/results/.  `make bench BENCH_ARGS=--quick` is a three-minute smoke run.
BENCH_ARGS ?=
bench: build
	@FLUX_BENCH_TOOLS=1 scripts/setup-system.sh
	@$(BIN)/python -c 'import matplotlib' 2>/dev/null || flock $(VAR)/build.lock $(BIN)/python -m pip install -q -e '.[test,bench]'
	@scripts/ensure-dockerd.sh
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

## The control plane at 100, 1,000 and 5,000 services (benchmarks/scale.py): one change from the
## etcd write to the kernel, iptables sync time, full resync, RSS; about 10 minutes, results in
## benchmarks/results/scale.md (`make bench-scale SCALE_ARGS="--sizes 100 1000"` for less).
SCALE_ARGS ?=
bench-scale: build
	@scripts/ensure-dockerd.sh
	$(BIN)/python -m benchmarks.scale $(SCALE_ARGS)

## Soak: fluxd for $(SOAK_MINUTES) minutes under steady TCP and HTTP load while instances churn,
## a private dockerd and an etcd member restart and fluxd is SIGKILLed twice (benchmarks/soak.py).
## Fails on unexpected failed requests or on RSS/descriptor growth; writes
## benchmarks/results/soak.md and soak.png (`make soak SOAK_MINUTES=3` for a short run).
SOAK_MINUTES ?= 30
SOAK_ARGS ?=
soak: build
	@$(BIN)/python -c 'import matplotlib' 2>/dev/null || flock $(VAR)/build.lock $(BIN)/python -m pip install -q -e '.[test,bench]'
	@scripts/ensure-dockerd.sh
	$(BIN)/python -m benchmarks.soak --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

## Fuzz the HTTP/1.x framer against h11 (fuzz/fuzz_http_framer.py), then the HTTP/2 observer
## against hpack (fuzz/fuzz_h2_observer.py), with atheris, ten minutes each by default
## (`make fuzz FUZZ_TIME=60`); the corpora grow in .var/fuzz/, failing inputs land there.
FUZZ_TIME ?= 600
FUZZ_ARGS ?=
fuzz: build
	@mkdir -p $(VAR)/fuzz/http-framer $(VAR)/fuzz/h2-observer
	$(BIN)/python fuzz/fuzz_http_framer.py -max_total_time=$(FUZZ_TIME) -timeout=10 \
		-artifact_prefix=$(VAR)/fuzz/ $(FUZZ_ARGS) $(VAR)/fuzz/http-framer
	$(BIN)/python fuzz/fuzz_h2_observer.py -max_total_time=$(FUZZ_TIME) -timeout=10 \
		-artifact_prefix=$(VAR)/fuzz/ $(FUZZ_ARGS) $(VAR)/fuzz/h2-observer

clean:
	rm -rf build src/flux/_splice.c src/flux/_histogram.c src/flux/*.so src/*.egg-info

## fluxd's production image (Dockerfile), tagged $(IMAGE), on $(BASE_IMAGE).  Where no registry
## is reachable: `make image BASE_IMAGE=flux-base:bookworm` (builds that base first).
IMAGE            ?= fluxd:latest
BASE_IMAGE       ?= python:3.11-slim-bookworm
LOCAL_BASE_IMAGE := flux-base:bookworm

.PHONY: image base-image

image: $(if $(filter $(LOCAL_BASE_IMAGE),$(BASE_IMAGE)),base-image)
	@scripts/ensure-dockerd.sh
	@IMAGE='$(IMAGE)' BASE_IMAGE='$(BASE_IMAGE)' scripts/build-image.sh

## A local Debian bookworm base image (debootstrap + docker import), built once and cached.
base-image:
	@scripts/ensure-dockerd.sh
	@scripts/build-base-image.sh '$(LOCAL_BASE_IMAGE)'
