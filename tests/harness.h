// The test harness shared by every op test (in the spirit of llama.cpp's
// test-backend-ops): host tensors with explicit strides, a device twin per run
// with NaN-poisoned outputs and guard regions, one C ABI call on any backend,
// and comparison against the reference backend on the same inputs.
//
//   OpTest::build()   makes the host tensors (fresh random inputs).
//   OpTest::run()     makes one C ABI call with device pointers of a context.
//   OpTest::compare() checks the backend's tensors against the reference's.
//   check_against_reference() drives the three on one backend.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "core/dtype.h"
#include "tiny_kernel/tiny_kernel.h"

namespace tk::test {

// ----------------------------------------------------------------------------
// Random numbers: one generator per test, seeded from the run seed and the
// test's full name, so that every case gets its own inputs and every run new
// ones; TK_TEST_SEED=<n> replays a run.
// ----------------------------------------------------------------------------
class Rng {
 public:
  explicit Rng(uint64_t seed) : g_(seed) {}
  double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(g_); }
  int64_t range(int64_t lo, int64_t hi) {  // inclusive
    return std::uniform_int_distribution<int64_t>(lo, hi)(g_);
  }
  template <class T>
  void shuffle(std::vector<T>& v) {
    std::shuffle(v.begin(), v.end(), g_);
  }

 private:
  std::mt19937_64 g_;
};

uint64_t run_seed();
// Seed of the running test: run_seed() mixed with the test's full name.
uint64_t test_seed();

// ----------------------------------------------------------------------------
// Tensors
// ----------------------------------------------------------------------------
enum class Elem : uint8_t { F32, F16, BF16, I32, U8 };
Elem elem_of(tk_dtype d);
size_t elem_size(Elem e);
bool is_float(Elem e);

enum class Role : uint8_t {
  In,       // read only: must be bit-identical afterwards
  Out,      // every element written: poisoned with NaN before the call
  InOut,    // updated in place (rope, residual, KV cache): compared with the reference
  Scratch,  // workspace: only its guards are checked
};

// Every byte of a tensor's span starts as 0xFF: NaN in f32, f16 and bf16, so an
// output element left unwritten, or a gap or guard element read by mistake,
// shows up as NaN. Guards around each device buffer hold the same bytes.
constexpr uint8_t kPoison = 0xFF;

// A host tensor: logical shape, strides in elements, and `lead` elements of
// padding before the logical origin (to misalign it, e.g. by one element, and
// so push kernels off their wide-load path). The span covers lead + every
// element the strides reach; elements between rows (gaps) are never logical.
class Tensor {
 public:
  Tensor(std::string name, Elem elem, Role role, std::vector<int64_t> shape,
         std::vector<int64_t> strides = {}, int64_t lead = 0);

  std::string name;
  Elem elem;
  Role role;
  std::vector<int64_t> shape, strides;
  int64_t lead;
  std::vector<uint8_t> bytes;  // the span, lead included

  int64_t numel() const;
  int64_t span() const { return int64_t(bytes.size() / elem_size(elem)); }
  int64_t stride(size_t dim) const { return strides.at(dim); }
  // Element offset (from the start of the span) of a logical index.
  int64_t offset(std::initializer_list<int64_t> idx) const;

  double get(int64_t e) const;        // float elements as f32 -> double
  void set(int64_t e, double v);      // rounded to the element type
  double at(std::initializer_list<int64_t> idx) const { return get(offset(idx)); }
  void put(std::initializer_list<int64_t> idx, double v) { set(offset(idx), v); }
  int32_t* i32() { return reinterpret_cast<int32_t*>(bytes.data()) + lead; }
  const int32_t* i32() const { return reinterpret_cast<const int32_t*>(bytes.data()) + lead; }
  uint8_t* u8() { return bytes.data() + lead; }
  const uint8_t* u8() const { return bytes.data() + lead; }
  uint16_t bits16(int64_t e) const;

  // Calls f(idx, e) for each logical element: idx its index (rank entries), e its offset.
  template <class F>
  void for_each(F&& f) const {
    const size_t rank = shape.size();
    for (int64_t s : shape)
      if (s == 0) return;
    std::vector<int64_t> idx(rank, 0);
    for (;;) {
      int64_t e = lead;
      for (size_t d = 0; d < rank; ++d) e += idx[d] * strides[d];
      f(static_cast<const std::vector<int64_t>&>(idx), e);
      size_t d = rank;
      while (d > 0) {
        if (++idx[d - 1] < shape[d - 1]) break;
        idx[d - 1] = 0;
        --d;
      }
      if (d == 0) return;
    }
  }
  std::vector<char> logical_mask() const;  // per span element: 1 where logical
  std::string index_string(int64_t e) const;  // "[t, h, c]" of a span offset, or "gap +e"

  // Fills every logical float element with uniform(lo, hi), rounded to the type.
  void fill(Rng& rng, double lo, double hi);
};

// Row-major strides of `shape` with `pad` extra elements added to each
// non-innermost stride (pad 0: contiguous). Pads compound outward so that no
// two logical elements overlap.
std::vector<int64_t> padded_strides(const std::vector<int64_t>& shape, int64_t pad);

// ----------------------------------------------------------------------------
// One op run through the C ABI
// ----------------------------------------------------------------------------
// Device pointers of the tensors of one run (at each tensor's logical origin).
class Bound {
 public:
  void* operator()(const Tensor& t) const;
  void* operator()(const Tensor* t) const { return t ? (*this)(*t) : nullptr; }
  std::vector<std::pair<const Tensor*, void*>> map;
};

// What a run left behind: status, message and every tensor as downloaded.
struct Result {
  tk_status status = TK_OK;
  std::string message;
  std::vector<Tensor> after;  // same order as OpTest::tensors
  const Tensor& of(const Tensor& t) const;
  const Tensor& of(const Tensor* t) const { return of(*t); }
};

class OpTest {
 public:
  virtual ~OpTest() = default;
  virtual void build(Rng& rng) = 0;
  virtual tk_status run(tk_context* ctx, const Bound& b) = 0;
  virtual void compare(const Result& out, const Result& ref) const = 0;
  // Problem size in multiply-adds of the reference, to keep the suite fast.
  virtual double cost() const { return 0; }

  std::vector<Tensor*> tensors;
  // The backend under test, set before build() (workspace sizes depend on it).
  tk_backend backend = TK_BACKEND_REFERENCE;

  Tensor* add(Tensor t);  // keeps t (at a stable address) and lists it in `tensors`

 private:
  std::deque<Tensor> storage_;
};

// OpTest of an op with params struct P: `mutate` edits the params just before
// the call, which is how the bad-input suite breaks one argument at a time.
template <class P>
class OpTestOf : public OpTest {
 public:
  std::function<void(P&)> mutate;
  virtual P params(const Bound& b) const = 0;
  virtual tk_status call(tk_context* ctx, const P& p) const = 0;
  tk_status run(tk_context* ctx, const Bound& b) override {
    P p = params(b);
    if (mutate) mutate(p);
    return call(ctx, p);
  }
};

// Uploads every tensor into a fresh tk_malloc'd buffer with guard regions,
// calls op.run, downloads. Adds a failure for any guard byte changed, any gap
// element changed, or any In tensor changed.
Result execute(tk_context* ctx, OpTest& op);
// Adds a failure for each Out float element that is still NaN.
void expect_written(const OpTest& op, const Result& r);
// Adds a failure unless every non-scratch tensor is bit-identical to before the call.
void expect_untouched(const OpTest& op, const Result& r);

// ----------------------------------------------------------------------------
// Contexts: one per backend kind, shared by all tests of the process.
// ----------------------------------------------------------------------------
// nullptr with `why` set when the backend cannot be created (no GPU, not built).
tk_context* context(tk_backend backend, std::string* why);
const char* backend_label(tk_backend b);  // "Cpu", "Cuda", "Reference"

// ----------------------------------------------------------------------------
// Comparison
// ----------------------------------------------------------------------------
// Element error e = |out - ref| / (atol * S + rtol * |ref|), with S the RMS of
// the reference over the tensor, at least `scale_floor` (the magnitude the
// op's inputs make typical, so that an output that cancels to near zero is
// judged against the size of what was summed, not against itself). Passes
// when max e <= 1 and, over tensors of 64 elements or more (enough for the
// statistic to mean something), the normalised error
// sqrt(sum (out-ref)^2 / (n S^2)) <= nerr: a systematic error that every
// element hides under rtol. NaN never passes; an infinite reference must be
// matched exactly.
struct Tol {
  double atol, rtol, nerr;
};
enum class OpKind { Elementwise, Matmul, Attention };
Tol tolerance(OpKind op, tk_dtype d);

::testing::AssertionResult compare_close(const Tensor& out, const Tensor& ref, Tol tol,
                                         double scale_floor = 1e-3);
// FlashAttention's bound: max |out - ref| <= 2 * max |lowp - ref| + atol_d,
// where lowp is a plain low-precision implementation and atol_d the rounding
// error of the dtype at the reference's magnitude. NaN never passes.
::testing::AssertionResult compare_within_lowp(const Tensor& out, const Tensor& ref,
                                               const Tensor& lowp, tk_dtype d);

// ----------------------------------------------------------------------------
// The driver
// ----------------------------------------------------------------------------
struct Verdict {
  bool supported = true;
  std::string why;  // when not supported: the backend's message
};
// Builds op's inputs from `seed`, runs it on `backend` and on the reference,
// checks guards, gaps, that outputs were written and that no device error was
// raised, then compares. Failures are added to the running test.
Verdict check_against_reference(tk_backend backend, OpTest& op, uint64_t seed);

// A named factory of an op test: the parameter of the op suites.
struct Case {
  std::string name;
  std::function<std::unique_ptr<OpTest>()> make;
};
inline void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

using CaseParam = std::tuple<tk_backend, Case>;
std::string case_name(const ::testing::TestParamInfo<CaseParam>& info);

class OpSuite : public ::testing::TestWithParam<CaseParam> {
 protected:
  // Runs the case; skips (with the backend's reason) when the backend cannot run it.
  void RunCase();
};

// Host backends run the reference in plain double loops: cases above this many
// multiply-adds are registered for CUDA only, to keep the CPU suite fast (also
// under ASan).
constexpr double kHostCostLimit = 3e7;
std::vector<Case> cases_for(tk_backend backend, const std::vector<Case>& all);

// Registers one op suite on every backend. Test names carry the backend first
// (Cpu/..., Cuda/..., Reference/...) so --gtest_filter=*Cuda* picks the GPU.
// The Reference instantiation runs the oracle against itself: it checks that
// the reference writes every output element and nothing else.
#define TK_OP_SUITE(Suite, cases_fn)                                                        \
  class Suite : public ::tk::test::OpSuite {};                                              \
  TEST_P(Suite, MatchesReference) { RunCase(); }                                            \
  INSTANTIATE_TEST_SUITE_P(Cpu, Suite,                                                      \
                           ::testing::Combine(::testing::Values(TK_BACKEND_CPU),            \
                                              ::testing::ValuesIn(::tk::test::cases_for(       \
                                                  TK_BACKEND_CPU, cases_fn()))),            \
                           ::tk::test::case_name);                                          \
  INSTANTIATE_TEST_SUITE_P(Cuda, Suite,                                                     \
                           ::testing::Combine(::testing::Values(TK_BACKEND_CUDA),           \
                                              ::testing::ValuesIn(cases_fn())),             \
                           ::tk::test::case_name);                                          \
  INSTANTIATE_TEST_SUITE_P(Reference, Suite,                                                \
                           ::testing::Combine(::testing::Values(TK_BACKEND_REFERENCE),      \
                                              ::testing::ValuesIn(::tk::test::cases_for(       \
                                                  TK_BACKEND_REFERENCE, cases_fn()))),      \
                           ::tk::test::case_name)

// ----------------------------------------------------------------------------
// Small helpers for op tests
// ----------------------------------------------------------------------------
// Memory layouts every op is swept over: kernels pick wide (16-byte) loads only
// when pointers and strides allow, so each path needs its own inputs.
enum class Layout {
  Contiguous,
  Strided,  // rows padded by 8 elements: not contiguous, still 16-byte aligned rows
  Odd,      // rows padded by 3 elements: rows start misaligned for wide loads
  Offset,   // contiguous, origin shifted by one element
};
struct LayoutSpec {
  int64_t pad, lead;
  const char* tag;  // suffix of case names
};
LayoutSpec layout_spec(Layout l);
constexpr Layout kLayouts[] = {Layout::Contiguous, Layout::Strided, Layout::Odd, Layout::Offset};
constexpr tk_dtype kDtypes[] = {TK_F32, TK_F16, TK_BF16};

// Case name fragments: "f16", "T3".
std::string tag(tk_dtype d);
std::string tag(const char* prefix, int64_t v);

double silu(double g);

}  // namespace tk::test
