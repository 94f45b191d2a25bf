#!/usr/bin/env bash
# One entry point that sets everything up on a fresh machine, then runs a job:
#   bash run.sh demo     sample with the shipped model (the README's main job)
#   bash run.sh test     the test suite (what CI runs)
#   bash run.sh example  the shipped model in a diffusers pipeline (flexikern.pipelines.example)
# Set-up is idempotent: a venv in .venv, torch (CPU build), the package with its C++ extension.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${FLEXIKERN_VENV:-.venv}
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.flexikern-deps"
if [[ ! -f "$stamp" || requirements-dev.txt -nt "$stamp" ]]; then
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "torch==2.13.0"
  "$PY" -m pip install -q -r requirements-dev.txt
  # diffusers (converters, schedulers, flexikern.pipelines) and transformers + tokenizers (PixArt's
  # T5 text encoder in the pipeline tests); --no-deps keeps torch as is.
  "$PY" -m pip install -q --no-deps "diffusers==0.42.1" "transformers==5.24.0" "tokenizers==0.23.3"
  touch "$stamp"
fi
# The package and its C++ extension (incremental: a rebuild with nothing changed takes seconds).
if ! "$PY" -m pip install -q --no-build-isolation --no-deps -e . > "$VENV/.install.log" 2>&1; then
  cat "$VENV/.install.log" >&2
  echo "run.sh: installing flexikern failed (log above)" >&2
  exit 1
fi
job=${1:-demo}
shift || true
case "$job" in
  demo) exec "$PY" -m flexikern demo "$@" ;;
  example) exec "$PY" -m flexikern.pipelines.example "$@" ;;   # FlexiDiT in a diffusers pipeline
  test) TRITON_INTERPRET=1 exec "$PY" -m pytest tests -q -x -p no:cacheprovider "$@" ;;
  *) echo "usage: bash run.sh [demo|test|example] [args...]" >&2; exit 2 ;;
esac
