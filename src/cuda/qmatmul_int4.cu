// PLACEHOLDER: qmatmul_int4 on CUDA is not implemented yet.
#include "cuda/ops.h"

namespace tk::cuda {
tk_status qmatmul_int4(const tk_qmatmul_int4_params&, const Launch&) {
  return fail(TK_ERR_UNSUPPORTED, "qmatmul_int4: not implemented on the cuda backend");
}
}  // namespace tk::cuda
