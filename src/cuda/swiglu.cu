// PLACEHOLDER: swiglu on CUDA is not implemented yet.
#include "cuda/ops.h"

namespace tk::cuda {
tk_status swiglu(const tk_swiglu_params&, const Launch&) {
  return fail(TK_ERR_UNSUPPORTED, "swiglu: not implemented on the cuda backend");
}
}  // namespace tk::cuda
