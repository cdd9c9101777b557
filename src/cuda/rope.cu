// PLACEHOLDER: rope on CUDA is not implemented yet.
#include "cuda/ops.h"

namespace tk::cuda {
tk_status rope(const tk_rope_params&, const Launch&) {
  return fail(TK_ERR_UNSUPPORTED, "rope: not implemented on the cuda backend");
}
}  // namespace tk::cuda
