// PLACEHOLDER: rmsnorm on CUDA is not implemented yet.
#include "cuda/ops.h"

namespace tk::cuda {
tk_status rmsnorm(const tk_rmsnorm_params&, const Launch&) {
  return fail(TK_ERR_UNSUPPORTED, "rmsnorm: not implemented on the cuda backend");
}
}  // namespace tk::cuda
