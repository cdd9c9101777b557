#include "cases.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <numeric>
#include <random>
#include <stdexcept>
#include <type_traits>

namespace tkb {
namespace {

// Llama-3-8B.
constexpr int64_t kD = 4096, kF = 14336, kHq = 32, kHkv = 8, kDh = 128;
constexpr int64_t kGroup = 128;  // int4 group size of the bench rows
constexpr float kEps = 1e-5f;
constexpr double kTheta = 500000.0;

[[noreturn]] void throw_tk(const char* what) {
  throw std::runtime_error(std::string(what) + ": " + tk_last_error());
}

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// Round to nearest even; the bench only converts values of modest size.
uint16_t to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const int exp = int((u >> 23) & 0xffu) - 127 + 15;
  const uint32_t man = u & 0x7fffffu;
  if (exp <= 0) return sign;  // below the normal range: zero
  if (exp >= 31) return uint16_t(sign | 0x7c00u);
  uint32_t h = sign | (uint32_t(exp) << 10) | (man >> 13);
  const uint32_t rest = man & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return uint16_t(h);
}

size_t esize(tk_dtype d) { return tk_dtype_size(d); }

// Random values are drawn once into a pool per (dtype, scale) and tiled:
// filling gigabytes of KV cache stays a memcpy, and the kernels' speed does
// not depend on the values beyond their range.
const std::vector<unsigned char>& pool(tk_dtype dtype, float scale) {
  static std::map<std::pair<int, float>, std::vector<unsigned char>> pools;
  auto& p = pools[{int(dtype), scale}];
  if (p.empty()) {
    constexpr size_t kCount = (size_t(1) << 20) + 13;
    std::mt19937 rng(1234u + unsigned(dtype));
    std::uniform_real_distribution<float> u(-scale, scale);
    p.resize(kCount * esize(dtype));
    for (size_t i = 0; i < kCount; ++i) {
      const float v = u(rng);
      if (dtype == TK_F32) {
        std::memcpy(&p[i * 4], &v, 4);
      } else {
        const uint16_t h = dtype == TK_F16 ? to_f16(v) : to_bf16(v);
        std::memcpy(&p[i * 2], &h, 2);
      }
    }
  }
  return p;
}

std::string dims(int64_t a, int64_t b) {
  return "[" + std::to_string(a) + "x" + std::to_string(b) + "]";
}

// y[T, N] = x[T, K] W[N, K]^T, the shape written the seed's way.
std::string linear_shape(int64_t T, int64_t K, int64_t N) {
  return "[" + std::to_string(T) + "x" + std::to_string(K) + "]->" + std::to_string(N);
}

// Memory-bound rows on the CPU: issue 2 asks for >= 80 % of the measured
// bandwidth, and for beating llama.cpp's figure where it gives one.
std::function<double(const Peaks&)> cpu_bandwidth_target(double bytes, Traffic traffic,
                                                        double anchor_us = 0) {
  return [bytes, traffic, anchor_us](const Peaks& pk) {
    const double t = bytes / (0.8 * pk.gbps(traffic) * 1e3);
    return anchor_us > 0 ? std::min(t, anchor_us) : t;
  };
}
// The CPU's in-cache baseline: a slice of at most this many bytes stays in
// the last-level cache (32 MB on the Zen 4 machines of CI) between calls.
constexpr double kInCacheBytes = 8e6;

// The same kernel over the same elements with its data already in the cache:
// run(cx, p) k times over the first T / k of the T rows that p.*rows counts
// (k a power of two, the slice at most kInCacheBytes; rows null: the whole op,
// k = 1), timed without the flush. It is what the cores take without DRAM: a
// row near it is compute-bound, a row well above it waits on memory.
template <class P>
Baseline in_cache(tk_status (*run)(tk_context*, const P*), tk_context* cx, P p,
                  std::type_identity_t<int64_t P::*> rows, double bytes) {
  const int64_t T = rows ? p.*rows : 1;
  int64_t k = 1;
  while (bytes / double(k) > kInCacheBytes && T % (2 * k) == 0) k *= 2;
  if (rows) p.*rows = T / k;
  std::string name = "in cache";
  if (k > 1) name += " (" + std::to_string(k) + "x " + std::to_string(T / k) + " rows)";
  return {name,
          [run, cx, p, k] {
            for (int64_t i = 0; i < k; ++i)
              if (const tk_status st = run(cx, &p); st != TK_OK) return st;
            return TK_OK;
          },
          true};
}

std::function<double(const Peaks&)> fixed_us(double us) {
  return [us](const Peaks&) { return us; };
}

struct Builder {
  const CaseOptions& opt;
  std::vector<Case> cases;

  tk_context* ctx() const { return opt.ctx; }
  // Issue 4 measures attention in bf16 on the GPU; llama.cpp's CPU figure
  // reads an f16 KV cache.
  tk_dtype attn_dtype() const { return opt.cuda ? TK_BF16 : TK_F16; }

  // The target column: issue 3's figure on the GPU (none when cuda_us is 0);
  // on the CPU, for memory-bound rows, 80 % of the measured bandwidth or
  // llama.cpp's time where issue 2 gives one, whichever is faster.
  void set_target(Case& c, double cuda_us, bool cpu_memory_bound, double cpu_anchor_us = 0,
                  const char* anchor_name = "llama.cpp") const {
    if (opt.cuda && cuda_us > 0) {
      c.target_us = fixed_us(cuda_us);
      c.target_note = "issue 3";
    } else if (!opt.cuda && cpu_memory_bound) {
      c.target_us = cpu_bandwidth_target(c.bytes, c.traffic, cpu_anchor_us);
      c.target_note = cpu_anchor_us > 0 ? std::string("80% BW, ") + anchor_name : "80% BW";
    }
  }

  void rmsnorm(int64_t T, int64_t D, bool residual, double cuda_target_us, tk_dtype dt = TK_F16) {
    Case c;
    c.kernel = residual ? "rmsnorm_residual" : "rmsnorm";
    c.shape = dims(T, D);
    c.dtype = tk_dtype_name(dt);
    c.bytes = double(esize(dt)) * double(T * D * (residual ? 4 : 2) + D);
    c.traffic = residual ? Traffic::kInPlace : Traffic::kReadWrite;  // the residual sum lands in x
    set_target(c, cuda_target_us, c.bytes > 64e6);
    tk_context* cx = ctx();
    Device* dev = opt.device;
    const bool cuda = opt.cuda;
    const double bytes = c.bytes;
    c.setup = [=](Instance& in) {
      Arena& a = *in.arena;
      tk_rmsnorm_params p{};
      p.dtype = dt;
      p.rows = T;
      p.dim = D;
      p.x = a.random(dt, T * D, 1.0f);
      p.x_stride = D;
      p.residual = residual ? a.random(dt, T * D, 1.0f) : nullptr;
      p.residual_stride = D;
      p.weight = a.random(dt, D, 1.0f);
      p.y = a.alloc(size_t(T * D) * esize(dt));
      p.y_stride = D;
      p.eps = kEps;
      in.op = [cx, p] { return tk_rmsnorm(cx, &p); };
      if (!cuda) in.baselines.push_back(in_cache(tk_rmsnorm, cx, p, &tk_rmsnorm_params::rows, bytes));
      if (!residual) {
        const size_t n = size_t(T * D) * esize(dt);
        if (Op copy = dev->copy_pass(a.alloc(n), p.x, n)) in.baselines.push_back({"memcpy of x", copy});
      }
    };
    cases.push_back(std::move(c));
  }

  void rope(int64_t T, int64_t H, int64_t Dh, double cuda_target_us) {
    const tk_dtype dt = TK_F16;
    Case c;
    c.kernel = "rope";
    c.shape = "T" + std::to_string(T) + " heads " + std::to_string(H) + " dim " +
              std::to_string(Dh) + " neox";
    c.dtype = tk_dtype_name(dt);
    // q read and written in place, positions, and the cos/sin rows they select.
    c.bytes = double(esize(dt)) * 2.0 * double(T * H * Dh) + 4.0 * double(T) +
              2.0 * 4.0 * double(T * Dh / 2);
    c.traffic = Traffic::kInPlace;
    set_target(c, cuda_target_us, true);
    tk_context* cx = ctx();
    const bool cuda = opt.cuda;
    const double bytes = c.bytes;
    c.setup = [=](Instance& in) {
      Arena& a = *in.arena;
      std::vector<float> cos_t(size_t(T * Dh / 2)), sin_t(cos_t.size());
      tk_rope_scaling sc{1, 8.0f, 1.0f, 4.0f, 8192};
      if (tk_rope_table(cos_t.data(), sin_t.data(), T, Dh, kTheta, &sc) != TK_OK)
        throw_tk("tk_rope_table");
      std::vector<int32_t> pos(static_cast<size_t>(T));
      std::iota(pos.begin(), pos.end(), 0);
      tk_rope_params p{};
      p.dtype = dt;
      p.style = TK_ROPE_NEOX;
      p.tokens = T;
      p.head_dim = Dh;
      p.rot_dim = Dh;
      p.q = a.random(dt, T * H * Dh, 1.0f);
      p.num_q_heads = H;
      p.q_token_stride = H * Dh;
      p.q_head_stride = Dh;
      p.k = nullptr;
      p.num_k_heads = 0;
      p.positions = a.upload(pos);
      p.cos_table = a.upload(cos_t);
      p.sin_table = a.upload(sin_t);
      p.max_pos = T;
      in.op = [cx, p] { return tk_rope(cx, &p); };
      if (!cuda) in.baselines.push_back(in_cache(tk_rope, cx, p, &tk_rope_params::tokens, bytes));
    };
    cases.push_back(std::move(c));
  }

  void swiglu(int64_t T, int64_t F, double cuda_target_us, tk_dtype dt = TK_F16) {
    Case c;
    c.kernel = "swiglu";
    c.shape = dims(T, F);
    c.dtype = tk_dtype_name(dt);
    c.bytes = 3.0 * double(esize(dt)) * double(T * F);
    c.traffic = Traffic::kReadWrite;
    set_target(c, cuda_target_us, true);
    tk_context* cx = ctx();
    const bool cuda = opt.cuda;
    const double bytes = c.bytes;
    c.setup = [=](Instance& in) {
      Arena& a = *in.arena;
      tk_swiglu_params p{};
      p.dtype = dt;
      p.rows = T;
      p.dim = F;
      p.gate = a.random(dt, T * F, 4.0f);
      p.gate_stride = F;
      p.up = a.random(dt, T * F, 1.0f);
      p.up_stride = F;
      p.out = a.alloc(size_t(T * F) * esize(dt));
      p.out_stride = F;
      in.op = [cx, p] { return tk_swiglu(cx, &p); };
      if (!cuda) in.baselines.push_back(in_cache(tk_swiglu, cx, p, &tk_swiglu_params::rows, bytes));
    };
    cases.push_back(std::move(c));
  }

  void matmul(int64_t T, int64_t N, int64_t K, double cuda_target_us, double cpu_anchor_us) {
    const tk_dtype dt = TK_F16;
    Case c;
    c.kernel = "matmul";
    c.shape = linear_shape(T, K, N);
    c.dtype = tk_dtype_name(dt);
    c.bytes = double(esize(dt)) * double(T * K + N * K + T * N);
    c.flops = 2.0 * double(T) * double(N) * double(K);
    set_target(c, cuda_target_us, T == 1, cpu_anchor_us);
    if (!opt.cuda && T > 64 && !opt.full)
      c.skip = "prefill-sized matmul on the CPU (" + std::to_string(int(c.flops / 1e9)) +
               " GFLOP per call); --full runs it";
    tk_context* cx = ctx();
    Device* dev = opt.device;
    c.setup = [=](Instance& in) {
      Arena& a = *in.arena;
      tk_matmul_params p{};
      p.dtype = dt;
      p.weight_dtype = dt;
      p.T = T;
      p.N = N;
      p.K = K;
      p.x = a.random(dt, T * K, 1.0f);
      p.x_stride = K;
      p.w = a.random(dt, N * K, 0.05f);
      p.w_stride = K;
      p.y = a.alloc(size_t(T * N) * esize(dt));
      p.y_stride = N;
      in.op = [cx, p] { return tk_matmul(cx, &p); };
      if (Op v = dev->vendor_matmul(dt, T, N, K, p.x, p.w, a.alloc(size_t(T * N) * esize(dt))))
        in.baselines.push_back({dev->vendor_name(), v});
      if (T <= 16)
        if (Op r = dev->read_pass(p.w, size_t(N * K) * esize(dt))) in.baselines.push_back({"read of W", r});
    };
    cases.push_back(std::move(c));
  }

  // Symmetric int4 weights with f16 scales: random codes, scales near 0.01.
  static tk_int4_weights int4_weights(Arena& a, int64_t N, int64_t K) {
    tk_int4_weights w{};
    w.packed = static_cast<const uint8_t*>(a.random_bytes(size_t(N * K / 2)));
    std::vector<uint16_t> s(size_t(N * (K / kGroup)));
    std::mt19937 rng(7);
    for (auto& v : s) v = to_f16(0.005f + 0.01f * float(rng() % 1000) / 1000.0f);
    w.scales = a.upload(s);
    w.zeros = nullptr;
    w.scale_dtype = TK_F16;
    w.N = N;
    w.K = K;
    w.group_size = kGroup;
    return w;
  }
  static double int4_bytes(int64_t N, int64_t K) {
    return double(N * K / 2) + 2.0 * double(N * (K / kGroup));
  }

  void qmatmul(int64_t T, int64_t N, int64_t K, double cuda_target_us, double cpu_anchor_us) {
    const tk_dtype dt = TK_F16;
    Case c;
    c.kernel = "qmatmul_int4";
    c.shape = linear_shape(T, K, N) + " g" + std::to_string(kGroup);
    c.dtype = tk_dtype_name(dt);
    c.bytes = int4_bytes(N, K) + double(esize(dt)) * double(T * K + T * N);
    c.flops = 2.0 * double(T) * double(N) * double(K);
    set_target(c, cuda_target_us, T == 1, cpu_anchor_us, "llama.cpp q4_0");
    tk_context* cx = ctx();
    Device* dev = opt.device;
    c.setup = [=](Instance& in) {
      Arena& a = *in.arena;
      tk_qmatmul_int4_params p{};
      p.dtype = dt;
      p.T = T;
      p.x = a.random(dt, T * K, 1.0f);
      p.x_stride = K;
      p.w = int4_weights(a, N, K);
      p.y = a.alloc(size_t(T * N) * esize(dt));
      p.y_stride = N;
      in.op = [cx, p] { return tk_qmatmul_int4(cx, &p); };
      // Issue 3: int4 must beat our own f16 path of the same shape.
      tk_matmul_params m{};
      m.dtype = dt;
      m.weight_dtype = dt;
      m.T = T;
      m.N = N;
      m.K = K;
      m.x = p.x;
      m.x_stride = K;
      m.w = a.random(dt, N * K, 0.05f);
      m.w_stride = K;
      m.y = a.alloc(size_t(T * N) * esize(dt));
      m.y_stride = N;
      in.baselines.push_back({"f16 matmul", [cx, m] { return tk_matmul(cx, &m); }});
      if (T <= 16)
        if (Op r = dev->read_pass(p.w.packed, size_t(N * K / 2))) in.baselines.push_back({"read of packed W", r});
    };
    cases.push_back(std::move(c));
  }

  void fused_ffn(int64_t T, int64_t D, int64_t F, bool int4, double cuda_target_us) {
    const tk_dtype dt = TK_F16;
    Case c;
    c.kernel = "fused_ffn";
    c.shape = linear_shape(T, D, F) + (int4 ? " int4 g" + std::to_string(kGroup) : "");
    c.dtype = tk_dtype_name(dt);
    const double weights =
        int4 ? 2.0 * int4_bytes(F, D) : 2.0 * double(esize(dt)) * double(F * D);
    c.bytes = weights + double(esize(dt)) * double(T * D + D + T * F);
    c.flops = 4.0 * double(T) * double(F) * double(D);
    set_target(c, cuda_target_us, false);
    tk_context* cx = ctx();
    c.setup = [=](Instance& in) {
      Arena& a = *in.arena;
      tk_fused_ffn_params p{};
      p.dtype = dt;
      p.T = T;
      p.D = D;
      p.F = F;
      p.x = a.random(dt, T * D, 1.0f);
      p.x_stride = D;
      p.norm_weight = a.random(dt, D, 1.0f);
      p.eps = kEps;
      p.format = int4 ? TK_WEIGHTS_INT4 : TK_WEIGHTS_DENSE;
      p.weight_dtype = dt;
      if (int4) {
        p.q_gate = int4_weights(a, F, D);
        p.q_up = int4_weights(a, F, D);
      } else {
        p.w_gate = a.random(dt, F * D, 0.05f);
        p.w_gate_stride = D;
        p.w_up = a.random(dt, F * D, 0.05f);
        p.w_up_stride = D;
      }
      p.out = a.alloc(size_t(T * F) * esize(dt));
      p.out_stride = F;
      p.algo = TK_FUSED_SPLIT;
      in.op = [cx, p] { return tk_fused_ffn(cx, &p); };

      // The unfused chain of our own kernels: norm, two projections, swiglu,
      // each through memory.
      tk_rmsnorm_params n{};
      n.dtype = dt;
      n.rows = T;
      n.dim = D;
      n.x = p.x;
      n.x_stride = D;
      n.weight = p.norm_weight;
      n.y = a.alloc(size_t(T * D) * esize(dt));
      n.y_stride = D;
      n.eps = kEps;
      void* gate = a.alloc(size_t(T * F) * esize(dt));
      void* up = a.alloc(size_t(T * F) * esize(dt));
      tk_swiglu_params s{};
      s.dtype = dt;
      s.rows = T;
      s.dim = F;
      s.gate = gate;
      s.gate_stride = F;
      s.up = up;
      s.up_stride = F;
      s.out = a.alloc(size_t(T * F) * esize(dt));
      s.out_stride = F;
      Op proj_gate, proj_up;
      if (int4) {
        tk_qmatmul_int4_params g{};
        g.dtype = dt;
        g.T = T;
        g.x = n.y;
        g.x_stride = D;
        g.w = p.q_gate;
        g.y = gate;
        g.y_stride = F;
        tk_qmatmul_int4_params u = g;
        u.w = p.q_up;
        u.y = up;
        proj_gate = [cx, g] { return tk_qmatmul_int4(cx, &g); };
        proj_up = [cx, u] { return tk_qmatmul_int4(cx, &u); };
      } else {
        tk_matmul_params g{};
        g.dtype = dt;
        g.weight_dtype = dt;
        g.T = T;
        g.N = F;
        g.K = D;
        g.x = n.y;
        g.x_stride = D;
        g.w = p.w_gate;
        g.w_stride = D;
        g.y = gate;
        g.y_stride = F;
        tk_matmul_params u = g;
        u.w = p.w_up;
        u.y = up;
        proj_gate = [cx, g] { return tk_matmul(cx, &g); };
        proj_up = [cx, u] { return tk_matmul(cx, &u); };
      }
      in.baselines.push_back({"unfused", [cx, n, s, proj_gate, proj_up] {
                                tk_status st = tk_rmsnorm(cx, &n);
                                if (st == TK_OK) st = proj_gate();
                                if (st == TK_OK) st = proj_up();
                                if (st == TK_OK) st = tk_swiglu(cx, &s);
                                return st;
                              }});
      tk_fused_ffn_params naive = p;
      naive.algo = TK_FUSED_NAIVE;
      naive.out = s.out;  // its own output, so the split result stays intact
      in.baselines.push_back({"naive fused", [cx, naive] { return tk_fused_ffn(cx, &naive); }});
    };
    cases.push_back(std::move(c));
  }

  // A paged cache holding `seqs` sequences of `ctx_len` tokens each, its
  // pages handed out in a shuffled order as an allocator would after a while.
  static tk_paged_kv_cache paged_cache(Arena& a, tk_dtype dt, int64_t seqs, int64_t ctx_len,
                                       int64_t page) {
    tk_paged_kv_cache c{};
    const int64_t per_seq = (ctx_len + page - 1) / page;
    c.dtype = dt;
    c.num_blocks = seqs * per_seq;
    c.page_size = page;
    c.num_kv_heads = kHkv;
    c.head_dim = kDh;
    // K then V in one region, so that one read pass covers the cache (the floor
    // printed beside paged_attention).
    const int64_t n = c.num_blocks * page * kHkv * kDh;
    c.k = a.random(dt, 2 * n, 1.0f);
    c.v = static_cast<char*>(c.k) + size_t(n) * esize(dt);
    std::vector<int32_t> table(size_t(c.num_blocks));
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), std::mt19937(42));
    c.block_table = a.upload(table);
    c.num_seqs = seqs;
    c.max_blocks_per_seq = per_seq;
    return c;
  }

  static tk_attn_front_params attn_front_params(Arena& a, tk_dtype dt,
                                                const tk_paged_kv_cache& cache, int32_t pos) {
    const int64_t max_pos = 8192;
    std::vector<float> cos_t(size_t(max_pos * kDh / 2)), sin_t(cos_t.size());
    tk_rope_scaling sc{1, 8.0f, 1.0f, 4.0f, 8192};
    if (tk_rope_table(cos_t.data(), sin_t.data(), max_pos, kDh, kTheta, &sc) != TK_OK)
      throw_tk("tk_rope_table");
    tk_attn_front_params p{};
    p.dtype = dt;
    p.T = 1;
    p.D = kD;
    p.x = a.random(dt, kD, 1.0f);
    p.x_stride = kD;
    p.norm_weight = a.random(dt, kD, 1.0f);
    p.eps = kEps;
    p.w_qkv = a.random(dt, (kHq + 2 * kHkv) * kDh * kD, 0.05f);
    p.w_qkv_stride = kD;
    p.num_q_heads = kHq;
    p.rope_style = TK_ROPE_NEOX;
    p.rot_dim = kDh;
    p.cos_table = a.upload(cos_t);
    p.sin_table = a.upload(sin_t);
    p.max_pos = max_pos;
    p.positions = a.upload(std::vector<int32_t>{pos});
    p.seq_ids = a.upload(std::vector<int32_t>{0});
    p.cache = cache;
    p.q_out = a.alloc(size_t(kHq * kDh) * esize(dt));
    return p;
  }

  void attn_front() {
    const tk_dtype dt = TK_F16;
    const int64_t qkv = (kHq + 2 * kHkv) * kDh;
    Case c;
    c.kernel = "fused_attn_front";
    c.shape = "[1x" + std::to_string(kD) + "] -> q " + std::to_string(kHq * kDh) + ", k/v " +
              std::to_string(kHkv * kDh);
    c.dtype = tk_dtype_name(dt);
    const double weight_bytes = double(esize(dt)) * double(qkv * kD);
    // x, norm weight, Wqkv, q out, the k and v rows written to the cache, the
    // cos/sin row, position, sequence id and the block-table entry.
    c.bytes = weight_bytes + double(esize(dt)) * double(2 * kD + qkv) + 4.0 * double(kDh) + 12.0;
    c.flops = 2.0 * double(qkv) * double(kD);
    if (opt.cuda) {
      c.target_us = [weight_bytes](const Peaks& pk) {
        return 1.15 * weight_bytes / (pk.read_gbps * 1e3);
      };
      c.target_note = "issue 3: 1.15x weight read";
    }
    tk_context* cx = ctx();
    Device* dev = opt.device;
    c.setup = [=](Instance& in) {
      Arena& a = *in.arena;
      const tk_paged_kv_cache cache = paged_cache(a, dt, 1, 4096, 16);
      const tk_attn_front_params p = attn_front_params(a, dt, cache, 4095);
      in.op = [cx, p] { return tk_attn_front(cx, &p); };
      if (Op r = dev->read_pass(p.w_qkv, size_t(qkv * kD) * esize(dt))) in.baselines.push_back({"read of Wqkv", r});

      // Unfused, and still short of the real chain: no kernel of ours writes
      // k and v into the paged cache on its own.
      tk_rmsnorm_params n{};
      n.dtype = dt;
      n.rows = 1;
      n.dim = kD;
      n.x = p.x;
      n.x_stride = kD;
      n.weight = p.norm_weight;
      n.y = a.alloc(size_t(kD) * esize(dt));
      n.y_stride = kD;
      n.eps = kEps;
      tk_matmul_params m{};
      m.dtype = dt;
      m.weight_dtype = dt;
      m.T = 1;
      m.N = qkv;
      m.K = kD;
      m.x = n.y;
      m.x_stride = kD;
      m.w = p.w_qkv;
      m.w_stride = kD;
      m.y = a.alloc(size_t(qkv) * esize(dt));
      m.y_stride = qkv;
      tk_rope_params r{};
      r.dtype = dt;
      r.style = TK_ROPE_NEOX;
      r.tokens = 1;
      r.head_dim = kDh;
      r.rot_dim = kDh;
      r.q = m.y;
      r.num_q_heads = kHq;
      r.q_token_stride = qkv;
      r.q_head_stride = kDh;
      r.k = static_cast<char*>(m.y) + kHq * kDh * int64_t(esize(dt));
      r.num_k_heads = kHkv;
      r.k_token_stride = qkv;
      r.k_head_stride = kDh;
      r.positions = p.positions;
      r.cos_table = p.cos_table;
      r.sin_table = p.sin_table;
      r.max_pos = p.max_pos;
      in.baselines.push_back({"norm+matmul+rope", [cx, n, m, r] {
                                tk_status st = tk_rmsnorm(cx, &n);
                                if (st == TK_OK) st = tk_matmul(cx, &m);
                                if (st == TK_OK) st = tk_rope(cx, &r);
                                return st;
                              }});
    };
    cases.push_back(std::move(c));
  }

  void flash(int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t Dh, double cuda_target_tflops) {
    const tk_dtype dt = attn_dtype();
    Case c;
    c.kernel = "flash_attention";
    c.shape = "B" + std::to_string(B) + (Hq == Hkv ? " H" + std::to_string(Hq)
                                                   : " Hq" + std::to_string(Hq) + " Hkv" +
                                                         std::to_string(Hkv)) +
              " S" + std::to_string(S) + " D" + std::to_string(Dh) + " causal";
    c.dtype = tk_dtype_name(dt);
    c.bytes = double(esize(dt)) * double(B * S) * double(2 * Hq + 2 * Hkv) * double(Dh) +
              8.0 * double(B + 1);
    // Causal: half of the S x S scores, as FlashAttention counts it.
    c.flops = 4.0 * double(B) * double(Hq) * double(S) * double(S) * double(Dh) / 2.0;
    if (opt.cuda && cuda_target_tflops > 0) {
      const double flops = c.flops;
      c.target_us = [flops, cuda_target_tflops](const Peaks&) {
        return flops / (cuda_target_tflops * 1e6);
      };
      c.target_note = "issue 4";
    }
    if (!opt.cuda && !opt.full && c.flops > 20e9)
      c.skip = "giant prefill on the CPU (" + std::to_string(int(c.flops / 1e9)) +
               " GFLOP per call); --full runs it";
    tk_context* cx = ctx();
    c.setup = [=](Instance& in) {
      Arena& a = *in.arena;
      std::vector<int32_t> cu(size_t(B + 1));
      for (int64_t b = 0; b <= B; ++b) cu[size_t(b)] = int32_t(b * S);
      tk_flash_attention_params p{};
      p.dtype = dt;
      p.batch = B;
      p.num_q_heads = Hq;
      p.num_kv_heads = Hkv;
      p.head_dim = Dh;
      p.q = a.random(dt, B * S * Hq * Dh, 1.0f);
      p.q_token_stride = Hq * Dh;
      p.q_head_stride = Dh;
      p.k = a.random(dt, B * S * Hkv * Dh, 1.0f);
      p.k_token_stride = Hkv * Dh;
      p.k_head_stride = Dh;
      p.v = a.random(dt, B * S * Hkv * Dh, 1.0f);
      p.v_token_stride = Hkv * Dh;
      p.v_head_stride = Dh;
      p.out = a.alloc(size_t(B * S * Hq * Dh) * esize(dt));
      p.out_token_stride = Hq * Dh;
      p.out_head_stride = Dh;
      p.cu_seqlens_q = a.upload(cu);
      p.cu_seqlens_k = p.cu_seqlens_q;
      p.total_q = B * S;
      p.total_k = B * S;
      p.max_seqlen_q = S;
      p.max_seqlen_k = S;
      p.scale = float(1.0 / std::sqrt(double(Dh)));
      p.causal = 1;
      p.lse = nullptr;
      in.op = [cx, p] { return tk_flash_attention(cx, &p); };
    };
    cases.push_back(std::move(c));
  }

  static tk_paged_attention_params paged_params(Arena& a, tk_context* cx,
                                                const tk_paged_kv_cache& cache, int64_t ctx_len) {
    const tk_dtype dt = cache.dtype;
    const int64_t B = cache.num_seqs;
    tk_paged_attention_params p{};
    p.dtype = dt;
    p.num_q_heads = kHq;
    p.q = a.random(dt, B * kHq * kDh, 1.0f);
    p.q_token_stride = kHq * kDh;
    p.q_head_stride = kDh;
    p.out = a.alloc(size_t(B * kHq * kDh) * esize(dt));
    p.out_token_stride = kHq * kDh;
    p.out_head_stride = kDh;
    p.cu_seqlens_q = nullptr;
    p.total_q = B;
    p.max_q_len = 1;
    p.cache = cache;
    p.context_lens = a.upload(std::vector<int32_t>(size_t(B), int32_t(ctx_len)));
    p.max_context_len = ctx_len;
    p.scale = float(1.0 / std::sqrt(double(kDh)));
    p.lse = nullptr;
    p.workspace_bytes = tk_paged_attention_workspace_size(cx, B, kHq, kDh, ctx_len);
    p.workspace = p.workspace_bytes ? a.alloc(p.workspace_bytes) : nullptr;
    return p;
  }

  void paged(int64_t B, int64_t ctx_len, int64_t page, double cuda_target_us,
             double cuda_target_kv_tbps, double cpu_anchor_us) {
    const tk_dtype dt = attn_dtype();
    Case c;
    c.kernel = "paged_attention";
    c.shape = "B" + std::to_string(B) + " Hq" + std::to_string(kHq) + " Hkv" +
              std::to_string(kHkv) + " ctx" + std::to_string(ctx_len) + " D" +
              std::to_string(kDh) + " page" + std::to_string(page);
    c.dtype = tk_dtype_name(dt);
    const double kv = 2.0 * double(esize(dt)) * double(B * ctx_len * kHkv * kDh);
    c.bytes = kv + 2.0 * double(esize(dt)) * double(B * kHq * kDh) +
              4.0 * double(B * ((ctx_len + page - 1) / page) + B);
    c.flops = 4.0 * double(B) * double(kHq) * double(ctx_len) * double(kDh);
    if (opt.cuda && cuda_target_us > 0) {
      c.target_us = fixed_us(cuda_target_us);
      c.target_note = "issue 4";
    } else if (opt.cuda && cuda_target_kv_tbps > 0) {
      c.target_us = fixed_us(kv / (cuda_target_kv_tbps * 1e6));
      c.target_note = "issue 4: KV at " + std::to_string(cuda_target_kv_tbps).substr(0, 4) +
                      " TB/s";
    } else if (!opt.cuda) {
      c.target_us = cpu_bandwidth_target(c.bytes, c.traffic, cpu_anchor_us);
      c.target_note = cpu_anchor_us > 0 ? "80% BW, llama.cpp" : "80% BW";
    }
    tk_context* cx = ctx();
    Device* dev = opt.device;
    const bool cuda = opt.cuda;
    const double bytes = c.bytes;
    c.setup = [=](Instance& in) {
      Arena& a = *in.arena;
      const tk_paged_kv_cache cache = paged_cache(a, dt, B, ctx_len, page);
      const tk_paged_attention_params p = paged_params(a, cx, cache, ctx_len);
      in.op = [cx, p] { return tk_paged_attention(cx, &p); };
      const size_t cache_bytes = 2 * size_t(cache.num_blocks * page * kHkv * kDh) * esize(dt);
      if (Op r = dev->read_pass(cache.k, cache_bytes)) in.baselines.push_back({"read of KV", r});
      // One sequence's cache (16.8 MB at ctx 4096) fits the CPU's last-level cache unsliced.
      if (!cuda && B == 1)
        in.baselines.push_back(in_cache(tk_paged_attention, cx, p, nullptr, bytes));
    };
    cases.push_back(std::move(c));
  }
};

}  // namespace

Arena::~Arena() {
  for (const Device::Region& r : regions_) tk_free(ctx_, const_cast<void*>(r.p));
}

void* Arena::alloc(size_t bytes) {
  void* p = nullptr;
  if (tk_malloc(ctx_, bytes, &p) != TK_OK) throw_tk("tk_malloc");
  regions_.push_back({p, bytes});
  return p;
}

void* Arena::upload(const void* host, size_t bytes) {
  void* p = alloc(bytes);
  if (tk_memcpy_to_device(ctx_, p, host, bytes) != TK_OK) throw_tk("tk_memcpy_to_device");
  return p;
}

void* Arena::random(tk_dtype dtype, int64_t count, float scale) {
  const size_t bytes = size_t(count) * esize(dtype);
  char* dst = static_cast<char*>(alloc(bytes));
  const std::vector<unsigned char>& src = pool(dtype, scale);
  constexpr size_t kChunk = size_t(32) << 20;
  std::vector<unsigned char> stage(std::min(bytes, kChunk));
  for (size_t off = 0; off < bytes; off += kChunk) {
    const size_t n = std::min(kChunk, bytes - off);
    for (size_t i = 0; i < n; i += src.size())
      std::memcpy(&stage[i], src.data(), std::min(src.size(), n - i));
    if (tk_memcpy_to_device(ctx_, dst + off, stage.data(), n) != TK_OK)
      throw_tk("tk_memcpy_to_device");
  }
  return dst;
}

void* Arena::random_bytes(size_t bytes) {
  // Any byte is a valid pair of int4 codes; one random chunk, tiled.
  char* dst = static_cast<char*>(alloc(bytes));
  constexpr size_t kChunk = size_t(32) << 20;
  std::vector<unsigned char> stage(std::min(bytes, kChunk));
  std::mt19937 rng(99);
  for (auto& b : stage) b = static_cast<unsigned char>(rng());
  for (size_t off = 0; off < bytes; off += kChunk) {
    const size_t n = std::min(kChunk, bytes - off);
    if (tk_memcpy_to_device(ctx_, dst + off, stage.data(), n) != TK_OK)
      throw_tk("tk_memcpy_to_device");
  }
  return dst;
}

std::vector<Case> make_cases(const CaseOptions& opt) {
  Builder b{opt, {}};
  // Seed rows first, then Llama-3-8B and the rows of issues 3 and 4.
  b.rmsnorm(32, kD, false, 4.0);
  b.rmsnorm(4096, 4096, false, 24.0);
  b.rmsnorm(16384, 8192, false, 200.0);
  b.rmsnorm(1, kD, true, 0);
  b.rmsnorm(4096, kD, true, 0);
  b.rope(4096, kHq, kDh, 26.0);
  b.swiglu(4096, kF, 122.0);
  if (!opt.cuda) {
    // Llama-3's own dtype: the CPU converts bf16 with other instructions than f16.
    b.rmsnorm(4096, 4096, false, 0, TK_BF16);
    b.rmsnorm(4096, kD, true, 0, TK_BF16);
    b.swiglu(4096, kF, 0, TK_BF16);
  }
  // llama.cpp on a 2-core Zen 4: f16 matvec 2.4-3.5 ms, q4_0 1.3 ms (issue 2).
  b.matmul(1, kF, kD, 43.0, 2400.0);
  b.matmul(8, kF, kD, 45.0, 0);
  b.matmul(64, kF, kD, 0, 0);
  b.matmul(4096, kF, kD, 0, 0);
  b.qmatmul(1, kF, kD, 13.0, 1300.0);
  b.qmatmul(8, kF, kD, 16.0, 0);
  b.qmatmul(64, kF, kD, 0, 0);
  b.fused_ffn(1, kD, kF, false, 86.0);
  b.fused_ffn(8, kD, kF, false, 90.0);
  b.fused_ffn(1, kD, kF, true, 0);
  b.attn_front();
  b.flash(1, kHq, kHq, 512, kDh, 125.0);  // the seed's row
  b.flash(1, kHq, kHkv, 512, kDh, 0);     // GQA, Llama-3-8B heads
  b.flash(4, kHq, kHq, 4096, kDh, 560.0);
  b.flash(1, kHq, kHq, 16384, kDh, 600.0);
  b.flash(4, kHq, kHq, 4096, 64, 440.0);
  b.flash(4, kHq, kHkv, 4096, kDh, 0);
  // llama.cpp: 2.2 ms for this decode on 2 Zen 4 cores (f16 KV).
  b.paged(1, 4096, 16, 12.0, 0, 2200.0);
  b.paged(32, 4096, 16, 0, 2.8, 0);
  b.paged(64, 8192, 16, 0, 2.85, 0);
  return std::move(b.cases);
}

std::unique_ptr<Sequence> make_decode_step(const CaseOptions& opt) {
  const tk_dtype dt = TK_F16;
  const int64_t ctx_len = 4096;
  auto seq = std::make_unique<Sequence>();
  seq->arena = std::make_unique<Arena>(opt.ctx);
  seq->shape = "Llama-3-8B layer, T 1, ctx " + std::to_string(ctx_len) + ", " +
               tk_dtype_name(dt);
  Arena& a = *seq->arena;
  tk_context* cx = opt.ctx;

  const tk_paged_kv_cache cache = Builder::paged_cache(a, dt, 1, ctx_len, 16);
  const tk_attn_front_params front = Builder::attn_front_params(a, dt, cache, int32_t(ctx_len - 1));
  tk_paged_attention_params attn = Builder::paged_params(a, cx, cache, ctx_len);
  attn.q = front.q_out;
  // o_proj: [1, Hq*Dh] -> D
  tk_matmul_params o{};
  o.dtype = dt;
  o.weight_dtype = dt;
  o.T = 1;
  o.N = kD;
  o.K = kHq * kDh;
  o.x = attn.out;
  o.x_stride = o.K;
  o.w = a.random(dt, o.N * o.K, 0.05f);
  o.w_stride = o.K;
  o.y = a.alloc(size_t(kD) * tk_dtype_size(dt));
  o.y_stride = kD;
  // The residual add after attention: residual <- residual + o_proj(attn). Its
  // normed output goes unused here because fused_ffn norms the stream itself.
  tk_rmsnorm_params res{};
  res.dtype = dt;
  res.rows = 1;
  res.dim = kD;
  res.x = o.y;
  res.x_stride = kD;
  res.residual = a.random(dt, kD, 1.0f);
  res.residual_stride = kD;
  res.weight = a.random(dt, kD, 1.0f);
  res.y = a.alloc(size_t(kD) * tk_dtype_size(dt));
  res.y_stride = kD;
  res.eps = kEps;
  tk_fused_ffn_params ffn{};
  ffn.dtype = dt;
  ffn.T = 1;
  ffn.D = kD;
  ffn.F = kF;
  ffn.x = res.residual;
  ffn.x_stride = kD;
  ffn.norm_weight = res.weight;
  ffn.eps = kEps;
  ffn.format = TK_WEIGHTS_DENSE;
  ffn.weight_dtype = dt;
  ffn.w_gate = a.random(dt, kF * kD, 0.05f);
  ffn.w_gate_stride = kD;
  ffn.w_up = a.random(dt, kF * kD, 0.05f);
  ffn.w_up_stride = kD;
  ffn.out = a.alloc(size_t(kF) * tk_dtype_size(dt));
  ffn.out_stride = kF;
  ffn.algo = TK_FUSED_SPLIT;
  tk_matmul_params down{};
  down.dtype = dt;
  down.weight_dtype = dt;
  down.T = 1;
  down.N = kD;
  down.K = kF;
  down.x = ffn.out;
  down.x_stride = kF;
  down.w = a.random(dt, kD * kF, 0.05f);
  down.w_stride = kF;
  down.y = a.alloc(size_t(kD) * tk_dtype_size(dt));
  down.y_stride = kD;

  seq->ops.push_back({"fused_attn_front", [cx, front] { return tk_attn_front(cx, &front); }});
  seq->ops.push_back({"paged_attention", [cx, attn] { return tk_paged_attention(cx, &attn); }});
  seq->ops.push_back({"matmul o_proj", [cx, o] { return tk_matmul(cx, &o); }});
  seq->ops.push_back({"rmsnorm_residual", [cx, res] { return tk_rmsnorm(cx, &res); }});
  seq->ops.push_back({"fused_ffn", [cx, ffn] { return tk_fused_ffn(cx, &ffn); }});
  seq->ops.push_back({"matmul down", [cx, down] { return tk_matmul(cx, &down); }});
  return seq;
}

}  // namespace tkb
