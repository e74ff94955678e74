#pragma once

// The spp family's ops through the dispatcher: one typed handle per op, looked up once. The C++
// API, the composites and the autograd Functions all call the ops through these.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/MemoryFormat.h>
#include <c10/core/SymIntArrayRef.h>
#include <c10/util/ArrayRef.h>

#include <string_view>
#include <tuple>

namespace torch_ext::spp_impl {

// spp(Tensor input, int[] levels, str mode) -> Tensor
inline at::Tensor call_spp(const at::Tensor& input, at::IntArrayRef levels,
                           std::string_view mode) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_ext::spp", "")
                       .typed<at::Tensor(const at::Tensor&, at::IntArrayRef, std::string_view)>();
  return op.call(input, levels, mode);
}

// _spp_forward(Tensor input, int[] levels, str mode, bool need_indices) -> (Tensor, Tensor)
inline std::tuple<at::Tensor, at::Tensor> call_spp_forward(const at::Tensor& input,
                                                           at::IntArrayRef levels,
                                                           std::string_view mode,
                                                           bool need_indices) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_ext::_spp_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::IntArrayRef,
                                                                 std::string_view, bool)>();
  return op.call(input, levels, mode, need_indices);
}

// _spp_backward(Tensor grad_output, Tensor indices, SymInt[4] input_size, int[] levels, str mode,
//               MemoryFormat memory_format) -> Tensor
inline at::Tensor call_spp_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                                    c10::SymIntArrayRef input_size, at::IntArrayRef levels,
                                    std::string_view mode, c10::MemoryFormat memory_format) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_ext::_spp_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef,
                                         at::IntArrayRef, std::string_view, c10::MemoryFormat)>();
  return op.call(grad_output, indices, input_size, levels, mode, memory_format);
}

// sppf(Tensor input, int kernel_size, int repeats) -> Tensor
inline at::Tensor call_sppf(const at::Tensor& input, int64_t kernel_size, int64_t repeats) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_ext::sppf", "")
                       .typed<at::Tensor(const at::Tensor&, int64_t, int64_t)>();
  return op.call(input, kernel_size, repeats);
}

// _sppf_backward(Tensor grad_output, Tensor output, int kernel_size, int repeats) -> Tensor
inline at::Tensor call_sppf_backward(const at::Tensor& grad_output, const at::Tensor& output,
                                     int64_t kernel_size, int64_t repeats) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_ext::_sppf_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
  return op.call(grad_output, output, kernel_size, repeats);
}

}  // namespace torch_ext::spp_impl
