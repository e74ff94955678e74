#pragma once

// Size arithmetic that cannot wrap around: every product or sum of user-given sizes that shapes
// an allocation or a loop goes through these, and an overflow is an error naming the op and
// what was being computed, never a too-small buffer.

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <cstdint>

namespace torch_ext {

inline int64_t checked_mul(const char* op, const char* what, int64_t a, int64_t b) {
  int64_t out = 0;
  TORCH_CHECK(!c10::mul_overflows<int64_t>(a, b, &out), op, "(): ", what, " (", a, " * ", b,
              ") does not fit in 64 bits");
  return out;
}

inline int64_t checked_add(const char* op, const char* what, int64_t a, int64_t b) {
  int64_t out = 0;
  TORCH_CHECK(!c10::add_overflows<int64_t>(a, b, &out), op, "(): ", what, " (", a, " + ", b,
              ") does not fit in 64 bits");
  return out;
}

// The bytes of a tensor of these sizes must be countable in 64 bits (the allocator's own
// arithmetic then cannot wrap either).
inline void check_allocation(const char* op, const char* what, c10::IntArrayRef sizes,
                             int64_t element_size) {
  int64_t bytes = element_size;
  bool overflow = false;
  for (const auto size : sizes) overflow |= c10::mul_overflows<int64_t>(bytes, size, &bytes);
  TORCH_CHECK(!overflow, op, "(): ", what, " of shape ", sizes,
              " would need more bytes than 64 bits can count");
}

}  // namespace torch_ext
