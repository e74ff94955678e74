#pragma once

// Numerics that the CPU and CUDA kernels share (host and device functions), so that both
// backends give the same answer by construction:
// - max pooling's update rule, PyTorch's: a value takes the place of the current maximum when
//   it is strictly larger or NaN. So ties go to the first element scanned, NaN propagates, and
//   with NaNs the last NaN is the argmax (adaptive_max_pool2d and max_pool2d alike);
// - adaptive pooling's bins, PyTorch's: bin i of `bins` over `size` spans
//   [floor(i * size / bins), ceil((i + 1) * size / bins));
// - torch.argmax's rule (the metrics' class scores): a strictly larger score takes over (ties
//   keep the lowest class), and the first NaN wins over any number.
//
// The CPU kernel files are compiled once per instruction set; there these functions live in
// the inline namespace CPU_CAPABILITY (like ATen's vector types), so that every copy keeps its
// own and the linker never swaps an AVX512 copy into the default kernels.

#include <c10/macros/Macros.h>

#include <cstdint>
#include <limits>

#ifdef CPU_CAPABILITY
#define TORCH_EXT_NUMERICS_NAMESPACE CPU_CAPABILITY
#else
#define TORCH_EXT_NUMERICS_NAMESPACE shared
#endif

namespace torch_ext::numerics {
inline namespace TORCH_EXT_NUMERICS_NAMESPACE {

template <class A>
C10_HOST_DEVICE inline bool is_nan(A v) {
  return v != v;
}

// Whether `value` replaces `best` in a scan in order (PyTorch's max pooling rule).
template <class A>
C10_HOST_DEVICE inline bool takes_over(A value, A best) {
  return value > best || is_nan(value);
}

// max(a, b) with NaN propagation: a when it is larger or NaN.
template <class A>
C10_HOST_DEVICE inline A max_nan(A a, A b) {
  return (a > b || is_nan(a)) ? a : b;
}

template <class A>
C10_HOST_DEVICE constexpr A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

// Of two (value, index) candidates of one window, whether a scan in index order would end on
// b rather than a: the rule above made associative, for parallel reductions.
template <class A>
C10_HOST_DEVICE inline bool scan_prefers_second(A va, int64_t ia, A vb, int64_t ib) {
  const bool na = is_nan(va), nb = is_nan(vb);
  if (na || nb) return nb && (!na || ib > ia);  // the last NaN
  if (va != vb) return vb > va;
  return ib < ia;  // ties: the first
}

// Whether `value` replaces `best` in an argmax scan in order (torch.argmax's rule).
template <class A>
C10_HOST_DEVICE inline bool argmax_takes_over(A value, A best) {
  return value > best || (is_nan(value) && !is_nan(best));
}

// Adaptive pooling's bin i of `bins` over `size`: [bin_start, bin_end).
C10_HOST_DEVICE inline int64_t bin_start(int64_t i, int64_t size, int64_t bins) {
  return (i * size) / bins;
}
C10_HOST_DEVICE inline int64_t bin_end(int64_t i, int64_t size, int64_t bins) {
  return ((i + 1) * size + bins - 1) / bins;
}

}  // namespace TORCH_EXT_NUMERICS_NAMESPACE
}  // namespace torch_ext::numerics
