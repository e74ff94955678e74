// Ops that report how the library runs in this process (not tensor ops).

#include <torch/library.h>

#include <string>

#include "common/cpu_capability.h"

TORCH_LIBRARY_FRAGMENT(torch_ext, m) {
  // The instruction set whose copy of the CPU kernels this process uses:
  // "default", "avx2", "avx512" or "avx512_bf16" (see csrc/common/cpu_capability.h).
  m.def("_cpu_capability() -> str",
        [] { return std::string(torch_ext::cpu_capability_name(torch_ext::cpu_capability())); });
}
