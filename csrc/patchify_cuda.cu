// CUDA kernels of patchify / unpatchify: thin __global__ wrappers around patchify_tile.h (the
// algorithm, also run on the host by the C++ test). No torch headers: see patchify_launch.h.
#include <cuda_runtime.h>

#include <cstdint>

#include "patchify_index.h"
#include "patchify_launch.h"
#include "patchify_tile.h"

namespace flexikern {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;  // blocks loop over the remaining tiles / elements

template <typename T, int VEC, bool kToTokens>
__global__ void __launch_bounds__(kThreads)
patch_tiles_kernel(const T* __restrict__ src, T* __restrict__ dst, PatchGeometry g, TilePlan plan,
                   int64_t num_tiles) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* buf = reinterpret_cast<T*>(smem_raw);
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    move_tile<T, VEC, kToTokens>(src, dst, g, plan.tile(g, tile), buf, threadIdx.x, blockDim.x);
  }
}

template <typename T, bool kToTokens>
__global__ void __launch_bounds__(kThreads)
patch_elementwise_kernel(const T* __restrict__ src, T* __restrict__ dst, PatchGeometry g) {
  const int64_t total = g.image_numel();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    move_element<T, kToTokens>(src, dst, g, i);
  }
}

unsigned grid_size(int64_t work) {
  return static_cast<unsigned>(work < kMaxBlocks ? work : kMaxBlocks);
}

template <typename T, bool kToTokens>
int launch_typed(const T* src, T* dst, const PatchGeometry& g, cudaStream_t stream) {
  if (g.image_numel() == 0) return cudaSuccess;
  const LaunchPlan plan = plan_launch(g, sizeof(T), src, dst);
  if (plan.elementwise) {
    patch_elementwise_kernel<T, kToTokens>
        <<<grid_size((g.image_numel() + kThreads - 1) / kThreads), kThreads, 0, stream>>>(src, dst,
                                                                                          g);
  } else if (plan.vectorise) {
    constexpr int kVec = 16 / sizeof(T);
    patch_tiles_kernel<T, kVec, kToTokens>
        <<<grid_size(plan.num_tiles), kThreads, plan.smem_bytes, stream>>>(src, dst, g, plan.tiles,
                                                                           plan.num_tiles);
  } else {
    patch_tiles_kernel<T, 1, kToTokens>
        <<<grid_size(plan.num_tiles), kThreads, plan.smem_bytes, stream>>>(src, dst, g, plan.tiles,
                                                                           plan.num_tiles);
  }
  return cudaGetLastError();
}

template <typename T>
int launch_direction(const void* src, void* dst, const PatchGeometry& g, bool to_tokens,
                     cudaStream_t stream) {
  const T* s = static_cast<const T*>(src);
  T* o = static_cast<T*>(dst);
  return to_tokens ? launch_typed<T, true>(s, o, g, stream)
                   : launch_typed<T, false>(s, o, g, stream);
}

}  // namespace

int launch_patchify_cuda(const void* src, void* dst, const PatchGeometry& g, int element_size,
                         bool to_tokens, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (element_size) {
    case 2: return launch_direction<uint16_t>(src, dst, g, to_tokens, s);
    case 4: return launch_direction<uint32_t>(src, dst, g, to_tokens, s);
    case 8: return launch_direction<uint64_t>(src, dst, g, to_tokens, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace flexikern
