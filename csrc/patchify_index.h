// Index math of patchify / unpatchify, shared by the CPU loops, the CUDA kernels and the C++
// unit test. Plain C++17 (no torch, no CUDA headers): every function is __host__ __device__
// under nvcc and an ordinary inline function elsewhere.
//
// Layout: DiT's (the inverse of its `unpatchify`: tokens on a row-major grid of patches,
// features ordered (ph, pw, C), channel fastest), with videos' frame axis outermost. A 2-D
// image (N, C, H, W) is treated as a video with F = 1 and pt = 1, so one geometry covers both:
//   image  x[n][c][f][h][w], contiguous (N, C, F, H, W)
//   tokens tok[n][t][d] with t = (fg * GH + hg) * GW + wg   (a row-major grid of patches)
//                        and d = ((ip * ph + jp) * pw + kp) * C + c   (features (pt, ph, pw, C))
//   where f = fg * pt + ip, h = hg * ph + jp, w = wg * pw + kp.
// The token buffer may be a strided view (a slice of token rows wider than D): element
// (n, t, d) lives at n * token_batch_stride + t * token_row_stride + d.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FK_HOST_DEVICE inline
#endif

namespace flexikern {

// The largest patch size per axis the compiled kernels support (the Python validation allows
// more; dispatch falls back to the torch reference above this).
constexpr int kMaxPatch = 8;

struct PatchGeometry {
  int64_t n = 1, c = 1, f = 1, h = 1, w = 1;  // image sizes (f = 1 for 2-D images)
  int64_t pt = 1, ph = 1, pw = 1;             // patch sizes (pt = 1 for 2-D images)
  int64_t token_batch_stride = 0;             // set by make_geometry: T * D unless strided
  int64_t token_row_stride = 0;               // D unless strided

  FK_HOST_DEVICE int64_t grid_f() const { return f / pt; }
  FK_HOST_DEVICE int64_t grid_h() const { return h / ph; }
  FK_HOST_DEVICE int64_t grid_w() const { return w / pw; }
  FK_HOST_DEVICE int64_t tokens() const { return grid_f() * grid_h() * grid_w(); }
  FK_HOST_DEVICE int64_t features() const { return pt * ph * pw * c; }
  FK_HOST_DEVICE int64_t image_numel() const { return n * c * f * h * w; }

  // Offset of x[n][c][f][h][w] in the contiguous image.
  FK_HOST_DEVICE int64_t image_offset(int64_t in, int64_t ic, int64_t iff, int64_t ih,
                                      int64_t iw) const {
    return (((in * c + ic) * f + iff) * h + ih) * w + iw;
  }

  // Index of patch (fg, hg, wg) in the row-major token grid.
  FK_HOST_DEVICE int64_t token_index(int64_t fg, int64_t hg, int64_t wg) const {
    return (fg * grid_h() + hg) * grid_w() + wg;
  }

  // Index of pixel (ip, jp, kp) of a patch, channel c, in a token's features.
  FK_HOST_DEVICE int64_t feature_index(int64_t ip, int64_t jp, int64_t kp, int64_t ic) const {
    return ((ip * ph + jp) * pw + kp) * c + ic;
  }

  // Offset of tok[n][t][d] in the (possibly strided) token buffer.
  FK_HOST_DEVICE int64_t token_offset(int64_t in, int64_t t, int64_t d) const {
    return in * token_batch_stride + t * token_row_stride + d;
  }

  // Where image element (n, c, f, h, w) goes in the token buffer.
  FK_HOST_DEVICE int64_t token_offset_of_pixel(int64_t in, int64_t ic, int64_t iff, int64_t ih,
                                               int64_t iw) const {
    const int64_t t = token_index(iff / pt, ih / ph, iw / pw);
    return token_offset(in, t, feature_index(iff % pt, ih % ph, iw % pw, ic));
  }

  // Where token element (n, t, d) comes from in the image (the inverse of the above).
  FK_HOST_DEVICE int64_t image_offset_of_token(int64_t in, int64_t t, int64_t d) const {
    const int64_t ic = d % c;
    int64_t rest = d / c;
    const int64_t kp = rest % pw;
    rest /= pw;
    const int64_t jp = rest % ph;
    const int64_t ip = rest / ph;
    const int64_t wg = t % grid_w();
    const int64_t fhg = t / grid_w();
    const int64_t hg = fhg % grid_h();
    const int64_t fg = fhg / grid_h();
    return image_offset(in, ic, fg * pt + ip, hg * ph + jp, wg * pw + kp);
  }
};

// A geometry with contiguous (N, T, D) tokens, or with the given token strides when > 0.
FK_HOST_DEVICE PatchGeometry make_geometry(int64_t n, int64_t c, int64_t f, int64_t h, int64_t w,
                                           int64_t pt, int64_t ph, int64_t pw,
                                           int64_t token_batch_stride = 0,
                                           int64_t token_row_stride = 0) {
  PatchGeometry g;
  g.n = n; g.c = c; g.f = f; g.h = h; g.w = w;
  g.pt = pt; g.ph = ph; g.pw = pw;
  g.token_row_stride = token_row_stride > 0 ? token_row_stride : g.features();
  g.token_batch_stride = token_batch_stride > 0 ? token_batch_stride
                                                : g.tokens() * g.token_row_stride;
  return g;
}

// A tile is the unit of work of one CUDA block: `hcount` rows of patches x `wcount` patches of
// one (n, fg). Its tokens are consecutive in the grid (rows span the whole width when
// hcount > 1), so the tile is one run of `tile_tokens()` token rows. A tile holds at most a few
// thousand elements (plan_tiles), so indices inside it are 32-bit: on GPUs 64-bit division costs
// several times more, and the kernels divide per 16-byte vector.
struct PatchTile {
  int64_t n, fg, hg0, wg0;
  int32_t hcount, wcount;
  int64_t image_base;  // image offset of the tile's first pixel, (n, 0, fg*pt, hg0*ph, wg0*pw)
  int64_t token_base;  // token-buffer offset of its first token's first feature
  FK_HOST_DEVICE int32_t tile_tokens() const { return hcount * wcount; }
};

// Tiles of (at most) `tile_h` x `tile_w` patches; `tile_h` > 1 only when `tile_w` = grid_w().
struct TilePlan {
  int64_t tile_h = 1, tile_w = 1;

  FK_HOST_DEVICE int64_t tiles_h(const PatchGeometry& g) const {
    return (g.grid_h() + tile_h - 1) / tile_h;
  }
  FK_HOST_DEVICE int64_t tiles_w(const PatchGeometry& g) const {
    return (g.grid_w() + tile_w - 1) / tile_w;
  }
  FK_HOST_DEVICE int64_t num_tiles(const PatchGeometry& g) const {
    return g.n * g.grid_f() * tiles_h(g) * tiles_w(g);
  }
  FK_HOST_DEVICE PatchTile tile(const PatchGeometry& g, int64_t index) const {
    PatchTile t;
    const int64_t tw = index % tiles_w(g);
    index /= tiles_w(g);
    const int64_t th = index % tiles_h(g);
    index /= tiles_h(g);
    t.fg = index % g.grid_f();
    t.n = index / g.grid_f();
    t.hg0 = th * tile_h;
    t.wg0 = tw * tile_w;
    t.hcount = static_cast<int32_t>(g.grid_h() - t.hg0 < tile_h ? g.grid_h() - t.hg0 : tile_h);
    t.wcount = static_cast<int32_t>(g.grid_w() - t.wg0 < tile_w ? g.grid_w() - t.wg0 : tile_w);
    t.image_base = g.image_offset(t.n, 0, t.fg * g.pt, t.hg0 * g.ph, t.wg0 * g.pw);
    t.token_base = g.token_offset(t.n, g.token_index(t.fg, t.hg0, t.wg0), 0);
    return t;
  }
};

// The largest tile of whole patches holding at most `max_elements` token elements (at least one
// patch): whole rows of patches when a row fits, else a run of patches within one row.
inline TilePlan plan_tiles(const PatchGeometry& g, int64_t max_elements) {
  TilePlan plan;
  const int64_t d = g.features();
  const int64_t row = g.grid_w() * d;
  if (row <= max_elements) {
    plan.tile_w = g.grid_w();
    const int64_t rows = max_elements / row;
    plan.tile_h = rows < g.grid_h() ? rows : g.grid_h();
  } else {
    const int64_t patches = max_elements / d;
    plan.tile_w = patches < 1 ? 1 : patches;
    plan.tile_h = 1;
  }
  return plan;
}

// Inside a tile, the image side is `tile_image_rows` rows of `tile_row_length` contiguous
// elements: row r = ((c * pt + ip) * hcount + hl) * ph + jp covers
// x[n][c][fg*pt + ip][(hg0 + hl)*ph + jp][wg0*pw : (wg0 + wcount)*pw]
// (rows are ordered as they lie in memory, so consecutive threads read consecutive addresses).
FK_HOST_DEVICE int32_t tile_image_rows(const PatchGeometry& g, const PatchTile& t) {
  return static_cast<int32_t>(g.c * g.pt * g.ph) * t.hcount;
}
FK_HOST_DEVICE int32_t tile_row_length(const PatchGeometry& g, const PatchTile& t) {
  return t.wcount * static_cast<int32_t>(g.pw);
}

// Offset in the image of element `col` of tile row `row`.
FK_HOST_DEVICE int64_t tile_image_offset(const PatchGeometry& g, const PatchTile& t, int32_t row,
                                         int32_t col) {
  const int32_t ph = static_cast<int32_t>(g.ph), pt = static_cast<int32_t>(g.pt);
  const int32_t jp = row % ph;
  row /= ph;
  const int32_t hl = row % t.hcount;
  const int32_t frame = row / t.hcount;  // c * pt + ip: (c, fg*pt + ip) is frame c * F + that
  const int32_t ic = frame / pt, ip = frame % pt;
  return t.image_base + ((ic * g.f + ip) * g.h + hl * ph + jp) * g.w + col;
}

// Index in the tile's dense token block (tile_tokens() x D, row-major) of the same element.
FK_HOST_DEVICE int32_t tile_token_index(const PatchGeometry& g, const PatchTile& t, int32_t row,
                                        int32_t col) {
  const int32_t ph = static_cast<int32_t>(g.ph), pt = static_cast<int32_t>(g.pt);
  const int32_t pw = static_cast<int32_t>(g.pw), c = static_cast<int32_t>(g.c);
  const int32_t jp = row % ph;
  row /= ph;
  const int32_t hl = row % t.hcount;
  row /= t.hcount;
  const int32_t ip = row % pt, ic = row / pt;
  const int32_t local_token = hl * t.wcount + col / pw;
  return local_token * static_cast<int32_t>(g.features()) + ((ip * ph + jp) * pw + col % pw) * c +
         ic;
}

// The step of tile_token_index from column col to col + 1 of a row; `kp` is col % pw on entry
// and (col + 1) % pw on return. Within a patch the next pixel is C features on; past a patch's
// last column it is the next token's first column, D - (pw - 1) * C on.
FK_HOST_DEVICE int32_t tile_token_step(const PatchGeometry& g, int32_t& kp) {
  const int32_t pw = static_cast<int32_t>(g.pw), c = static_cast<int32_t>(g.c);
  if (++kp < pw) return c;
  kp = 0;
  return static_cast<int32_t>(g.features()) - (pw - 1) * c;
}

// Offset in the token buffer of element `i` of the tile's dense token block.
FK_HOST_DEVICE int64_t tile_token_offset(const PatchGeometry& g, const PatchTile& t, int32_t i) {
  const int32_t d = static_cast<int32_t>(g.features());
  return t.token_base + static_cast<int64_t>(i / d) * g.token_row_stride + i % d;
}

}  // namespace flexikern
