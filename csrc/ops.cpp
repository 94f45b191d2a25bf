// torch.library registration of flexikern's patchify ops (namespace `flexikern`), their checks,
// and the packed variants. Device work is in patchify_cpu.cpp / ops_cuda.cpp.
//
// Ops (fake implementations and autograd are registered from Python, flexikern/_ext.py):
//   patchify(x, patch_size) -> tokens                     x (N, C, [F,] H, W), tokens (N, T, D)
//   unpatchify(tokens, patch_size, size) -> x
//   patchify_out / unpatchify_out: the same, into a given buffer (the token buffer may have a
//     row stride > D, e.g. rows of a packed buffer); nothing else of the buffer is touched.
//   patchify_packed(xs, patch_sizes) -> (tokens, cu_seqlens), unpatchify_packed(...) -> xs, and
//     their _out forms. Layout: see flexikern/ops/patchify.py (`patchify_packed`).
// Patch sizes of the packed ops are flattened: group i's patch is patch_sizes[i*k : (i+1)*k].
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
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

// ---- packed: groups with different patch sizes in one (total_tokens, max D) buffer ----------

struct PackedGroup {
  PatchGeometry g;
  int64_t first_row;  // the group's first row in the packed buffer
};

// The groups of a packed buffer, from the image shapes of each group.
std::vector<PackedGroup> plan_packed(const std::vector<at::IntArrayRef>& shapes,
                                     at::IntArrayRef patch_sizes, int64_t* rows,
                                     int64_t* width, int64_t* sequences) {
  TORCH_CHECK(!shapes.empty(), "flexikern patchify_packed: no groups");
  TORCH_CHECK(shapes[0].size() == 4 || shapes[0].size() == 5, "flexikern patchify_packed: groups "
              "must be (N, C, H, W) or (N, C, F, H, W), got shape ", shapes[0]);
  const size_t k = shapes[0].size() - 2;
  TORCH_CHECK(patch_sizes.size() == shapes.size() * k, "flexikern patchify_packed: ",
              patch_sizes.size(), " patch sizes for ", shapes.size(), " groups of rank ",
              shapes[0].size(), " (expected ", shapes.size() * k, ")");
  std::vector<PackedGroup> groups;
  *rows = *width = *sequences = 0;
  for (size_t i = 0; i < shapes.size(); ++i) {
    TORCH_CHECK(shapes[i].size() == shapes[0].size() && shapes[i][1] == shapes[0][1],
                "flexikern patchify_packed: group ", i, " has shape ", shapes[i],
                "; every group needs the rank and channels of group 0, ", shapes[0]);
    const PatchGeometry g =
        image_geometry(shapes[i], patch_sizes.slice(i * k, k), "a packed group");
    groups.push_back({g, *rows});
    *rows += g.n * g.tokens();
    *width = std::max(*width, g.features());
    *sequences += g.n;
  }
  TORCH_CHECK(*rows <= std::numeric_limits<int32_t>::max(),
              "flexikern patchify_packed: ", *rows, " tokens overflow int32 cu_seqlens");
  return groups;
}

// Group i's tokens as a (N_i, T_i, D_i) view of the packed buffer's rows.
at::Tensor group_view(const at::Tensor& packed, const PatchGeometry& g, int64_t first_row) {
  const int64_t width = packed.size(1);
  return packed.as_strided({g.n, g.tokens(), g.features()}, {g.tokens() * width, width, 1},
                           packed.storage_offset() + first_row * width);
}

void patchify_packed_out(at::TensorList xs, at::IntArrayRef patch_sizes, const at::Tensor& tokens,
                         const at::Tensor& cu_seqlens) {
  std::vector<at::IntArrayRef> shapes;
  for (const at::Tensor& x : xs) shapes.push_back(x.sizes());
  int64_t rows, width, sequences;
  const std::vector<PackedGroup> groups = plan_packed(shapes, patch_sizes, &rows, &width,
                                                      &sequences);
  check_same(tokens, xs[0], "tokens");
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(0) == rows && tokens.size(1) == width &&
                  tokens.is_contiguous(),
              "flexikern patchify_packed_out: tokens must be contiguous (", rows, ", ", width,
              "), got shape ", tokens.sizes());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1 &&
                  cu_seqlens.size(0) == sequences + 1 && cu_seqlens.is_contiguous() &&
                  cu_seqlens.device() == tokens.device(),
              "flexikern patchify_packed_out: cu_seqlens must be contiguous int32 (",
              sequences + 1, ",) on ", tokens.device());
  const int64_t k = xs[0].dim() - 2;
  int64_t sequence = 0;
  for (size_t i = 0; i < groups.size(); ++i) {
    const PatchGeometry& g = groups[i].g;
    patchify_out(xs[i], patch_sizes.slice(i * k, k), group_view(tokens, g, groups[i].first_row));
    if (g.features() < width) {  // the padding columns are zeros
      tokens.narrow(0, groups[i].first_row, g.n * g.tokens())
          .narrow(1, g.features(), width - g.features())
          .zero_();
    }
    // Sequence starts of the group, computed on the device (no host copy: graph-capturable).
    if (g.n > 0) {
      at::Tensor starts = cu_seqlens.narrow(0, sequence, g.n);
      at::arange_out(starts, groups[i].first_row,
                     groups[i].first_row + g.n * g.tokens(), g.tokens());
    }
    sequence += g.n;
  }
  cu_seqlens.narrow(0, sequences, 1).fill_(rows);
}

std::tuple<at::Tensor, at::Tensor> patchify_packed(at::TensorList xs,
                                                   at::IntArrayRef patch_sizes) {
  TORCH_CHECK(!xs.empty(), "flexikern patchify_packed: xs is empty");
  std::vector<at::IntArrayRef> shapes;
  for (const at::Tensor& x : xs) shapes.push_back(x.sizes());
  int64_t rows, width, sequences;
  plan_packed(shapes, patch_sizes, &rows, &width, &sequences);
  at::Tensor tokens = at::empty({rows, width}, xs[0].options());
  at::Tensor cu_seqlens = at::empty({sequences + 1}, xs[0].options().dtype(at::kInt));
  patchify_packed_out(xs, patch_sizes, tokens, cu_seqlens);
  return {tokens, cu_seqlens};
}

void unpatchify_packed_out(const at::Tensor& tokens, at::IntArrayRef patch_sizes,
                           at::TensorList out) {
  TORCH_CHECK(!out.empty(), "flexikern unpatchify_packed_out: out is empty");
  std::vector<at::IntArrayRef> shapes;
  for (const at::Tensor& x : out) shapes.push_back(x.sizes());
  int64_t rows, width, sequences;
  const std::vector<PackedGroup> groups = plan_packed(shapes, patch_sizes, &rows, &width,
                                                      &sequences);
  check_same(tokens, out[0], "tokens");
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(0) == rows && tokens.size(1) == width,
              "flexikern unpatchify_packed: tokens of shape ", tokens.sizes(),
              " do not fit the groups: expected (", rows, ", ", width, ")");
  const at::Tensor dense = tokens.contiguous();
  const int64_t k = out[0].dim() - 2;
  for (size_t i = 0; i < groups.size(); ++i) {
    unpatchify_out(group_view(dense, groups[i].g, groups[i].first_row),
                   patch_sizes.slice(i * k, k), out[i]);
  }
}

std::vector<at::Tensor> unpatchify_packed(const at::Tensor& tokens, at::IntArrayRef patch_sizes,
                                          at::IntArrayRef shapes) {
  TORCH_CHECK(tokens.dim() == 2, "flexikern unpatchify_packed: tokens must be (total, D), got ",
              tokens.sizes());
  // shapes: the groups' image shapes, flattened; G groups of rank k + 2 give G * (k + 2) shape
  // entries and G * k patch entries, which fixes k (2 or 3) unambiguously.
  int64_t k = 0;
  for (int64_t rank : {2, 3}) {
    if (shapes.size() % (rank + 2) == 0 && patch_sizes.size() % rank == 0 &&
        shapes.size() / (rank + 2) == patch_sizes.size() / rank && !patch_sizes.empty()) {
      k = rank;
      break;
    }
  }
  TORCH_CHECK(k > 0, "flexikern unpatchify_packed: ", shapes.size(), " shape entries do not match ",
              patch_sizes.size(), " patch-size entries");
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < patch_sizes.size() / k; ++i) {
    out.push_back(at::empty(shapes.slice(i * (k + 2), k + 2), tokens.options()));
  }
  unpatchify_packed_out(tokens, patch_sizes, out);
  return out;
}

}  // namespace

TORCH_LIBRARY(flexikern, m) {
  m.def("patchify(Tensor x, int[] patch_size) -> Tensor");
  m.def("unpatchify(Tensor tokens, int[] patch_size, int[] size) -> Tensor");
  m.def("patchify_out(Tensor x, int[] patch_size, Tensor(a!) out) -> ()");
  m.def("unpatchify_out(Tensor tokens, int[] patch_size, Tensor(a!) out) -> ()");
  m.def("patchify_packed(Tensor[] xs, int[] patch_sizes) -> (Tensor, Tensor)");
  m.def("patchify_packed_out(Tensor[] xs, int[] patch_sizes, Tensor(a!) tokens, "
        "Tensor(b!) cu_seqlens) -> ()");
  m.def("unpatchify_packed(Tensor tokens, int[] patch_sizes, int[] shapes) -> Tensor[]");
  m.def("unpatchify_packed_out(Tensor tokens, int[] patch_sizes, Tensor(a!)[] out) -> ()");
}

#define FLEXIKERN_IMPL_ALL(m)                                \
  m.impl("patchify", &patchify);                             \
  m.impl("unpatchify", &unpatchify);                         \
  m.impl("patchify_out", &patchify_out);                     \
  m.impl("unpatchify_out", &unpatchify_out);                 \
  m.impl("patchify_packed", &patchify_packed);               \
  m.impl("patchify_packed_out", &patchify_packed_out);       \
  m.impl("unpatchify_packed", &unpatchify_packed);           \
  m.impl("unpatchify_packed_out", &unpatchify_packed_out)

TORCH_LIBRARY_IMPL(flexikern, CPU, m) { FLEXIKERN_IMPL_ALL(m); }

#ifdef FLEXIKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(flexikern, CUDA, m) { FLEXIKERN_IMPL_ALL(m); }
#endif

}  // namespace flexikern
