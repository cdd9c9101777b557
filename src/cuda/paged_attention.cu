// PLACEHOLDER: paged_attention on CUDA is not implemented yet.
#include "cuda/ops.h"

namespace tk::cuda {
tk_status paged_attention(const tk_paged_attention_params&, const Launch&) {
  return fail(TK_ERR_UNSUPPORTED, "paged_attention: not implemented on the cuda backend");
}
}  // namespace tk::cuda
namespace tk::cuda {
size_t paged_attention_workspace_size(int64_t, int64_t, int64_t, int64_t, int) { return 0; }
}  // namespace tk::cuda
