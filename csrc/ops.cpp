// torch.library registration of flexikern's patchify ops (namespace `flexikern`) and their
// checks. Device work is in patchify_cpu.cpp / ops_cuda.cpp.
//
// Ops (fake implementations and autograd are registered from Python, flexikern/_ext.py):
//   patchify(x, patch_size) -> tokens                     x (N, C, [F,] H, W), tokens (N, T, D)
//   unpatchify(tokens, patch_size, size) -> x
//   patchify_out / unpatchify_out: the same, into a given buffer (the token buffer may have a
//     row stride > D, e.g. a slice of wider token rows); nothing else of the buffer is touched.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "ops.h"
#include "patchify_index.h"

namespace flexikern {
namespace {

// Checks an image shape against a patch size; returns the geometry with contiguous tokens.
PatchGeometry image_geometry(at::IntArrayRef shape, at::IntArrayRef patch, const char* name) {
  TORCH_CHECK(shape.size() == 4 || shape.size() == 5, "flexikern patchify: ", name,
              " must be (N, C, H, W) or (N, C, F, H, W), got shape ", shape);
  const size_t k = shape.size() - 2;
  TORCH_CHECK(patch.size() == k, "flexikern patchify: patch_size ", patch, " must have ", k,
              " entries for ", name, " of shape ", shape);
  for (size_t i = 0; i < k; ++i) {
    TORCH_CHECK(patch[i] >= 1 && patch[i] <= kMaxPatch, "flexikern patchify: patch_size ", patch,
                ": the extension supports sizes 1..", kMaxPatch);
    TORCH_CHECK(shape[2 + i] % patch[i] == 0, "flexikern patchify: ", name, " of shape ", shape,
                " is not divisible by patch_size ", patch);
  }
  const bool video = k == 3;
  return make_geometry(shape[0], shape[1], video ? shape[2] : 1, shape[k], shape[k + 1],
                       video ? patch[0] : 1, patch[k - 2], patch[k - 1]);
}

void check_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_floating_point() &&
                  (t.element_size() == 2 || t.element_size() == 4 || t.element_size() == 8),
              "flexikern patchify: ", name, " has dtype ", t.scalar_type(),
              "; expected float16, bfloat16, float32 or float64");
}

void check_same(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device() == like.device(),
              "flexikern patchify: ", name, " is ", t.scalar_type(), " on ", t.device(),
              ", expected ", like.scalar_type(), " on ", like.device());
}

// Sets the geometry's token strides from a (N, T, D) tensor whose last dimension is contiguous
// and whose rows do not overlap; returns false when the tensor is not laid out so.
bool set_token_strides(PatchGeometry& g, const at::Tensor& tokens) {
  const int64_t t = g.tokens(), d = g.features();
  const int64_t row = t > 1 ? tokens.stride(1) : d;
  const int64_t batch = g.n > 1 ? tokens.stride(0) : t * row;
  if ((d > 1 && tokens.stride(2) != 1) || row < d || batch < t * row) return false;
  g.token_row_stride = row;
  g.token_batch_stride = batch;
  return true;
}

void check_tokens_shape(const at::Tensor& tokens, const PatchGeometry& g, const char* name) {
  TORCH_CHECK(tokens.dim() == 3 && tokens.size(0) == g.n && tokens.size(1) == g.tokens() &&
                  tokens.size(2) == g.features(),
              "flexikern patchify: ", name, " has shape ", tokens.sizes(), ", expected (", g.n,
              ", ", g.tokens(), ", ", g.features(), ")");
}

void patch_copy(const at::Tensor& src, const at::Tensor& dst, const PatchGeometry& g,
                bool to_tokens) {
  if (src.is_cpu()) return patch_copy_cpu(src, dst, g, to_tokens);
#ifdef FLEXIKERN_WITH_CUDA
  if (src.is_cuda()) return patch_copy_cuda(src, dst, g, to_tokens);
#endif
  TORCH_CHECK(false, "flexikern patchify: no kernel for device ", src.device());
}

void patchify_out(const at::Tensor& x, at::IntArrayRef patch_size, const at::Tensor& out) {
  check_dtype(x, "x");
  check_same(out, x, "out");
  PatchGeometry g = image_geometry(x.sizes(), patch_size, "x");
  check_tokens_shape(out, g, "out");
  TORCH_CHECK(set_token_strides(g, out), "flexikern patchify_out: out of strides ", out.strides(),
              " must have a contiguous last dimension and non-overlapping rows");
  patch_copy(x.contiguous(), out, g, /*to_tokens=*/true);
}

void unpatchify_out(const at::Tensor& tokens, at::IntArrayRef patch_size, const at::Tensor& out) {
  check_dtype(tokens, "tokens");
  check_same(out, tokens, "out");
  TORCH_CHECK(out.is_contiguous(), "flexikern unpatchify_out: out must be contiguous");
  PatchGeometry g = image_geometry(out.sizes(), patch_size, "out");
  check_tokens_shape(tokens, g, "tokens");
  if (set_token_strides(g, tokens)) {
    patch_copy(tokens, out, g, /*to_tokens=*/false);
  } else {
    const at::Tensor dense = tokens.contiguous();
    set_token_strides(g, dense);
    patch_copy(dense, out, g, /*to_tokens=*/false);
  }
}

at::Tensor patchify(const at::Tensor& x, at::IntArrayRef patch_size) {
  const PatchGeometry g = image_geometry(x.sizes(), patch_size, "x");
  at::Tensor out = at::empty({g.n, g.tokens(), g.features()}, x.options());
  patchify_out(x, patch_size, out);
  return out;
}

at::Tensor unpatchify(const at::Tensor& tokens, at::IntArrayRef patch_size,
                      at::IntArrayRef size) {
  TORCH_CHECK(tokens.dim() == 3, "flexikern unpatchify: tokens must be (N, T, D), got shape ",
              tokens.sizes());
  int64_t volume = 1;
  for (int64_t p : patch_size) volume *= p;
  TORCH_CHECK(volume > 0 && tokens.size(2) % volume == 0, "flexikern unpatchify: tokens of shape ",
              tokens.sizes(), " do not have prod(patch_size) * C features, patch_size ", patch_size);
  std::vector<int64_t> shape = {tokens.size(0), tokens.size(2) / volume};
  shape.insert(shape.end(), size.begin(), size.end());
  at::Tensor out = at::empty(shape, tokens.options());
  unpatchify_out(tokens, patch_size, out);
  return out;
}

}  // namespace

TORCH_LIBRARY(flexikern, m) {
  m.def("patchify(Tensor x, int[] patch_size) -> Tensor");
  m.def("unpatchify(Tensor tokens, int[] patch_size, int[] size) -> Tensor");
  m.def("patchify_out(Tensor x, int[] patch_size, Tensor(a!) out) -> ()");
  m.def("unpatchify_out(Tensor tokens, int[] patch_size, Tensor(a!) out) -> ()");
}

#define FLEXIKERN_IMPL_ALL(m)                    \
  m.impl("patchify", &patchify);                 \
  m.impl("unpatchify", &unpatchify);             \
  m.impl("patchify_out", &patchify_out);         \
  m.impl("unpatchify_out", &unpatchify_out)

TORCH_LIBRARY_IMPL(flexikern, CPU, m) { FLEXIKERN_IMPL_ALL(m); }

#ifdef FLEXIKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(flexikern, CUDA, m) { FLEXIKERN_IMPL_ALL(m); }
#endif

}  // namespace flexikern
