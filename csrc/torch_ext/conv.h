#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <string_view>

#include "torch_ext/macros.h"

namespace torch_ext {

// Convolution with torch::nn::functional::conv2d's semantics (input [N, C_in, H, W], weight
// [C_out, C_in / groups, kH, kW], stride/padding/dilation as one int or a pair) followed by an
// optional activation fused into the same pass: "none", "relu", "silu" or "gelu" (erf form).
// Our own kernels: a direct one for depthwise convolutions (groups == C_in, any channel
// multiplier), im2col tiles + GEMM otherwise. Differentiable (input, weight, bias), CPU and CUDA,
// float32/float64/float16/bfloat16; the output is channels_last when the input is.
TORCH_EXT_API at::Tensor dilated_conv2d(const at::Tensor& input, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias = c10::nullopt,
                                        at::IntArrayRef stride = 1, at::IntArrayRef padding = 0,
                                        at::IntArrayRef dilation = 1, int64_t groups = 1,
                                        std::string_view activation = "none");

// Padding by rule, as conv2d's padding="same" / "valid".
enum class ConvPadding {
  Valid,  // no padding
  Same,   // output size = input size (stride 1); an odd total padding puts the extra
          // row/column at the bottom/right, like PyTorch
};

// The same with padding ConvPadding::Same or ::Valid (the op's "same" / "valid").
TORCH_EXT_API at::Tensor dilated_conv2d(const at::Tensor& input, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias,
                                        at::IntArrayRef stride, ConvPadding padding,
                                        at::IntArrayRef dilation = 1, int64_t groups = 1,
                                        std::string_view activation = "none");

}  // namespace torch_ext
