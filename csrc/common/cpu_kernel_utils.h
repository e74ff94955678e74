#pragma once

// Helpers for the CPU kernel files (*_cpu_kernel.cpp), which CMake compiles once per CPU
// capability. They live in the inline namespace CPU_CAPABILITY, like ATen's vector types, so
// every copy gets its own.

#include <ATen/OpMathType.h>

#include <type_traits>

#ifndef CPU_CAPABILITY
#error "include only from *_cpu_kernel.cpp files, which are compiled once per CPU capability"
#endif

#include "common/numerics.h"

namespace torch_ext {
inline namespace CPU_CAPABILITY {

template <class T>
using acc_t = at::opmath_type<T>;

// float and double go through ATen's vector types; half types are converted per element.
template <class T>
constexpr bool kVectorized = std::is_same_v<T, float> || std::is_same_v<T, double>;

// Max pooling's NaN and tie rules, shared with the CUDA kernels (common/numerics.h).
using numerics::is_nan;
using numerics::max_nan;
using numerics::neg_inf;
using numerics::takes_over;
}  // namespace CPU_CAPABILITY
}  // namespace torch_ext

// The name of this copy's kernel table: TORCH_EXT_CPU_KERNEL_TABLE(spp_cpu_kernels) is
// spp_cpu_kernels_AVX2 in the AVX2 copy (declared for every capability in the family's header).
#define TORCH_EXT_CONCAT_(a, b) a##b
#define TORCH_EXT_CONCAT(a, b) TORCH_EXT_CONCAT_(a, b)
#define TORCH_EXT_CPU_KERNEL_TABLE(name) TORCH_EXT_CONCAT(name##_, CPU_CAPABILITY)
