/*
 * tiny-kernel: fused kernels for LLM inference.
 *
 * The C ABI. Plain pointers, sizes, strides and enums, so that C, Zig, Rust or
 * Python ctypes can call it with no C++ in between.
 *
 * Conventions (they hold for every op):
 *  - Tensors are row-major. Strides are counted in ELEMENTS, not bytes. The last
 *    dimension of every tensor is contiguous (stride 1).
 *  - Pointers live in the context's memory space: host memory for the CPU and
 *    reference backends, device memory for the CUDA backend (passed unchanged to
 *    the kernels). tk_malloc / tk_memcpy_* move data for either.
 *  - Every pointer must be aligned to its element size. Fast paths pick wide
 *    (16-byte) loads when pointers and strides allow it, narrow ones otherwise.
 *  - Activations are f32, f16 or bf16; accumulation is f32.
 *  - Every call validates all of its arguments before any work starts and
 *    returns a status; tk_last_error() then names the problem.
 *  - Calls on a CUDA context are asynchronous on the context's stream, allocate
 *    nothing and never synchronise the host, so they can be captured in a CUDA
 *    graph. Index arrays that live in device memory (positions, block tables,
 *    context lengths, cumulative sequence lengths) cannot be read by the host
 *    without a sync: the kernels bounds-check them, skip what is out of range
 *    (never writing out of bounds) and raise a sticky flag that
 *    tk_check_device_errors() reports.
 */
#ifndef TINY_KERNEL_H_
#define TINY_KERNEL_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define TK_API __declspec(dllexport)
#else
#define TK_API __attribute__((visibility("default")))
#endif

/* ------------------------------------------------------------------------- */
/* Status, dtypes, contexts                                                  */
/* ------------------------------------------------------------------------- */

typedef enum tk_status {
  TK_OK = 0,
  TK_ERR_INVALID_ARGUMENT = 1, /* shape, stride or value out of its domain */
  TK_ERR_UNSUPPORTED = 2,      /* valid request this backend does not implement */
  TK_ERR_NULL_POINTER = 3,
  TK_ERR_MISALIGNED = 4,
  TK_ERR_OUT_OF_RANGE = 5,     /* an index (position, block id, ...) past its table */
  TK_ERR_BACKEND = 6,          /* the device or driver reported an error */
  TK_ERR_OUT_OF_MEMORY = 7
} tk_status;

/* Arithmetic is f32 (the reference: f64); results are rounded to the output
 * dtype to nearest even, NaNs stay NaN (quiet). On CPUs with AVX512_BF16 the
 * CPU backend rounds bf16 outputs in hardware, which flushes results below
 * 2^-126 (the f32 / bf16 denormals) to zero. */
typedef enum tk_dtype { TK_F32 = 0, TK_F16 = 1, TK_BF16 = 2 } tk_dtype;

typedef enum tk_backend {
  TK_BACKEND_DEFAULT = 0,   /* CUDA when a GPU is present and built in, else CPU */
  TK_BACKEND_REFERENCE = 1, /* plain loops in double precision: the test oracle */
  TK_BACKEND_CPU = 2,       /* SIMD (chosen at run time) + threads */
  TK_BACKEND_CUDA = 3
} tk_backend;

typedef struct tk_context tk_context;

/* Message of the last failed call on this thread ("" if none). */
TK_API const char* tk_last_error(void);
TK_API const char* tk_status_string(tk_status status);
TK_API const char* tk_dtype_name(tk_dtype dtype);
TK_API size_t tk_dtype_size(tk_dtype dtype);

/* device: GPU ordinal for CUDA, ignored otherwise. */
TK_API tk_status tk_context_create(tk_backend backend, int device, tk_context** out);
TK_API void tk_context_destroy(tk_context* ctx);
TK_API tk_backend tk_context_backend(const tk_context* ctx);
/* Human-readable device name, e.g. "NVIDIA H100 80GB HBM3" or "AMD EPYC (avx512, 2 threads)". */
TK_API const char* tk_context_device_name(const tk_context* ctx);
/* CUDA: a cudaStream_t (NULL = legacy default stream). Others: ignored. */
TK_API tk_status tk_context_set_stream(tk_context* ctx, void* stream);
/* CPU: worker threads (0 = all hardware threads). Others: ignored. */
TK_API tk_status tk_context_set_threads(tk_context* ctx, int threads);

/* Memory in the context's space. Copies are synchronous. */
TK_API tk_status tk_malloc(tk_context* ctx, size_t bytes, void** out);
TK_API tk_status tk_free(tk_context* ctx, void* ptr);
TK_API tk_status tk_memcpy_to_device(tk_context* ctx, void* dst, const void* host_src, size_t bytes);
TK_API tk_status tk_memcpy_to_host(tk_context* ctx, void* host_dst, const void* src, size_t bytes);
TK_API tk_status tk_synchronize(tk_context* ctx);
/* Synchronises, then reports (and clears) an out-of-range index seen by a
 * kernel since the last check. Always TK_OK on host backends, which reject
 * such indices before running. */
TK_API tk_status tk_check_device_errors(tk_context* ctx);

/* ------------------------------------------------------------------------- */
/* 1. RMSNorm                                                                */
/* ------------------------------------------------------------------------- */
/*   y[t, :] = x[t, :] / sqrt(mean(x[t, :]^2) + eps) * weight
 * With residual != NULL (the variant between layers), in one pass:
 *   h = x + residual;  residual <- h (rounded to dtype);  y = rmsnorm(h) * weight
 * where the norm is taken of h as stored. y may alias x. */
typedef struct tk_rmsnorm_params {
  tk_dtype dtype;           /* x, residual, weight, y */
  int64_t rows;             /* T */
  int64_t dim;              /* D */
  const void* x;            /* [T, D] */
  int64_t x_stride;
  void* residual;           /* [T, D] or NULL */
  int64_t residual_stride;
  const void* weight;       /* [D] */
  void* y;                  /* [T, D] */
  int64_t y_stride;
  float eps;                /* > 0 */
} tk_rmsnorm_params;
TK_API tk_status tk_rmsnorm(tk_context* ctx, const tk_rmsnorm_params* p);

/* ------------------------------------------------------------------------- */
/* 2. RoPE                                                                   */
/* ------------------------------------------------------------------------- */
typedef enum tk_rope_style {
  TK_ROPE_NEOX = 0, /* rotate-half (GPT-NeoX, HF Llama): pairs (i, i + rot_dim/2) */
  TK_ROPE_GPTJ = 1  /* interleaved (GPT-J): pairs (2i, 2i + 1) */
} tk_rope_style;

/* Applied in place to the first rot_dim elements of each head of q and k:
 *   (a, b) <- (a cos - b sin, a sin + b cos),  angle = table[positions[t], i]. */
typedef struct tk_rope_params {
  tk_dtype dtype;           /* q, k */
  tk_rope_style style;
  int64_t tokens;           /* T */
  int64_t head_dim;         /* Dh */
  int64_t rot_dim;          /* even, 2 <= rot_dim <= Dh (partial rotary) */
  void* q;                  /* [T, Hq, Dh] */
  int64_t num_q_heads;
  int64_t q_token_stride, q_head_stride;
  void* k;                  /* [T, Hkv, Dh]; NULL with num_k_heads 0 to skip */
  int64_t num_k_heads;
  int64_t k_token_stride, k_head_stride;
  const int32_t* positions; /* [T], each in [0, max_pos) */
  const float* cos_table;   /* [max_pos, rot_dim/2], f32, contiguous */
  const float* sin_table;   /* [max_pos, rot_dim/2], f32, contiguous */
  int64_t max_pos;
} tk_rope_params;
TK_API tk_status tk_rope(tk_context* ctx, const tk_rope_params* p);

typedef struct tk_rope_scaling {
  int llama3;               /* 0: none. 1: Llama-3 frequency scaling below. */
  float factor;             /* 8 for Llama-3.1 */
  float low_freq_factor;    /* 1 */
  float high_freq_factor;   /* 4 */
  int64_t original_max_pos; /* 8192 */
} tk_rope_scaling;
/* Host helper: fills cos/sin [max_pos, rot_dim/2] (host memory) for
 * inv_freq[i] = theta^(-2i/rot_dim), optionally Llama-3 scaled. */
TK_API tk_status tk_rope_table(float* cos_table, float* sin_table, int64_t max_pos, int64_t rot_dim,
                               double theta, const tk_rope_scaling* scaling);

/* ------------------------------------------------------------------------- */
/* 3. SwiGLU                                                                 */
/* ------------------------------------------------------------------------- */
/*   out = silu(gate) * up,  silu(g) = g / (1 + exp(-g)).
 * For one concatenated [T, 2F] tensor pass gate = base, up = base + F (in
 * elements) and both strides 2F; tk_swiglu_concat does exactly that. */
typedef struct tk_swiglu_params {
  tk_dtype dtype;
  int64_t rows;             /* T */
  int64_t dim;              /* F */
  const void* gate;         /* [T, F] */
  int64_t gate_stride;
  const void* up;           /* [T, F] */
  int64_t up_stride;
  void* out;                /* [T, F] */
  int64_t out_stride;
} tk_swiglu_params;
TK_API tk_status tk_swiglu(tk_context* ctx, const tk_swiglu_params* p);
TK_API tk_status tk_swiglu_concat(tk_context* ctx, tk_dtype dtype, int64_t rows, int64_t dim,
                                  const void* gate_up, int64_t gate_up_stride, void* out,
                                  int64_t out_stride);

/* ------------------------------------------------------------------------- */
/* 4. Matmul                                                                 */
/* ------------------------------------------------------------------------- */
/*   y[T, N] = x[T, K] . W[N, K]^T     (the nn.Linear layout) */
typedef struct tk_matmul_params {
  tk_dtype dtype;           /* x, y */
  tk_dtype weight_dtype;    /* W */
  int64_t T, N, K;
  const void* x;            /* [T, K] */
  int64_t x_stride;
  const void* w;            /* [N, K] */
  int64_t w_stride;
  void* y;                  /* [T, N] */
  int64_t y_stride;
} tk_matmul_params;
TK_API tk_status tk_matmul(tk_context* ctx, const tk_matmul_params* p);

/* ------------------------------------------------------------------------- */
/* 5. int4 weights and qmatmul_int4                                           */
/* ------------------------------------------------------------------------- */
/* Packed layout of W[N, K] in int4, groups of group_size along K:
 *   packed [N, K/2] bytes, row-major, row stride K/2: byte j of row n holds
 *     k = 2j in its low nibble and k = 2j+1 in its high nibble, each an
 *     unsigned code q in [0, 15].
 *   scales [N, K/group_size], scale_dtype (f16 or bf16), row-major.
 *   zeros  [N, K/group_size] bytes, each a zero point in [0, 15], or NULL for
 *     symmetric quantisation (zero point 8).
 *   W[n, k] = (q[n, k] - zero[n, k/g]) * scale[n, k/g].
 * Requirements: group_size in {32, 64, 128}; K a multiple of group_size. */
typedef struct tk_int4_weights {
  const uint8_t* packed;
  const void* scales;
  const uint8_t* zeros;
  tk_dtype scale_dtype;
  int64_t N, K;
  int64_t group_size;
} tk_int4_weights;

typedef struct tk_qmatmul_int4_params {
  tk_dtype dtype;           /* x, y */
  int64_t T;
  const void* x;            /* [T, K] */
  int64_t x_stride;
  tk_int4_weights w;        /* [N, K] */
  void* y;                  /* [T, N] */
  int64_t y_stride;
} tk_qmatmul_int4_params;
TK_API tk_status tk_qmatmul_int4(tk_context* ctx, const tk_qmatmul_int4_params* p);

/* Host helper (host memory in and out): quantises W[N, K] (src_dtype, row
 * stride w_stride) into the layout above. symmetric != 0: scale = max|w| / 7,
 * zero point 8, zeros may be NULL. Otherwise scale = (max(hi, 0) - min(lo, 0)) / 15 (the range always holds 0) and
 * zeros [N, K/group_size] is written. */
TK_API tk_status tk_quantize_int4(tk_dtype src_dtype, const void* w, int64_t w_stride, int64_t N,
                                  int64_t K, int64_t group_size, int symmetric,
                                  tk_dtype scale_dtype, uint8_t* packed, void* scales,
                                  uint8_t* zeros);

/* ------------------------------------------------------------------------- */
/* 6. Fused FFN front: out = silu(rmsnorm(x) Wg^T) * (rmsnorm(x) Wu^T)        */
/* ------------------------------------------------------------------------- */
typedef enum tk_weight_format { TK_WEIGHTS_DENSE = 0, TK_WEIGHTS_INT4 = 1 } tk_weight_format;
typedef enum tk_fused_algo {
  TK_FUSED_SPLIT = 0, /* norm statistics once, then one weight pass with the silu*up epilogue */
  TK_FUSED_NAIVE = 1  /* every output recomputes the norm: the seed's slow lesson, for the bench */
} tk_fused_algo;

typedef struct tk_fused_ffn_params {
  tk_dtype dtype;             /* x, norm_weight, out */
  int64_t T, D, F;
  const void* x;              /* [T, D] */
  int64_t x_stride;
  const void* norm_weight;    /* [D] */
  float eps;
  tk_weight_format format;
  tk_dtype weight_dtype;      /* DENSE: dtype of w_gate / w_up */
  const void* w_gate;         /* DENSE: [F, D] */
  int64_t w_gate_stride;
  const void* w_up;           /* DENSE: [F, D] */
  int64_t w_up_stride;
  tk_int4_weights q_gate;     /* INT4: N = F, K = D */
  tk_int4_weights q_up;       /* INT4: N = F, K = D */
  void* out;                  /* [T, F] */
  int64_t out_stride;
  tk_fused_algo algo;
} tk_fused_ffn_params;
TK_API tk_status tk_fused_ffn(tk_context* ctx, const tk_fused_ffn_params* p);

/* ------------------------------------------------------------------------- */
/* Paged KV cache (used by 7 and 9)                                           */
/* ------------------------------------------------------------------------- */
/* k and v: [num_blocks, page_size, num_kv_heads, head_dim] each, contiguous.
 * Token position p of sequence s lives in block block_table[s, p / page_size]
 * at row p % page_size. block_table: [num_seqs, max_blocks_per_seq] int32,
 * row-major; each used entry in [0, num_blocks). */
typedef struct tk_paged_kv_cache {
  tk_dtype dtype;
  void* k;
  void* v;
  int64_t num_blocks;
  int64_t page_size;          /* power of two, 1 .. 256 */
  int64_t num_kv_heads;
  int64_t head_dim;
  const int32_t* block_table;
  int64_t num_seqs;
  int64_t max_blocks_per_seq;
} tk_paged_kv_cache;

/* ------------------------------------------------------------------------- */
/* 7. Fused attention front                                                   */
/* ------------------------------------------------------------------------- */
/* For each token t: h = rmsnorm(x[t]) * norm_weight; [q | k | v] = h . Wqkv^T;
 * RoPE on q and k at positions[t]; q -> q_out[t]; k, v -> the cache of
 * sequence seq_ids[t] at position positions[t]. */
typedef struct tk_attn_front_params {
  tk_dtype dtype;             /* x, norm_weight, w_qkv, q_out, cache */
  int64_t T, D;
  const void* x;              /* [T, D] */
  int64_t x_stride;
  const void* norm_weight;    /* [D] */
  float eps;
  const void* w_qkv;          /* [(Hq + 2 Hkv) * Dh, D]: q heads, then k heads, then v heads */
  int64_t w_qkv_stride;
  int64_t num_q_heads;        /* Hq, a multiple of cache.num_kv_heads */
  tk_rope_style rope_style;
  int64_t rot_dim;
  const float* cos_table;     /* [max_pos, rot_dim/2] */
  const float* sin_table;
  int64_t max_pos;
  const int32_t* positions;   /* [T] */
  const int32_t* seq_ids;     /* [T], rows of cache.block_table */
  tk_paged_kv_cache cache;
  void* q_out;                /* [T, Hq, Dh], contiguous */
} tk_attn_front_params;
TK_API tk_status tk_attn_front(tk_context* ctx, const tk_attn_front_params* p);

/* ------------------------------------------------------------------------- */
/* 8. Flash attention (prefill, variable-length batch)                        */
/* ------------------------------------------------------------------------- */
/* Sequence b owns query rows [cu_seqlens_q[b], cu_seqlens_q[b+1]) and key rows
 * [cu_seqlens_k[b], cu_seqlens_k[b+1]). Head h of q reads kv head
 * h / (Hq / Hkv) (GQA / MQA). Causal masking is aligned to the bottom right:
 * query i of a sequence with Lq queries and Lk keys sees keys j <= i + Lk - Lq.
 * A row that sees no key gets out = 0 and lse = -inf. */
typedef struct tk_flash_attention_params {
  tk_dtype dtype;             /* q, k, v, out */
  int64_t batch;
  int64_t num_q_heads, num_kv_heads, head_dim;
  const void* q;              /* [total_q, Hq, Dh] */
  int64_t q_token_stride, q_head_stride;
  const void* k;              /* [total_k, Hkv, Dh] */
  int64_t k_token_stride, k_head_stride;
  const void* v;              /* [total_k, Hkv, Dh] */
  int64_t v_token_stride, v_head_stride;
  void* out;                  /* [total_q, Hq, Dh] */
  int64_t out_token_stride, out_head_stride;
  const int32_t* cu_seqlens_q; /* [batch + 1], starts at 0, non-decreasing */
  const int32_t* cu_seqlens_k; /* [batch + 1] */
  int64_t total_q, total_k;   /* rows of q and k; bound the offsets above */
  int64_t max_seqlen_q, max_seqlen_k;
  float scale;                /* usually 1/sqrt(Dh) */
  int causal;
  float* lse;                 /* optional [Hq, total_q], natural log, f32 */
} tk_flash_attention_params;
TK_API tk_status tk_flash_attention(tk_context* ctx, const tk_flash_attention_params* p);

/* ------------------------------------------------------------------------- */
/* 9. Paged attention (decode, chunked prefill, speculative verification)     */
/* ------------------------------------------------------------------------- */
/* Sequence s has context_lens[s] cached tokens, its q_len query tokens being
 * the last q_len of them (already written to the cache). Query i sees cached
 * positions 0 .. context_lens[s] - q_len + i (causal at the sequence's end).
 * Long contexts are split into chunks merged by log-sum-exp; the partial
 * results go to the caller's workspace (tk_paged_attention_workspace_size). */
typedef struct tk_paged_attention_params {
  tk_dtype dtype;             /* q, out, cache */
  int64_t num_q_heads;        /* a multiple of cache.num_kv_heads */
  const void* q;              /* [total_q, Hq, Dh] */
  int64_t q_token_stride, q_head_stride;
  void* out;                  /* [total_q, Hq, Dh] */
  int64_t out_token_stride, out_head_stride;
  const int32_t* cu_seqlens_q; /* [num_seqs + 1], or NULL: one query per sequence */
  int64_t total_q;
  int64_t max_q_len;          /* max over sequences of q_len (1 when cu_seqlens_q is NULL) */
  tk_paged_kv_cache cache;
  const int32_t* context_lens; /* [num_seqs], q_len <= context_lens[s] <= page_size * max_blocks */
  int64_t max_context_len;
  float scale;
  float* lse;                 /* optional [Hq, total_q] */
  void* workspace;            /* may be NULL when workspace_bytes is 0: no split */
  size_t workspace_bytes;
} tk_paged_attention_params;
TK_API tk_status tk_paged_attention(tk_context* ctx, const tk_paged_attention_params* p);
/* Bytes of workspace that let the backend split long contexts; 0 when it never does. */
TK_API size_t tk_paged_attention_workspace_size(const tk_context* ctx, int64_t total_q,
                                                int64_t num_q_heads, int64_t head_dim,
                                                int64_t max_context_len);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* TINY_KERNEL_H_ */
