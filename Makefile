# Text-to-audio with a causal LM over continuous tokens — common commands.
# Every target that runs Python first (re)creates the virtual environment when it is
# missing or older than setup.cfg, so a fresh clone needs no separate install step.

SHELL := /bin/bash
PYTHON_BOOTSTRAP ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-setup
# CPU build of torch that this machine holds on disk (see README "Install recipe").
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev

EXP ?= demo
ARGS ?=
CKPT ?=
PROMPT ?=
PROMPTS ?=
SECONDS ?=
CFG ?=
STEPS ?=
SAMPLER ?=
STREAM ?=
AUDIO_PROMPT ?=
PROMPT_SECONDS ?=
TEMPERATURE ?=
SEED ?=
OUT ?=
PYTEST_ARGS ?=
# make tensorboard / make notebook listen on this address only; HOST=0.0.0.0 opens them to the network
HOST ?= 127.0.0.1
# make notebook opens notebooks/$(NB).ipynb
NB ?= explore_samples
PORT ?=

.DEFAULT_GOAL := help
.PHONY: help setup check train cache generate seam eval evaluator ablate bench figures gpu-check rehearsal test test-min test-rehearsal test-full tensorboard notebook corpus manifest clean-venv

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'
	@echo ""
	@echo "  Variables: EXP=<experiment> (default demo), ARGS=\"key=value ...\", CKPT=, PROMPT=, PROMPTS=, OUT="
	@echo "  Experiments: $$(ls experiments/*.yaml | xargs -n1 basename | sed 's/\.yaml//' | grep -v '^base$$' | tr '\n' ' ')"

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	@# the reference evaluation code the parity tests compare with; --no-deps: it declares torchaudio
	$(PY) -m pip install -q --disable-pip-version-check --no-deps audioldm_eval==0.0.3
	@touch $(STAMP)

setup: $(STAMP) ## Create/refresh the virtual environment (.venv) — other targets do this themselves

check: $(STAMP) ## Preflight: everything EXP needs on disk, all at once, with the commands that fix it: make check EXP=masked_base
	$(PY) -m experiments.preflight $(EXP) $(ARGS)

train: $(STAMP) ## Train an experiment: make train [EXP=demo] [ARGS="key=value ..."]
	$(PY) -m experiments.train $(EXP) $(ARGS)

cache: $(STAMP) ## Encode an experiment's manifest into its latent cache (resumable)
	$(PY) -m experiments.cache $(EXP) $(ARGS)

generate: $(STAMP) ## Generate audio: make generate [CKPT=...] PROMPT="..." | PROMPTS=file.txt [SECONDS= CFG= CFG_SCHEDULE= CFG_RESCALE= STEPS= SAMPLER= TEMPERATURE= SEED= OUT=] [AUDIO_PROMPT=clip.wav PROMPT_SECONDS=1] [STREAM=1]
	$(PY) -m experiments.generate \
	  $(if $(CKPT),--ckpt "$(CKPT)") $(if $(PROMPT),--prompt "$(PROMPT)") $(if $(PROMPTS),--prompts "$(PROMPTS)") \
	  $(if $(SECONDS),--seconds $(SECONDS)) $(if $(CFG),--cfg $(CFG)) \
	  $(if $(CFG_SCHEDULE),--cfg-schedule $(CFG_SCHEDULE)) $(if $(CFG_RESCALE),--cfg-rescale $(CFG_RESCALE)) $(if $(STEPS),--steps $(STEPS)) $(if $(SAMPLER),--sampler $(SAMPLER)) \
	  $(if $(AUDIO_PROMPT),--audio-prompt "$(AUDIO_PROMPT)") $(if $(PROMPT_SECONDS),--prompt-seconds $(PROMPT_SECONDS)) $(if $(STREAM),--stream) \
	  $(if $(TEMPERATURE),--temperature $(TEMPERATURE)) $(if $(SEED),--seed $(SEED)) $(if $(OUT),--out "$(OUT)") $(ARGS)

seam: $(STAMP) ## Measure the seam at long-form window shifts: make seam [EXP=demo] [CKPT=...] [SECONDS=6] [ARGS="--overlap 0.5"]
	$(PY) -m experiments.seam --exp $(EXP) $(if $(CKPT),--ckpt "$(CKPT)") $(if $(SECONDS),--seconds $(SECONDS)) $(ARGS)

eval: $(STAMP) ## Evaluate a checkpoint: make eval [EXP=demo] [CKPT=...]
	$(PY) -m experiments.evaluate $(EXP) $(if $(CKPT),--ckpt "$(CKPT)") $(ARGS)

evaluator: $(STAMP) ## Train the offline evaluator network for the synthetic corpus
	$(PY) -m experiments.train evaluator $(ARGS)

ablate: $(STAMP) ## NTP vs MNTP on the synthetic corpus, same budget and seed, side-by-side table
	$(PY) -m experiments.ablate $(ARGS)

rehearsal: $(STAMP) ## Write an AudioCaps-shaped tree with random AudioLDM/FLAN-T5/CLAP dirs (tiny; --full-size: real sizes): make rehearsal ARGS="--root DIR"
	$(PY) -m experiments.rehearsal $(ARGS)

gpu-check: $(STAMP) ## One GPU, paper shapes, a few minutes: step time, tokens/s, TFLOP/s vs peak, memory, generation RTF
	$(PY) -m experiments.gpu_check $(ARGS)

bench: $(STAMP) ## Throughput benchmarks (ratios measured in one run)
	$(PY) -m experiments.bench $(ARGS)

figures: $(STAMP) ## README pictures from a finished run: make figures [RUN=runs/demo/last] [OUT=docs/figures]
	$(PY) -m experiments.figures --run $(or $(RUN),runs/demo/last) --out $(or $(OUT),docs/figures)

corpus: $(STAMP) ## Generate the built-in synthetic corpus of an experiment
	$(PY) -m experiments.corpus $(EXP) $(ARGS)

test: $(STAMP) ## Fast tests (excludes tests marked slow)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-min: ## Fast tests in .venv-min with every dependency at its setup.cfg lower bound (.ci/min-versions.txt)
	@test -x .venv-min/bin/python || $(PYTHON_BOOTSTRAP) -m venv .venv-min
	.venv-min/bin/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	.venv-min/bin/python -m pip install -q --disable-pip-version-check -c .ci/min-versions.txt -e ".[dev]"
	.venv-min/bin/python -m pip install -q --disable-pip-version-check --no-deps audioldm_eval==0.0.3
	.venv-min/bin/python -m pytest -q -m "not slow" -p no:cacheprovider $(PYTEST_ARGS)

test-rehearsal: $(STAMP) ## The paper recipe end to end on a generated AudioCaps-shaped tree (slow, ~2 min; CI runs it)
	$(PY) -m pytest -q -m slow tests/test_preflight.py $(PYTEST_ARGS)

test-full: $(STAMP) ## All tests, including slow end-to-end ones
	$(PY) -m pytest -q $(PYTEST_ARGS)

tensorboard: $(STAMP) ## Watch training: TensorBoard over runs/ (on 127.0.0.1 unless HOST=0.0.0.0; PORT=)
	$(VENV)/bin/tensorboard --logdir runs --host $(HOST) $(if $(PORT),--port $(PORT))

notebook: $(STAMP) ## Jupyter Lab opening notebooks/$(NB).ipynb (NB=explore_samples | explore_latent_cache | explore_corpus; on 127.0.0.1 unless HOST=0.0.0.0; PORT=)
	$(PY) -m pip install -q -e ".[notebook,$(EXTRAS)]"
	$(VENV)/bin/jupyter lab notebooks/$(NB).ipynb --ServerApp.ip=$(HOST) $(if $(PORT),--ServerApp.port=$(PORT))

clean-venv: ## Remove the virtual environment
	rm -rf $(VENV)
