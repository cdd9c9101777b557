#include "core/validate.h"

#include <cstdint>
#include <cstring>

#include "core/dtype.h"
#include "core/error.h"

namespace tk {
namespace {

// Any single dimension above this is rejected: it keeps every element count,
// offset and product of two dimensions far from int64 overflow.
constexpr int64_t kMaxDim = int64_t(1) << 31;

// Enum fields arrive from C callers and may hold any int. Read them as ints:
// loading an out-of-range value as the C++ enum type is undefined behaviour
// (UBSan reports it), and an unknown value must be an error message instead.
template <class E>
int raw(const E& e) {
  static_assert(sizeof(E) == sizeof(int));
  int v;
  std::memcpy(&v, &e, sizeof v);
  return v;
}

bool valid_dtype(int d) { return d == TK_F32 || d == TK_F16 || d == TK_BF16; }
const char* dtype_name(int d) { return valid_dtype(d) ? tk_dtype_name(tk_dtype(d)) : "unknown"; }

tk_status check_dtype(const char* op, const char* what, const tk_dtype& d) {
  TK_REQUIRE(valid_dtype(raw(d)), TK_ERR_UNSUPPORTED, "%s: unsupported %s dtype %d", op, what,
             raw(d));
  return TK_OK;
}

tk_status check_dim(const char* op, const char* what, int64_t v, int64_t min_value) {
  TK_REQUIRE(v >= min_value && v < kMaxDim, TK_ERR_INVALID_ARGUMENT,
             "%s: %s = %lld is out of range [%lld, 2^31)", op, what, (long long)v,
             (long long)min_value);
  return TK_OK;
}

tk_status check_ptr(const char* op, const char* what, const void* p, size_t align) {
  TK_REQUIRE(p != nullptr, TK_ERR_NULL_POINTER, "%s: %s is null", op, what);
  TK_REQUIRE(reinterpret_cast<uintptr_t>(p) % align == 0, TK_ERR_MISALIGNED,
             "%s: %s (%p) is not aligned to %zu bytes", op, what, p, align);
  return TK_OK;
}

// A [rows, cols] matrix with row stride `stride` (elements): rows must not overlap.
tk_status check_matrix(const char* op, const char* what, const void* p, tk_dtype d, int64_t rows,
                       int64_t cols, int64_t stride) {
  TK_TRY(check_ptr(op, what, p, dtype_size(d)));
  TK_REQUIRE(rows <= 1 || (stride >= cols && stride < kMaxDim * 4), TK_ERR_INVALID_ARGUMENT,
             "%s: %s row stride %lld is smaller than its row length %lld", op, what,
             (long long)stride, (long long)cols);
  return TK_OK;
}

// A [tokens, heads, head_dim] tensor with the given strides: heads and tokens
// must not overlap, either token-major ([T, H, D]) or head-major ([H, T, D]).
tk_status check_heads(const char* op, const char* what, const void* p, tk_dtype d, int64_t tokens,
                      int64_t heads, int64_t head_dim, int64_t token_stride, int64_t head_stride) {
  TK_TRY(check_ptr(op, what, p, dtype_size(d)));
  const bool token_major = (heads <= 1 || head_stride >= head_dim) &&
                           (tokens <= 1 || token_stride >= heads * head_stride);
  const bool head_major = (tokens <= 1 || token_stride >= head_dim) &&
                          (heads <= 1 || head_stride >= tokens * token_stride);
  TK_REQUIRE(token_stride >= 0 && head_stride >= 0 && (token_major || head_major),
             TK_ERR_INVALID_ARGUMENT,
             "%s: %s strides (token %lld, head %lld) overlap for [%lld, %lld, %lld]", op, what,
             (long long)token_stride, (long long)head_stride, (long long)tokens, (long long)heads,
             (long long)head_dim);
  return TK_OK;
}

tk_status check_eps(const char* op, float eps) {
  TK_REQUIRE(eps > 0.0f && eps < 1.0f, TK_ERR_INVALID_ARGUMENT,
             "%s: eps = %g must be in (0, 1)", op, double(eps));
  return TK_OK;
}

tk_status check_rope_table(const char* op, const tk_rope_style& style, int64_t head_dim,
                           int64_t rot_dim, const float* cos_table, const float* sin_table,
                           int64_t max_pos) {
  TK_REQUIRE(raw(style) == TK_ROPE_NEOX || raw(style) == TK_ROPE_GPTJ, TK_ERR_INVALID_ARGUMENT,
             "%s: unknown rope style %d", op, raw(style));
  TK_REQUIRE(rot_dim >= 2 && rot_dim % 2 == 0 && rot_dim <= head_dim, TK_ERR_INVALID_ARGUMENT,
             "%s: rot_dim = %lld must be even and in [2, head_dim = %lld]", op, (long long)rot_dim,
             (long long)head_dim);
  TK_TRY(check_dim(op, "max_pos", max_pos, 1));
  TK_TRY(check_ptr(op, "cos_table", cos_table, 4));
  TK_TRY(check_ptr(op, "sin_table", sin_table, 4));
  return TK_OK;
}

tk_status check_positions(const char* op, const int32_t* positions, int64_t tokens,
                          int64_t max_pos, bool host_indices) {
  TK_TRY(check_ptr(op, "positions", positions, 4));
  if (!host_indices) return TK_OK;
  for (int64_t t = 0; t < tokens; ++t) {
    TK_REQUIRE(positions[t] >= 0 && positions[t] < max_pos, TK_ERR_OUT_OF_RANGE,
               "%s: positions[%lld] = %d is past the rope table (max_pos %lld)", op, (long long)t,
               positions[t], (long long)max_pos);
  }
  return TK_OK;
}

tk_status check_cache(const char* op, const tk_paged_kv_cache& c, tk_dtype dtype) {
  TK_REQUIRE(raw(c.dtype) == raw(dtype), TK_ERR_UNSUPPORTED, "%s: cache dtype %s differs from %s",
             op, dtype_name(raw(c.dtype)), dtype_name(raw(dtype)));
  TK_TRY(check_dim(op, "cache.num_blocks", c.num_blocks, 1));
  TK_REQUIRE(c.page_size >= 1 && c.page_size <= 256 && (c.page_size & (c.page_size - 1)) == 0,
             TK_ERR_UNSUPPORTED, "%s: page_size = %lld must be a power of two in [1, 256]", op,
             (long long)c.page_size);
  TK_TRY(check_dim(op, "cache.num_kv_heads", c.num_kv_heads, 1));
  TK_TRY(check_dim(op, "cache.head_dim", c.head_dim, 1));
  TK_TRY(check_dim(op, "cache.num_seqs", c.num_seqs, 1));
  TK_TRY(check_dim(op, "cache.max_blocks_per_seq", c.max_blocks_per_seq, 1));
  TK_REQUIRE(c.num_blocks * c.page_size < (int64_t(1) << 40) &&
                 c.num_kv_heads * c.head_dim < kMaxDim,
             TK_ERR_INVALID_ARGUMENT, "%s: cache is too large", op);
  TK_TRY(check_ptr(op, "cache.k", c.k, dtype_size(dtype)));
  TK_TRY(check_ptr(op, "cache.v", c.v, dtype_size(dtype)));
  TK_TRY(check_ptr(op, "cache.block_table", c.block_table, 4));
  return TK_OK;
}

// Block-table entries that cover positions [0, len) of sequence s.
tk_status check_block_entries(const char* op, const tk_paged_kv_cache& c, int64_t s, int64_t len) {
  const int64_t blocks = (len + c.page_size - 1) / c.page_size;
  TK_REQUIRE(blocks <= c.max_blocks_per_seq, TK_ERR_OUT_OF_RANGE,
             "%s: sequence %lld needs %lld blocks for %lld tokens but its block table holds %lld",
             op, (long long)s, (long long)blocks, (long long)len, (long long)c.max_blocks_per_seq);
  const int32_t* row = c.block_table + s * c.max_blocks_per_seq;
  for (int64_t b = 0; b < blocks; ++b) {
    TK_REQUIRE(row[b] >= 0 && row[b] < c.num_blocks, TK_ERR_OUT_OF_RANGE,
               "%s: block_table[%lld, %lld] = %d is out of range [0, %lld)", op, (long long)s,
               (long long)b, row[b], (long long)c.num_blocks);
  }
  return TK_OK;
}

tk_status check_gqa(const char* op, int64_t hq, int64_t hkv) {
  TK_REQUIRE(hq % hkv == 0, TK_ERR_INVALID_ARGUMENT,
             "%s: num_q_heads = %lld is not a multiple of num_kv_heads = %lld", op, (long long)hq,
             (long long)hkv);
  return TK_OK;
}

// cu[0] = 0, non-decreasing, cu[n] <= total, and each length <= max_len.
tk_status check_cu_seqlens(const char* op, const char* what, const int32_t* cu, int64_t n,
                           int64_t total, int64_t max_len) {
  TK_REQUIRE(cu[0] == 0, TK_ERR_INVALID_ARGUMENT, "%s: %s[0] = %d must be 0", op, what, cu[0]);
  for (int64_t b = 0; b < n; ++b) {
    const int64_t len = int64_t(cu[b + 1]) - cu[b];
    TK_REQUIRE(len >= 0, TK_ERR_INVALID_ARGUMENT, "%s: %s decreases at %lld", op, what,
               (long long)b);
    TK_REQUIRE(len <= max_len, TK_ERR_INVALID_ARGUMENT,
               "%s: sequence %lld has length %lld, more than max_seqlen %lld (%s)", op,
               (long long)b, (long long)len, (long long)max_len, what);
  }
  TK_REQUIRE(cu[n] <= total, TK_ERR_OUT_OF_RANGE, "%s: %s[%lld] = %d is past the %lld rows", op,
             what, (long long)n, cu[n], (long long)total);
  return TK_OK;
}

}  // namespace

tk_status validate(const tk_rmsnorm_params& p) {
  const char* op = p.residual ? "rmsnorm_residual" : "rmsnorm";
  TK_TRY(check_dtype(op, "activation", p.dtype));
  TK_TRY(check_dim(op, "rows", p.rows, 0));
  TK_TRY(check_dim(op, "dim", p.dim, 1));
  TK_TRY(check_eps(op, p.eps));
  TK_TRY(check_matrix(op, "x", p.x, p.dtype, p.rows, p.dim, p.x_stride));
  TK_TRY(check_matrix(op, "y", p.y, p.dtype, p.rows, p.dim, p.y_stride));
  TK_TRY(check_ptr(op, "weight", p.weight, dtype_size(p.dtype)));
  if (p.residual)
    TK_TRY(check_matrix(op, "residual", p.residual, p.dtype, p.rows, p.dim, p.residual_stride));
  return TK_OK;
}

tk_status validate(const tk_rope_params& p, bool host_indices) {
  const char* op = "rope";
  TK_TRY(check_dtype(op, "activation", p.dtype));
  TK_TRY(check_dim(op, "tokens", p.tokens, 0));
  TK_TRY(check_dim(op, "head_dim", p.head_dim, 2));
  TK_TRY(check_rope_table(op, p.style, p.head_dim, p.rot_dim, p.cos_table, p.sin_table, p.max_pos));
  TK_TRY(check_dim(op, "num_q_heads", p.num_q_heads, 1));
  TK_TRY(check_heads(op, "q", p.q, p.dtype, p.tokens, p.num_q_heads, p.head_dim, p.q_token_stride,
                     p.q_head_stride));
  TK_TRY(check_dim(op, "num_k_heads", p.num_k_heads, 0));
  if (p.k != nullptr || p.num_k_heads > 0) {
    TK_REQUIRE(p.num_k_heads > 0, TK_ERR_INVALID_ARGUMENT, "rope: k is given but num_k_heads is 0");
    TK_TRY(check_heads(op, "k", p.k, p.dtype, p.tokens, p.num_k_heads, p.head_dim,
                       p.k_token_stride, p.k_head_stride));
  }
  return check_positions(op, p.positions, p.tokens, p.max_pos, host_indices);
}

tk_status validate(const tk_swiglu_params& p) {
  const char* op = "swiglu";
  TK_TRY(check_dtype(op, "activation", p.dtype));
  TK_TRY(check_dim(op, "rows", p.rows, 0));
  TK_TRY(check_dim(op, "dim", p.dim, 1));
  TK_TRY(check_matrix(op, "gate", p.gate, p.dtype, p.rows, p.dim, p.gate_stride));
  TK_TRY(check_matrix(op, "up", p.up, p.dtype, p.rows, p.dim, p.up_stride));
  TK_TRY(check_matrix(op, "out", p.out, p.dtype, p.rows, p.dim, p.out_stride));
  return TK_OK;
}

tk_status validate(const tk_matmul_params& p) {
  const char* op = "matmul";
  TK_TRY(check_dtype(op, "activation", p.dtype));
  TK_TRY(check_dtype(op, "weight", p.weight_dtype));
  TK_TRY(check_dim(op, "T", p.T, 0));
  TK_TRY(check_dim(op, "N", p.N, 1));
  TK_TRY(check_dim(op, "K", p.K, 1));
  TK_TRY(check_matrix(op, "x", p.x, p.dtype, p.T, p.K, p.x_stride));
  TK_TRY(check_matrix(op, "w", p.w, p.weight_dtype, p.N, p.K, p.w_stride));
  TK_TRY(check_matrix(op, "y", p.y, p.dtype, p.T, p.N, p.y_stride));
  return TK_OK;
}

tk_status validate_int4_weights(const char* op, const char* name, const tk_int4_weights& w) {
  TK_REQUIRE(raw(w.scale_dtype) == TK_F16 || raw(w.scale_dtype) == TK_BF16, TK_ERR_UNSUPPORTED,
             "%s: %s scale dtype must be f16 or bf16, got %s", op, name,
             dtype_name(raw(w.scale_dtype)));
  TK_REQUIRE(w.group_size == 32 || w.group_size == 64 || w.group_size == 128, TK_ERR_UNSUPPORTED,
             "%s: %s group size %lld is not one of 32, 64, 128", op, name,
             (long long)w.group_size);
  TK_REQUIRE(w.N >= 1 && w.N < kMaxDim && w.K >= 1 && w.K < kMaxDim, TK_ERR_INVALID_ARGUMENT,
             "%s: %s shape [%lld, %lld] is out of range", op, name, (long long)w.N,
             (long long)w.K);
  TK_REQUIRE(w.K % w.group_size == 0, TK_ERR_INVALID_ARGUMENT,
             "%s: %s group size %lld does not divide K = %lld", op, name, (long long)w.group_size,
             (long long)w.K);
  TK_REQUIRE(w.packed != nullptr, TK_ERR_NULL_POINTER, "%s: %s packed weights are null", op, name);
  TK_TRY(check_ptr(op, "int4 scales", w.scales, 2));
  return TK_OK;
}

tk_status validate(const tk_qmatmul_int4_params& p) {
  const char* op = "qmatmul_int4";
  TK_TRY(check_dtype(op, "activation", p.dtype));
  TK_TRY(check_dim(op, "T", p.T, 0));
  TK_TRY(validate_int4_weights(op, "w", p.w));
  TK_TRY(check_matrix(op, "x", p.x, p.dtype, p.T, p.w.K, p.x_stride));
  TK_TRY(check_matrix(op, "y", p.y, p.dtype, p.T, p.w.N, p.y_stride));
  return TK_OK;
}

tk_status validate(const tk_fused_ffn_params& p) {
  const char* op = "fused_ffn";
  TK_TRY(check_dtype(op, "activation", p.dtype));
  TK_TRY(check_dim(op, "T", p.T, 0));
  TK_TRY(check_dim(op, "D", p.D, 1));
  TK_TRY(check_dim(op, "F", p.F, 1));
  TK_TRY(check_eps(op, p.eps));
  TK_REQUIRE(raw(p.algo) == TK_FUSED_SPLIT || raw(p.algo) == TK_FUSED_NAIVE,
             TK_ERR_INVALID_ARGUMENT, "fused_ffn: unknown algo %d", raw(p.algo));
  TK_TRY(check_matrix(op, "x", p.x, p.dtype, p.T, p.D, p.x_stride));
  TK_TRY(check_ptr(op, "norm_weight", p.norm_weight, dtype_size(p.dtype)));
  TK_TRY(check_matrix(op, "out", p.out, p.dtype, p.T, p.F, p.out_stride));
  if (raw(p.format) == TK_WEIGHTS_DENSE) {
    TK_TRY(check_dtype(op, "weight", p.weight_dtype));
    TK_TRY(check_matrix(op, "w_gate", p.w_gate, p.weight_dtype, p.F, p.D, p.w_gate_stride));
    TK_TRY(check_matrix(op, "w_up", p.w_up, p.weight_dtype, p.F, p.D, p.w_up_stride));
  } else if (raw(p.format) == TK_WEIGHTS_INT4) {
    TK_TRY(validate_int4_weights(op, "q_gate", p.q_gate));
    TK_TRY(validate_int4_weights(op, "q_up", p.q_up));
    TK_REQUIRE(p.q_gate.N == p.F && p.q_gate.K == p.D && p.q_up.N == p.F && p.q_up.K == p.D,
               TK_ERR_INVALID_ARGUMENT,
               "fused_ffn: int4 weights [%lld, %lld] and [%lld, %lld] must both be [F, D] = "
               "[%lld, %lld]",
               (long long)p.q_gate.N, (long long)p.q_gate.K, (long long)p.q_up.N,
               (long long)p.q_up.K, (long long)p.F, (long long)p.D);
  } else {
    return fail(TK_ERR_INVALID_ARGUMENT, "fused_ffn: unknown weight format %d", raw(p.format));
  }
  return TK_OK;
}

tk_status validate(const tk_attn_front_params& p, bool host_indices) {
  const char* op = "attn_front";
  TK_TRY(check_dtype(op, "activation", p.dtype));
  TK_TRY(check_dim(op, "T", p.T, 0));
  TK_TRY(check_dim(op, "D", p.D, 1));
  TK_TRY(check_eps(op, p.eps));
  TK_TRY(check_cache(op, p.cache, p.dtype));
  const int64_t hq = p.num_q_heads, hkv = p.cache.num_kv_heads, dh = p.cache.head_dim;
  TK_TRY(check_dim(op, "num_q_heads", hq, 1));
  TK_TRY(check_gqa(op, hq, hkv));
  TK_TRY(check_rope_table(op, p.rope_style, dh, p.rot_dim, p.cos_table, p.sin_table, p.max_pos));
  TK_TRY(check_matrix(op, "x", p.x, p.dtype, p.T, p.D, p.x_stride));
  TK_TRY(check_ptr(op, "norm_weight", p.norm_weight, dtype_size(p.dtype)));
  TK_TRY(check_matrix(op, "w_qkv", p.w_qkv, p.dtype, (hq + 2 * hkv) * dh, p.D, p.w_qkv_stride));
  TK_TRY(check_ptr(op, "q_out", p.q_out, dtype_size(p.dtype)));
  TK_TRY(check_positions(op, p.positions, p.T, p.max_pos, host_indices));
  TK_TRY(check_ptr(op, "seq_ids", p.seq_ids, 4));
  if (!host_indices) return TK_OK;
  for (int64_t t = 0; t < p.T; ++t) {
    const int32_t s = p.seq_ids[t];
    TK_REQUIRE(s >= 0 && s < p.cache.num_seqs, TK_ERR_OUT_OF_RANGE,
               "attn_front: seq_ids[%lld] = %d is out of range [0, %lld)", (long long)t, s,
               (long long)p.cache.num_seqs);
    TK_TRY(check_block_entries(op, p.cache, s, int64_t(p.positions[t]) + 1));
  }
  return TK_OK;
}

tk_status validate(const tk_flash_attention_params& p, bool host_indices) {
  const char* op = "flash_attention";
  TK_TRY(check_dtype(op, "activation", p.dtype));
  TK_TRY(check_dim(op, "batch", p.batch, 1));
  TK_TRY(check_dim(op, "num_q_heads", p.num_q_heads, 1));
  TK_TRY(check_dim(op, "num_kv_heads", p.num_kv_heads, 1));
  TK_TRY(check_dim(op, "head_dim", p.head_dim, 1));
  TK_TRY(check_gqa(op, p.num_q_heads, p.num_kv_heads));
  TK_TRY(check_dim(op, "total_q", p.total_q, 0));
  TK_TRY(check_dim(op, "total_k", p.total_k, 0));
  TK_TRY(check_dim(op, "max_seqlen_q", p.max_seqlen_q, 0));
  TK_TRY(check_dim(op, "max_seqlen_k", p.max_seqlen_k, 0));
  TK_REQUIRE(p.scale > 0.0f && p.scale < 1e6f, TK_ERR_INVALID_ARGUMENT,
             "flash_attention: scale = %g must be positive and finite", double(p.scale));
  TK_TRY(check_heads(op, "q", p.q, p.dtype, p.total_q, p.num_q_heads, p.head_dim, p.q_token_stride,
                     p.q_head_stride));
  TK_TRY(check_heads(op, "k", p.k, p.dtype, p.total_k, p.num_kv_heads, p.head_dim,
                     p.k_token_stride, p.k_head_stride));
  TK_TRY(check_heads(op, "v", p.v, p.dtype, p.total_k, p.num_kv_heads, p.head_dim,
                     p.v_token_stride, p.v_head_stride));
  TK_TRY(check_heads(op, "out", p.out, p.dtype, p.total_q, p.num_q_heads, p.head_dim,
                     p.out_token_stride, p.out_head_stride));
  if (p.lse) TK_TRY(check_ptr(op, "lse", p.lse, 4));
  TK_TRY(check_ptr(op, "cu_seqlens_q", p.cu_seqlens_q, 4));
  TK_TRY(check_ptr(op, "cu_seqlens_k", p.cu_seqlens_k, 4));
  if (!host_indices) return TK_OK;
  TK_TRY(check_cu_seqlens(op, "cu_seqlens_q", p.cu_seqlens_q, p.batch, p.total_q, p.max_seqlen_q));
  TK_TRY(check_cu_seqlens(op, "cu_seqlens_k", p.cu_seqlens_k, p.batch, p.total_k, p.max_seqlen_k));
  return TK_OK;
}

tk_status validate(const tk_paged_attention_params& p, bool host_indices) {
  const char* op = "paged_attention";
  TK_TRY(check_dtype(op, "activation", p.dtype));
  TK_TRY(check_cache(op, p.cache, p.dtype));
  const int64_t hq = p.num_q_heads, dh = p.cache.head_dim, n = p.cache.num_seqs;
  TK_TRY(check_dim(op, "num_q_heads", hq, 1));
  TK_TRY(check_gqa(op, hq, p.cache.num_kv_heads));
  TK_TRY(check_dim(op, "total_q", p.total_q, 0));
  TK_TRY(check_dim(op, "max_q_len", p.max_q_len, 1));
  TK_TRY(check_dim(op, "max_context_len", p.max_context_len, 1));
  TK_REQUIRE(p.scale > 0.0f && p.scale < 1e6f, TK_ERR_INVALID_ARGUMENT,
             "paged_attention: scale = %g must be positive and finite", double(p.scale));
  TK_REQUIRE(p.cu_seqlens_q != nullptr || (p.total_q == n && p.max_q_len == 1),
             TK_ERR_INVALID_ARGUMENT,
             "paged_attention: without cu_seqlens_q, total_q (%lld) must equal num_seqs (%lld) "
             "and max_q_len (%lld) must be 1",
             (long long)p.total_q, (long long)n, (long long)p.max_q_len);
  TK_TRY(check_heads(op, "q", p.q, p.dtype, p.total_q, hq, dh, p.q_token_stride, p.q_head_stride));
  TK_TRY(check_heads(op, "out", p.out, p.dtype, p.total_q, hq, dh, p.out_token_stride,
                     p.out_head_stride));
  if (p.lse) TK_TRY(check_ptr(op, "lse", p.lse, 4));
  TK_REQUIRE(p.workspace_bytes == 0 || p.workspace != nullptr, TK_ERR_NULL_POINTER,
             "paged_attention: workspace is null but workspace_bytes = %zu", p.workspace_bytes);
  if (p.workspace) TK_TRY(check_ptr(op, "workspace", p.workspace, 16));
  TK_TRY(check_ptr(op, "context_lens", p.context_lens, 4));
  if (p.cu_seqlens_q) TK_TRY(check_ptr(op, "cu_seqlens_q", p.cu_seqlens_q, 4));
  if (!host_indices) return TK_OK;
  if (p.cu_seqlens_q)
    TK_TRY(check_cu_seqlens(op, "cu_seqlens_q", p.cu_seqlens_q, n, p.total_q, p.max_q_len));
  for (int64_t s = 0; s < n; ++s) {
    const int64_t q_len = p.cu_seqlens_q ? p.cu_seqlens_q[s + 1] - p.cu_seqlens_q[s] : 1;
    const int64_t len = p.context_lens[s];
    TK_REQUIRE(len >= q_len && len <= p.max_context_len, TK_ERR_INVALID_ARGUMENT,
               "paged_attention: context_lens[%lld] = %lld must be in [q_len = %lld, "
               "max_context_len = %lld]",
               (long long)s, (long long)len, (long long)q_len, (long long)p.max_context_len);
    TK_TRY(check_block_entries(op, p.cache, s, len));
  }
  return TK_OK;
}

}  // namespace tk
