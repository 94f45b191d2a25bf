#!/usr/bin/env bash
# The ONE command for a GPU machine: build the extension, run every GPU test, run the benchmarks,
# print the results table. No internet, no venv: it uses the machine's python and its torch.
#
#   bash benchmarks/gpu_check.sh            # results in benchmarks/results/<device-name>/
#
# Stages run under `timeout` against one deadline (FLEXIKERN_GPU_CHECK_BUDGET seconds, default
# 530, i.e. < 9 minutes), each printing its wall time, so that a hang cannot eat the budget:
#   1. build      pip install --no-build-isolation --no-deps -e .  (only this card's CUDA arch),
#                 then a check that the extension has its CUDA kernels
#   2. info       python -m flexikern.info (versions, backends and why not)
#   3. gpu tests  every tests/ file that mentions CUDA, with TRITON_INTERPRET unset: Triton
#                 kernels compile and run on the GPU, not in the interpreter
#   4. e2e bench  benchmarks/test_bench_e2e.py (DiT-XL/2 sizes), its own JSON, so that a later
#                 stage running out of time cannot lose it
#   5. op benches the other benchmarks/ suites (GPU sizes); JSON rows carry device and versions
#   6. render     results.md + e2e.png; the table (and the goals) printed last
#   7. cpu tests  the rest of tests/, if time is left (CI already runs them on CPU)
# Knobs: PYTHON (default: python3), FLEXIKERN_BENCH_STEPS (timed steps of the e2e benchmark,
# default 25; images/s is extrapolated to 250 steps), FLEXIKERN_GPU_CHECK_BUDGET, and for a dry
# run of this script on a CPU machine FLEXIKERN_GPU_CHECK_ALLOW_CPU=1 (results go to
# benchmarks/results/cpu) with FLEXIKERN_GPU_CHECK_SKIP_BUILD=1 (keep the installed build).
# Exit status: 0 when every stage that ran passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${FLEXIKERN_GPU_CHECK_BUDGET:-530}
START=$SECONDS
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1   # no internet: never wait on an index
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [[ ${FLEXIKERN_GPU_CHECK_ALLOW_CPU:-0} != 1 ]]; then
    echo "gpu_check: torch.cuda.is_available() is False with $PY; this script is for a GPU machine" \
         "(FLEXIKERN_GPU_CHECK_ALLOW_CPU=1 dry-runs it on CPU)" >&2
    exit 2
  fi
fi
read -r ARCH SLUG DEVICE < <("$PY" - <<'EOF'
import re, torch
if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    print(f"{major}{minor}{'a' if major >= 9 else ''}", re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), name)
else:
    print("none cpu cpu")
EOF
)
if [[ $SLUG == cpu ]]; then
  export TRITON_INTERPRET=1   # a dry run: on CPU tensors Triton runs only in its interpreter
else
  unset TRITON_INTERPRET      # on the GPU: compiled kernels, never the interpreter
fi
OUT=benchmarks/results/$SLUG
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT/results.md" "$OUT/e2e.png"   # never render a previous run's rows
echo "gpu_check: $DEVICE (arch $ARCH), $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'), results in $OUT"

declare -a SUMMARY=()
FAILED=0
# run_stage NAME CAP RESERVE CMD...: at most CAP seconds, leaving RESERVE seconds for later stages.
run_stage() {
  local name=$1 cap=$2 reserve=$3; shift 3
  local left=$((BUDGET - (SECONDS - START) - reserve))
  local limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    SUMMARY+=("$(printf '%-11s skipped (budget spent)' "$name")")
    echo "== $name: skipped, ${left}s of the budget left"
    [[ $name == "cpu tests" ]] || FAILED=1   # CI runs the CPU tests; every other stage must run
    return 0
  fi
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  local status="ok"
  if ((rc == 124 || rc == 137)); then status="TIMED OUT"; FAILED=1
  elif ((rc != 0)); then status="FAILED (exit $rc)"; FAILED=1; fi
  SUMMARY+=("$(printf '%-11s %4ds  %s' "$name" $((SECONDS - t0)) "$status")")
  echo "== $name: $status in $((SECONDS - t0))s"
}

# 1. The extension, for this card only (one arch keeps nvcc short). pip writes an editable install
#    into the machine's site-packages; the compiled module lands in flexikern/ as in development.
build() {
  if [[ ${FLEXIKERN_GPU_CHECK_SKIP_BUILD:-0} != 1 ]]; then
    FLEXIKERN_CUDA_ARCHS=$ARCH "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
      || { tail -30 "$OUT/build.log"; return 1; }
  fi
  # On a GPU the extension must have its CUDA kernels, or the GPU tests would silently skip them.
  "$PY" -c "import sys, torch, flexikern._ext as e; print('extension:', e.build_info());
sys.exit(0 if e.cuda_built() or not torch.cuda.is_available() else 1)"
}
export PY ARCH OUT
export -f build   # `timeout` runs programs, not shell functions: it runs this through bash -c
run_stage build 150 330 bash -c build

run_stage info 20 310 "$PY" -m flexikern.info
GPU_TESTS=$(grep -l -i "cuda" tests/test_*.py | tr '\n' ' ')
run_stage "gpu tests" 180 130 "$PY" -m pytest $GPU_TESTS -q -rs -p no:cacheprovider --durations=10

BENCH_ARGS=(-q -p no:cacheprovider --benchmark-columns=median,iqr,rounds --benchmark-sort=name)
run_stage "e2e bench" 200 20 "$PY" -m pytest benchmarks/test_bench_e2e.py "${BENCH_ARGS[@]}" \
  --benchmark-json "$OUT/e2e.json"
run_stage "op benches" 150 20 "$PY" -m pytest benchmarks --ignore=benchmarks/test_bench_e2e.py "${BENCH_ARGS[@]}" \
  --benchmark-json "$OUT/ops.json"
run_stage render 20 0 "$PY" benchmarks/render.py "$OUT"

CPU_TESTS=$(ls tests/test_*.py | grep -v -x -F -f <(printf '%s\n' $GPU_TESTS) | tr '\n' ' ')
run_stage "cpu tests" 300 0 "$PY" -m pytest $CPU_TESTS -q -p no:cacheprovider

echo
echo "gpu_check on $DEVICE: $((SECONDS - START))s in all (budget ${BUDGET}s); results in $OUT"
printf '  %s\n' "${SUMMARY[@]}"
# The short table last: throughput and goals (results.md also lists every other benchmark).
[[ -f $OUT/results.md ]] && { echo; sed '/^## Other benchmarks/,$d' "$OUT/results.md"; }
exit $FAILED
