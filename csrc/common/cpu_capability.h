#pragma once

// Run-time choice among the copies of a CPU kernel file compiled for several instruction sets
// (CMakeLists.txt compiles every *_cpu_kernel.cpp once per capability).

namespace torch_ext {

enum class CpuCapability { Default = 0, Avx2 = 1, Avx512 = 2 };

// The capability whose kernels run: the one asked for by the environment variable
// TORCH_EXT_CPU_CAPABILITY (or else ATEN_CPU_CAPABILITY, as ATen does): "default", "avx2" or
// "avx512", else "avx2"; capped by what this CPU supports. Read once.
CpuCapability cpu_capability();

// For the kernels that measured faster with AVX-512 (the NHWC depthwise convolution, whose
// oneDNN counterpart runs AVX-512 too): the capability asked for by the environment variable
// when set, else the best this CPU supports. Read once.
CpuCapability cpu_capability_preferring_avx512();

const char* cpu_capability_name(CpuCapability capability);

// Picks one of three kernel tables (any type) by cpu_capability(), or by
// cpu_capability_preferring_avx512() for kernels that prefer it.
template <class Table>
const Table& select_cpu_kernels(const Table& default_kernels, const Table& avx2_kernels,
                                const Table& avx512_kernels, bool prefer_avx512 = false) {
  switch (prefer_avx512 ? cpu_capability_preferring_avx512() : cpu_capability()) {
    case CpuCapability::Avx512:
      return avx512_kernels;
    case CpuCapability::Avx2:
      return avx2_kernels;
    default:
      return default_kernels;
  }
}

}  // namespace torch_ext
