// The Python module flexikern._C. The ops themselves are registered with the dispatcher
// (TORCH_LIBRARY in ops.cpp) when this library loads and are called as torch.ops.flexikern.*;
// the module only reports how it was built.
#include <pybind11/pybind11.h>

#include "patchify_index.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flexikern's compiled ops, called through torch.ops.flexikern";
#ifdef FLEXIKERN_WITH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
  m.attr("max_patch") = flexikern::kMaxPatch;
}
