# servoloop: two commands do all set-up on a fresh Debian machine with Python 3.11.
#   make up    install into .venv, build the bundled tiny model if missing, run the whole system
#   make test  the same install, then the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_DIR ?= .servoloop/models/tiny-chat
# A GPU machine gets the CUDA build of vLLM; everywhere else the CPU build over the local CPU torch wheel.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
EXTRAS := $(if $(HAS_GPU),vllm-gpu,vllm),dev
TORCH_SPEC := $(if $(HAS_GPU),,torch==2.13.0)
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: install model up demo test lint proto docs clean help

help:
	@echo "make up      install, build the tiny model if missing, run servoloop up"
	@echo "make test    install, then run the whole test suite"
	@echo "make demo    install, then servoloop demo: the closed loop with simulated users (~15 min)"
	@echo "make proto   regenerate gRPC code from schemas/proto"
	@echo "make lint    ruff"
	@echo "make docs    regenerate docs/configuration.md and docs/api.md"
	@echo "make audit   pip-audit the installed packages, report in benchmarks/results/pip_audit.json"

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@bash scripts/ensure-system.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	@# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break transformers imports next to the
	@# CPU torch; triton is the GPU compiler (~0.9 GB) that vLLM on CPU does not use.
	@if [ -z "$(HAS_GPU)" ]; then $(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true; fi
	@rm -f $(VENV)/.installed-*
	@touch $@

model: install
	@test -f $(MODEL_DIR)/config.json || $(BIN)/servoloop model build-tiny --out $(MODEL_DIR)

up: install model
	$(BIN)/servoloop up

# The closed loop in one command: simulated users, drift, retraining, canary, poisoning, a report.
demo: install model
	$(BIN)/servoloop demo --report demo-report.json --keep-running

test: install model
	@set +e; $(BIN)/python -m pytest -q --durations=25 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

lint: install
	$(BIN)/ruff check .

proto: install
	$(BIN)/python -m schemas.proto_gen

# The generated references; tests/deploy/test_docs.py fails when the committed ones are stale.
docs: install
	$(BIN)/python docs/gen_config.py > docs/configuration.md
	$(BIN)/python docs/gen_api.py > docs/api.md

# Dependency audit: the report is recorded whatever the service answers; only a found vulnerability fails.
audit: install
	@$(BIN)/pip-audit --local --progress-spinner off --format json -o .pip_audit_raw.json 2>.pip_audit.err; \
	$(BIN)/python scripts/audit_report.py .pip_audit_raw.json "$$(tail -n 1 .pip_audit.err)"; rc=$$?; \
	rm -f .pip_audit_raw.json .pip_audit.err; exit $$rc

clean:
	rm -rf $(VENV) .servoloop .pytest_cache
