// Launchers of the CUDA backend, one per op, each in its own .cu file.
// Params are validated already; pointers are device memory. Launchers take the
// stream (in Launch), allocate nothing and never synchronise the host.
#pragma once

#include "cuda/common.cuh"

namespace tk::cuda {

tk_status rmsnorm(const tk_rmsnorm_params& p, const Launch& l);
tk_status rope(const tk_rope_params& p, const Launch& l);
tk_status swiglu(const tk_swiglu_params& p, const Launch& l);
tk_status matmul(const tk_matmul_params& p, const Launch& l);
tk_status qmatmul_int4(const tk_qmatmul_int4_params& p, const Launch& l);
tk_status fused_ffn(const tk_fused_ffn_params& p, const Launch& l);
tk_status attn_front(const tk_attn_front_params& p, const Launch& l);
tk_status flash_attention(const tk_flash_attention_params& p, const Launch& l);
tk_status paged_attention(const tk_paged_attention_params& p, const Launch& l);
size_t paged_attention_workspace_size(int64_t total_q, int64_t num_q_heads, int64_t head_dim,
                                      int64_t max_context_len, int num_sms);

}  // namespace tk::cuda
