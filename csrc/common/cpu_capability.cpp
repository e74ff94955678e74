#include "common/cpu_capability.h"

#include <cstdlib>
#include <cstring>

namespace torch_ext {
namespace {

// The AVX-512 copy runs only when asked for: on the machine these kernels were tuned on (AMD
// EPYC, AVX-512 on 256-bit units) it measured slower than the AVX2 copy (benchmarks/).
CpuCapability detect() {
  CpuCapability supported = CpuCapability::Default;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    supported = CpuCapability::Avx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    supported = CpuCapability::Avx512;
  }
#endif
  const char* cap = std::getenv("TORCH_EXT_CPU_CAPABILITY");
  if (cap == nullptr) cap = std::getenv("ATEN_CPU_CAPABILITY");
  CpuCapability asked = CpuCapability::Avx2;
  if (cap != nullptr) {
    if (std::strcmp(cap, "default") == 0) asked = CpuCapability::Default;
    if (std::strcmp(cap, "avx2") == 0) asked = CpuCapability::Avx2;
    if (std::strcmp(cap, "avx512") == 0) asked = CpuCapability::Avx512;
  }
  return static_cast<int>(asked) < static_cast<int>(supported) ? asked : supported;
}

}  // namespace

CpuCapability cpu_capability() {
  static const CpuCapability capability = detect();
  return capability;
}

const char* cpu_capability_name(CpuCapability capability) {
  switch (capability) {
    case CpuCapability::Avx512:
      return "avx512";
    case CpuCapability::Avx2:
      return "avx2";
    default:
      return "default";
  }
}

}  // namespace torch_ext
