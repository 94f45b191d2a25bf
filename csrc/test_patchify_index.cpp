// Unit test of csrc/patchify_index.h: plain C++, no torch. Run by csrc/ci_check.sh and ctest.
//
// Checks, for many geometries (2-D and 3-D, every patch size 1..8, odd channel counts):
//   * a hand-computed example of the layout;
//   * image -> token offsets are a bijection, and image_offset_of_token is its inverse;
//   * the tiles of every plan cover each element exactly once, mapped as the pixel formula says
//     (this is the mapping the CUDA kernels use), with strided token rows too.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "patchify_index.h"

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

// `extra` widens each token row (a packed buffer): row stride D + extra.
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

int main() {
  check_hand_example();
  int geometries = 0;
  for (int p = 1; p <= flexikern::kMaxPatch; ++p) {  // square 2-D patches, every size
    check_geometry(flexikern::make_geometry(2, 3, 1, p * 3, p * 2, 1, p, p), 0);
    check_geometry(flexikern::make_geometry(1, 1, 1, p, p * 5, 1, p, p), 5);
    geometries += 2;
  }
  const int shapes[][3] = {{1, 3, 5}, {5, 2, 1}, {8, 1, 3}, {2, 7, 4}, {3, 8, 2}, {1, 1, 8}};
  for (const auto& s : shapes) {  // non-square 2-D and 3-D patches
    check_geometry(flexikern::make_geometry(2, 2, 1, s[1] * 2, s[2] * 3, 1, s[1], s[2]), 3);
    check_geometry(flexikern::make_geometry(1, 5, s[0] * 2, s[1] * 2, s[2] * 2, s[0], s[1], s[2]),
                   0);
    geometries += 2;
  }
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("patchify index math: %d geometries OK\n", geometries);
  return 0;
}
