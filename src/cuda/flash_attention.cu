// PLACEHOLDER: flash_attention on CUDA is not implemented yet.
#include "cuda/ops.h"

namespace tk::cuda {
tk_status flash_attention(const tk_flash_attention_params&, const Launch&) {
  return fail(TK_ERR_UNSUPPORTED, "flash_attention: not implemented on the cuda backend");
}
}  // namespace tk::cuda
