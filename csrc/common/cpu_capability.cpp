#include "common/cpu_capability.h"

#include <cstdlib>
#include <cstring>

namespace torch_ext {
namespace {

CpuCapability detect() {
  CpuCapability best = CpuCapability::Default;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = CpuCapability::Avx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    best = CpuCapability::Avx512;
  }
#endif
  const char* cap = std::getenv("TORCH_EXT_CPU_CAPABILITY");
  if (cap == nullptr) cap = std::getenv("ATEN_CPU_CAPABILITY");
  if (cap != nullptr) {
    CpuCapability asked = best;
    if (std::strcmp(cap, "default") == 0) asked = CpuCapability::Default;
    if (std::strcmp(cap, "avx2") == 0) asked = CpuCapability::Avx2;
    if (std::strcmp(cap, "avx512") == 0) asked = CpuCapability::Avx512;
    if (static_cast<int>(asked) < static_cast<int>(best)) best = asked;
  }
  return best;
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
