// The streaming shapes ds_tune.cu sweeps for the dense kernels of dstream.cuh
// (matmul: kFfn false; fused_ffn: true), shared by its two translation units.
// Include after the .cu file that brings dstream.cuh in.
#pragma once

#include <cstdio>

namespace tk::tune {

// Variant v (0..) of the list below on a; -1 past its end, -2 where the plan
// does not fit this device. `label` starts the name written for the variant.
template <bool kFfn>
int ds_dense_variant(const tk::cuda::DsArgs& a, const tk::cuda::Launch& l, int v, const char* label, char* name,
                     size_t name_len) {
  using namespace tk::cuda;
  struct V { int chunks, warps, stages; };
  const V vs[] = {{8, 16, 2}, {8, 16, 3}, {8, 16, 4}, {8, 16, 6}, {16, 16, 2}, {16, 16, 3}, {8, 8, 4}};
  if (v >= int(sizeof vs / sizeof vs[0])) return -1;
  DsPlan pl;
  unsigned grid;
  size_t smem;
  const V& s = vs[v];
  bool ok = false;
  tk_status st = TK_OK;
#define TK_DS_CASE(C, W)                                                                                  \
  if (s.chunks == C && s.warps == W && ds_plan<C, W>(a.T, a.K, a.N, kFfn, l, s.stages, pl, grid, smem)) { \
    ok = true;                                                                                            \
    st = launch_dstream<__half, kFfn, C, W>(a, l, pl, grid, smem, label);                                 \
  }
  TK_DS_CASE(8, 16)
  TK_DS_CASE(16, 16)
  TK_DS_CASE(8, 8)
#undef TK_DS_CASE
  if (!ok) return -2;
  std::snprintf(name, name_len, "%s stream %dw %dB x %d stages (%zu KB)", label, s.warps, s.chunks * 16, pl.stages,
                smem / 1024);
  return int(st);
}

}  // namespace tk::tune
