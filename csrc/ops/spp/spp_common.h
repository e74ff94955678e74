#pragma once

// Argument checks and shapes shared by the SPP/SPPF kernels of every backend.

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/ArrayRef.h>

#include <string_view>

namespace torch_ext::spp_impl {

enum class PoolMode { Max, Avg };

// Parses "max" / "avg"; any other string is an error naming the argument.
PoolMode parse_mode(std::string_view mode);

// Checks spp's arguments; errors name the argument, the expectation and what arrived.
void check_spp_args(const at::Tensor& input, at::IntArrayRef levels, std::string_view mode);

// Checks sppf's arguments.
void check_sppf_args(const at::Tensor& input, int64_t kernel_size, int64_t repeats);

// Checks what the backward ops receive (from autograd, or from a direct call).
void check_spp_backward_args(const at::Tensor& grad_output, const at::Tensor& indices,
                             at::IntArrayRef input_size, at::IntArrayRef levels,
                             std::string_view mode, c10::MemoryFormat memory_format);
void check_sppf_backward_args(const at::Tensor& grad_output, const at::Tensor& output,
                              int64_t kernel_size, int64_t repeats);

// The layout asked of the input gradient: contiguous or channels_last.
void check_memory_format(const char* op, c10::MemoryFormat memory_format);

// Bins of all levels: sum(l * l), an error if it overflows.
int64_t total_bins(at::IntArrayRef levels);

// sppf's kernel size as the kernels run it on an H x W map: windows wider than
// 2 * max(H, W) - 1 already cover the whole map, so larger sizes are clipped to that.
int64_t effective_kernel_size(int64_t kernel_size, int64_t height, int64_t width);

// ChannelsLast when the input is laid out NHWC, Contiguous otherwise. The kernels read the
// input in this format (after .contiguous(format)) and write sppf's output in it.
c10::MemoryFormat kernel_memory_format(const at::Tensor& input);

}  // namespace torch_ext::spp_impl
