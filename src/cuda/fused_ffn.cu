// PLACEHOLDER: fused_ffn on CUDA is not implemented yet.
#include "cuda/ops.h"

namespace tk::cuda {
tk_status fused_ffn(const tk_fused_ffn_params&, const Launch&) {
  return fail(TK_ERR_UNSUPPORTED, "fused_ffn: not implemented on the cuda backend");
}
}  // namespace tk::cuda
