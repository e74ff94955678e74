#pragma once

// Calls f with a value of the C++ type of a floating dtype (float, double, c10::Half,
// c10::BFloat16): the float types every op takes. Header-only and light, for CPU kernel files
// and CUDA files alike.

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace torch_ext {

template <class F>
void dispatch_float_types(c10::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return f(float{});
    case c10::ScalarType::Double:
      return f(double{});
    case c10::ScalarType::Half:
      return f(c10::Half{});
    case c10::ScalarType::BFloat16:
      return f(c10::BFloat16{});
    default:
      TORCH_CHECK(false, op, ": expected float32, float64, float16 or bfloat16, got ", dtype);
  }
}

}  // namespace torch_ext
