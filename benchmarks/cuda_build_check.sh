#!/usr/bin/env bash
# The GPU build, checked on a machine without a GPU (run by .ci/run; under a minute once the venv
# exists, about two more when it makes it: the CUDA torch is ~5 GB installed):
#   1. venv: the GPU machine's torch 2.11.0 (its PyPI wheel is the CUDA 13.0 build) and the
#      triton it pins (3.6), cached in $FLEXIKERN_CUDA_VENV and reused once complete;
#   2. build: the extension with CUDA for sm_90a, from a copy of the files git knows (working tree
#      included), installed into a temporary folder: the tree's own build outputs stay as they are;
#   3. check: benchmarks/sm90_compile.py in that venv: every flexikern op has a CUDA kernel, every
#      Triton kernel compiles for sm_90 (and sm_80) at DiT-XL/2 shapes without unexplained
#      spills; it rewrites benchmarks/results/sm90-compile.json (benchmarks/README.md, "sm_90
#      compile table").
# Without nvcc it says so loudly and exits 0; anything else that fails, fails.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

if ! command -v nvcc >/dev/null && [[ ! -x /usr/local/cuda/bin/nvcc ]]; then
  echo "cuda_build_check: ======================================================================"
  echo "cuda_build_check: SKIPPED: no nvcc (PATH, /usr/local/cuda/bin): the CUDA build and the"
  echo "cuda_build_check: sm_90 compile of the Triton kernels are NOT checked on this machine"
  echo "cuda_build_check: ======================================================================"
  exit 0
fi
source benchmarks/cuda_home.sh
cuda_home=$(find_cuda_home)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. The venv. The stamp, written last, holds the requirements it was made with.
venv=${FLEXIKERN_CUDA_VENV:-$HOME/.cache/flexikern/venv-torch2.11.0-cu130}
requirements=(torch==2.11.0 numpy ninja pybind11 safetensors tqdm pillow setuptools wheel)
stamp=$venv/.flexikern-requirements
if [[ ! -f $stamp || $(<"$stamp") != "${requirements[*]}" ]]; then
  echo "cuda_build_check: creating $venv: ${requirements[*]}"
  rm -rf "$venv"
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/pip" install "${requirements[@]}" >"$work/venv.log" 2>&1 \
    || { tail -30 "$work/venv.log"; echo "cuda_build_check: FAILED: pip install"; exit 1; }
  "$venv/bin/python" -c 'import torch, triton
assert torch.version.cuda == "13.0", f"torch {torch.__version__}: CUDA {torch.version.cuda}"
assert triton.__version__.startswith("3.6."), f"triton {triton.__version__}, not 3.6"'
  echo "${requirements[*]}" >"$stamp"
fi
echo "cuda_build_check: venv ready ($((SECONDS - start))s): $venv"

# 2. The build, from a copy of the working tree's files that git tracks or would track.
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' file; do if [[ -e $file ]]; then printf '%s\0' "$file"; fi; done \
  | tar --null -T - -cf - | tar -xf - -C "$work/src"
step=$SECONDS
if ! CUDA_HOME=$cuda_home FLEXIKERN_CUDA_ARCHS=90a "$venv/bin/pip" install --no-build-isolation \
    --no-deps --target "$work/site" "$work/src" >"$work/build.log" 2>&1; then
  tail -40 "$work/build.log"
  echo "cuda_build_check: FAILED: the extension did not build with CUDA_HOME=$cuda_home"
  exit 1
fi
echo "cuda_build_check: extension built for sm_90a in $((SECONDS - step))s (CUDA_HOME=$cuda_home)"

# 3. The checks, on the installed copy (benchmarks/ is the script's folder, not a package root).
step=$SECONDS
PYTHONPATH=$work/site "$venv/bin/python" benchmarks/sm90_compile.py \
  || { echo "cuda_build_check: FAILED (the FAIL lines above) after $((SECONDS - start))s"; exit 1; }
echo "cuda_build_check: checks in $((SECONDS - step))s; OK in $((SECONDS - start))s in all"
