#!/usr/bin/env bash
# CI checks of csrc/ that need no GPU and no torch (run by .ci/run; well under a minute):
#   1. nvcc compiles the CUDA kernels for sm_80 and sm_90a (skipped, loudly, without nvcc);
#   2. the index-math unit test (plain C++) builds with warnings as errors and passes;
#   3. CMakeLists.txt configures and builds the same torch-free targets, and ctest passes
#      (when cmake is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

nvcc=$(command -v nvcc || true)
if [[ -z "$nvcc" && -x /usr/local/cuda/bin/nvcc ]]; then
  nvcc=/usr/local/cuda/bin/nvcc
fi
if [[ -n "$nvcc" ]]; then
  for arch in 80 90a; do
    "$nvcc" -std=c++17 -O3 -c csrc/patchify_cuda.cu -o "$work/patchify_sm$arch.o" \
      -gencode "arch=compute_$arch,code=sm_$arch" -Xcompiler -Wall,-Werror
    echo "ci_check: nvcc sm_$arch OK ($("$nvcc" --version | tail -1))"
  done
else
  echo "ci_check: WARNING: nvcc not found (PATH, /usr/local/cuda/bin): CUDA compile check skipped"
fi

cxx=${CXX:-c++}
"$cxx" -std=c++17 -O1 -Wall -Wextra -Werror csrc/test_patchify_index.cpp -o "$work/test_patchify_index"
"$work/test_patchify_index"

if command -v cmake >/dev/null; then
  cuda_flag=()
  [[ -n "$nvcc" ]] && cuda_flag=(-DCMAKE_CUDA_COMPILER="$nvcc")
  cmake -S . -B "$work/cmake" -DFLEXIKERN_WITH_TORCH=OFF "${cuda_flag[@]}" >"$work/cmake.log" 2>&1 \
    || { cat "$work/cmake.log"; exit 1; }
  cmake --build "$work/cmake" -j 2 >>"$work/cmake.log" 2>&1 || { cat "$work/cmake.log"; exit 1; }
  ctest --test-dir "$work/cmake" --output-on-failure >>"$work/cmake.log" 2>&1 \
    || { cat "$work/cmake.log"; exit 1; }
  echo "ci_check: CMake build of the torch-free targets and ctest OK"
else
  echo "ci_check: cmake not found: CMakeLists.txt not checked"
fi
