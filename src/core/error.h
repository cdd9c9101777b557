// Errors: a status code plus a thread-local message naming the problem.
#pragma once

#include "tiny_kernel/tiny_kernel.h"

namespace tk {

// Records a printf-style message for tk_last_error() and returns `status`.
tk_status fail(tk_status status, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void clear_error();

}  // namespace tk

// Returns from the enclosing function with `status` and a message when `cond` is false.
#define TK_REQUIRE(cond, status, ...)     \
  do {                                    \
    if (!(cond)) return ::tk::fail((status), __VA_ARGS__); \
  } while (0)

// Propagates a non-OK status.
#define TK_TRY(expr)                      \
  do {                                    \
    tk_status tk_try_status_ = (expr);    \
    if (tk_try_status_ != TK_OK) return tk_try_status_; \
  } while (0)
