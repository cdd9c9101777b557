// RoPE on CUDA, in place on q and k. One block per token: the position is read
// (and bounds-checked) once, the token's cos/sin row stays in L1 for all its
// heads, and each thread rotates one unit: a pair of 16-byte packs (rotate-half:
// elements i.. and i+half..) or one pack of adjacent pairs (interleaved).
// Elements past rot_dim are never touched. Bound by HBM bandwidth.
#include <algorithm>

#include "cuda/ops.h"
#include "cuda/vec.cuh"

namespace tk::cuda {
namespace {

// n consecutive f32 of the table, 16-byte aligned when n % 4 == 0, else 8.
template <int n>
__device__ __forceinline__ void load_table(const float* p, float (&v)[n]) {
  if constexpr (n % 4 == 0) {
#pragma unroll
    for (int i = 0; i < n; i += 4) {
      const float4 f = reinterpret_cast<const float4*>(p)[i / 4];
      v[i] = f.x; v[i + 1] = f.y; v[i + 2] = f.z; v[i + 3] = f.w;
    }
  } else {
    static_assert(n % 2 == 0, "table chunks are pairs");
#pragma unroll
    for (int i = 0; i < n; i += 2) {
      const float2 f = reinterpret_cast<const float2*>(p)[i / 2];
      v[i] = f.x; v[i + 1] = f.y;
    }
  }
}

// kW: elements per access (kPack<T>, or 1 when pointers or sizes forbid 16 bytes).
template <class T, int kW>
__device__ __forceinline__ void rotate_unit(T* head, int u, int half, bool neox, const float* cs,
                                            const float* sn) {
  if constexpr (kW == 1) {
    const int a = neox ? u : 2 * u, b = neox ? u + half : 2 * u + 1;
    const float c = cs[u], s = sn[u];
    const float x0 = to_f32(head[a]), x1 = to_f32(head[b]);
    head[a] = from_f32<T>(x0 * c - x1 * s);
    head[b] = from_f32<T>(x0 * s + x1 * c);
  } else if (neox) {  // elements [i, i + kW) pair with [half + i, half + i + kW)
    const int i = u * kW;
    float x0[kW], x1[kW], c[kW], s[kW];
    load_pack<T>(head + i, x0);
    load_pack<T>(head + half + i, x1);
    load_table<kW>(cs + i, c);
    load_table<kW>(sn + i, s);
    float y0[kW], y1[kW];
#pragma unroll
    for (int e = 0; e < kW; ++e) {
      y0[e] = x0[e] * c[e] - x1[e] * s[e];
      y1[e] = x0[e] * s[e] + x1[e] * c[e];
    }
    store_pack<T>(head + i, y0);
    store_pack<T>(head + half + i, y1);
  } else {  // kW / 2 interleaved pairs, angles u * kW / 2 ..
    const int i = u * kW;
    float x[kW], c[kW / 2], s[kW / 2];
    load_pack<T>(head + i, x);
    load_table<kW / 2>(cs + i / 2, c);
    load_table<kW / 2>(sn + i / 2, s);
    float y[kW];
#pragma unroll
    for (int e = 0; e < kW / 2; ++e) {
      y[2 * e] = x[2 * e] * c[e] - x[2 * e + 1] * s[e];
      y[2 * e + 1] = x[2 * e] * s[e] + x[2 * e + 1] * c[e];
    }
    store_pack<T>(head + i, y);
  }
}

template <class T, int kW>
__global__ void rope_kernel(tk_rope_params p, int units, unsigned int* error_flag) {
  const int64_t t = blockIdx.x;
  const int32_t pos = p.positions[t];
  if (pos < 0 || pos >= p.max_pos) {
    if (threadIdx.x == 0) raise_index_error(error_flag);
    return;
  }
  const int half = int(p.rot_dim / 2);
  const float* cs = p.cos_table + int64_t(pos) * half;
  const float* sn = p.sin_table + int64_t(pos) * half;
  const bool neox = p.style == TK_ROPE_NEOX;
  const int hq = int(p.num_q_heads), heads = hq + int(p.num_k_heads);
  for (int item = threadIdx.x; item < heads * units; item += blockDim.x) {
    const int h = item / units, u = item - h * units;
    T* head = h < hq ? static_cast<T*>(p.q) + t * p.q_token_stride + h * p.q_head_stride
                     : static_cast<T*>(p.k) + t * p.k_token_stride + (h - hq) * p.k_head_stride;
    rotate_unit<T, kW>(head, u, half, neox, cs, sn);
  }
}

template <class T>
tk_status launch(const tk_rope_params& p, const Launch& l) {
  const int64_t esz = sizeof(T), half = p.rot_dim / 2;
  const bool neox = p.style == TK_ROPE_NEOX;
  auto heads_aligned = [&](const void* base, int64_t ts, int64_t hs) {
    return aligned16(base) && (ts * esz) % 16 == 0 && (hs * esz) % 16 == 0;
  };
  // Vector units must tile the rotated part and keep table reads aligned.
  const bool vec = (neox ? half % kPack<T> == 0 : p.rot_dim % kPack<T> == 0) &&
                   heads_aligned(p.q, p.q_token_stride, p.q_head_stride) &&
                   (!p.k || heads_aligned(p.k, p.k_token_stride, p.k_head_stride)) &&
                   aligned16(p.cos_table) && aligned16(p.sin_table) && half % 4 == 0;
  const int64_t units = vec ? (neox ? half / kPack<T> : p.rot_dim / kPack<T>) : half;
  const int64_t items = units * (p.num_q_heads + (p.k ? p.num_k_heads : 0));
  if (items >= (int64_t(1) << 31))
    return fail(TK_ERR_UNSUPPORTED, "rope: %lld heads x %lld pairs is too many for one token",
                (long long)(p.num_q_heads + p.num_k_heads), (long long)half);
  tk_rope_params q = p;
  if (!q.k) q.num_k_heads = 0;
  const int threads = int(std::min<int64_t>(1024, std::max<int64_t>(32, (items + 31) / 32 * 32)));
  if (vec)
    rope_kernel<T, kPack<T>><<<unsigned(p.tokens), threads, 0, l.stream>>>(q, int(units), l.error_flag);
  else
    rope_kernel<T, 1><<<unsigned(p.tokens), threads, 0, l.stream>>>(q, int(units), l.error_flag);
  return check_launch("rope");
}

}  // namespace

tk_status rope(const tk_rope_params& p, const Launch& l) {
  if (p.tokens == 0) return TK_OK;
  TK_DISPATCH_DTYPE(p.dtype, T, return launch<T>(p, l);)
  return fail(TK_ERR_UNSUPPORTED, "rope: unsupported dtype %d", int(p.dtype));
}

}  // namespace tk::cuda
