// Torch-free entry points of the CUDA kernels (csrc/patchify_cuda.cu). The torch glue
// (csrc/ops_cuda.cpp) checks the tensors and calls these; nvcc compiles the kernels without any
// torch header, so `nvcc -c csrc/patchify_cuda.cu` works on any machine with a CUDA toolkit.
#pragma once

#include <cstdint>

#include "patchify_index.h"

namespace flexikern {

// Copy `g.image_numel()` elements of `element_size` bytes (2, 4 or 8: patchify moves bits, so
// fp16/bf16, fp32 and fp64 share kernels) between the contiguous image and the token buffer.
// `to_tokens`: image `src` -> tokens `dst` (patchify); otherwise tokens `src` -> image `dst`.
// `stream` is a cudaStream_t. Returns a cudaError_t value (0 = success).
int launch_patchify_cuda(const void* src, void* dst, const PatchGeometry& g, int element_size,
                         bool to_tokens, void* stream);

}  // namespace flexikern
