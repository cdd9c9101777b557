// Host-only Monte-Carlo (g++ -O2 ffn_tol_sim.cpp; ./a.out T D F bf16? trials): how often
// fused_ffn outputs computed from B = x * nw rounded to the dtype (one plane) or
// from hi + lo planes fail the tests' two comparators (test_matmul.cpp:
// compare_within_lowp for dense f16/bf16, compare_close for int4).
// Monte-Carlo of the fused_ffn comparators: dense (compare_within_lowp rule) and
// int4-like (compare_close with the matmul tolerance), for the B roundings.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <cstdint>
#include <random>
#include <vector>
#include <algorithm>
static float rbf16(float v) { uint32_t u; std::memcpy(&u, &v, 4); u += 0x7FFF + ((u >> 16) & 1); u &= 0xFFFF0000u; float r; std::memcpy(&r, &u, 4); return r; }
static float rf16(float v) {  // round to f16 (normal range) via frexp
  if (v == 0) return 0; int e; double m = std::frexp(double(v), &e);  // v = m 2^e, 0.5<=|m|<1
  double q = std::nearbyint(m * 2048.0) / 2048.0; return float(std::ldexp(q, e)); }
static float rd(bool bf, float v) { return bf ? rbf16(v) : rf16(v); }
int main(int argc, char** argv) {
  const int T = atoi(argv[1]), D = atoi(argv[2]), F = atoi(argv[3]); const bool bf = atoi(argv[4]); const int trials = atoi(argv[5]);
  std::mt19937_64 rng(1);
  std::uniform_real_distribution<double> U(0, 1);
  int fail_hilo_lowp = 0; double worst_hilo_lowp = 0;
  int fail_old_lowp = 0, fail_new_lowp = 0, fail_old_close = 0, fail_hilo_close = 0;
  double worst_old_close = 0, worst_hilo_close = 0, worst_new_lowp = 0, worst_old_lowp = 0;
  const double atol = bf ? 1.2e-2 : 2e-3, rtol = bf ? 2e-2 : 3e-3;
  for (int tr = 0; tr < trials; ++tr) {
    std::vector<float> x(T * D), nw(D), wg(F * D), wu(F * D);
    for (auto& v : x) v = rd(bf, float(-3 + 6 * U(rng)));
    for (auto& v : nw) v = rd(bf, float(0.5 + U(rng)));
    const double range = 2.0 / std::sqrt(double(D));
    for (auto& v : wg) v = rd(bf, float(-range + 2 * range * U(rng)));
    for (auto& v : wu) v = rd(bf, float(-range + 2 * range * U(rng)));
    std::vector<double> ref(T * F), emu(T * F), o_old(T * F), o_new(T * F), o_hilo(T * F);
    for (int t = 0; t < T; ++t) {
      double ss = 0; float ssf = 0;
      for (int k = 0; k < D; ++k) ss += double(x[t * D + k]) * x[t * D + k], ssf = std::fma(x[t*D+k], x[t*D+k], ssf);
      const double inv = 1.0 / std::sqrt(ss / D + 1e-5);
      const float invf = 1.0f / std::sqrt(ssf / float(D) + 1e-5f);
      std::vector<float> h(D), bold(D), bnew(D), bhi(D), blo(D);
      for (int k = 0; k < D; ++k) {
        h[k] = rd(bf, float(x[t * D + k] * inv * nw[k]));
        bold[k] = rd(bf, x[t * D + k] * nw[k]);
        bnew[k] = rd(bf, x[t * D + k] * invf * nw[k]);
        const float p = x[t * D + k] * nw[k];
        bhi[k] = rd(bf, p); blo[k] = rd(bf, p - bhi[k]);
      }
      for (int f = 0; f < F; ++f) {
        double g = 0, u = 0, gr = 0, ur = 0, go = 0, uo = 0, gn = 0, un = 0, gh = 0, uh = 0;
        for (int k = 0; k < D; ++k) {
          const double a = wg[f * D + k], b = wu[f * D + k];
          const double xn = double(x[t * D + k]) * inv * nw[k];
          gr += a * xn; ur += b * xn;
          g += h[k] * a; u += h[k] * b;
          go += bold[k] * a; uo += bold[k] * b;
          gn += bnew[k] * a; un += bnew[k] * b;
          gh += (double(bhi[k]) + blo[k]) * a; uh += (double(bhi[k]) + blo[k]) * b;
        }
        auto sw = [](double gg, double uu) { return gg / (1 + std::exp(-gg)) * uu; };
        ref[t * F + f] = sw(gr, ur);
        const float gq = rd(bf, float(g)), uq = rd(bf, float(u));
        emu[t * F + f] = rd(bf, float(sw(gq, uq)));
        o_old[t * F + f] = rd(bf, float(sw(float(go) * invf, float(uo) * invf)));
        o_new[t * F + f] = rd(bf, float(sw(float(gn), float(un))));
        o_hilo[t * F + f] = rd(bf, float(sw(float(gh) * invf, float(uh) * invf)));
      }
    }
    // compare_within_lowp
    double err_lowp = 0, atol_d = 0, e_old = 0, e_new = 0, rss = 0, e_hl = 0;
    for (int i = 0; i < T * F; ++i) {
      const double r = ref[i];
      const double shifted = rd(bf, float(rd(bf, float(r + 0.3)) - 0.3f));
      atol_d = std::max(atol_d, 2 * std::fabs(shifted - r));
      err_lowp = std::max(err_lowp, std::fabs(emu[i] - r));
      e_old = std::max(e_old, std::fabs(o_old[i] - r));
      e_new = std::max(e_new, std::fabs(o_new[i] - r));
      e_hl = std::max(e_hl, std::fabs(o_hilo[i] - r));
      rss += r * r;
    }
    const double bound = 2 * err_lowp + atol_d;
    if (e_old > bound) ++fail_old_lowp;
    if (e_new > bound) ++fail_new_lowp;
    if (e_hl > bound) ++fail_hilo_lowp;
    worst_hilo_lowp = std::max(worst_hilo_lowp, e_hl / bound);
    worst_old_lowp = std::max(worst_old_lowp, e_old / bound);
    worst_new_lowp = std::max(worst_new_lowp, e_new / bound);
    // compare_close, scale floor 0.1
    const double scale = std::max(std::sqrt(rss / (T * F)), 0.1);
    double wo = 0, wh = 0;
    for (int i = 0; i < T * F; ++i) {
      const double allowed = atol * scale + rtol * std::fabs(ref[i]);
      wo = std::max(wo, std::fabs(o_old[i] - ref[i]) / allowed);
      wh = std::max(wh, std::fabs(o_hilo[i] - ref[i]) / allowed);
    }
    if (wo > 1) ++fail_old_close;
    if (wh > 1) ++fail_hilo_close;
    worst_old_close = std::max(worst_old_close, wo);
    worst_hilo_close = std::max(worst_hilo_close, wh);
  }
  std::printf("T%d D%d F%d %s, %d trials: lowp rule: B=x*nw fails %d (worst %.2fx), B=x*inv*nw fails %d (worst %.2fx) | close rule: one plane fails %d (worst %.2fx), hi+lo fails %d (worst %.2fx)\n",
              T, D, F, bf ? "bf16" : "f16", trials, fail_old_lowp, worst_old_lowp, fail_new_lowp, worst_new_lowp,
              fail_old_close, worst_old_close, fail_hilo_close, worst_hilo_close);
  std::printf("   lowp rule, hi+lo: fails %d (worst %.2fx)\n", fail_hilo_lowp, worst_hilo_lowp);
}
