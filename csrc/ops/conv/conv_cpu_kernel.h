#pragma once

// The interface between conv_cpu.cpp (checks, allocation, GEMMs through ATen) and the loops of
// conv_cpu_kernel.cpp, which are compiled once per CPU capability. Plain pointers and sizes;
// float and double (conv_cpu.cpp computes the half types in float), except the depthwise forward,
// which also reads and writes half-type maps itself. Maps are NCHW unless said otherwise.

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "ops/conv/conv_common.h"

namespace torch_ext::conv_impl {

// Depthwise convolution, direct: output[n, co] = act(bias[co] + sum_taps w[co] * x[n, co / m]).
// The maps (input, output, preact) are in `dtype`: float, double, float16 or bfloat16, NCHW, or
// NHWC when channels_last (multiplier 1 only). The weight and bias are in the compute type:
// double for double maps, float otherwise (half-type maps are widened to float as they are
// read and rounded once as they are written; no float copy of a whole map is made).
struct DepthwiseForwardArgs {
  c10::ScalarType dtype;
  const void* input;   // [N, C_in, H, W] (or [N, H, W, C_in] in memory when channels_last)
  const void* weight;  // [C_out, 1, kh, kw], compute type
  const void* bias;    // [C_out] or nullptr, compute type
  void* output;        // [N, C_out, oh, ow], laid out as the input
  void* preact;        // like output, or nullptr
  ConvGeometry g;
  Activation act;
  bool channels_last;
  // bfloat16 maps written with the CPU's own rounding (cpu_native_bfloat16), where the kernel
  // has a use for it (the AVX-512 NHWC loops and NCHW tiles); the software rounding otherwise.
  bool native_bf16 = false;
};

// Whether the NCHW depthwise forward of maps other than double takes its register tiles (in the
// vector copies): stride 1 and a square kernel of width 3, 5 or 7. Those calls (forwards, and
// input gradients computed as the forward of the flipped taps) run AVX-512 where the CPU has it
// (conv_cpu.cpp), as the NHWC kernels do.
inline bool depthwise_nchw_tiled(const ConvGeometry& g, c10::ScalarType dtype) {
  return dtype != c10::ScalarType::Double && g.stride_h == 1 && g.stride_w == 1 &&
         g.kh == g.kw && (g.kh == 3 || g.kh == 5 || g.kh == 7);
}

// grad_input[n, c] = sum over the c_out / c_in output channels of c of the transposed taps.
struct DepthwiseBackwardInputArgs {
  c10::ScalarType dtype;
  const void* grad_preact;  // [N, C_out, oh, ow]: grad_output through the activation
  const void* weight;
  void* grad_input;  // [N, C_in, H, W], fully written
  ConvGeometry g;
};

// grad_weight[co, tap] = sum over (n, oh, ow), and grad_bias[co] = sum of grad_preact over
// (n, oh, ow) when asked for (the map is read for the weight anyway), in double, in an order
// fixed by the shape (deterministic for any thread count). NCHW: the maps in the compute type
// (float or double). channels_last (multiplier 1): the maps NHWC in `dtype` (half types widened
// as they are read).
struct DepthwiseBackwardWeightArgs {
  c10::ScalarType dtype;
  const void* grad_preact;
  const void* input;
  void* grad_weight;  // [C_out, 1, kh, kw], compute type, fully written
  void* grad_bias;    // [C_out], compute type, fully written; or nullptr
  ConvGeometry g;
  bool channels_last;
};

// One tile of the im2col matrix of one (image, group): col[r, t] for rows r = (ci, i, j) of the
// group's c_in / groups channels and columns t = output pixels p0 .. p1 - 1 (p = oh * ow + ow),
// zero where the tap falls into the padding. col2im adds such a tile back into a map.
struct Im2colArgs {
  c10::ScalarType dtype;
  const void* image;  // the group's first channel of one image: [c_in / groups, H, W]
  void* col;          // [c_in / groups * kh * kw, p1 - p0]
  ConvGeometry g;
  int64_t p0, p1;
};

struct Col2imArgs {
  c10::ScalarType dtype;
  const void* col;  // [c_in / groups * kh * kw, p1 - p0]
  void* image;      // [c_in / groups, H, W], accumulated into
  ConvGeometry g;
  int64_t p0, p1;
};

// In place over a [rows, cols] block with leading dimension ld: v = data + bias[row];
// preact = v (when given); data = act(v).
struct EpilogueArgs {
  c10::ScalarType dtype;
  void* data;
  int64_t ld;
  int64_t rows, cols;
  const void* bias;  // [rows] or nullptr
  void* preact;      // same layout as data (leading dimension preact_ld) or nullptr
  int64_t preact_ld;
  Activation act;
};

struct ConvCpuKernels {
  void (*depthwise_forward)(const DepthwiseForwardArgs&);
  void (*depthwise_backward_input)(const DepthwiseBackwardInputArgs&);
  void (*depthwise_backward_weight)(const DepthwiseBackwardWeightArgs&);
  void (*im2col)(const Im2colArgs&);
  void (*col2im)(const Col2imArgs&);
  void (*epilogue)(const EpilogueArgs&);
};

extern const ConvCpuKernels conv_cpu_kernels_DEFAULT;
extern const ConvCpuKernels conv_cpu_kernels_AVX2;
extern const ConvCpuKernels conv_cpu_kernels_AVX512;

}  // namespace torch_ext::conv_impl
