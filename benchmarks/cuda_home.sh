# Sourced by the scripts that build CUDA code (gpu_check.sh, cuda_build_check.sh):
#   source benchmarks/cuda_home.sh; find_cuda_home   # prints the toolkit root, or fails
#
# torch's build guesses CUDA_HOME from the nvcc on PATH (its grandparent folder). Where that
# nvcc is a wrapper script (/usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc), the
# guess is /usr/local and the build stops at `cuda_runtime_api.h: No such file or directory`.
# nvcc itself knows its root: `nvcc --dryrun` prints `#$ TOP=<root>/bin/..` without compiling.

find_cuda_home() {
  local root="" nvcc probe
  if [[ -n ${CUDA_HOME:-} && -f $CUDA_HOME/include/cuda_runtime_api.h ]]; then
    echo "$CUDA_HOME"; return 0
  fi
  nvcc=$(command -v nvcc || true)
  [[ -z $nvcc && -x /usr/local/cuda/bin/nvcc ]] && nvcc=/usr/local/cuda/bin/nvcc
  if [[ -z $nvcc ]]; then
    echo "find_cuda_home: no nvcc on PATH or in /usr/local/cuda/bin" >&2; return 1
  fi
  probe=$(mktemp -d)
  : > "$probe/probe.cu"
  root=$("$nvcc" --dryrun -c "$probe/probe.cu" -o "$probe/probe.o" 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  rm -rf "$probe"
  [[ -n $root ]] && root=$(cd "$root" 2>/dev/null && pwd -P)
  if [[ -z $root || ! -f $root/include/cuda_runtime_api.h ]]; then
    echo "find_cuda_home: $nvcc did not name a toolkit with include/cuda_runtime_api.h (got '$root');" \
         "set CUDA_HOME to the CUDA toolkit folder" >&2
    return 1
  fi
  echo "$root"
}
