#include "torch_ext/build_info.h"

#include "torch_ext_build_info.h"

#if defined(TORCH_EXT_WITH_CUDA)
#define TORCH_EXT_BUILD_CUDA "\"" TORCH_EXT_CUDA_VERSION_STRING "\""
#define TORCH_EXT_BUILD_ARCHS "\"" TORCH_EXT_CUDA_ARCHITECTURES_STRING "\""
#define TORCH_EXT_BUILD_BACKENDS "[\"CPU\", \"CUDA\"]"
#else
#define TORCH_EXT_BUILD_CUDA "null"
#define TORCH_EXT_BUILD_ARCHS "null"
#define TORCH_EXT_BUILD_BACKENDS "[\"CPU\"]"
#endif

// Read by the Python package from the file's bytes *before* it loads the library, so that a
// library built against another torch gives a clear "rebuild" error instead of an
// undefined-symbol trace (torch_ext/_library.py). Keep the prefix and the one-line JSON.
extern "C" TORCH_EXT_API __attribute__((used)) const char torch_ext_build_info[] =
    "torch_ext-build-info:{\"version\": \"" TORCH_EXT_VERSION_STRING
    "\", \"torch\": \"" TORCH_EXT_TORCH_VERSION_STRING "\", \"cuda\": " TORCH_EXT_BUILD_CUDA
    ", \"cuda_architectures\": " TORCH_EXT_BUILD_ARCHS ", \"backends\": " TORCH_EXT_BUILD_BACKENDS
    "}\n";

namespace torch_ext {

std::string version() { return TORCH_EXT_VERSION_STRING; }

std::string torch_version() { return TORCH_EXT_TORCH_VERSION_STRING; }

std::string cuda_version() {
#if defined(TORCH_EXT_WITH_CUDA)
  return TORCH_EXT_CUDA_VERSION_STRING;
#else
  return "";
#endif
}

std::vector<std::string> compiled_backends() {
#if defined(TORCH_EXT_WITH_CUDA)
  return {"CPU", "CUDA"};
#else
  return {"CPU"};
#endif
}

namespace detail {
int link_anchor() { return 1; }
}  // namespace detail

}  // namespace torch_ext
