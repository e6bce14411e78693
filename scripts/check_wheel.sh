#!/usr/bin/env bash
# What `pip install .` users get: build otr's wheel from this checkout, install it into a fresh
# virtual environment, and run it from a directory outside the checkout (`make wheel-check`, CI).
# Needs the package registry (otr's dependencies); TORCH_SPEC and TORCH_INDEX_URL as in the Makefile.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
work=$(mktemp -d "${TMPDIR:-/tmp}/otr-wheel-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
step() { echo "== [${SECONDS}s] $*"; }

step "copy the checkout's files (a stale build/ in the checkout must not leak into the wheel)"
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' file; do
  [ -e "$file" ] && cp --parents "$file" "$work/src/"
done

step "build the wheel (isolated, as pip does for a user)"
"$PYTHON" -m venv "$work/venv"
bin="$work/venv/bin"
"$bin/pip" wheel --quiet --no-deps -w "$work/dist" "$work/src"
wheel=$(ls "$work"/dist/otr_cli-*.whl)
echo "$(basename "$wheel"): $(unzip -Z1 "$wheel" | wc -l) files, $(unzip -Z1 "$wheel" | grep -c '^otr_cli/recipes/.*\.yaml$') recipes"

step "install it into a fresh virtual environment (torch first, from TORCH_INDEX_URL when set)"
"$bin/pip" install --quiet "$TORCH_SPEC" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
"$bin/pip" install --quiet "$wheel"

mkdir "$work/elsewhere" && cd "$work/elsewhere"
site=$("$bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
packaged="$site/otr_cli/recipes"
expect() {  # expect TEXT OUTPUT: fail loudly when the output lacks the text
  grep -qF -- "$1" <<<"$2" || { printf 'FAILED: expected %s in:\n%s\n' "$1" "$2" >&2; exit 1; }
}

step "otr --version"
out=$("$bin/otr" --version); echo "$out"
expect "(recipes: $packaged)" "$out"

step "otr train --help"
out=$("$bin/otr" train --help); head -3 <<<"$out"
expect "Recipes: $packaged" "$out"

step "otr train recipe=smollm2_demo dry_run=true"
out=$("$bin/otr" train recipe=smollm2_demo dry_run=true); head -1 <<<"$out"
expect "name: smollm2_demo" "$out"

step "a user recipe through hydra.searchpath"
mkdir -p my_recipes/recipe
cat >my_recipes/recipe/demo_long.yaml <<'EOF'
# @package _global_
defaults:
  - /recipe/smollm2_demo@_global_
  - _self_
run:
  name: demo_long
trainer:
  max_steps: 80
EOF
out=$("$bin/otr" train "hydra.searchpath=[file://$PWD/my_recipes]" recipe=demo_long dry_run=true); head -1 <<<"$out"
expect "name: demo_long" "$out"
expect "max_steps: 80" "$out"
echo "wheel check passed"
