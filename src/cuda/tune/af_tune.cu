// Scratch timing of attn_front's streaming kernel against its siblings on the
// same bytes (not built by CMake):
//   nvcc -O3 -std=c++20 -arch=sm_90a --expt-relaxed-constexpr -Iinclude -Isrc \
//     src/cuda/tune/af_tune.cu -o /tmp/af_tune
// The bench's attn_front row (D 4096, Hq 32, Hkv 8, Dh 128, f16, T 1) beside
// dstream_kernel run as a matmul over the same Wqkv (N 6144) and as a dense
// fused_ffn over it (F 3072: gate = rows 0..3071, up = the rest): all three
// stream the same 50.3 MB in 384 tiles of 16 rows, so their differences are
// attn_front's own (prologue, epilogue, row order), not its size. Each after a
// read-pass L2 flush, median of 80.
#include <cstdio>
#include <random>
#include <vector>

#include "../attn_front.cu"
#include "timing.cuh"

using namespace tk::cuda;
tk_status tk::fail(tk_status s, const char*, ...) { return s; }

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  constexpr int64_t D = 4096, Hq = 32, Hkv = 8, Dh = 128, N = (Hq + 2 * Hkv) * Dh, ctx = 4096, page = 16;
  constexpr int64_t max_pos = 8192, blocks = ctx / page;
  std::mt19937 rng(11);
  auto f16 = [&](uint16_t base, uint16_t span) { return uint16_t((rng() & 0x8000) | (base + rng() % span)); };
  std::vector<uint16_t> hw(static_cast<size_t>(N * D)), hx(static_cast<size_t>(8 * D)), hn(static_cast<size_t>(D));
  for (auto& v : hw) v = f16(0x1C00, 0x1000);
  for (auto& v : hx) v = f16(0x3000, 0xC00);
  for (auto& v : hn) v = uint16_t(0x3800 + rng() % 0x800);
  std::vector<float> hcos(size_t(max_pos * Dh / 2)), hsin(hcos.size());
  for (size_t i = 0; i < hcos.size(); ++i) hcos[i] = std::cos(0.001f * float(i)), hsin[i] = std::sin(0.001f * float(i));
  std::vector<int32_t> table(blocks);
  for (int64_t i = 0; i < blocks; ++i) table[size_t(i)] = int32_t((i * 37) % blocks);
  const int32_t pos = int32_t(ctx - 1), seq = 0;

  auto up = [](const auto& v) {
    void* p = nullptr;
    cudaMalloc(&p, v.size() * sizeof(v[0]));
    cudaMemcpy(p, v.data(), v.size() * sizeof(v[0]), cudaMemcpyHostToDevice);
    return p;
  };
  void *w = up(hw), *x = up(hx), *nw = up(hn), *cs = up(hcos), *sn = up(hsin), *bt = up(table);
  void *d_pos = up(std::vector<int32_t>(8, pos)), *d_seq = up(std::vector<int32_t>(8, seq));  // T 8: token 0's slot 8 times
  void *kc, *vc, *qo, *y;
  cudaMalloc(&kc, size_t(blocks * page * Hkv * Dh * 2));
  cudaMalloc(&vc, size_t(blocks * page * Hkv * Dh * 2));
  cudaMalloc(&qo, size_t(8 * Hq * Dh * 2));
  cudaMalloc(&y, size_t(8 * N * 2));
  unsigned* flag;
  cudaMalloc(&flag, 4);
  cudaMemset(flag, 0, 4);

  Launch l{};
  l.stream = 0;
  l.num_sms = sms;
  l.error_flag = flag;
  cudaDeviceGetAttribute(&l.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);

  tk_attn_front_params af{};
  af.dtype = TK_F16;
  af.T = 1, af.D = D, af.x = x, af.x_stride = D, af.norm_weight = nw, af.eps = 1e-5f;
  af.w_qkv = w, af.w_qkv_stride = D, af.num_q_heads = Hq, af.rope_style = TK_ROPE_NEOX, af.rot_dim = Dh;
  af.cos_table = static_cast<const float*>(cs), af.sin_table = static_cast<const float*>(sn), af.max_pos = max_pos;
  af.positions = static_cast<const int32_t*>(d_pos), af.seq_ids = static_cast<const int32_t*>(d_seq);
  af.cache = tk_paged_kv_cache{TK_F16, kc, vc, blocks, page, Hkv, Dh, static_cast<const int32_t*>(bt), 1, blocks};
  af.q_out = qo;

  const tk::tune::Timer timer(sms);
  const double bytes = double(N) * D * 2;
  auto time = [&](const char* name, auto&& fn) {
    fn();
    const cudaError_t e = cudaDeviceSynchronize();
    const std::vector<float> v = timer.time(fn, 80).us;
    std::printf("%-58s median %6.2f us  %5.0f GB/s  (min %.2f, p90 %.2f)%s\n", name, v[v.size() / 2],
                bytes / v[v.size() / 2] / 1e3, v[0], v[v.size() * 9 / 10], e ? "  LAUNCH ERROR" : "");
  };
  char name[96];
  for (int T : {1, 8}) {
    af.T = T;
    std::snprintf(name, sizeof name, "attn_front (library path) T=%d", T);
    time(name, [&] { attn_front(af, l); });
  }
  af.T = 1;
  const int64_t units_per_head = Dh / 2;
  const DsArgs aa = [&] {
    DsArgs a = ds_args(w, D, nullptr, 0, x, D, 1, nw, af.eps, nullptr, 0, (Hq + 2 * Hkv) * units_per_head, D);
    a.af = af, a.units_per_head = units_per_head, a.error_flag = flag;
    return a;
  }();
  const DsArgs am = ds_args(w, D, nullptr, 0, x, D, 1, nullptr, 0.0f, y, N, N, D);
  const DsArgs af2 = ds_args(w, D, static_cast<const char*>(w) + size_t(N / 2) * D * 2, D, x, D, 1, nw, af.eps, y,
                             N, N / 2, D);
  for (int stages : {2, 3, 4}) {
    for (unsigned grid_req : {0u, 128u, 96u}) {
      DsPlan pl;
      unsigned grid;
      size_t smem;
      if (!ds_plan<8, 16>(1, D, N, false, l, stages, pl, grid, smem)) continue;
      const unsigned g = grid_req ? grid_req : grid;
      std::snprintf(name, sizeof name, "matmul N 6144      stages %d grid %u", pl.stages, g);
      time(name, [&] { launch_dstream<__half, false, 8, 16>(am, l, pl, g, smem, "mm"); });
      if (!ds_plan<8, 16>(1, D, N / 2, true, l, stages, pl, grid, smem)) continue;
      std::snprintf(name, sizeof name, "fused_ffn F 3072   stages %d grid %u", pl.stages, g);
      time(name, [&] { launch_dstream<__half, true, 8, 16>(af2, l, pl, g, smem, "ffn"); });
      if (!ds_plan<8, 16>(1, D, aa.N, true, l, stages, pl, grid, smem)) continue;
      std::snprintf(name, sizeof name, "attn_front kAttn   stages %d grid %u", pl.stages, g);
      time(name, [&] { launch_dstream<__half, true, 8, 16, false, true>(aa, l, pl, g, smem, "af"); });
    }
  }
  time("read kernel over Wqkv", [&] { timer.read(w, size_t(N) * D * 2); });
  unsigned hflag = 0;
  cudaMemcpy(&hflag, flag, 4, cudaMemcpyDeviceToHost);
  std::printf("af_tune rc=%d (%s), error flag %u\n", int(cudaDeviceSynchronize()),
              cudaGetErrorString(cudaGetLastError()), hflag);
  return 0;
}
