// One test object per op: its shape, how it builds inputs, runs through the C
// ABI and compares. Shared by the op suites, the bad-input suite and the
// coverage tests.
#pragma once

#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "harness.h"

namespace tk::test {

// ---------------------------------------------------------------------------
// rmsnorm (residual = false) and rmsnorm_residual
// ---------------------------------------------------------------------------
struct RmsnormShape {
  tk_dtype dtype;
  int64_t T, D;
  Layout layout = Layout::Contiguous;
  bool residual = false;
  bool in_place = false;  // y aliases x
  double magnitude = 1;   // |x| bound: 300 squares past f16's range
  std::string name() const;
};
class RmsnormTest : public OpTestOf<tk_rmsnorm_params> {
 public:
  explicit RmsnormTest(RmsnormShape s);
  void build(Rng& rng) override;
  tk_rmsnorm_params params(const Bound& b) const override;
  tk_status call(tk_context* ctx, const tk_rmsnorm_params& p) const override;
  void compare(const Result& out, const Result& ref) const override;
  double cost() const override { return double(s_.T) * double(s_.D); }
  Tensor *x = nullptr, *residual = nullptr, *weight = nullptr, *y = nullptr;

 private:
  RmsnormShape s_;
};

// ---------------------------------------------------------------------------
// rope
// ---------------------------------------------------------------------------
struct RopeShape {
  tk_dtype dtype;
  tk_rope_style style;
  int64_t T, Hq, Hkv, Dh, rot, max_pos;  // Hkv 0: no k
  Layout layout = Layout::Contiguous;
  bool head_major = false;  // q and k stored [H, T, Dh]
  bool llama3 = false;      // table with Llama-3 frequency scaling
  std::string name() const;
};
class RopeTest : public OpTestOf<tk_rope_params> {
 public:
  explicit RopeTest(RopeShape s);
  void build(Rng& rng) override;
  tk_rope_params params(const Bound& b) const override;
  tk_status call(tk_context* ctx, const tk_rope_params& p) const override;
  void compare(const Result& out, const Result& ref) const override;
  double cost() const override { return double(s_.T) * double(s_.Hq + s_.Hkv) * double(s_.rot); }
  Tensor *q = nullptr, *k = nullptr, *positions = nullptr, *cos_table = nullptr,
         *sin_table = nullptr;

 private:
  RopeShape s_;
};

// ---------------------------------------------------------------------------
// swiglu (concat: through tk_swiglu_concat on one [T, 2F] tensor)
// ---------------------------------------------------------------------------
struct SwigluShape {
  tk_dtype dtype;
  int64_t T, F;
  Layout layout = Layout::Contiguous;
  bool concat = false;
  bool large_gate = false;  // gates in +-100
  std::string name() const;
};
class SwigluTest : public OpTestOf<tk_swiglu_params> {
 public:
  explicit SwigluTest(SwigluShape s);
  void build(Rng& rng) override;
  tk_swiglu_params params(const Bound& b) const override;
  tk_status call(tk_context* ctx, const tk_swiglu_params& p) const override;
  void compare(const Result& out, const Result& ref) const override;
  double cost() const override { return double(s_.T) * double(s_.F); }
  Tensor *gate = nullptr, *up = nullptr, *gate_up = nullptr, *out = nullptr;

 private:
  SwigluShape s_;
};

// ---------------------------------------------------------------------------
// matmul
// ---------------------------------------------------------------------------
struct MatmulShape {
  tk_dtype dtype, weight_dtype;
  int64_t T, N, K;
  Layout layout = Layout::Contiguous;
  std::string name() const;
};
class MatmulTest : public OpTestOf<tk_matmul_params> {
 public:
  explicit MatmulTest(MatmulShape s);
  void build(Rng& rng) override;
  tk_matmul_params params(const Bound& b) const override;
  tk_status call(tk_context* ctx, const tk_matmul_params& p) const override;
  void compare(const Result& out, const Result& ref) const override;
  double cost() const override { return double(s_.T) * double(s_.N) * double(s_.K); }
  Tensor *x = nullptr, *w = nullptr, *y = nullptr;

 private:
  MatmulShape s_;
};

// ---------------------------------------------------------------------------
// int4 weights: random codes or the output of tk_quantize_int4
// ---------------------------------------------------------------------------
struct Int4Spec {
  int64_t group = 128;
  tk_dtype scale_dtype = TK_F16;
  bool zeros = false;      // asymmetric (zero points given)
  bool quantized = false;  // built by tk_quantize_int4 from random weights
};
struct Int4Tensors {
  Tensor *packed = nullptr, *scales = nullptr, *zeros = nullptr;
  tk_int4_weights bind(const Bound& b, const Int4Spec& spec, int64_t N, int64_t K) const;
};

// ---------------------------------------------------------------------------
// qmatmul_int4
// ---------------------------------------------------------------------------
struct QmatmulShape {
  tk_dtype dtype;
  int64_t T, N, K;
  Int4Spec w;
  Layout layout = Layout::Contiguous;
  std::string name() const;
};
class QmatmulTest : public OpTestOf<tk_qmatmul_int4_params> {
 public:
  explicit QmatmulTest(QmatmulShape s);
  void build(Rng& rng) override;
  tk_qmatmul_int4_params params(const Bound& b) const override;
  tk_status call(tk_context* ctx, const tk_qmatmul_int4_params& p) const override;
  void compare(const Result& out, const Result& ref) const override;
  double cost() const override { return double(s_.T) * double(s_.N) * double(s_.K); }
  Tensor *x = nullptr, *y = nullptr;
  Int4Tensors w;

 private:
  QmatmulShape s_;
};

// ---------------------------------------------------------------------------
// fused_ffn (dense or int4 weights, split or naive algo)
// ---------------------------------------------------------------------------
struct FusedFfnShape {
  tk_dtype dtype;
  int64_t T, D, F;
  tk_weight_format format = TK_WEIGHTS_DENSE;
  tk_dtype weight_dtype = TK_F16;  // dense
  Int4Spec q;                      // int4
  tk_fused_algo algo = TK_FUSED_SPLIT;
  Layout layout = Layout::Contiguous;
  std::string name() const;
};
class FusedFfnTest : public OpTestOf<tk_fused_ffn_params> {
 public:
  explicit FusedFfnTest(FusedFfnShape s);
  void build(Rng& rng) override;
  tk_fused_ffn_params params(const Bound& b) const override;
  tk_status call(tk_context* ctx, const tk_fused_ffn_params& p) const override;
  void compare(const Result& out, const Result& ref) const override;
  double cost() const override { return 2.0 * double(s_.T) * double(s_.F) * double(s_.D); }
  Tensor *x = nullptr, *norm_weight = nullptr, *w_gate = nullptr, *w_up = nullptr, *out = nullptr;
  Int4Tensors q_gate, q_up;

 private:
  FusedFfnShape s_;
};

// ---------------------------------------------------------------------------
// Paged KV cache shared by attn_front and paged_attention: blocks handed out
// in random order, unused table entries -1, unused slots left NaN.
// ---------------------------------------------------------------------------
struct PagedCache {
  Tensor *k = nullptr, *v = nullptr, *block_table = nullptr;
  int64_t num_blocks = 0, page = 0, hkv = 0, dh = 0, num_seqs = 0, max_blocks = 0;
  // Allocates for sequences of the given lengths (in tokens), `extra_blocks` unused.
  void build(OpTest& op, Rng& rng, Elem e, Role role, int64_t page_size, int64_t num_kv_heads,
             int64_t head_dim, const std::vector<int64_t>& lengths, int64_t extra_blocks,
             int64_t extra_table_entries, int64_t lead);
  // Element offset in k / v of (sequence s, position pos, kv head h, channel 0).
  int64_t slot(int64_t s, int64_t pos, int64_t h) const;
  tk_paged_kv_cache bind(const Bound& b, tk_dtype d) const;
};

// ---------------------------------------------------------------------------
// attn_front
// ---------------------------------------------------------------------------
struct AttnFrontShape {
  tk_dtype dtype;
  int64_t D, Hq, Hkv, Dh, rot, page;
  std::vector<int64_t> new_tokens;  // per sequence: tokens appended in this call
  tk_rope_style style = TK_ROPE_NEOX;
  Layout layout = Layout::Contiguous;
  int64_t extra_pos = 0;  // rows of the rope table past the last position used
  std::string name() const;
};
class AttnFrontTest : public OpTestOf<tk_attn_front_params> {
 public:
  explicit AttnFrontTest(AttnFrontShape s);
  void build(Rng& rng) override;
  tk_attn_front_params params(const Bound& b) const override;
  tk_status call(tk_context* ctx, const tk_attn_front_params& p) const override;
  void compare(const Result& out, const Result& ref) const override;
  double cost() const override;
  Tensor *x = nullptr, *norm_weight = nullptr, *w_qkv = nullptr, *cos_table = nullptr,
         *sin_table = nullptr, *positions = nullptr, *seq_ids = nullptr, *q_out = nullptr;
  PagedCache cache;
  int64_t T = 0, max_pos = 0;

 private:
  AttnFrontShape s_;
};

// ---------------------------------------------------------------------------
// flash_attention
// ---------------------------------------------------------------------------
struct FlashShape {
  tk_dtype dtype;
  int64_t Hq, Hkv, Dh;
  std::vector<std::pair<int64_t, int64_t>> seqs;  // (Lq, Lk) per sequence
  bool causal = true;
  bool lse = false;
  Layout layout = Layout::Contiguous;
  bool head_major = false;  // q and out stored [H, total, Dh]
  double qk_range = 1;      // q, k uniform in +-qk_range; 10 gives logits near +-100
  int64_t pad_k = 0;        // rows of k and v past the last sequence, all NaN (no sequence owns them)
  std::string name() const;
};
class FlashTest : public OpTestOf<tk_flash_attention_params> {
 public:
  explicit FlashTest(FlashShape s);
  void build(Rng& rng) override;
  tk_flash_attention_params params(const Bound& b) const override;
  tk_status call(tk_context* ctx, const tk_flash_attention_params& p) const override;
  void compare(const Result& out, const Result& ref) const override;
  double cost() const override;
  Tensor *q = nullptr, *k = nullptr, *v = nullptr, *out = nullptr, *cu_q = nullptr,
         *cu_k = nullptr, *lse = nullptr;
  int64_t total_q = 0, total_k = 0, max_q = 0, max_k = 0;

 private:
  FlashShape s_;
};

// ---------------------------------------------------------------------------
// paged_attention
// ---------------------------------------------------------------------------
struct PagedShape {
  tk_dtype dtype;
  int64_t Hq, Hkv, Dh, page;
  std::vector<std::pair<int64_t, int64_t>> seqs;  // (q_len, context_len) per sequence
  bool cu_seqlens = false;  // pass cu_seqlens_q (required when some q_len > 1)
  bool lse = false;
  bool workspace = true;    // the backend's workspace size (false: none, no split)
  Layout layout = Layout::Contiguous;
  double qk_range = 1;
  std::string name() const;
};
class PagedTest : public OpTestOf<tk_paged_attention_params> {
 public:
  explicit PagedTest(PagedShape s);
  void build(Rng& rng) override;
  tk_paged_attention_params params(const Bound& b) const override;
  tk_status call(tk_context* ctx, const tk_paged_attention_params& p) const override;
  void compare(const Result& out, const Result& ref) const override;
  double cost() const override;
  Tensor *q = nullptr, *out = nullptr, *cu_q = nullptr, *context_lens = nullptr, *lse = nullptr,
         *workspace = nullptr;
  PagedCache cache;
  int64_t total_q = 0, max_q = 0, max_ctx = 0;

 private:
  PagedShape s_;
};

// Case lists (one per op suite); the coverage tests use the first case of each
// (dtype, variant) they need.
std::vector<Case> rmsnorm_cases_plain();
std::vector<Case> rmsnorm_cases_residual();
std::vector<Case> rope_cases();
std::vector<Case> swiglu_cases();
std::vector<Case> matmul_cases();
std::vector<Case> qmatmul_cases();
std::vector<Case> fused_ffn_cases();
std::vector<Case> attn_front_cases();
std::vector<Case> flash_cases();
std::vector<Case> paged_cases();

template <class T, class S>
Case make_case(const S& s) {
  return {s.name(), [s] { return std::make_unique<T>(s); }};
}

}  // namespace tk::test
