// Linked when the CUDA backend is not built.
#include "core/backend.h"
#include "core/error.h"

namespace tk {
bool cuda_available() { return false; }
std::unique_ptr<Backend> make_cuda_backend(int) {
  fail(TK_ERR_UNSUPPORTED, "the CUDA backend is not built into this tiny-kernel");
  return nullptr;
}
}  // namespace tk
