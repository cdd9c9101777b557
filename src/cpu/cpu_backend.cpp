// CPU backend (placeholder until the SIMD kernels land).
#include "core/backend.h"

namespace tk {
namespace {
class CpuBackend final : public HostBackend {
 public:
  tk_backend kind() const override { return TK_BACKEND_CPU; }
  const char* name() const override { return "cpu"; }
  const char* device_name() const override { return "cpu"; }
};
}  // namespace
std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }
}  // namespace tk
