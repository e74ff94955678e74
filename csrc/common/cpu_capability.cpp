#include "common/cpu_capability.h"

#include <cstdlib>
#include <cstring>

namespace torch_ext {
namespace {

// The best capability this CPU supports.
CpuCapability supported() {
  CpuCapability result = CpuCapability::Default;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) result = CpuCapability::Avx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    result = CpuCapability::Avx512;
    if (__builtin_cpu_supports("avx512bf16")) result = CpuCapability::Avx512Bf16;
  }
#endif
  return result;
}

// The capability the environment asks for (TORCH_EXT_CPU_CAPABILITY, else ATEN_CPU_CAPABILITY,
// as ATen reads it), or -1 when it asks for none we know.
int asked() {
  const char* cap = std::getenv("TORCH_EXT_CPU_CAPABILITY");
  if (cap == nullptr) cap = std::getenv("ATEN_CPU_CAPABILITY");
  if (cap == nullptr) return -1;
  if (std::strcmp(cap, "default") == 0) return static_cast<int>(CpuCapability::Default);
  if (std::strcmp(cap, "avx2") == 0) return static_cast<int>(CpuCapability::Avx2);
  if (std::strcmp(cap, "avx512") == 0) return static_cast<int>(CpuCapability::Avx512);
  if (std::strcmp(cap, "avx512_bf16") == 0) return static_cast<int>(CpuCapability::Avx512Bf16);
  return -1;
}

// `fallback` unless the environment asks for a capability; capped by what the CPU supports.
CpuCapability detect(CpuCapability fallback) {
  const int request = asked();
  const int wanted = request >= 0 ? request : static_cast<int>(fallback);
  const int best = static_cast<int>(supported());
  return static_cast<CpuCapability>(wanted < best ? wanted : best);
}

}  // namespace

// By default the AVX2 copy runs: on the machine these kernels were tuned on (AMD EPYC, AVX-512
// on 256-bit units) most of them measured slower with AVX-512 (benchmarks/).
CpuCapability cpu_capability() {
  static const CpuCapability capability = detect(CpuCapability::Avx2);
  return capability;
}

CpuCapability cpu_capability_preferring_avx512() {
  static const CpuCapability capability = detect(CpuCapability::Avx512Bf16);
  return capability;
}

bool cpu_native_bfloat16(bool prefer_avx512) {
  return (prefer_avx512 ? cpu_capability_preferring_avx512() : cpu_capability()) ==
         CpuCapability::Avx512Bf16;
}

const char* cpu_capability_name(CpuCapability capability) {
  switch (capability) {
    case CpuCapability::Avx512Bf16:
      return "avx512_bf16";
    case CpuCapability::Avx512:
      return "avx512";
    case CpuCapability::Avx2:
      return "avx2";
    default:
      return "default";
  }
}

}  // namespace torch_ext
