// Argument validation: one function per op, run by the C ABI before any work.
// `host_indices` says whether index arrays (positions, block tables, lengths)
// are host memory the validator may read; for device backends the kernels
// bounds-check them instead (see tiny_kernel.h).
#pragma once

#include "tiny_kernel/tiny_kernel.h"

namespace tk {

tk_status validate(const tk_rmsnorm_params& p);
tk_status validate(const tk_rope_params& p, bool host_indices);
tk_status validate(const tk_swiglu_params& p);
tk_status validate(const tk_matmul_params& p);
tk_status validate(const tk_qmatmul_int4_params& p);
tk_status validate(const tk_fused_ffn_params& p);
tk_status validate(const tk_attn_front_params& p, bool host_indices);
tk_status validate(const tk_flash_attention_params& p, bool host_indices);
tk_status validate(const tk_paged_attention_params& p, bool host_indices);
tk_status validate_int4_weights(const char* op, const char* name, const tk_int4_weights& w);

}  // namespace tk
