#!/usr/bin/env bash
# The ONE command for a GPU machine: build the extension, run the GPU tests and the benchmarks,
# print the results table last. No internet, no venv: the machine's python and its torch.
#
#   bash benchmarks/gpu_check.sh        # results in benchmarks/results/<device-name>/
#
# Stages, each under `timeout` against one deadline (FLEXIKERN_GPU_CHECK_BUDGET seconds, default
# 480 on a GPU; each stage's limit also keeps the minimum of the stages after it):
#   preflight  (<15 s) python, torch, triton, CUDA, the GPU; CUDA_HOME found from nvcc (which may
#              be a wrapper script); which optional packages are present. Fails fast when a
#              required one (pytest, pytest-benchmark) is missing.
#   build      pip install --no-build-isolation --no-deps -e . for this card's arch only, then
#              python -m flexikern.info (versions, backends and why not)
#   gpu tests  pytest -m gpu: the tests marked as needing a GPU (Triton kernels compiled for the
#              card, the extension's CUDA kernels, CUDA graphs, sync-free steps), in parallel
#              when pytest-xdist is there; nothing CI already did (CPU tests, compile-only checks)
#   e2e bench  benchmarks/test_bench_e2e.py (DiT-XL/2 shapes) but its torch.compile rows: rows
#              appended to e2e.jsonl as each benchmark finishes (FLEXIKERN_BENCH_ROWS), so a
#              timeout loses one row at most
#   op benches the other suites, rows to ops.jsonl the same way
#   compile bench  the e2e compiled rows (-k compile: the plain DiT under torch.compile mode
#              max-autotune-no-cudagraphs, then FlexiDiT compiled, then compiled in CUDA graphs),
#              to e2e.jsonl; last because compiling takes minutes, so a timeout here costs only
#              these rows. Its minimum (120 s) came with the budget's rise from 360 s: no other
#              stage lost time.
#   render     results.md + e2e.png from the rows; the short table is printed last
# Everything lands in benchmarks/results/<device-name>/: gpu_check.log (this output), build.log,
# gpu_tests.log, e2e.jsonl, ops.jsonl, results.md, e2e.png. Commit that folder.
#
# Knobs: PYTHON (default python3), FLEXIKERN_GPU_CHECK_BUDGET, FLEXIKERN_BENCH_STEPS (timed steps
# per e2e run, default 10 on a GPU; see benchmarks/README.md), FLEXIKERN_BENCH_COMPILE_MODE (FlexiDiT's
# torch.compile mode in the compiled rows, default "default"; the plain DiT's is always
# max-autotune-no-cudagraphs).
# CPU rehearsal (CI runs it): FLEXIKERN_GPU_CHECK_ALLOW_CPU=1 runs the same stages shrunk on a
# machine without CUDA: Triton in its interpreter, the GPU tests collected (with diffusers,
# flash-attn and xformers hidden, as on the GPU machine) and skipped, the benchmarks at CPU sizes,
# results in benchmarks/results/cpu/ (FLEXIKERN_GPU_CHECK_OUT elsewhere); its default budget is 540 s.
# Exit status: 0 when every stage passed, 1 when one failed or timed out, 2 when preflight failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
START=$SECONDS
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1   # no internet: never wait on an index
export PIP_BREAK_SYSTEM_PACKAGES=1   # the machine's python may be marked externally managed
export PYTHONUNBUFFERED=1

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  GPU=1
  SCALE=100                              # stage limits in % of the GPU ones
  BUDGET=${FLEXIKERN_GPU_CHECK_BUDGET:-480}
  unset TRITON_INTERPRET                 # compiled kernels, never the interpreter
elif [[ ${FLEXIKERN_GPU_CHECK_ALLOW_CPU:-0} == 1 ]]; then
  GPU=0
  SCALE=112                              # 540 / 480: the GPU stages' limits, scaled to this budget
  BUDGET=${FLEXIKERN_GPU_CHECK_BUDGET:-540}
  export TRITON_INTERPRET=1              # on CPU tensors Triton runs only in its interpreter
  export FLEXIKERN_HIDE_MODULES=${FLEXIKERN_HIDE_MODULES-diffusers,flash_attn,xformers}
else
  echo "gpu_check: torch.cuda.is_available() is False with $PY; this script is for a GPU machine" \
       "(FLEXIKERN_GPU_CHECK_ALLOW_CPU=1 rehearses it on CPU)" >&2
  exit 2
fi
SLUG=$("$PY" -c "import re, torch
print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-') if torch.cuda.is_available() else 'cpu')")
OUT=${FLEXIKERN_GPU_CHECK_OUT:-benchmarks/results/$SLUG}
mkdir -p "$OUT"
rm -f "$OUT"/*.jsonl "$OUT"/*.json "$OUT"/*.log "$OUT"/*.xml "$OUT/results.md" "$OUT/e2e.png"   # never mix runs
exec > >(tee "$OUT/gpu_check.log") 2>&1
TEE=$!

declare -a SUMMARY=()
FAILED=0
# run_stage NAME CAP RESERVE CMD...: at most CAP seconds, leaving RESERVE seconds for later stages
# (both GPU figures, scaled by SCALE% in the rehearsal).
run_stage() {
  local name=$1 cap=$(($2 * SCALE / 100)) reserve=$(($3 * SCALE / 100)); shift 3
  local left=$((BUDGET - (SECONDS - START) - reserve))
  local limit=$((cap < left ? cap : left))
  if ((limit < 10)); then
    SUMMARY+=("$(printf '%-13s skipped: budget spent' "$name")")
    echo "== $name: skipped, ${left}s of the budget left"
    FAILED=1
    return 0
  fi
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS rc
  timeout --kill-after=5 "$limit" "$@"
  rc=$?
  local status="ok"
  if ((rc == 124 || rc == 137)); then status="TIMED OUT"; FAILED=1
  elif ((rc != 0)); then status="FAILED (exit $rc)"; FAILED=1; fi
  SUMMARY+=("$(printf '%-13s %4ds  %s' "$name" $((SECONDS - t0)) "$status")")
  echo "== $name: $status in $((SECONDS - t0))s"
}

# --- preflight: what this machine has, before anything long -------------------------------
source benchmarks/cuda_home.sh
if ! CUDA_HOME=$(find_cuda_home); then
  if ((GPU)); then echo "gpu_check: preflight failed: no CUDA toolkit for the build" >&2; exit 2; fi
  CUDA_HOME=""
fi
export CUDA_HOME
[[ -n $CUDA_HOME ]] && export PATH="$CUDA_HOME/bin:$PATH"
ARCH=$(CUDA_HOME=$CUDA_HOME timeout 15 "$PY" - <<'EOF'
import importlib.util, os, platform, shutil, subprocess, sys
import torch
def have(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "absent"
print(f"python {platform.python_version()} ({sys.executable})", file=sys.stderr)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton_version}", file=sys.stderr)
home = os.environ.get("CUDA_HOME")
if home:
    nvcc = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    print(f"nvcc: {shutil.which('nvcc')}, CUDA_HOME={home} ({nvcc.stdout.strip().splitlines()[-1]})",
          file=sys.stderr)
else:
    print("nvcc: none (no CUDA build)", file=sys.stderr)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB", file=sys.stderr)
    print(f"{p.major}{p.minor}{'a' if p.major == 9 else ''}")   # the build's arch
else:
    print("GPU: none (CPU rehearsal)", file=sys.stderr)
    print("none")
required = ["pytest", "pytest_benchmark"]
optional = ["xdist", "diffusers", "flash_attn", "xformers", "timm", "scipy", "matplotlib", "hypothesis",
            "safetensors", "ninja"]
hidden = set(filter(None, os.environ.get("FLEXIKERN_HIDE_MODULES", "").split(",")))
print("packages: " + ", ".join(f"{n} {'hidden' if n in hidden else 'yes' if have(n) else 'no'}"
                               for n in required + optional), file=sys.stderr)
missing = [n for n in required if not have(n)]
if missing:
    sys.exit(f"gpu_check: preflight failed: {missing} missing; the GPU stages need them")
EOF
) || { echo "gpu_check: preflight failed" >&2; exit 2; }
echo "gpu_check: preflight done in $((SECONDS - START))s; budget ${BUDGET}s; results in $OUT"

# --- the stages -------------------------------------------------------------------------------
# `timeout` runs programs, not shell functions: exported functions run through `bash -c`.
build() {
  if ((GPU)); then
    FLEXIKERN_CUDA_ARCHS=$ARCH "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
      || { tail -30 "$OUT/build.log"; return 1; }
  else   # the rehearsal: the same install, CPU extension only (incremental, seconds)
    "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
      || { tail -30 "$OUT/build.log"; return 1; }
  fi
  # The extension must have its CUDA kernels on a GPU, or the GPU tests would test the fallbacks.
  "$PY" -c "import sys, torch, flexikern._ext as e; print('extension:', e.build_info());
sys.exit(0 if e.cuda_built() or not torch.cuda.is_available() else 'flexikern._C has no CUDA kernels')" \
    && "$PY" -m flexikern.info
}
export PY ARCH OUT GPU
export -f build
run_stage build 100 360 bash -c build
if ((FAILED)); then   # without the package every later stage would test the fallbacks or nothing
  echo "gpu_check: the build failed (tail of $OUT/build.log above); stopping"
  printf '  %s\n' "${SUMMARY[@]}"
  exit 1
fi

PARALLEL=()
if ((GPU)) && "$PY" -c "import xdist" 2>/dev/null; then
  PARALLEL=(-n 12)   # Triton compiles dominate: 12 processes share the 16 cores and the one GPU
fi
run_stage "gpu tests" 80 280 "$PY" -m pytest tests -m gpu "${PARALLEL[@]}" -v -rs -p no:cacheprovider \
  --durations=10 -o console_output_style=classic --junitxml="$OUT/gpu_tests.xml"

BENCH=(-q -p no:cacheprovider --benchmark-columns=median,iqr,rounds --benchmark-sort=name)
FLEXIKERN_BENCH_ROWS="$OUT/e2e.jsonl" \
  run_stage "e2e bench" 100 200 "$PY" -m pytest benchmarks/test_bench_e2e.py -k "not compile" "${BENCH[@]}"
# Not the `late` rows (FlexAttention: tens of seconds of torch.compile each, for a backend that
# dispatch tries fifth): `pytest benchmarks/test_bench_attention.py` times them when there is time.
# Not the `late` rows either of the sampling suite (DiT-S/2 under torch.compile, a CPU measurement).
FLEXIKERN_BENCH_ROWS="$OUT/ops.jsonl" \
  run_stage "op benches" 100 140 "$PY" -m pytest benchmarks --ignore=benchmarks/test_bench_e2e.py -m "not late" \
  "${BENCH[@]}"
# The compiled e2e rows last, from the time the budget's rise added (at least 120 s, up to 180 s).
FLEXIKERN_BENCH_ROWS="$OUT/e2e.jsonl" \
  run_stage "compile bench" 180 20 "$PY" -m pytest benchmarks/test_bench_e2e.py -k compile "${BENCH[@]}"
run_stage render 20 0 "$PY" benchmarks/render.py "$OUT"

echo
echo "gpu_check on $SLUG: $((SECONDS - START))s in all (budget ${BUDGET}s); results in $OUT"
printf '  %s\n' "${SUMMARY[@]}"
# The short table last: throughput and goals (results.md also lists every other benchmark).
[[ -f $OUT/results.md ]] && { echo; sed '/^## Other benchmarks/,$d' "$OUT/results.md"; }
exec >&- 2>&-   # let tee write the last lines before the script exits
wait "$TEE" 2>/dev/null
exit $FAILED
