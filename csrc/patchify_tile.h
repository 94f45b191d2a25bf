// The algorithm of the CUDA kernels, as __host__ __device__ code without CUDA or torch headers:
// patchify_cuda.cu wraps it in __global__ kernels, and the C++ test (test_patchify_index.cpp)
// runs the very same code on the host, one thread per block (a valid schedule: each phase's loop
// then covers the whole tile, and the barrier between phases has nothing to wait for).
//
// patchify is a batched transpose: an image row is contiguous along W, a token row contiguous
// along (ph, pw, C). One block moves one tile of whole patches (PatchTile) through shared memory,
// so both global sides are read and written along their contiguous axis (coalesced), 16 bytes per
// thread where alignment allows. Tiles too large for shared memory (very wide tokens) are moved
// element by element instead.
#pragma once

#include <cstdint>

#include "patchify_index.h"

#if defined(__CUDA_ARCH__)
#define FK_SYNC_THREADS() __syncthreads()
#define FK_UNROLL _Pragma("unroll")
#else
#define FK_SYNC_THREADS() ((void)0)  // the host runs one thread per block
#define FK_UNROLL
#endif

namespace flexikern {

constexpr int64_t kTileBytes = 8 * 1024;      // small tiles: many blocks even for DiT's 256 tokens
constexpr int64_t kMaxTileBytes = 48 * 1024;  // the default dynamic shared-memory limit

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// How a launch moves `g`: element by element, or by tiles (of `tiles`) with `smem_bytes` of
// shared memory, 16-byte vectors when `vectorise`.
struct LaunchPlan {
  bool elementwise = false;
  TilePlan tiles;
  int64_t num_tiles = 0;
  int64_t smem_bytes = 0;
  bool vectorise = false;
};

// True when every tile row and token row starts and ends on a 16-byte boundary.
inline bool vectorisable(const PatchGeometry& g, const TilePlan& tiles, int64_t element_size,
                         const void* src, const void* dst) {
  const int64_t vec = 16 / element_size;
  const bool full_rows = tiles.tile_w == g.grid_w();
  return reinterpret_cast<uintptr_t>(src) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0 &&
         g.w % vec == 0 && (full_rows || (tiles.tile_w * g.pw) % vec == 0) &&
         g.features() % vec == 0 && g.token_row_stride % vec == 0 &&
         g.token_batch_stride % vec == 0;
}

inline LaunchPlan plan_launch(const PatchGeometry& g, int64_t element_size, const void* src,
                              const void* dst) {
  LaunchPlan plan;
  const int64_t d = g.features();
  if (d * element_size > kMaxTileBytes) {
    plan.elementwise = true;
    return plan;
  }
  const int64_t budget = d * element_size > kTileBytes ? kMaxTileBytes : kTileBytes;
  plan.tiles = plan_tiles(g, budget / element_size);
  plan.num_tiles = plan.tiles.num_tiles(g);
  plan.smem_bytes = plan.tiles.tile_h * plan.tiles.tile_w * d * element_size;
  plan.vectorise = vectorisable(g, plan.tiles, element_size, src, dst);
  return plan;
}

// Moves tile `t` as thread `thread` of `threads`; `buf` holds tile_tokens() x D elements (shared
// memory on the GPU), 16-byte aligned. Indices inside the tile are 32-bit (see PatchTile).
template <typename T, int VEC, bool kToTokens>
FK_HOST_DEVICE void move_tile(const T* __restrict__ src, T* __restrict__ dst,
                              const PatchGeometry& g, const PatchTile& t, T* buf, int32_t thread,
                              int32_t threads) {
  using V = Pack<T, VEC>;
  const int32_t d = static_cast<int32_t>(g.features());
  const int32_t pw = static_cast<int32_t>(g.pw);
  const int32_t row_vecs = tile_row_length(g, t) / VEC;
  const int32_t image_vecs = tile_image_rows(g, t) * row_vecs;
  const int32_t token_vecs = t.tile_tokens() * d / VEC;

  if (kToTokens) {
    for (int32_t v = thread; v < image_vecs; v += threads) {
      const int32_t row = v / row_vecs, col = (v % row_vecs) * VEC;
      const V pixels = *reinterpret_cast<const V*>(src + tile_image_offset(g, t, row, col));
      int32_t at = tile_token_index(g, t, row, col);
      int32_t kp = col % pw;
FK_UNROLL
      for (int k = 0; k < VEC; ++k) {
        buf[at] = pixels.v[k];
        at += tile_token_step(g, kp);
      }
    }
    FK_SYNC_THREADS();
    for (int32_t v = thread; v < token_vecs; v += threads) {
      const int32_t i = v * VEC;
      *reinterpret_cast<V*>(dst + tile_token_offset(g, t, i)) = *reinterpret_cast<const V*>(buf + i);
    }
  } else {
    for (int32_t v = thread; v < token_vecs; v += threads) {
      const int32_t i = v * VEC;
      *reinterpret_cast<V*>(buf + i) = *reinterpret_cast<const V*>(src + tile_token_offset(g, t, i));
    }
    FK_SYNC_THREADS();
    for (int32_t v = thread; v < image_vecs; v += threads) {
      const int32_t row = v / row_vecs, col = (v % row_vecs) * VEC;
      V pixels;
      int32_t at = tile_token_index(g, t, row, col);
      int32_t kp = col % pw;
FK_UNROLL
      for (int k = 0; k < VEC; ++k) {
        pixels.v[k] = buf[at];
        at += tile_token_step(g, kp);
      }
      *reinterpret_cast<V*>(dst + tile_image_offset(g, t, row, col)) = pixels;
    }
  }
  FK_SYNC_THREADS();  // the block's next tile reuses `buf`
}

// Moves token element `i` (of n * T * D, in token order) element-wise: token-side accesses of
// consecutive threads are coalesced, image-side ones gather.
template <typename T, bool kToTokens>
FK_HOST_DEVICE void move_element(const T* __restrict__ src, T* __restrict__ dst,
                                 const PatchGeometry& g, int64_t i) {
  const int64_t d = g.features(), per_sample = g.tokens() * d;
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

}  // namespace flexikern
