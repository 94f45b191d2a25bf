// CPU loops of patchify / unpatchify, parallel over image rows with at::parallel_for (OpenMP).
#include <ATen/Parallel.h>

#include <cstdint>

#include "ops.h"

namespace flexikern {
namespace {

// One image row (n, f, h) at a time, every channel: the image side is read or written
// contiguously along W, the token side lands in the W / pw tokens of one row of patches.
template <typename T, bool kToTokens>
void copy_rows(const T* src, T* dst, const PatchGeometry& g) {
  const int64_t rows = g.n * g.f * g.h;
  // 32K elements per task, ATen's GRAIN_SIZE: smaller tasks cost more in wake-ups than they save.
  const int64_t grain = 32768 / (g.c * g.w) + 1;
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t h = r % g.h, f = (r / g.h) % g.f, n = r / (g.h * g.f);
      for (int64_t c = 0; c < g.c; ++c) {
        int64_t image = g.image_offset(n, c, f, h, 0);
        int64_t token = g.token_offset_of_pixel(n, c, f, h, 0);
        // Along w the token offset steps by C within a patch and by a token row between patches.
        for (int64_t wg = 0; wg < g.grid_w(); ++wg) {
          for (int64_t kp = 0; kp < g.pw; ++kp) {
            if (kToTokens) {
              dst[token + kp * g.c] = src[image + kp];
            } else {
              dst[image + kp] = src[token + kp * g.c];
            }
          }
          image += g.pw;
          token += g.token_row_stride;
        }
      }
    }
  });
}

template <typename T>
void copy_typed(const at::Tensor& src, const at::Tensor& dst, const PatchGeometry& g,
                bool to_tokens) {
  const T* s = static_cast<const T*>(src.const_data_ptr());
  T* d = static_cast<T*>(dst.mutable_data_ptr());
  if (to_tokens) {
    copy_rows<T, true>(s, d, g);
  } else {
    copy_rows<T, false>(s, d, g);
  }
}

}  // namespace

void patch_copy_cpu(const at::Tensor& src, const at::Tensor& dst, const PatchGeometry& g,
                    bool to_tokens) {
  if (g.image_numel() == 0) return;
  // Patchify moves bits: one loop per element size serves fp16/bf16, fp32 and fp64.
  switch (src.element_size()) {
    case 2: return copy_typed<uint16_t>(src, dst, g, to_tokens);
    case 4: return copy_typed<uint32_t>(src, dst, g, to_tokens);
    case 8: return copy_typed<uint64_t>(src, dst, g, to_tokens);
    default: TORCH_CHECK(false, "flexikern patchify: unsupported element size ", src.element_size());
  }
}

}  // namespace flexikern
