#pragma once

// Helpers for the CPU kernel files (*_cpu_kernel.cpp), which CMake compiles once per CPU
// capability. They live in the inline namespace CPU_CAPABILITY, like ATen's vector types, so
// every copy gets its own.
//
// Max pooling follows PyTorch's update rule: a value takes the place of the current maximum
// when it is strictly larger or NaN. So ties go to the first element scanned, NaN propagates,
// and with NaNs the last NaN is the argmax (adaptive_max_pool2d and max_pool2d alike).

#include <ATen/OpMathType.h>

#include <limits>
#include <type_traits>

#ifndef CPU_CAPABILITY
#error "include only from *_cpu_kernel.cpp files, which are compiled once per CPU capability"
#endif

namespace torch_ext {
inline namespace CPU_CAPABILITY {

template <class T>
using acc_t = at::opmath_type<T>;

// float and double go through ATen's vector types; half types are converted per element.
template <class T>
constexpr bool kVectorized = std::is_same_v<T, float> || std::is_same_v<T, double>;

template <class A>
inline bool is_nan(A v) {
  return v != v;
}

template <class A>
inline bool takes_over(A value, A best) {
  return value > best || is_nan(value);
}

template <class A>
inline A max_nan(A a, A b) {
  return (a > b || is_nan(a)) ? a : b;
}

template <class A>
constexpr A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}
}  // namespace CPU_CAPABILITY
}  // namespace torch_ext

// The name of this copy's kernel table: TORCH_EXT_CPU_KERNEL_TABLE(spp_cpu_kernels) is
// spp_cpu_kernels_AVX2 in the AVX2 copy (declared for every capability in the family's header).
#define TORCH_EXT_CONCAT_(a, b) a##b
#define TORCH_EXT_CONCAT(a, b) TORCH_EXT_CONCAT_(a, b)
#define TORCH_EXT_CPU_KERNEL_TABLE(name) TORCH_EXT_CONCAT(name##_, CPU_CAPABILITY)
