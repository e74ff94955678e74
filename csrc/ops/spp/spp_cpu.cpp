// CPU kernels of spp and sppf: checks, allocation, then the loops of spp_cpu_kernel.cpp for the
// best instruction set this CPU has.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/cpu_capability.h"
#include "ops/spp/spp_common.h"
#include "ops/spp/spp_cpu_kernel.h"

namespace torch_ext::spp_impl {
namespace {

const SppCpuKernels& spp_kernels() {
  return select_cpu_kernels(spp_cpu_kernels_DEFAULT, spp_cpu_kernels_AVX2, spp_cpu_kernels_AVX512);
}

const SppfCpuKernels& sppf_kernels() {
  return select_cpu_kernels(sppf_cpu_kernels_DEFAULT, sppf_cpu_kernels_AVX2,
                            sppf_cpu_kernels_AVX512);
}

MapShape map_shape(const at::Tensor& t, c10::MemoryFormat format) {
  return {t.size(0), t.size(1), t.size(2), t.size(3), format == c10::MemoryFormat::ChannelsLast};
}

// The backward scatters through the indices: each must point into its H x W plane.
void check_index_range(const at::Tensor& indices, int64_t plane) {
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < indices.numel(); ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < plane, "spp backward: indices must lie in [0, H * W = ",
                plane, "), got ", idx[i], " at flat position ", i);
  }
}

std::tuple<at::Tensor, at::Tensor> spp_forward_cpu(const at::Tensor& input_, at::IntArrayRef levels,
                                                   std::string_view mode, bool need_indices) {
  check_spp_args(input_, levels, mode);
  const auto format = kernel_memory_format(input_);
  const auto input = input_.contiguous(format);
  const auto pool_mode = parse_mode(mode);
  const int64_t features = input.size(1) * total_bins(levels);
  auto output = at::empty({input.size(0), features}, input.options());
  const bool with_indices = need_indices && pool_mode == PoolMode::Max;
  // Without indices: an empty [0], as the Meta kernel says.
  const auto long_options = input.options().dtype(at::kLong);
  auto indices = with_indices ? at::empty({input.size(0), features}, long_options)
                              : at::empty({0}, long_options);
  if (output.numel() > 0) {
    spp_kernels().spp_forward(
        {input.scalar_type(), input.const_data_ptr(), output.mutable_data_ptr(),
         with_indices ? indices.mutable_data_ptr<int64_t>() : nullptr, map_shape(input, format),
         levels.data(), static_cast<int64_t>(levels.size()), pool_mode});
  }
  return {output, indices};
}

at::Tensor spp_backward_cpu(const at::Tensor& grad_output_, const at::Tensor& indices,
                            at::IntArrayRef input_size, at::IntArrayRef levels,
                            std::string_view mode, c10::MemoryFormat memory_format) {
  check_spp_backward_args(grad_output_, indices, input_size, levels, mode, memory_format);
  const auto pool_mode = parse_mode(mode);
  const auto grad_output = grad_output_.contiguous();
  const auto indices_c = indices.contiguous();
  if (pool_mode == PoolMode::Max) check_index_range(indices_c, input_size[2] * input_size[3]);
  auto grad_input = at::empty(input_size, grad_output.options().memory_format(memory_format));
  if (grad_input.numel() > 0) {
    spp_kernels().spp_backward(
        {grad_output.scalar_type(), grad_output.const_data_ptr(),
         pool_mode == PoolMode::Max ? indices_c.const_data_ptr<int64_t>() : nullptr,
         grad_input.mutable_data_ptr(), map_shape(grad_input, memory_format), levels.data(),
         static_cast<int64_t>(levels.size()), pool_mode});
  }
  return grad_input;
}

at::Tensor sppf_cpu(const at::Tensor& input_, int64_t kernel_size, int64_t repeats) {
  check_sppf_args(input_, kernel_size, repeats);
  const auto format = kernel_memory_format(input_);
  const auto input = input_.contiguous(format);
  auto output =
      at::empty({input.size(0), input.size(1) * (repeats + 1), input.size(2), input.size(3)},
                input.options().memory_format(format));
  if (output.numel() > 0) {
    sppf_kernels().sppf_forward({input.scalar_type(), input.const_data_ptr(),
                                 output.mutable_data_ptr(), map_shape(input, format),
                                 effective_kernel_size(kernel_size, input.size(2), input.size(3)),
                                 repeats});
  }
  return output;
}

at::Tensor sppf_backward_cpu(const at::Tensor& grad_output_, const at::Tensor& output_,
                             int64_t kernel_size, int64_t repeats) {
  check_sppf_backward_args(grad_output_, output_, kernel_size, repeats);
  const auto format = kernel_memory_format(output_);
  const auto output = output_.contiguous(format);
  const auto grad_output = grad_output_.contiguous(format);
  auto grad_input =
      at::empty({output.size(0), output.size(1) / (repeats + 1), output.size(2), output.size(3)},
                output.options().memory_format(format));
  if (grad_input.numel() > 0) {
    sppf_kernels().sppf_backward({output.scalar_type(), grad_output.const_data_ptr(),
                                  output.const_data_ptr(), grad_input.mutable_data_ptr(),
                                  map_shape(grad_input, format),
                                  effective_kernel_size(kernel_size, output.size(2), output.size(3)),
                                  repeats});
  }
  return grad_input;
}

}  // namespace
}  // namespace torch_ext::spp_impl

TORCH_LIBRARY_IMPL(torch_ext, CPU, m) {
  m.impl("_spp_forward", torch_ext::spp_impl::spp_forward_cpu);
  m.impl("_spp_backward", torch_ext::spp_impl::spp_backward_cpu);
  m.impl("sppf", torch_ext::spp_impl::sppf_cpu);
  m.impl("_sppf_backward", torch_ext::spp_impl::sppf_backward_cpu);
}
