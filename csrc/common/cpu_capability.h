#pragma once

// Run-time choice among the copies of a CPU kernel file compiled for several instruction sets
// (CMakeLists.txt compiles every *_cpu_kernel.cpp once per capability).

namespace torch_ext {

// A ladder: each level has every instruction of the ones below it. Avx512Bf16 runs the AVX-512
// copy of the kernels; those that write bfloat16 round with the CPU's own conversion
// (VCVTNE2PS2BF16, AVX512_BF16: round to nearest even, as the software rounding, but denormal
// inputs and outputs flushed to zero, and a NaN kept as a quiet NaN of its sign).
enum class CpuCapability { Default = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3 };

// The capability whose kernels run: the one asked for by the environment variable
// TORCH_EXT_CPU_CAPABILITY (or else ATEN_CPU_CAPABILITY, as ATen does): "default", "avx2",
// "avx512" or "avx512_bf16", else "avx2"; capped by what this CPU supports. Read once.
CpuCapability cpu_capability();

// For the kernels that measured faster with AVX-512 (the NHWC depthwise convolution, whose
// oneDNN counterpart runs AVX-512 too, and the NCHW depthwise forward's register tiles): the
// capability asked for by the environment variable when set, else the best this CPU supports.
// Read once.
CpuCapability cpu_capability_preferring_avx512();

const char* cpu_capability_name(CpuCapability capability);

// Whether the kernels round to bfloat16 with the CPU's own conversion (Avx512Bf16 asked for or
// allowed, and supported); for the kernels that prefer AVX-512 when prefer_avx512.
bool cpu_native_bfloat16(bool prefer_avx512);

// Picks one of three kernel tables (any type) by cpu_capability(), or by
// cpu_capability_preferring_avx512() for kernels that prefer it.
template <class Table>
const Table& select_cpu_kernels(const Table& default_kernels, const Table& avx2_kernels,
                                const Table& avx512_kernels, bool prefer_avx512 = false) {
  switch (prefer_avx512 ? cpu_capability_preferring_avx512() : cpu_capability()) {
    case CpuCapability::Avx512Bf16:
    case CpuCapability::Avx512:
      return avx512_kernels;
    case CpuCapability::Avx2:
      return avx2_kernels;
    default:
      return default_kernels;
  }
}

}  // namespace torch_ext
