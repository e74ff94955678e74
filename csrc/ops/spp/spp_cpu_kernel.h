#pragma once

// The interface between spp_cpu.cpp (argument handling, allocation) and the loops of
// spp_cpu_kernel.cpp and sppf_cpu_kernel.cpp, which are compiled once per CPU capability.
// Plain pointers and sizes only, so the kernel files need no tensor headers. Layouts:
// input/grad_input and sppf's output are NCHW or NHWC (channels_last) as flagged; spp's
// output, indices and grad_output are [N, C * bins].

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "ops/spp/spp_common.h"

namespace torch_ext::spp_impl {

struct MapShape {
  int64_t n, c, h, w;
  bool channels_last;
};

struct SppForwardArgs {
  c10::ScalarType dtype;
  const void* input;
  void* output;
  int64_t* indices;  // nullptr: no argmax wanted (inference, or mode avg)
  MapShape shape;
  const int64_t* levels;
  int64_t num_levels;
  PoolMode mode;
};

struct SppBackwardArgs {
  c10::ScalarType dtype;
  const void* grad_output;
  const int64_t* indices;  // mode max only
  void* grad_input;
  MapShape shape;
  const int64_t* levels;
  int64_t num_levels;
  PoolMode mode;
};

struct SppfForwardArgs {
  c10::ScalarType dtype;
  const void* input;
  void* output;    // [N, C * (repeats + 1), H, W] in the input's layout
  MapShape shape;  // of the input
  int64_t kernel_size;
  int64_t repeats;
};

struct SppfBackwardArgs {
  c10::ScalarType dtype;
  const void* grad_output;  // like output
  const void* output;       // the forward's output: every stage of the cascade
  void* grad_input;
  MapShape shape;  // of the input
  int64_t kernel_size;
  int64_t repeats;
};

// One table per capability copy: spp_cpu_kernel.cpp and sppf_cpu_kernel.cpp.
struct SppCpuKernels {
  void (*spp_forward)(const SppForwardArgs&);
  void (*spp_backward)(const SppBackwardArgs&);
};
struct SppfCpuKernels {
  void (*sppf_forward)(const SppfForwardArgs&);
  void (*sppf_backward)(const SppfBackwardArgs&);
};

extern const SppCpuKernels spp_cpu_kernels_DEFAULT;
extern const SppCpuKernels spp_cpu_kernels_AVX2;
extern const SppCpuKernels spp_cpu_kernels_AVX512;
extern const SppfCpuKernels sppf_cpu_kernels_DEFAULT;
extern const SppfCpuKernels sppf_cpu_kernels_AVX2;
extern const SppfCpuKernels sppf_cpu_kernels_AVX512;

}  // namespace torch_ext::spp_impl
