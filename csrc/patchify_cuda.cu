// CUDA kernels of patchify / unpatchify. No torch headers: see patchify_launch.h.
//
// patchify is a batched transpose: an image row is contiguous along W, a token row contiguous
// along (ph, pw, C). One block takes one tile of whole patches (patchify_index.h: PatchTile) and
// stages it in shared memory, so both global sides are read and written along their contiguous
// axis (coalesced), 16 bytes per thread where alignment allows. Tiles too large for shared memory
// (very wide tokens) use an element-wise kernel instead.
#include <cuda_runtime.h>

#include <cstdint>

#include "patchify_index.h"
#include "patchify_launch.h"

namespace flexikern {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kTileBytes = 8 * 1024;       // small tiles: many blocks even for DiT's 256 tokens
constexpr int64_t kMaxTileBytes = 48 * 1024;   // the default dynamic shared-memory limit
constexpr int64_t kMaxBlocks = 1 << 20;        // blocks loop over the remaining tiles

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Moves one tile. The shared buffer holds the tile's tokens densely (tile_tokens() x D).
template <typename T, int VEC, bool kToTokens>
__global__ void __launch_bounds__(kThreads)
patch_tiles_kernel(const T* __restrict__ src, T* __restrict__ dst, PatchGeometry g, TilePlan plan,
                   int64_t num_tiles) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* buf = reinterpret_cast<T*>(smem_raw);
  using V = Pack<T, VEC>;
  const int32_t d = static_cast<int32_t>(g.features());
  const int32_t pw = static_cast<int32_t>(g.pw);

  for (int64_t tile_id = blockIdx.x; tile_id < num_tiles; tile_id += gridDim.x) {
    const PatchTile t = plan.tile(g, tile_id);
    // 32-bit inside the tile (see PatchTile).
    const int32_t row_vecs = tile_row_length(g, t) / VEC;
    const int32_t image_vecs = tile_image_rows(g, t) * row_vecs;
    const int32_t token_vecs = t.tile_tokens() * d / VEC;

    if (kToTokens) {
      for (int32_t v = threadIdx.x; v < image_vecs; v += blockDim.x) {
        const int32_t row = v / row_vecs, col = (v % row_vecs) * VEC;
        const V pixels = *reinterpret_cast<const V*>(src + tile_image_offset(g, t, row, col));
        int32_t at = tile_token_index(g, t, row, col);
        int32_t kp = col % pw;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          buf[at] = pixels.v[k];
          at += tile_token_step(g, kp);
        }
      }
      __syncthreads();
      for (int32_t v = threadIdx.x; v < token_vecs; v += blockDim.x) {
        const int32_t i = v * VEC;
        *reinterpret_cast<V*>(dst + tile_token_offset(g, t, i)) =
            *reinterpret_cast<const V*>(buf + i);
      }
    } else {
      for (int32_t v = threadIdx.x; v < token_vecs; v += blockDim.x) {
        const int32_t i = v * VEC;
        *reinterpret_cast<V*>(buf + i) =
            *reinterpret_cast<const V*>(src + tile_token_offset(g, t, i));
      }
      __syncthreads();
      for (int32_t v = threadIdx.x; v < image_vecs; v += blockDim.x) {
        const int32_t row = v / row_vecs, col = (v % row_vecs) * VEC;
        V pixels;
        int32_t at = tile_token_index(g, t, row, col);
        int32_t kp = col % pw;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          pixels.v[k] = buf[at];
          at += tile_token_step(g, kp);
        }
        *reinterpret_cast<V*>(dst + tile_image_offset(g, t, row, col)) = pixels;
      }
    }
    __syncthreads();  // the next tile reuses `buf`
  }
}

// One thread per token element; token-side accesses are coalesced, image-side ones gather.
template <typename T, bool kToTokens>
__global__ void __launch_bounds__(kThreads)
patch_elementwise_kernel(const T* __restrict__ src, T* __restrict__ dst, PatchGeometry g) {
  const int64_t d = g.features(), per_sample = g.tokens() * d;
  const int64_t total = g.n * per_sample;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / per_sample, rest = i % per_sample;
    const int64_t t = rest / d, f = rest % d;
    const int64_t image = g.image_offset_of_token(n, t, f);
    const int64_t token = g.token_offset(n, t, f);
    if (kToTokens) {
      dst[token] = src[image];
    } else {
      dst[image] = src[token];
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, bool kToTokens>
int launch_typed(const T* src, T* dst, const PatchGeometry& g, cudaStream_t stream) {
  if (g.image_numel() == 0) return cudaSuccess;
  const int64_t elem = sizeof(T);
  const int64_t d = g.features();
  if (d * elem > kMaxTileBytes) {
    const int64_t blocks = (g.image_numel() + kThreads - 1) / kThreads;
    patch_elementwise_kernel<T, kToTokens>
        <<<static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks), kThreads, 0, stream>>>(
            src, dst, g);
    return cudaGetLastError();
  }
  const TilePlan plan = plan_tiles(g, (d * elem > kTileBytes ? kMaxTileBytes : kTileBytes) / elem);
  const int64_t num_tiles = plan.num_tiles(g);
  const int64_t smem = plan.tile_h * plan.tile_w * d * elem;
  const unsigned blocks = static_cast<unsigned>(num_tiles < kMaxBlocks ? num_tiles : kMaxBlocks);

  // 16-byte vectors when every tile row and token row starts and ends on a 16-byte boundary.
  constexpr int kVec = 16 / sizeof(T);
  const bool full_rows = plan.tile_w == g.grid_w();
  const bool vectorise = aligned16(src) && aligned16(dst) && g.w % kVec == 0 &&
                         (full_rows || (plan.tile_w * g.pw) % kVec == 0) && d % kVec == 0 &&
                         g.token_row_stride % kVec == 0 && g.token_batch_stride % kVec == 0;
  if (vectorise) {
    patch_tiles_kernel<T, kVec, kToTokens><<<blocks, kThreads, smem, stream>>>(src, dst, g, plan,
                                                                               num_tiles);
  } else {
    patch_tiles_kernel<T, 1, kToTokens><<<blocks, kThreads, smem, stream>>>(src, dst, g, plan,
                                                                            num_tiles);
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
