#pragma once

// The conv family's ops through the dispatcher: one typed handle per op (and overload), looked
// up once. The C++ API, the composites, autocast and the autograd Function all call the ops
// through these.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <array>
#include <cstdint>
#include <string_view>
#include <tuple>
#include <type_traits>

namespace torch_ext::conv_impl {

// dilated_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, <padding>,
//                int[2] dilation, int groups, str activation) -> Tensor
// Padding = at::IntArrayRef (the int[2] overload) or std::string_view (the "padding" overload:
// "same" / "valid").
template <class Padding>
at::Tensor call_dilated_conv2d(const at::Tensor& input, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               Padding padding, at::IntArrayRef dilation, int64_t groups,
                               std::string_view activation) {
  static_assert(std::is_same_v<Padding, at::IntArrayRef> ||
                std::is_same_v<Padding, std::string_view>);
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torch_ext::dilated_conv2d",
                             std::is_same_v<Padding, std::string_view> ? "padding" : "")
          .template typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                     const c10::optional<at::Tensor>&, at::IntArrayRef, Padding,
                                     at::IntArrayRef, int64_t, std::string_view)>();
  return op.call(input, weight, bias, stride, padding, dilation, groups, activation);
}

// _dilated_conv2d_forward(Tensor input, Tensor weight, Tensor? bias, int[2] stride,
//                         int[4] padding, int[2] dilation, int groups, str activation,
//                         bool save_preact) -> (Tensor output, Tensor preact)
inline std::tuple<at::Tensor, at::Tensor> call_conv_forward(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding4, at::IntArrayRef dilation, int64_t groups,
    std::string_view activation, bool save_preact) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_ext::_dilated_conv2d_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                           at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                           std::string_view, bool)>();
  return op.call(input, weight, bias, stride, padding4, dilation, groups, activation, save_preact);
}

// _dilated_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor saved,
//                          int[2] stride, int[4] padding, int[2] dilation, int groups,
//                          str activation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> call_conv_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& saved, at::IntArrayRef stride, at::IntArrayRef padding4,
    at::IntArrayRef dilation, int64_t groups, std::string_view activation,
    std::array<bool, 3> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_ext::_dilated_conv2d_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                           int64_t, std::string_view, std::array<bool, 3>)>();
  return op.call(grad_output, input, weight, saved, stride, padding4, dilation, groups, activation,
                 output_mask);
}

}  // namespace torch_ext::conv_impl
