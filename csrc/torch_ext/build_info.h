#pragma once

#include <string>
#include <vector>

#include "torch_ext/macros.h"

namespace torch_ext {

// The version of torch_ext, e.g. "0.1.0".
TORCH_EXT_API std::string version();

// The torch version the library was compiled against, e.g. "2.13.0+cpu". The library must be
// loaded into that same torch: its C++ ABI is not stable across releases.
TORCH_EXT_API std::string torch_version();

// The CUDA toolkit version the CUDA kernels were compiled with; empty when none were compiled.
TORCH_EXT_API std::string cuda_version();

// Device backends with compiled kernels: {"CPU"} or {"CPU", "CUDA"}.
TORCH_EXT_API std::vector<std::string> compiled_backends();

namespace detail {
// Referenced from torch_ext.h so that linking the library is never dropped by --as-needed:
// the op registrations run when the library is loaded, and nothing else references it when a
// program calls ops only through the dispatcher.
TORCH_EXT_API int link_anchor();
}  // namespace detail

}  // namespace torch_ext
