// Host helpers of the C ABI: the RoPE table and the int4 quantiser.
#include <algorithm>
#include <cmath>

#include "core/dtype.h"
#include "core/error.h"
#include "core/validate.h"

extern "C" {

tk_status tk_rope_table(float* cos_table, float* sin_table, int64_t max_pos, int64_t rot_dim,
                        double theta, const tk_rope_scaling* scaling) {
  TK_REQUIRE(cos_table && sin_table, TK_ERR_NULL_POINTER, "rope_table: table pointer is null");
  TK_REQUIRE(max_pos >= 1 && max_pos < (int64_t(1) << 31), TK_ERR_INVALID_ARGUMENT,
             "rope_table: max_pos = %lld is out of range", (long long)max_pos);
  TK_REQUIRE(rot_dim >= 2 && rot_dim % 2 == 0 && rot_dim <= 4096, TK_ERR_INVALID_ARGUMENT,
             "rope_table: rot_dim = %lld must be even and in [2, 4096]", (long long)rot_dim);
  TK_REQUIRE(theta > 1.0 && std::isfinite(theta), TK_ERR_INVALID_ARGUMENT,
             "rope_table: theta = %g must be > 1", theta);
  const bool llama3 = scaling && scaling->llama3;
  if (llama3) {
    TK_REQUIRE(scaling->factor >= 1.0f && scaling->low_freq_factor > 0.0f &&
                   scaling->high_freq_factor > scaling->low_freq_factor &&
                   scaling->original_max_pos > 0,
               TK_ERR_INVALID_ARGUMENT,
               "rope_table: llama3 scaling needs factor >= 1, 0 < low_freq_factor < "
               "high_freq_factor and original_max_pos > 0");
  }
  const int64_t half = rot_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    double inv_freq = std::pow(theta, -2.0 * double(i) / double(rot_dim));
    if (llama3) {
      // Llama 3.1: keep high frequencies, divide low ones by `factor`, blend between.
      const double pi = 3.14159265358979323846;
      const double low_wavelen = double(scaling->original_max_pos) / scaling->low_freq_factor;
      const double high_wavelen = double(scaling->original_max_pos) / scaling->high_freq_factor;
      const double wavelen = 2.0 * pi / inv_freq;
      if (wavelen > low_wavelen) {
        inv_freq /= scaling->factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth =
            (double(scaling->original_max_pos) / wavelen - scaling->low_freq_factor) /
            (double(scaling->high_freq_factor) - scaling->low_freq_factor);
        inv_freq = (1.0 - smooth) * inv_freq / scaling->factor + smooth * inv_freq;
      }
    }
    for (int64_t pos = 0; pos < max_pos; ++pos) {
      const double angle = double(pos) * inv_freq;
      cos_table[pos * half + i] = float(std::cos(angle));
      sin_table[pos * half + i] = float(std::sin(angle));
    }
  }
  return TK_OK;
}

tk_status tk_quantize_int4(tk_dtype src_dtype, const void* w, int64_t w_stride, int64_t N,
                           int64_t K, int64_t group_size, int symmetric, tk_dtype scale_dtype,
                           uint8_t* packed, void* scales, uint8_t* zeros) {
  const char* op = "quantize_int4";
  TK_REQUIRE(src_dtype == TK_F32 || src_dtype == TK_F16 || src_dtype == TK_BF16,
             TK_ERR_UNSUPPORTED, "%s: unsupported source dtype %d", op, int(src_dtype));
  TK_REQUIRE(w && packed && scales, TK_ERR_NULL_POINTER, "%s: w, packed or scales is null", op);
  TK_REQUIRE(symmetric || zeros, TK_ERR_NULL_POINTER, "%s: asymmetric needs zeros", op);
  TK_REQUIRE(N == 1 || w_stride >= K, TK_ERR_INVALID_ARGUMENT,
             "%s: w row stride %lld is smaller than K = %lld", op, (long long)w_stride,
             (long long)K);
  tk_int4_weights desc{packed, scales, zeros, scale_dtype, N, K, group_size};
  TK_TRY(tk::validate_int4_weights(op, "w", desc));
  const int64_t groups = K / group_size;
  for (int64_t n = 0; n < N; ++n) {
    const char* row = static_cast<const char*>(w) + n * w_stride * int64_t(tk::dtype_size(src_dtype));
    for (int64_t g = 0; g < groups; ++g) {
      float lo = INFINITY, hi = -INFINITY, amax = 0.0f;
      for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) {
        const float v = tk::load_as_f32(src_dtype, row, k);
        TK_REQUIRE(std::isfinite(v), TK_ERR_INVALID_ARGUMENT, "%s: w[%lld, %lld] is not finite",
                   op, (long long)n, (long long)k);
        lo = std::min(lo, v);
        hi = std::max(hi, v);
        amax = std::max(amax, std::fabs(v));
      }
      // The zero point is a code in [0, 15], so the range must hold 0: a group
      // of [1.0, 1.1] is quantised over [0, 1.1] rather than clamped to nonsense.
      lo = std::min(lo, 0.0f);
      hi = std::max(hi, 0.0f);
      float scale = symmetric ? amax / 7.0f : (hi - lo) / 15.0f;
      // Quantise with the scale as stored, so that dequantisation matches exactly.
      scale = tk::round_to(scale_dtype, scale);
      int zero = 8;
      if (!symmetric) zero = scale > 0.0f ? int(std::lround(-lo / scale)) : 8;
      zero = std::clamp(zero, 0, 15);
      tk::store_from_f32(scale_dtype, scales, n * groups + g, scale);
      if (zeros) zeros[n * groups + g] = uint8_t(zero);
      for (int64_t k = g * group_size; k < (g + 1) * group_size; k += 2) {
        int q[2];
        for (int j = 0; j < 2; ++j) {
          const float v = tk::load_as_f32(src_dtype, row, k + j);
          const long r = scale > 0.0f ? std::lround(v / scale) : 0;
          q[j] = std::clamp(int(r) + zero, 0, 15);
        }
        packed[n * (K / 2) + k / 2] = uint8_t(q[0] | (q[1] << 4));
      }
    }
  }
  return TK_OK;
}

}  // extern "C"
