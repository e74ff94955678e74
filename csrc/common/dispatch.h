#pragma once

// Calls f with a value of the C++ type of a floating dtype (float, double, c10::Half,
// c10::BFloat16): the float types every op takes. Header-only and light, for CPU kernel files
// and CUDA files alike.

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>

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

// The same for the integer label types: uint8_t, int16_t, int32_t, int64_t.
template <class F>
void dispatch_label_types(c10::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Byte:
      return f(uint8_t{});
    case c10::ScalarType::Short:
      return f(int16_t{});
    case c10::ScalarType::Int:
      return f(int32_t{});
    case c10::ScalarType::Long:
      return f(int64_t{});
    default:
      TORCH_CHECK(false, op, ": expected uint8, int16, int32 or int64 labels, got ", dtype);
  }
}

}  // namespace torch_ext
