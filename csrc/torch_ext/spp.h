#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <string_view>

#include "torch_ext/macros.h"

namespace torch_ext {

// Spatial pyramid pooling (SPP-net). input [N, C, H, W] -> [N, C * sum(l * l)]: for each level l
// in order, the [N, C, l, l] adaptive max ("max") or average ("avg") pooling of the input,
// flattened per sample. Bins follow PyTorch's adaptive pooling rule: bin i of l covers rows
// floor(i * H / l) to ceil((i + 1) * H / l), so every level has l * l bins for any H, W >= 1.
// Calls go through the dispatcher: autograd applies, on CPU and CUDA.
TORCH_EXT_API at::Tensor spp(const at::Tensor& input, at::IntArrayRef levels = {1, 2, 4},
                             std::string_view mode = "max");

// The pooling part of YOLOv5's SPPF block in one op: cat([x, m1, ..., m_repeats], dim=1) with
// m_{i+1} = max_pool2d(m_i, kernel_size, stride=1, padding=kernel_size / 2), m_0 = x.
// kernel_size must be odd; output [N, C * (repeats + 1), H, W] in the input's memory format.
TORCH_EXT_API at::Tensor sppf(const at::Tensor& input, int64_t kernel_size = 5,
                              int64_t repeats = 3);

}  // namespace torch_ext
