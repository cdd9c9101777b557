// PLACEHOLDER: matmul on CUDA is not implemented yet.
#include "cuda/ops.h"

namespace tk::cuda {
tk_status matmul(const tk_matmul_params&, const Launch&) {
  return fail(TK_ERR_UNSUPPORTED, "matmul: not implemented on the cuda backend");
}
}  // namespace tk::cuda
