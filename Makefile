# MicroEmo developer entry points. Two commands do everything on a fresh machine:
#   make demo   -- set up, then run the small end-to-end demo
#   make test   -- set up, then run the whole test suite
# Set-up is idempotent: the venv is rebuilt only when setup.cfg, pyproject.toml,
# constraints.txt or requirements-nodeps.txt change.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.microemo-installed
SETUP_INPUTS := setup.cfg pyproject.toml constraints.txt requirements-nodeps.txt
PIP := $(BIN)/python -m pip --disable-pip-version-check
# The CPU torch wheel lies in /opt/wheels on our machines; elsewhere this is a no-op.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
# Our machines' pip config lists a local extra index that lacks most packages; pip warns
# once per package. Drop that line, keep every other message.
PIP_NOISE := is ignored: it is neither a file nor a directory
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=
# DeepSpeed JIT-builds ops on first use; keep the cache beside the venv.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

SYSTEM_TOOLS := ffmpeg:ffmpeg ffprobe:ffmpeg espeak-ng:espeak-ng

.PHONY: help setup system demo test test-fast bench lint clean

help:
	@echo "make demo   - set up everything, run 'microemo demo --out $(DEMO_OUT)'"
	@echo "make test   - set up everything, run the whole test suite (unit + integration)"
	@echo "make test-fast - unit tests only (skips tests marked integration)"
	@echo "make setup  - system packages + project venv ($(VENV)) only"
	@echo "make lint   - ruff over the sources"
	@echo "make clean  - remove the venv and demo output"

system:
	@missing=""; \
	for pair in $(SYSTEM_TOOLS); do \
	  command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
	  echo "installing system packages:$$missing"; \
	  $$sudo apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(STAMP): $(SETUP_INPUTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing microemo and its dependencies into $(VENV) (a few minutes the first time)"
	$(PIP) install -q $(FIND_LINKS) -c constraints.txt -e '.[embedded,test]' 2> >(grep -v "$(PIP_NOISE)" >&2)
	$(PIP) install -q $(FIND_LINKS) -c constraints.txt --no-deps -r requirements-nodeps.txt 2> >(grep -v "$(PIP_NOISE)" >&2)
	@touch $@

setup: system $(STAMP)

demo: setup
	$(BIN)/microemo demo --out $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

# make bench BENCH_ARGS="--quick" (or e.g. "preprocess train"): see docs/benchmarks.md
BENCH_ARGS ?=
bench: setup
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: setup
	$(PIP) install -q ruff
	$(BIN)/ruff check pipeline model jobs tests bench

clean:
	rm -rf $(VENV) $(DEMO_OUT)
