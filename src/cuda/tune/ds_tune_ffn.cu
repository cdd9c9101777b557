// fused_ffn half of ds_tune.cu (a separate translation unit: matmul.cu and
// fused_ffn.cu share names in their anonymous namespaces). See ds_tune.cu.
#include <cstdio>

#include "../fused_ffn.cu"
#include "ds_variant.cuh"

using namespace tk::cuda;

// variant -1: the kernel before (T = 1: CUDA cores; T >= 2: ffn_mma_kernel);
// 0..: the streaming kernel, shapes in the order of ds_tune.cu's list.
int ffn_variant(const tk_fused_ffn_params& p, const Launch& l, int v, char* name, size_t name_len) {
  if (v < 0) {
    std::snprintf(name, name_len, "ffn before (%s)", p.T == 1 ? "CUDA cores" : "mma short blocks");
    if (p.T == 1) return int(launch_tiles<__half, 8, 1, true>(p, l, p.D / 8, true));
    return int(launch_mma<__half, 1>(p, l));
  }
  const DsArgs a = ds_args(p.w_gate, p.w_gate_stride, p.w_up, p.w_up_stride, p.x, p.x_stride, p.T, p.norm_weight,
                           p.eps, p.out, p.out_stride, p.F, p.D);
  return tk::tune::ds_dense_variant<true>(a, l, v, "ffn", name, name_len);
}

// int4 weights (group 128): -1 the kernel before (CUDA cores), 0..: streaming shapes.
int ffn4_variant(const tk_fused_ffn_params& p, const Launch& l, int v, char* name, size_t name_len) {
  if (v < 0) {
    std::snprintf(name, name_len, "ffn int4 before (CUDA cores)");
    if (p.T == 1) return int(launch_tiles<void, 32, 1, true>(p, l, p.D / 32, true));
    return int(launch_tiles<void, 32, 8, true>(p, l, p.D / 32, true));
  }
  struct V { int warps, stages; };
  const V vs[] = {{16, 2}, {16, 3}, {16, 4}, {8, 3}, {8, 4}, {8, 6}};
  if (v >= int(sizeof vs / sizeof vs[0])) return -1;
  DsArgs a = ds_args(p.q_gate.packed, 0, p.q_up.packed, 0, p.x, p.x_stride, p.T, p.norm_weight, p.eps, p.out,
                     p.out_stride, p.F, p.D);
  a.s0 = static_cast<const uint16_t*>(p.q_gate.scales), a.s1 = static_cast<const uint16_t*>(p.q_up.scales);
  a.z0 = p.q_gate.zeros, a.z1 = p.q_up.zeros, a.bf16_scales = false;
  DsPlan pl;
  unsigned grid;
  size_t smem;
  const V& s = vs[v];
  bool ok = false;
  tk_status st = TK_OK;
  if (s.warps == 16 && ds_plan<8, 16>(a.T, a.K, a.N, true, l, s.stages, pl, grid, smem, true, a.z0 != nullptr)) {
    ok = true;
    st = launch_dstream<__half, true, 8, 16, true>(a, l, pl, grid, smem, "ffn4");
  }
  if (s.warps == 8 && ds_plan<8, 8>(a.T, a.K, a.N, true, l, s.stages, pl, grid, smem, true, a.z0 != nullptr)) {
    ok = true;
    st = launch_dstream<__half, true, 8, 8, true>(a, l, pl, grid, smem, "ffn4");
  }
  if (!ok) return -2;
  std::snprintf(name, name_len, "ffn int4 stream %dw x %d stages (%zu KB)", s.warps, pl.stages, smem / 1024);
  return int(st);
}
