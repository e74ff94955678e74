// Autograd and autocast for dilated_conv2d. The autograd Function calls the forward and backward
// ops, so C++ training, Python eager and AOTAutograd all see the same graph. Autocast follows
// aten::conv2d: under autocast the op runs in the autocast dtype (CUDA and CPU).

#include <ATen/autocast_mode.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>
#include <string_view>
#include <vector>

#include "common/non_differentiable.h"
#include "ops/conv/conv_common.h"
#include "ops/conv/conv_ops.h"

namespace torch_ext::conv_impl {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class DilatedConv2dFunction : public torch::autograd::Function<DilatedConv2dFunction> {
 public:
  // Without a bias, `bias` is an empty placeholder (autograd's Function cannot take an undefined
  // tensor) and has_bias is false.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& bias, bool has_bias,
                            const std::vector<int64_t>& stride,
                            const std::vector<int64_t>& padding4,
                            const std::vector<int64_t>& dilation, int64_t groups,
                            const std::string& activation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto act = parse_activation(activation);
    auto [output, preact] = call_conv_forward(
        input, weight, has_bias ? c10::optional<at::Tensor>(bias) : c10::nullopt, stride, padding4,
        dilation, groups, activation, backward_needs_preact(act));
    // What the activation's backward needs: relu the output, silu/gelu the pre-activation.
    at::Tensor saved;
    if (act == Activation::Relu) saved = output;
    if (backward_needs_preact(act)) saved = preact;
    ctx->save_for_backward({input, weight, saved});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding4;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["has_bias"] = has_bias;
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto& grad = grad_outputs[0];
    variable_list result(9);
    if (!grad.defined()) return result;
    const std::array<bool, 3> mask{
        ctx->needs_input_grad(0), ctx->needs_input_grad(1),
        ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)};
    const auto act_saved = saved[2].defined() ? saved[2] : at::empty({0}, grad.options());
    auto [gi, gw, gb] = call_conv_backward(
        grad, saved[0], saved[1], act_saved, ctx->saved_data["stride"].toIntVector(),
        ctx->saved_data["padding"].toIntVector(), ctx->saved_data["dilation"].toIntVector(),
        ctx->saved_data["groups"].toInt(), ctx->saved_data["activation"].toStringRef(), mask);
    if (mask[0]) result[0] = gi;
    if (mask[1]) result[1] = gw;
    if (mask[2]) result[2] = gb;
    return result;
  }
};

at::Tensor apply(const at::Tensor& input, const at::Tensor& weight,
                 const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                 const Padding4& padding4, at::IntArrayRef dilation, int64_t groups,
                 std::string_view activation) {
  const auto s = pair_arg("dilated_conv2d", "stride", stride);
  const auto d = pair_arg("dilated_conv2d", "dilation", dilation);
  const bool has_bias = bias.has_value() && bias->defined();
  const bool needs_grad =
      at::GradMode::is_enabled() &&
      (input.requires_grad() || weight.requires_grad() || (has_bias && bias->requires_grad()));
  if (!needs_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return std::get<0>(call_conv_forward(input, weight, bias, s, padding4, d, groups, activation,
                                         /*save_preact=*/false));
  }
  return DilatedConv2dFunction::apply(
      input, weight, has_bias ? *bias : at::empty({0}, weight.options()), has_bias,
      std::vector<int64_t>(s.begin(), s.end()),
      std::vector<int64_t>(padding4.begin(), padding4.end()),
      std::vector<int64_t>(d.begin(), d.end()), groups, std::string(activation));
}

at::Tensor conv_autograd(const at::Tensor& input, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                         std::string_view activation) {
  return apply(input, weight, bias, stride, padding4_from_ints("dilated_conv2d", padding), dilation,
               groups, activation);
}

at::Tensor conv_padding_autograd(const at::Tensor& input, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 std::string_view padding, at::IntArrayRef dilation, int64_t groups,
                                 std::string_view activation) {
  return apply(input, weight, bias, stride,
               padding4_from_string("dilated_conv2d", padding, stride, dilation, weight), dilation,
               groups, activation);
}

// ---------------------------------------------------------------- autocast

// Both overloads (Padding: at::IntArrayRef or std::string_view): cast to the autocast dtype,
// then the op again below autocast.
template <c10::DeviceType device, c10::DispatchKey key, class Padding>
at::Tensor conv_autocast(const at::Tensor& input, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                         Padding padding, at::IntArrayRef dilation, int64_t groups,
                         std::string_view activation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const auto dtype = at::autocast::get_autocast_dtype(device);
  return call_dilated_conv2d(at::autocast::cached_cast(dtype, input, device),
                             at::autocast::cached_cast(dtype, weight, device),
                             at::autocast::cached_cast(dtype, bias, device), stride, padding,
                             dilation, groups, activation);
}

}  // namespace
}  // namespace torch_ext::conv_impl

TORCH_LIBRARY_IMPL(torch_ext, Autograd, m) {
  m.impl("dilated_conv2d", torch_ext::conv_impl::conv_autograd);
  m.impl("dilated_conv2d.padding", torch_ext::conv_impl::conv_padding_autograd);
  m.impl("_dilated_conv2d_forward", torch_ext::refusing_grad());
  m.impl("_dilated_conv2d_backward", torch_ext::refusing_grad());
  m.impl("_dilated_conv2d_route", torch_ext::non_differentiable());  // a string
}

TORCH_LIBRARY_IMPL(torch_ext, AutocastCUDA, m) {
  using torch_ext::conv_impl::conv_autocast;
  constexpr auto cuda = c10::DeviceType::CUDA;
  constexpr auto key = c10::DispatchKey::AutocastCUDA;
  m.impl("dilated_conv2d", conv_autocast<cuda, key, at::IntArrayRef>);
  m.impl("dilated_conv2d.padding", conv_autocast<cuda, key, std::string_view>);
}

TORCH_LIBRARY_IMPL(torch_ext, AutocastCPU, m) {
  using torch_ext::conv_impl::conv_autocast;
  constexpr auto cpu = c10::DeviceType::CPU;
  constexpr auto key = c10::DispatchKey::AutocastCPU;
  m.impl("dilated_conv2d", conv_autocast<cpu, key, at::IntArrayRef>);
  m.impl("dilated_conv2d.padding", conv_autocast<cpu, key, std::string_view>);
}
