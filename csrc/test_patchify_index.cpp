// Unit test of csrc/patchify_index.h and csrc/patchify_tile.h: plain C++, no torch, no GPU.
// Run by csrc/ci_check.sh and ctest.
//
// Checks, for many geometries (2-D and 3-D, every patch size 1..8, odd channel counts):
//   * a hand-computed example of the layout;
//   * image -> token offsets are a bijection, and image_offset_of_token is its inverse;
//   * the tiles of every plan cover each element exactly once, mapped as the pixel formula says
//     (this is the mapping the CUDA kernels use), with strided token rows too;
//   * the CUDA kernels' algorithm (move_tile / move_element), run on the host one thread per
//     block, for 2-, 4- and 8-byte elements, scalar and 16-byte vectors, every tile plan, both
//     directions: every element lands where the formula says, nothing else is written.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "patchify_index.h"
#include "patchify_tile.h"

using flexikern::PatchGeometry;

static int failures = 0;

#define EXPECT(cond, ...)                                     \
  do {                                                        \
    if (!(cond)) {                                            \
      if (++failures <= 20) {                                 \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                             \
        std::printf("\n");                                    \
      }                                                       \
    }                                                         \
  } while (0)

static void check_hand_example() {
  // (N, C, H, W) = (1, 2, 4, 4), p = 2: pixel (c=1, h=1, w=2) is patch (0, 1) -> token 1, and
  // (jp=1, kp=0, c=1) -> feature ((0*2 + 1)*2 + 0)*2 + 1 = 5; D = 8, so offset 1*8 + 5 = 13.
  const PatchGeometry g = flexikern::make_geometry(1, 2, 1, 4, 4, 1, 2, 2);
  EXPECT(g.features() == 8 && g.tokens() == 4, "D=%lld T=%lld", (long long)g.features(),
         (long long)g.tokens());
  EXPECT(g.token_offset_of_pixel(0, 1, 0, 1, 2) == 13, "got %lld",
         (long long)g.token_offset_of_pixel(0, 1, 0, 1, 2));
  // Video (1, 1, 4, 2, 2), patch (2, 1, 2): pixel (f=3, h=1, w=1) is patch (1, 1, 0) ->
  // token (1*2 + 1)*1 + 0 = 3, feature ((1*1 + 0)*2 + 1)*1 + 0 = 3; D = 4 -> 3*4 + 3 = 15.
  const PatchGeometry v = flexikern::make_geometry(1, 1, 4, 2, 2, 2, 1, 2);
  EXPECT(v.token_offset_of_pixel(0, 0, 3, 1, 1) == 15, "got %lld",
         (long long)v.token_offset_of_pixel(0, 0, 3, 1, 1));
}

// `extra` widens each token row (a slice of wider rows): row stride D + extra.
static void check_geometry(const PatchGeometry& g0, int64_t extra) {
  const PatchGeometry g = flexikern::make_geometry(g0.n, g0.c, g0.f, g0.h, g0.w, g0.pt, g0.ph,
                                                   g0.pw, 0, g0.features() + extra);
  const int64_t numel = g.image_numel();
  const int64_t buffer = g.n * g.token_batch_stride;
  std::vector<int64_t> image_of(buffer, -1);  // token-buffer offset -> image offset
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t c = 0; c < g.c; ++c)
      for (int64_t f = 0; f < g.f; ++f)
        for (int64_t h = 0; h < g.h; ++h)
          for (int64_t w = 0; w < g.w; ++w) {
            const int64_t src = g.image_offset(n, c, f, h, w);
            const int64_t dst = g.token_offset_of_pixel(n, c, f, h, w);
            EXPECT(dst >= 0 && dst < buffer, "offset %lld out of range", (long long)dst);
            if (dst < 0 || dst >= buffer) continue;
            EXPECT((dst % g.token_row_stride) < g.features(), "offset %lld in padding",
                   (long long)dst);
            EXPECT(image_of[dst] == -1, "offset %lld written twice", (long long)dst);
            image_of[dst] = src;
          }
  int64_t covered = 0;
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t t = 0; t < g.tokens(); ++t)
      for (int64_t d = 0; d < g.features(); ++d) {
        const int64_t off = g.token_offset(n, t, d);
        ++covered;
        EXPECT(image_of[off] == g.image_offset_of_token(n, t, d), "inverse at (%lld,%lld,%lld)",
               (long long)n, (long long)t, (long long)d);
      }
  EXPECT(covered == numel, "covered %lld of %lld", (long long)covered, (long long)numel);

  // Every tile plan: the tile mapping agrees with the pixel mapping and covers each element once.
  const int64_t budgets[] = {1, 7, g.features(), 3 * g.features() + 1,
                             g.grid_w() * g.features() * 2, 1 << 20};
  for (int64_t budget : budgets) {
    const flexikern::TilePlan plan = flexikern::plan_tiles(g, budget);
    std::vector<int> seen(numel, 0);
    for (int64_t i = 0; i < plan.num_tiles(g); ++i) {
      const flexikern::PatchTile t = plan.tile(g, i);
      EXPECT(t.hcount >= 1 && t.wcount >= 1, "empty tile");
      EXPECT(t.hcount == 1 || t.wcount == g.grid_w(), "multi-row tile not full width");
      const int32_t rows = flexikern::tile_image_rows(g, t);
      const int32_t len = flexikern::tile_row_length(g, t);
      EXPECT(rows * len == t.tile_tokens() * g.features(), "tile size mismatch");
      for (int32_t r = 0; r < rows; ++r)
        for (int32_t col = 0; col < len; ++col) {
          const int64_t src = flexikern::tile_image_offset(g, t, r, col);
          EXPECT(src >= 0 && src < numel, "tile image offset %lld", (long long)src);
          if (src < 0 || src >= numel) continue;
          // consecutive columns are consecutive in memory (the coalesced/vectorised reads)
          if (col > 0)
            EXPECT(src == flexikern::tile_image_offset(g, t, r, col - 1) + 1, "row not contiguous");
          ++seen[src];
          const int32_t local = flexikern::tile_token_index(g, t, r, col);
          // The kernels step along a row instead of recomputing the index.
          if (col + 1 < len) {
            int32_t kp = col % static_cast<int32_t>(g.pw);
            const int32_t step = flexikern::tile_token_step(g, kp);
            EXPECT(local + step == flexikern::tile_token_index(g, t, r, col + 1) &&
                       kp == (col + 1) % g.pw,
                   "step from column %d", col);
          }
          EXPECT(local >= 0 && local < t.tile_tokens() * g.features(), "local %lld",
                 (long long)local);
          const int64_t dst = flexikern::tile_token_offset(g, t, local);
          EXPECT(dst >= 0 && dst < buffer && image_of[dst] == src, "tile maps %lld -> %lld",
                 (long long)src, (long long)dst);
        }
    }
    for (int64_t i = 0; i < numel; ++i)
      EXPECT(seen[i] == 1, "budget %lld: element %lld seen %d times", (long long)budget,
             (long long)i, seen[i]);
  }
}

// A 16-byte-aligned buffer of `n` elements of T, filled with `fill(i)`.
template <typename T>
struct Buffer {
  std::vector<flexikern::Pack<T, 16 / sizeof(T)>> storage;
  T* data;
  template <typename F>
  Buffer(int64_t n, F fill) : storage(n / (16 / sizeof(T)) + 1) {
    data = reinterpret_cast<T*>(storage.data());
    for (int64_t i = 0; i < n; ++i) data[i] = fill(i);
  }
};

// Runs every tile of `plan` with VEC-wide accesses, one host thread per block.
template <typename T, int VEC, bool kToTokens>
void run_tiles(const T* src, T* dst, const PatchGeometry& g, const flexikern::TilePlan& plan) {
  Buffer<T> buf(plan.tile_h * plan.tile_w * g.features(), [](int64_t) { return T(0); });
  for (int64_t i = 0; i < plan.num_tiles(g); ++i) {
    flexikern::move_tile<T, VEC, kToTokens>(src, dst, g, plan.tile(g, i), buf.data, 0, 1);
  }
}

// mode: 0 = element-wise, 1 = scalar tiles, 2 = 16-byte vector tiles.
template <typename T, bool kToTokens>
void run_mode(int mode, const T* src, T* dst, const PatchGeometry& g,
              const flexikern::TilePlan& plan) {
  if (mode == 0) {
    for (int64_t i = 0; i < g.image_numel(); ++i)
      flexikern::move_element<T, kToTokens>(src, dst, g, i);
  } else if (mode == 1) {
    run_tiles<T, 1, kToTokens>(src, dst, g, plan);
  } else {
    run_tiles<T, 16 / sizeof(T), kToTokens>(src, dst, g, plan);
  }
}

static int vector_checks = 0;

template <typename T>
void check_kernels(const PatchGeometry& g0, int64_t extra) {
  const PatchGeometry g = flexikern::make_geometry(g0.n, g0.c, g0.f, g0.h, g0.w, g0.pt, g0.ph,
                                                   g0.pw, 0, g0.features() + extra);
  const int64_t numel = g.image_numel(), buffer = g.n * g.token_batch_stride;
  const T poison = T(~T(0));
  auto pixel = [](int64_t i) { return T(i % 65521 + 1); };  // distinct below 65521 elements
  const Buffer<T> image(numel, pixel);
  const int64_t budgets[] = {1, 7, g.features() * 2, g.grid_w() * g.features() * 2, 1 << 20};
  for (int64_t budget : budgets) {
    const flexikern::TilePlan plan = flexikern::plan_tiles(g, budget);
    for (int mode = 0; mode < 3; ++mode) {
      Buffer<T> tokens(buffer, [&](int64_t) { return poison; });
      if (mode == 2 && !flexikern::vectorisable(g, plan, sizeof(T), image.data, tokens.data))
        continue;
      run_mode<T, true>(mode, image.data, tokens.data, g, plan);
      vector_checks += mode == 2;
      std::vector<int> written(buffer, 0);
      for (int64_t n = 0; n < g.n; ++n)
        for (int64_t c = 0; c < g.c; ++c)
          for (int64_t f = 0; f < g.f; ++f)
            for (int64_t h = 0; h < g.h; ++h)
              for (int64_t w = 0; w < g.w; ++w) {
                const int64_t dst = g.token_offset_of_pixel(n, c, f, h, w);
                written[dst] = 1;
                EXPECT(tokens.data[dst] == image.data[g.image_offset(n, c, f, h, w)],
                       "element %d, mode %d, budget %lld: wrong value", (int)sizeof(T), mode,
                       (long long)budget);
              }
      for (int64_t i = 0; i < buffer; ++i)
        if (!written[i]) EXPECT(tokens.data[i] == poison, "padding %lld written", (long long)i);
      Buffer<T> back(numel, [&](int64_t) { return poison; });
      run_mode<T, false>(mode, tokens.data, back.data, g, plan);
      for (int64_t i = 0; i < numel; ++i)
        EXPECT(back.data[i] == image.data[i], "round trip, element %d, mode %d, at %lld",
               (int)sizeof(T), mode, (long long)i);
    }
  }
}

static int vector_runs = 0;

// The launcher's own plan for a geometry must be one that check_kernels verified.
template <typename T>
void check_launch_plan(const PatchGeometry& g) {
  const Buffer<T> a(g.image_numel(), [](int64_t) { return T(0); });
  const Buffer<T> b(g.n * g.token_batch_stride, [](int64_t) { return T(0); });
  const flexikern::LaunchPlan plan = flexikern::plan_launch(g, sizeof(T), a.data, b.data);
  if (plan.elementwise) {
    EXPECT(g.features() * (int64_t)sizeof(T) > flexikern::kMaxTileBytes, "needless element-wise");
    return;
  }
  EXPECT(plan.smem_bytes <= flexikern::kMaxTileBytes && plan.smem_bytes > 0, "smem %lld",
         (long long)plan.smem_bytes);
  vector_runs += plan.vectorise;
}

static void check_all_kernels(const PatchGeometry& g, int64_t extra) {
  check_kernels<uint16_t>(g, extra);
  check_kernels<uint32_t>(g, extra);
  check_kernels<uint64_t>(g, extra);
  check_launch_plan<uint16_t>(g);
  check_launch_plan<uint32_t>(g);
}

int main() {
  check_hand_example();
  int geometries = 0;
  for (int p = 1; p <= flexikern::kMaxPatch; ++p) {  // square 2-D patches, every size
    check_geometry(flexikern::make_geometry(2, 3, 1, p * 3, p * 2, 1, p, p), 0);
    check_geometry(flexikern::make_geometry(1, 1, 1, p, p * 5, 1, p, p), 5);
    check_all_kernels(flexikern::make_geometry(2, 3, 1, p * 3, p * 2, 1, p, p), 0);
    check_all_kernels(flexikern::make_geometry(1, 1, 1, p, p * 5, 1, p, p), 5);
    // 16-byte vectors: W and D multiples of 8 elements (DiT-like: C = 4, p = 2).
    check_all_kernels(flexikern::make_geometry(2, 4, 1, p * 2, 8 * p, 1, p, p), 0);
    check_all_kernels(flexikern::make_geometry(1, 8, 1, p * 2, 16 * p, 1, p, p), 8);
    geometries += 4;
  }
  const int shapes[][3] = {{1, 3, 5}, {5, 2, 1}, {8, 1, 3}, {2, 7, 4}, {3, 8, 2}, {1, 1, 8}};
  for (const auto& s : shapes) {  // non-square 2-D and 3-D patches
    check_geometry(flexikern::make_geometry(2, 2, 1, s[1] * 2, s[2] * 3, 1, s[1], s[2]), 3);
    check_geometry(flexikern::make_geometry(1, 5, s[0] * 2, s[1] * 2, s[2] * 2, s[0], s[1], s[2]),
                   0);
    check_all_kernels(flexikern::make_geometry(2, 2, 1, s[1] * 2, s[2] * 3, 1, s[1], s[2]), 3);
    check_all_kernels(
        flexikern::make_geometry(1, 5, s[0] * 2, s[1] * 2, s[2] * 2, s[0], s[1], s[2]), 0);
    check_all_kernels(
        flexikern::make_geometry(1, 8, s[0], s[1] * 2, s[2] * 8, s[0], s[1], s[2]), 0);
    geometries += 2;
  }
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  // The element-wise path: tokens wider than a tile (8*8*8 patches of 16 channels, 8 bytes).
  check_launch_plan<uint64_t>(flexikern::make_geometry(1, 16, 8, 8, 8, 8, 8, 8));
  EXPECT(vector_runs > 0 && vector_checks > 0, "no geometry took the vector path");
  std::printf("patchify index math and kernel algorithm: %d geometries OK (%d runs with vectors)\n",
              geometries, vector_checks);
  return 0;
}
