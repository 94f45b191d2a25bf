// CUDA glue: device guard, current stream, error check; the kernels are in patchify_cuda.cu.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include "ops.h"
#include "patchify_launch.h"

namespace flexikern {

void patch_copy_cuda(const at::Tensor& src, const at::Tensor& dst, const PatchGeometry& g,
                     bool to_tokens) {
  if (g.image_numel() == 0) return;
  const c10::cuda::CUDAGuard guard(src.device());
  const int err = launch_patchify_cuda(src.const_data_ptr(), dst.mutable_data_ptr(), g,
                                       static_cast<int>(src.element_size()), to_tokens,
                                       c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "flexikern patchify CUDA kernel failed to launch: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace flexikern
