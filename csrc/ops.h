// The torch glue shared by csrc/ops.cpp (schemas, checks, CPU) and csrc/ops_cuda.cpp (CUDA).
#pragma once

#include <ATen/core/Tensor.h>

#include "patchify_index.h"

namespace flexikern {

// Moves the elements of `g` between the contiguous image and the token buffer (see
// patchify_index.h); `src` and `dst` hold checked, device-matching data.
void patch_copy_cpu(const at::Tensor& src, const at::Tensor& dst, const PatchGeometry& g,
                    bool to_tokens);
#ifdef FLEXIKERN_WITH_CUDA
void patch_copy_cuda(const at::Tensor& src, const at::Tensor& dst, const PatchGeometry& g,
                     bool to_tokens);
#endif

}  // namespace flexikern
