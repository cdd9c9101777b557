#include <cstdio>
#include "tiny_kernel/tiny_kernel.h"
int main() {
  tk_context* ctx;
  if (tk_context_create(TK_BACKEND_REFERENCE, 0, &ctx) != TK_OK) return 1;
  float x[4] = {1, 2, 3, 4}, w[4] = {1, 1, 1, 1}, y[4];
  tk_rmsnorm_params p{TK_F32, 1, 4, x, 4, nullptr, 0, w, y, 4, 1e-5f};
  tk_status s = tk_rmsnorm(ctx, &p);
  printf("%d %s %f %f\n", s, tk_last_error(), y[0], y[3]);
  p.eps = -1; s = tk_rmsnorm(ctx, &p); printf("%d %s\n", s, tk_last_error());
  tk_context_destroy(ctx);
}
