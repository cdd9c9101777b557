#include "harness.h"

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <sstream>

namespace tk::test {

// ----------------------------------------------------------------------------
// Seeds
// ----------------------------------------------------------------------------
namespace {
uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
uint64_t fnv1a(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h;
}
}  // namespace

uint64_t run_seed() {
  static const uint64_t seed = []() -> uint64_t {
    if (const char* env = std::getenv("TK_TEST_SEED"); env && *env)
      return uint64_t(std::strtoull(env, nullptr, 10));
    std::random_device rd;
    return (uint64_t(rd()) << 32 | rd()) % 1000000000ull;  // short enough to type
  }();
  return seed;
}

uint64_t test_seed() {
  const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = info ? std::string(info->test_suite_name()) + "." + info->name() : "";
  return splitmix64(run_seed() ^ fnv1a(name));
}

// ----------------------------------------------------------------------------
// Tensors
// ----------------------------------------------------------------------------
Elem elem_of(tk_dtype d) {
  switch (d) {
    case TK_F32: return Elem::F32;
    case TK_F16: return Elem::F16;
    case TK_BF16: return Elem::BF16;
  }
  return Elem::F32;
}

size_t elem_size(Elem e) {
  switch (e) {
    case Elem::F32: case Elem::I32: return 4;
    case Elem::F16: case Elem::BF16: return 2;
    case Elem::U8: return 1;
  }
  return 1;
}

bool is_float(Elem e) { return e == Elem::F32 || e == Elem::F16 || e == Elem::BF16; }

namespace {
tk_dtype dtype_of(Elem e) { return e == Elem::F16 ? TK_F16 : e == Elem::BF16 ? TK_BF16 : TK_F32; }
}  // namespace

std::vector<int64_t> padded_strides(const std::vector<int64_t>& shape, int64_t pad) {
  std::vector<int64_t> st(shape.size(), 1);
  for (size_t d = shape.size(); d-- > 1;) st[d - 1] = st[d] * shape[d] + pad;
  return st;
}

Tensor::Tensor(std::string name_, Elem elem_, Role role_, std::vector<int64_t> shape_,
               std::vector<int64_t> strides_, int64_t lead_)
    : name(std::move(name_)), elem(elem_), role(role_), shape(std::move(shape_)),
      strides(strides_.empty() ? padded_strides(shape, 0) : std::move(strides_)), lead(lead_) {
  int64_t span = lead + 1;
  bool empty = false;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 0) empty = true;
    span += (shape[d] - 1) * strides[d];
  }
  if (empty) span = lead;
  bytes.assign(size_t(span) * elem_size(elem), kPoison);
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

int64_t Tensor::offset(std::initializer_list<int64_t> idx) const {
  int64_t e = lead;
  size_t d = 0;
  for (int64_t i : idx) e += i * strides[d++];
  return e;
}

double Tensor::get(int64_t e) const {
  switch (elem) {
    case Elem::F32: case Elem::F16: case Elem::BF16:
      return double(load_as_f32(dtype_of(elem), bytes.data(), e));
    case Elem::I32: {
      int32_t v;
      std::memcpy(&v, bytes.data() + e * 4, 4);
      return v;
    }
    case Elem::U8: return bytes[size_t(e)];
  }
  return 0;
}

void Tensor::set(int64_t e, double v) {
  switch (elem) {
    case Elem::F32: case Elem::F16: case Elem::BF16:
      store_from_f32(dtype_of(elem), bytes.data(), e, float(v));
      break;
    case Elem::I32: {
      const int32_t x = int32_t(v);
      std::memcpy(bytes.data() + e * 4, &x, 4);
      break;
    }
    case Elem::U8: bytes[size_t(e)] = uint8_t(v); break;
  }
}

uint16_t Tensor::bits16(int64_t e) const {
  uint16_t v;
  std::memcpy(&v, bytes.data() + e * 2, 2);
  return v;
}

std::vector<char> Tensor::logical_mask() const {
  std::vector<char> m(size_t(span()), 0);
  for_each([&](const std::vector<int64_t>&, int64_t e) { m[size_t(e)] = 1; });
  return m;
}

std::string Tensor::index_string(int64_t e) const {
  // Logical index of span offset e, found by search (only used in messages).
  std::string found;
  for_each([&](const std::vector<int64_t>& idx, int64_t off) {
    if (off != e || !found.empty()) return;
    std::ostringstream os;
    os << "[";
    for (size_t d = 0; d < idx.size(); ++d) os << (d ? ", " : "") << idx[d];
    os << "]";
    found = os.str();
  });
  if (found.empty()) found = "(gap element " + std::to_string(e) + " of the span)";
  return found;
}

void Tensor::fill(Rng& rng, double lo, double hi) {
  for_each([&](const std::vector<int64_t>&, int64_t e) { set(e, rng.uniform(lo, hi)); });
}

// ----------------------------------------------------------------------------
// Running one op
// ----------------------------------------------------------------------------
void* Bound::operator()(const Tensor& t) const {
  for (const auto& [tensor, ptr] : map)
    if (tensor == &t) return ptr;
  ADD_FAILURE() << "tensor " << t.name << " is not part of this run";
  return nullptr;
}

const Tensor& Result::of(const Tensor& t) const {
  for (const Tensor& a : after)
    if (a.name == t.name) return a;
  throw std::runtime_error("no tensor named " + t.name + " in this result");
}

Tensor* OpTest::add(Tensor t) {
  storage_.push_back(std::move(t));
  tensors.push_back(&storage_.back());
  return &storage_.back();
}

namespace {

// Guard bytes on each side of every buffer. A multiple of 256, so the logical
// origin keeps the allocator's alignment (cudaMalloc gives 256 bytes); large
// enough to catch a kernel that writes a whole extra row or tile.
constexpr size_t kGuard = 4096;
constexpr int kMaxReports = 3;

void check_guard(const Tensor& t, const std::vector<uint8_t>& staging, size_t begin, size_t end,
                 const char* side) {
  for (size_t i = begin; i < end; ++i) {
    if (staging[i] != kPoison) {
      const long long dist = side[0] == 'b' ? (long long)(end - i) : (long long)(i - begin + 1);
      ADD_FAILURE() << "out-of-bounds write " << side << " " << t.name << ": byte " << dist
                    << " " << side << " the buffer was changed (0x" << std::hex
                    << int(staging[i]) << std::dec << ")";
      return;
    }
  }
}

}  // namespace

Result execute(tk_context* ctx, OpTest& op) {
  Result r;
  std::vector<void*> bases(op.tensors.size(), nullptr);
  std::vector<std::vector<uint8_t>> staging(op.tensors.size());
  Bound b;
  bool ok = true;
  for (size_t i = 0; i < op.tensors.size() && ok; ++i) {
    const Tensor& t = *op.tensors[i];
    auto& s = staging[i];
    s.assign(t.bytes.size() + 2 * kGuard, kPoison);
    if (!t.bytes.empty()) std::memcpy(s.data() + kGuard, t.bytes.data(), t.bytes.size());
    if (tk_malloc(ctx, s.size(), &bases[i]) != TK_OK ||
        tk_memcpy_to_device(ctx, bases[i], s.data(), s.size()) != TK_OK) {
      ADD_FAILURE() << "allocating " << s.size() << " bytes for " << t.name << ": "
                    << tk_last_error();
      ok = false;
      break;
    }
    b.map.emplace_back(&t, static_cast<char*>(bases[i]) + kGuard + t.lead * elem_size(t.elem));
  }
  if (ok) {
    r.status = op.run(ctx, b);
    r.message = r.status == TK_OK ? "" : tk_last_error();
    if (tk_synchronize(ctx) != TK_OK) ADD_FAILURE() << "tk_synchronize: " << tk_last_error();
  } else {
    r.status = TK_ERR_BACKEND;
    r.message = "harness could not set up the buffers";
  }
  for (size_t i = 0; i < op.tensors.size(); ++i) {
    const Tensor& t = *op.tensors[i];
    Tensor a = t;
    if (bases[i]) {
      auto& s = staging[i];
      if (tk_memcpy_to_host(ctx, s.data(), bases[i], s.size()) != TK_OK)
        ADD_FAILURE() << "downloading " << t.name << ": " << tk_last_error();
      check_guard(t, s, 0, kGuard, "before");
      check_guard(t, s, kGuard + t.bytes.size(), s.size(), "after");
      if (!t.bytes.empty()) std::memcpy(a.bytes.data(), s.data() + kGuard, t.bytes.size());
      tk_free(ctx, bases[i]);
    }
    if (t.role != Role::Scratch && a.bytes != t.bytes) {
      const std::vector<char> mask = t.logical_mask();
      const size_t es = elem_size(t.elem);
      int reports = 0;
      for (int64_t e = 0; e < t.span() && reports < kMaxReports; ++e) {
        const bool changed = std::memcmp(&a.bytes[e * es], &t.bytes[e * es], es) != 0;
        if (!changed) continue;
        if (!mask[size_t(e)]) {
          ADD_FAILURE() << t.name << ": element " << e
                        << " of its span lies between rows (a gap of the strides) and was "
                           "written";
          ++reports;
        } else if (t.role == Role::In) {
          ADD_FAILURE() << "input " << t.name << " was modified at " << t.index_string(e)
                        << ": " << t.get(e) << " -> " << a.get(e);
          ++reports;
        }
      }
    }
    r.after.push_back(std::move(a));
  }
  return r;
}

void expect_written(const OpTest& op, const Result& r) {
  for (size_t i = 0; i < op.tensors.size(); ++i) {
    const Tensor& t = *op.tensors[i];
    if (t.role != Role::Out || !is_float(t.elem)) continue;
    const Tensor& a = r.after[i];
    int64_t nan = 0, first = -1;
    a.for_each([&](const std::vector<int64_t>&, int64_t e) {
      if (std::isnan(a.get(e))) {
        if (first < 0) first = e;
        ++nan;
      }
    });
    if (nan)
      ADD_FAILURE() << t.name << ": " << nan << " of " << t.numel()
                    << " elements are NaN (unwritten: still the poison, or computed as NaN); first at "
                    << t.index_string(first);
  }
}

void expect_untouched(const OpTest& op, const Result& r) {
  for (size_t i = 0; i < op.tensors.size(); ++i) {
    const Tensor& t = *op.tensors[i];
    if (t.role == Role::Scratch) continue;
    EXPECT_TRUE(r.after[i].bytes == t.bytes)
        << t.name << " was changed by a call that returned " << tk_status_string(r.status)
        << " (validation must come before any work)";
  }
}

// ----------------------------------------------------------------------------
// Contexts
// ----------------------------------------------------------------------------
namespace {
struct Slot {
  tk_context* ctx = nullptr;
  std::string why;
  bool tried = false;
};
std::map<tk_backend, Slot>& slots() {
  static std::map<tk_backend, Slot> s;
  return s;
}

class ContextEnvironment : public ::testing::Environment {
 public:
  void TearDown() override {
    for (auto& [kind, slot] : slots()) {
      if (slot.ctx) tk_context_destroy(slot.ctx);
      slot = Slot{};
    }
  }
};
}  // namespace

tk_context* context(tk_backend backend, std::string* why) {
  Slot& s = slots()[backend];
  if (!s.tried) {
    s.tried = true;
    if (tk_context_create(backend, 0, &s.ctx) != TK_OK) {
      s.ctx = nullptr;
      s.why = std::string(backend_label(backend)) + " backend unavailable: " + tk_last_error();
    }
  }
  if (!s.ctx && why) *why = s.why;
  return s.ctx;
}

const char* backend_label(tk_backend b) {
  switch (b) {
    case TK_BACKEND_CPU: return "Cpu";
    case TK_BACKEND_CUDA: return "Cuda";
    case TK_BACKEND_REFERENCE: return "Reference";
    case TK_BACKEND_DEFAULT: return "Default";
  }
  return "Unknown";
}

// ----------------------------------------------------------------------------
// Comparison
// ----------------------------------------------------------------------------
Tol tolerance(OpKind op, tk_dtype d) {
  // One output rounding is up to 1 ulp apart from the reference's (2^-10 relative in
  // f16, 2^-7 in bf16) when the f32 result lands across a rounding midpoint; long
  // reductions may also round their intermediates (the normalised rmsnorm row,
  // dot products fed to tensor cores) to the activation type.
  switch (op) {
    case OpKind::Elementwise:
      if (d == TK_F32) return {1e-5, 1e-5, 1e-6};
      if (d == TK_F16) return {1e-3, 2e-3, 5e-4};
      return {8e-3, 1.6e-2, 4e-3};
    case OpKind::Matmul:
      if (d == TK_F32) return {3e-5, 3e-5, 1e-5};
      if (d == TK_F16) return {2e-3, 3e-3, 1e-3};
      return {1.2e-2, 2e-2, 6e-3};
    case OpKind::Attention:  // f16 / bf16 use compare_within_lowp
      if (d == TK_F32) return {5e-5, 5e-5, 2e-5};
      if (d == TK_F16) return {2e-3, 3e-3, 1e-3};
      return {1.2e-2, 2e-2, 6e-3};
  }
  return {0, 0, 0};
}

namespace {
std::string fmt(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}
}  // namespace

::testing::AssertionResult compare_close(const Tensor& out, const Tensor& ref, Tol tol,
                                         double scale_floor) {
  double ss = 0;
  int64_t n = 0;
  ref.for_each([&](const std::vector<int64_t>&, int64_t e) {
    const double r = ref.get(e);
    if (std::isfinite(r)) ss += r * r, ++n;
  });
  const double scale = std::max(n ? std::sqrt(ss / double(n)) : 0.0, scale_floor);
  double worst = 0, diff2 = 0;
  int64_t worst_e = -1, over = 0, nan = 0, first_nan = -1, bad_inf = -1, ref_nan = -1;
  ref.for_each([&](const std::vector<int64_t>&, int64_t e) {
    const double r = ref.get(e), o = out.get(e);
    if (std::isnan(r)) {
      if (ref_nan < 0) ref_nan = e;
      return;
    }
    if (std::isnan(o)) {
      if (first_nan < 0) first_nan = e;
      ++nan;
      return;
    }
    if (std::isinf(r) || std::isinf(o)) {
      if (o != r && bad_inf < 0) bad_inf = e;
      return;
    }
    const double d = std::fabs(o - r);
    const double denom = tol.atol * scale + tol.rtol * std::fabs(r);
    const double err = d == 0 ? 0 : denom > 0 ? d / denom : INFINITY;
    diff2 += d * d;
    if (err > 1) ++over;
    if (err > worst) worst = err, worst_e = e;
  });
  const double nerr = n ? std::sqrt(diff2 / double(n)) / scale : 0.0;
  std::ostringstream os;
  bool fail = false;
  if (ref_nan >= 0) fail = true, os << "\n  the reference itself is NaN at " << ref.index_string(ref_nan);
  if (nan) fail = true, os << "\n  " << nan << " NaN elements, first at " << out.index_string(first_nan);
  if (bad_inf >= 0)
    fail = true, os << "\n  infinity mismatch at " << out.index_string(bad_inf) << ": got "
                    << out.get(bad_inf) << " want " << ref.get(bad_inf);
  if (worst > 1) {
    fail = true;
    const double o = out.get(worst_e), r = ref.get(worst_e);
    os << "\n  " << over << " of " << ref.numel() << " elements out of tolerance; worst at "
       << out.index_string(worst_e) << ": got " << fmt(o) << " want " << fmt(r) << " (|diff| "
       << fmt(std::fabs(o - r)) << ", error " << fmt(worst) << " x the allowed atol*rms "
       << fmt(tol.atol) << "*" << fmt(scale) << " + rtol " << fmt(tol.rtol) << "*|ref|)";
  }
  if (n >= 64 && nerr > tol.nerr) fail = true, os << "\n  normalised error " << fmt(nerr) << " > " << fmt(tol.nerr);
  if (fail) return ::testing::AssertionFailure() << out.name << " differs from the reference:" << os.str();
  return ::testing::AssertionSuccess() << out.name << ": max error " << fmt(worst)
                                       << ", normalised " << fmt(nerr);
}

::testing::AssertionResult compare_within_lowp(const Tensor& out, const Tensor& ref,
                                               const Tensor& lowp, tk_dtype d) {
  double err_out = 0, err_lowp = 0, atol_d = 0;
  int64_t worst_e = -1, nan = 0, first_nan = -1, bad_inf = -1;
  ref.for_each([&](const std::vector<int64_t>&, int64_t e) {
    const double r = ref.get(e), o = out.get(e), l = lowp.get(e);
    if (std::isnan(o) || std::isnan(r)) {
      if (first_nan < 0) first_nan = e;
      ++nan;
      return;
    }
    if (std::isinf(r) || std::isinf(o)) {
      if (o != r && bad_inf < 0) bad_inf = e;
      return;
    }
    // As FlashAttention's tests: the dtype's own rounding error at this magnitude.
    const double shifted = round_to(d, float(round_to(d, float(r + 0.3)) - 0.3f));
    atol_d = std::max(atol_d, 2 * std::fabs(shifted - r));
    if (std::isfinite(l)) err_lowp = std::max(err_lowp, std::fabs(l - r));
    if (std::fabs(o - r) > err_out) err_out = std::fabs(o - r), worst_e = e;
  });
  const double bound = 2 * err_lowp + atol_d;
  std::ostringstream os;
  bool fail = false;
  if (nan) fail = true, os << "\n  " << nan << " NaN elements, first at " << out.index_string(first_nan);
  if (bad_inf >= 0)
    fail = true, os << "\n  infinity mismatch at " << out.index_string(bad_inf) << ": got "
                    << out.get(bad_inf) << " want " << ref.get(bad_inf);
  if (err_out > bound) {
    fail = true;
    os << "\n  max |out - ref| = " << fmt(err_out) << " at " << out.index_string(worst_e)
       << " (got " << fmt(out.get(worst_e)) << " want " << fmt(ref.get(worst_e))
       << ") exceeds 2 x " << fmt(err_lowp) << " (a plain " << tk_dtype_name(d)
       << " implementation's error) + " << fmt(atol_d);
  }
  if (fail) return ::testing::AssertionFailure() << out.name << " differs from the reference:" << os.str();
  return ::testing::AssertionSuccess() << out.name << ": max error " << fmt(err_out) << " <= "
                                       << fmt(bound);
}

// ----------------------------------------------------------------------------
// Driver
// ----------------------------------------------------------------------------
Verdict check_against_reference(tk_backend backend, OpTest& op, uint64_t seed) {
  std::string why;
  tk_context* ctx = context(backend, &why);
  if (!ctx) return {false, why};
  tk_context* ref = context(TK_BACKEND_REFERENCE, &why);
  if (!ref) {
    ADD_FAILURE() << why;
    return {};
  }
  Rng rng(seed);
  op.backend = backend;
  op.build(rng);
  const Result want = execute(ref, op);
  if (want.status != TK_OK) {
    ADD_FAILURE() << "the reference rejected a valid case: " << tk_status_string(want.status)
                  << ": " << want.message;
    return {};
  }
  expect_written(op, want);
  const Result got = execute(ctx, op);
  if (got.status == TK_ERR_UNSUPPORTED) {
    expect_untouched(op, got);
    return {false, got.message};
  }
  if (got.status != TK_OK) {
    ADD_FAILURE() << backend_label(backend) << " failed on a valid case: "
                  << tk_status_string(got.status) << ": " << got.message;
    return {};
  }
  if (tk_check_device_errors(ctx) != TK_OK)
    ADD_FAILURE() << "device error flag raised on valid input: " << tk_last_error();
  expect_written(op, got);
  op.compare(got, want);
  return {};
}

std::string case_name(const ::testing::TestParamInfo<CaseParam>& info) {
  return std::get<1>(info.param).name;
}

void OpSuite::RunCase() {
  const auto& [backend, c] = GetParam();
  std::string why;
  if (!context(backend, &why)) GTEST_SKIP() << why;
  const uint64_t seed = test_seed();
  Verdict v;
  {
    SCOPED_TRACE("case " + c.name + ", seed " + std::to_string(seed) +
                 " (replay the run with TK_TEST_SEED=" + std::to_string(run_seed()) + ")");
    std::unique_ptr<OpTest> op = c.make();
    v = check_against_reference(backend, *op, seed);
  }
  if (!v.supported) GTEST_SKIP() << v.why;
}

std::vector<Case> cases_for(tk_backend backend, const std::vector<Case>& all) {
  if (backend == TK_BACKEND_CUDA) return all;
  std::vector<Case> out;
  for (const Case& c : all)
    if (c.make()->cost() <= kHostCostLimit) out.push_back(c);
  return out;
}

LayoutSpec layout_spec(Layout l) {
  switch (l) {
    case Layout::Contiguous: return {0, 0, ""};
    case Layout::Strided: return {8, 0, "_strided"};
    case Layout::Odd: return {3, 0, "_odd"};
    case Layout::Offset: return {0, 1, "_offset"};
  }
  return {0, 0, ""};
}

std::string tag(tk_dtype d) { return tk_dtype_name(d); }
std::string tag(const char* prefix, int64_t v) { return prefix + std::to_string(v); }

double silu(double g) { return g / (1.0 + std::exp(-g)); }

}  // namespace tk::test

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  ::testing::AddGlobalTestEnvironment(new tk::test::ContextEnvironment);
  std::printf("tk_tests: run seed %" PRIu64 " (TK_TEST_SEED=%" PRIu64 " replays these inputs)\n",
              tk::test::run_seed(), tk::test::run_seed());
  return RUN_ALL_TESTS();
}
