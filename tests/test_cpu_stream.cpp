// Sizes around the CPU backend's non-temporal store threshold: rmsnorm and
// swiglu write outputs of 16 MiB and more (kStreamBytes in
// src/cpu/elementwise.cpp) with streaming stores, on rows whose start is
// aligned to the vector, and plain stores elsewhere; rmsnorm requests the
// next row of its task while it writes the current one. The op suites'
// shapes stay far below 16 MiB in f16 / bf16, so these cases put each dtype
// just under, exactly at and just over the threshold, with output rows that
// are all aligned (D a multiple of the vector), aligned one in 16 (odd and
// padded strides), or never (origin shifted by one element). Registered like
// every op suite, so the reference and CUDA run the same cases.
//
// Host allocations of 4 MiB and more take the huge-page path of tk_malloc
// (2 MiB-aligned, madvise'd): HostMemory checks sizes around that threshold.
#include <cstdint>
#include <cstring>

#include "ops.h"

namespace tk::test {
namespace {

constexpr int64_t kStreamElems16 = int64_t(8) << 20;  // 16 MiB of f16 / bf16
constexpr int64_t kStreamElems32 = int64_t(4) << 20;  // 16 MiB of f32

struct Size {
  tk_dtype dtype;
  int64_t T, D;
  Layout layout;
};

std::vector<Size> sizes() {
  static_assert(2048 * 4096 == kStreamElems16 && 1024 * 4096 == kStreamElems32);
  return {
      // Exactly 16 MiB: streamed, every row aligned.
      {TK_F16, 2048, 4096, Layout::Contiguous},
      {TK_F32, 1024, 4096, Layout::Contiguous},
      {TK_BF16, 2048, 4096, Layout::Contiguous},
      // Just over, odd rows (8198-byte f16 rows: one in 16 starts aligned).
      {TK_F16, 2047, 4099, Layout::Contiguous},
      {TK_F32, 1021, 4111, Layout::Odd},
      // Exactly 16 MiB, padded rows (one in 16 aligned) and rows never aligned.
      {TK_F16, 2048, 4096, Layout::Strided},
      {TK_F16, 2048, 4096, Layout::Offset},
      // Just under: plain stores (2046 x 4099 f16 and 1023 x 4097 f32 are < 16 MiB).
      {TK_F16, 2046, 4099, Layout::Contiguous},
      {TK_F32, 1023, 4097, Layout::Contiguous},
  };
}

std::vector<Case> rmsnorm_stream_cases(bool residual) {
  std::vector<Case> cases;
  for (const Size& s : sizes()) {
    RmsnormShape r{s.dtype, s.T, s.D, s.layout, residual};
    cases.push_back({r.name(), [r] { return std::make_unique<RmsnormTest>(r); }});
  }
  // y aliasing x: each row is streamed over itself while the next row is requested.
  RmsnormShape in_place{TK_F16, 2048, 4096, Layout::Contiguous, residual, true};
  cases.push_back({in_place.name(), [in_place] { return std::make_unique<RmsnormTest>(in_place); }});
  return cases;
}
std::vector<Case> rmsnorm_stream_plain() { return rmsnorm_stream_cases(false); }
std::vector<Case> rmsnorm_stream_residual() { return rmsnorm_stream_cases(true); }

std::vector<Case> swiglu_stream_cases() {
  std::vector<Case> cases;
  for (const Size& s : sizes())
    for (bool concat : {false, true}) {
      // gate_up [T, 2F] (tk_swiglu_concat) on the two f16 contiguous sizes only.
      if (concat && !(s.dtype == TK_F16 && s.layout == Layout::Contiguous && s.T >= 2047)) continue;
      SwigluShape w{s.dtype, s.T, s.D, s.layout, concat, s.T % 2 == 1};
      cases.push_back({w.name(), [w] { return std::make_unique<SwigluTest>(w); }});
    }
  return cases;
}

}  // namespace

// Sizes just under, at and over 4 MiB (and an odd one far over): every byte
// is writable and reads back, and the large ones start on a 2 MiB boundary.
TEST(HostMemory, HugePageThreshold) {
  for (tk_backend backend : {TK_BACKEND_CPU, TK_BACKEND_REFERENCE}) {
    std::string why;
    tk_context* ctx = context(backend, &why);
    ASSERT_NE(ctx, nullptr) << why;
    constexpr size_t kMiB = size_t(1) << 20;
    for (size_t bytes : {4 * kMiB - 1, 4 * kMiB, 4 * kMiB + 1, 4 * kMiB + 4097, 9 * kMiB + 333}) {
      void* p = nullptr;
      ASSERT_EQ(tk_malloc(ctx, bytes, &p), TK_OK) << tk_last_error();
      ASSERT_NE(p, nullptr);
      EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 64, 0u) << bytes << " bytes";
      if (bytes >= 4 * kMiB) {
        EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % (2 * kMiB), 0u) << bytes << " bytes";
      }
      unsigned char* b = static_cast<unsigned char*>(p);
      for (size_t i = 0; i < bytes; ++i) b[i] = static_cast<unsigned char>(i * 131 + bytes);
      size_t wrong = 0;
      for (size_t i = 0; i < bytes; ++i) wrong += b[i] != static_cast<unsigned char>(i * 131 + bytes);
      EXPECT_EQ(wrong, 0u) << bytes << " bytes";
      EXPECT_EQ(tk_free(ctx, p), TK_OK);
    }
  }
}

TK_OP_SUITE(RmsnormStream, rmsnorm_stream_plain);
TK_OP_SUITE(RmsnormResidualStream, rmsnorm_stream_residual);
TK_OP_SUITE(SwigluStream, swiglu_stream_cases);

}  // namespace tk::test
