// PLACEHOLDER: attn_front on CUDA is not implemented yet.
#include "cuda/ops.h"

namespace tk::cuda {
tk_status attn_front(const tk_attn_front_params&, const Launch&) {
  return fail(TK_ERR_UNSUPPORTED, "attn_front: not implemented on the cuda backend");
}
}  // namespace tk::cuda
