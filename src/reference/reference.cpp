// The reference backend: every op as plain loops in double precision.
// This is the oracle the tests trust, so it favours being obviously right over
// being fast. Shapes are written beside each loop.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/backend.h"
#include "core/dtype.h"

namespace tk {
namespace {

double ld(tk_dtype d, const void* p, int64_t i) { return double(load_as_f32(d, p, i)); }
void st(tk_dtype d, void* p, int64_t i, double v) { store_from_f32(d, p, i, float(v)); }

const void* offset(const void* p, tk_dtype d, int64_t elements) {
  return static_cast<const char*>(p) + elements * int64_t(dtype_size(d));
}
void* offset(void* p, tk_dtype d, int64_t elements) {
  return static_cast<char*>(p) + elements * int64_t(dtype_size(d));
}

double silu(double g) { return g / (1.0 + std::exp(-g)); }

// h[D] <- rmsnorm(x[D]) * w[D]
void rmsnorm_row(const std::vector<double>& x, tk_dtype wd, const void* w, double eps,
                 std::vector<double>& h) {
  double ss = 0.0;
  for (double v : x) ss += v * v;
  const double inv = 1.0 / std::sqrt(ss / double(x.size()) + eps);
  h.resize(x.size());
  for (size_t i = 0; i < x.size(); ++i) h[i] = x[i] * inv * ld(wd, w, int64_t(i));
}

// Rotates the first rot_dim elements of v[Dh] by the angles of table row `pos`.
void rope_vec(double* v, tk_rope_style style, int64_t rot_dim, const float* cos_table,
              const float* sin_table, int64_t pos) {
  const int64_t half = rot_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const double c = cos_table[pos * half + i], s = sin_table[pos * half + i];
    const int64_t a = style == TK_ROPE_NEOX ? i : 2 * i;
    const int64_t b = style == TK_ROPE_NEOX ? i + half : 2 * i + 1;
    const double x0 = v[a], x1 = v[b];
    v[a] = x0 * c - x1 * s;
    v[b] = x0 * s + x1 * c;
  }
}

// W[n, k] of int4 weights, dequantised.
double int4_weight(const tk_int4_weights& w, int64_t n, int64_t k) {
  const uint8_t byte = w.packed[n * (w.K / 2) + k / 2];
  const int q = (k % 2 == 0) ? (byte & 0xf) : (byte >> 4);
  const int64_t g = n * (w.K / w.group_size) + k / w.group_size;
  const int zero = w.zeros ? w.zeros[g] : 8;
  return double(q - zero) * ld(w.scale_dtype, w.scales, g);
}

// One query row against n_keys keys: out[Dh] = softmax(scale q.k_j) v_j.
// key(j) and value(j) return pointers to row j. A row with no key gives 0, lse -inf.
template <typename KeyFn, typename ValueFn>
void attend(tk_dtype d, const void* q, int64_t dh, int64_t n_keys, double scale, KeyFn key,
            ValueFn value, void* out, float* lse) {
  std::vector<double> s(size_t(n_keys > 0 ? n_keys : 0));
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n_keys; ++j) {
    const void* kj = key(j);
    double dot = 0.0;
    for (int64_t c = 0; c < dh; ++c) dot += ld(d, q, c) * ld(d, kj, c);
    s[size_t(j)] = dot * scale;
    m = std::max(m, s[size_t(j)]);
  }
  std::vector<double> acc(size_t(dh), 0.0);
  double sum = 0.0;
  for (int64_t j = 0; j < n_keys; ++j) {
    const double pj = std::exp(s[size_t(j)] - m);
    sum += pj;
    const void* vj = value(j);
    for (int64_t c = 0; c < dh; ++c) acc[size_t(c)] += pj * ld(d, vj, c);
  }
  for (int64_t c = 0; c < dh; ++c) st(d, out, c, n_keys > 0 ? acc[size_t(c)] / sum : 0.0);
  if (lse) *lse = n_keys > 0 ? float(m + std::log(sum)) : -std::numeric_limits<float>::infinity();
}

class ReferenceBackend final : public HostBackend {
 public:
  tk_backend kind() const override { return TK_BACKEND_REFERENCE; }
  const char* name() const override { return "reference"; }
  const char* device_name() const override { return "reference (host, double precision)"; }

  // y[T, D] = rmsnorm(x (+ residual)) * weight
  tk_status rmsnorm(const tk_rmsnorm_params& p) override {
    std::vector<double> h(size_t(p.dim)), y;
    for (int64_t t = 0; t < p.rows; ++t) {
      const void* x = offset(p.x, p.dtype, t * p.x_stride);
      for (int64_t i = 0; i < p.dim; ++i) h[size_t(i)] = ld(p.dtype, x, i);
      if (p.residual) {
        void* r = offset(p.residual, p.dtype, t * p.residual_stride);
        for (int64_t i = 0; i < p.dim; ++i) {
          h[size_t(i)] = round_to(p.dtype, float(h[size_t(i)] + ld(p.dtype, r, i)));
          st(p.dtype, r, i, h[size_t(i)]);
        }
      }
      rmsnorm_row(h, p.dtype, p.weight, p.eps, y);
      void* out = offset(p.y, p.dtype, t * p.y_stride);
      for (int64_t i = 0; i < p.dim; ++i) st(p.dtype, out, i, y[size_t(i)]);
    }
    return TK_OK;
  }

  // q[T, Hq, Dh], k[T, Hkv, Dh] rotated in place at positions[T]
  tk_status rope(const tk_rope_params& p) override {
    std::vector<double> v(size_t(p.head_dim));
    auto apply = [&](void* base, int64_t heads, int64_t ts, int64_t hs) {
      for (int64_t t = 0; t < p.tokens; ++t)
        for (int64_t h = 0; h < heads; ++h) {
          void* head = offset(base, p.dtype, t * ts + h * hs);
          for (int64_t c = 0; c < p.rot_dim; ++c) v[size_t(c)] = ld(p.dtype, head, c);
          rope_vec(v.data(), p.style, p.rot_dim, p.cos_table, p.sin_table, p.positions[t]);
          for (int64_t c = 0; c < p.rot_dim; ++c) st(p.dtype, head, c, v[size_t(c)]);
        }
    };
    apply(p.q, p.num_q_heads, p.q_token_stride, p.q_head_stride);
    if (p.k) apply(p.k, p.num_k_heads, p.k_token_stride, p.k_head_stride);
    return TK_OK;
  }

  // out[T, F] = silu(gate) * up
  tk_status swiglu(const tk_swiglu_params& p) override {
    for (int64_t t = 0; t < p.rows; ++t) {
      const void* g = offset(p.gate, p.dtype, t * p.gate_stride);
      const void* u = offset(p.up, p.dtype, t * p.up_stride);
      void* o = offset(p.out, p.dtype, t * p.out_stride);
      for (int64_t i = 0; i < p.dim; ++i) st(p.dtype, o, i, silu(ld(p.dtype, g, i)) * ld(p.dtype, u, i));
    }
    return TK_OK;
  }

  // y[T, N] = x[T, K] . W[N, K]^T
  tk_status matmul(const tk_matmul_params& p) override {
    for (int64_t t = 0; t < p.T; ++t)
      for (int64_t n = 0; n < p.N; ++n) {
        const void* x = offset(p.x, p.dtype, t * p.x_stride);
        const void* w = offset(p.w, p.weight_dtype, n * p.w_stride);
        double acc = 0.0;
        for (int64_t k = 0; k < p.K; ++k) acc += ld(p.dtype, x, k) * ld(p.weight_dtype, w, k);
        st(p.dtype, p.y, t * p.y_stride + n, acc);
      }
    return TK_OK;
  }

  // y[T, N] = x[T, K] . dequant(W)[N, K]^T
  tk_status qmatmul_int4(const tk_qmatmul_int4_params& p) override {
    for (int64_t t = 0; t < p.T; ++t)
      for (int64_t n = 0; n < p.w.N; ++n) {
        const void* x = offset(p.x, p.dtype, t * p.x_stride);
        double acc = 0.0;
        for (int64_t k = 0; k < p.w.K; ++k) acc += ld(p.dtype, x, k) * int4_weight(p.w, n, k);
        st(p.dtype, p.y, t * p.y_stride + n, acc);
      }
    return TK_OK;
  }

  // out[T, F] = silu(h . Wg^T) * (h . Wu^T),  h = rmsnorm(x) * norm_weight (not rounded)
  tk_status fused_ffn(const tk_fused_ffn_params& p) override {
    std::vector<double> x(size_t(p.D)), h;
    auto weight = [&](bool gate, int64_t f, int64_t k) {
      if (p.format == TK_WEIGHTS_INT4) return int4_weight(gate ? p.q_gate : p.q_up, f, k);
      const void* w = gate ? p.w_gate : p.w_up;
      const int64_t stride = gate ? p.w_gate_stride : p.w_up_stride;
      return ld(p.weight_dtype, w, f * stride + k);
    };
    for (int64_t t = 0; t < p.T; ++t) {
      for (int64_t i = 0; i < p.D; ++i) x[size_t(i)] = ld(p.dtype, p.x, t * p.x_stride + i);
      rmsnorm_row(x, p.dtype, p.norm_weight, p.eps, h);
      for (int64_t f = 0; f < p.F; ++f) {
        double g = 0.0, u = 0.0;
        for (int64_t k = 0; k < p.D; ++k) {
          g += h[size_t(k)] * weight(true, f, k);
          u += h[size_t(k)] * weight(false, f, k);
        }
        st(p.dtype, p.out, t * p.out_stride + f, silu(g) * u);
      }
    }
    return TK_OK;
  }

  // q_out[T, Hq, Dh]; cache k, v at (seq_ids[t], positions[t])
  tk_status attn_front(const tk_attn_front_params& p) override {
    const tk_paged_kv_cache& c = p.cache;
    const int64_t hq = p.num_q_heads, hkv = c.num_kv_heads, dh = c.head_dim;
    std::vector<double> x(size_t(p.D)), h, qkv(size_t((hq + 2 * hkv) * dh));
    for (int64_t t = 0; t < p.T; ++t) {
      for (int64_t i = 0; i < p.D; ++i) x[size_t(i)] = ld(p.dtype, p.x, t * p.x_stride + i);
      rmsnorm_row(x, p.dtype, p.norm_weight, p.eps, h);
      for (int64_t r = 0; r < int64_t(qkv.size()); ++r) {
        double acc = 0.0;
        for (int64_t k = 0; k < p.D; ++k) acc += h[size_t(k)] * ld(p.dtype, p.w_qkv, r * p.w_qkv_stride + k);
        qkv[size_t(r)] = acc;
      }
      const int64_t pos = p.positions[t];
      for (int64_t head = 0; head < hq + hkv; ++head)  // q heads, then k heads
        rope_vec(&qkv[size_t(head * dh)], p.rope_style, p.rot_dim, p.cos_table, p.sin_table, pos);
      for (int64_t i = 0; i < hq * dh; ++i) st(p.dtype, p.q_out, t * hq * dh + i, qkv[size_t(i)]);
      const int64_t block = c.block_table[int64_t(p.seq_ids[t]) * c.max_blocks_per_seq + pos / c.page_size];
      const int64_t slot = (block * c.page_size + pos % c.page_size) * hkv * dh;
      for (int64_t i = 0; i < hkv * dh; ++i) {
        st(p.dtype, c.k, slot + i, qkv[size_t(hq * dh + i)]);
        st(p.dtype, c.v, slot + i, qkv[size_t((hq + hkv) * dh + i)]);
      }
    }
    return TK_OK;
  }

  // out[total_q, Hq, Dh] = softmax(scale q k^T + causal mask) v, per sequence and head
  tk_status flash_attention(const tk_flash_attention_params& p) override {
    const int64_t group = p.num_q_heads / p.num_kv_heads;
    for (int64_t b = 0; b < p.batch; ++b) {
      const int64_t q0 = p.cu_seqlens_q[b], lq = p.cu_seqlens_q[b + 1] - q0;
      const int64_t k0 = p.cu_seqlens_k[b], lk = p.cu_seqlens_k[b + 1] - k0;
      for (int64_t h = 0; h < p.num_q_heads; ++h)
        for (int64_t i = 0; i < lq; ++i) {
          const int64_t visible = p.causal ? std::clamp<int64_t>(i + lk - lq + 1, 0, lk) : lk;
          const int64_t kvh = h / group;
          attend(p.dtype, offset(p.q, p.dtype, (q0 + i) * p.q_token_stride + h * p.q_head_stride),
                 p.head_dim, visible, p.scale,
                 [&](int64_t j) { return offset(p.k, p.dtype, (k0 + j) * p.k_token_stride + kvh * p.k_head_stride); },
                 [&](int64_t j) { return offset(p.v, p.dtype, (k0 + j) * p.v_token_stride + kvh * p.v_head_stride); },
                 offset(p.out, p.dtype, (q0 + i) * p.out_token_stride + h * p.out_head_stride),
                 p.lse ? &p.lse[h * p.total_q + q0 + i] : nullptr);
        }
    }
    return TK_OK;
  }

  // out[total_q, Hq, Dh]: each query attends to its sequence's paged cache up to its own position
  tk_status paged_attention(const tk_paged_attention_params& p) override {
    const tk_paged_kv_cache& c = p.cache;
    const int64_t group = p.num_q_heads / c.num_kv_heads, dh = c.head_dim;
    for (int64_t s = 0; s < c.num_seqs; ++s) {
      const int64_t q0 = p.cu_seqlens_q ? p.cu_seqlens_q[s] : s;
      const int64_t lq = p.cu_seqlens_q ? p.cu_seqlens_q[s + 1] - q0 : 1;
      const int64_t len = p.context_lens[s];
      const int32_t* blocks = c.block_table + s * c.max_blocks_per_seq;
      for (int64_t h = 0; h < p.num_q_heads; ++h)
        for (int64_t i = 0; i < lq; ++i) {
          const int64_t kvh = h / group;
          auto row = [&](void* cache, int64_t j) -> const void* {
            const int64_t slot = int64_t(blocks[j / c.page_size]) * c.page_size + j % c.page_size;
            return offset(cache, p.dtype, (slot * c.num_kv_heads + kvh) * dh);
          };
          attend(p.dtype, offset(p.q, p.dtype, (q0 + i) * p.q_token_stride + h * p.q_head_stride),
                 dh, len - lq + i + 1, p.scale, [&](int64_t j) { return row(c.k, j); },
                 [&](int64_t j) { return row(c.v, j); },
                 offset(p.out, p.dtype, (q0 + i) * p.out_token_stride + h * p.out_head_stride),
                 p.lse ? &p.lse[h * p.total_q + q0 + i] : nullptr);
        }
    }
    return TK_OK;
  }
};

}  // namespace

std::unique_ptr<Backend> make_reference_backend() { return std::make_unique<ReferenceBackend>(); }

}  // namespace tk
