// Dilated convolution: op schemas, the C++ API, argument checks and Meta kernels.
// Backends: conv_cpu.cpp, conv_cuda.cu; autograd and autocast: conv_autograd.cpp.

#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
#include <ATen/ops/threshold_backward.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <limits>

#include "common/checked_size.h"
#include "ops/conv/conv_common.h"
#include "ops/conv/conv_ops.h"
#include "torch_ext/conv.h"

namespace torch_ext {
namespace conv_impl {

Activation parse_activation(std::string_view activation) {
  if (activation == "none") return Activation::None;
  if (activation == "relu") return Activation::Relu;
  if (activation == "silu") return Activation::Silu;
  if (activation == "gelu") return Activation::Gelu;
  TORCH_CHECK(
      false,
      "dilated_conv2d(): activation must be \"none\", \"relu\", \"silu\" or \"gelu\", got \"",
      activation, "\"");
}

std::array<int64_t, 2> pair_arg(const char* op, const char* name, at::IntArrayRef values) {
  TORCH_CHECK(values.size() == 1 || values.size() == 2, op, "(): ", name,
              " must be an int or a pair of ints, got ", values);
  return {values[0], values.back()};
}

Padding4 padding4_from_ints(const char* op, at::IntArrayRef padding) {
  const auto p = pair_arg(op, "padding", padding);
  return {p[0], p[1], p[0], p[1]};
}

Padding4 padding4_from_string(const char* op, std::string_view padding, at::IntArrayRef stride,
                              at::IntArrayRef dilation, const at::Tensor& weight) {
  if (padding == "valid") return {0, 0, 0, 0};
  TORCH_CHECK(padding == "same", op, "(): padding must be \"same\", \"valid\" or ints, got \"",
              padding, "\"");
  const auto s = pair_arg(op, "stride", stride);
  TORCH_CHECK(s[0] == 1 && s[1] == 1, op,
              "(): padding=\"same\" needs stride 1 (as in torch.nn.functional.conv2d), got stride=",
              stride);
  TORCH_CHECK(weight.dim() == 4, op,
              "(): weight must be a 4-D tensor [C_out, C_in / groups, kH, "
              "kW], got shape ",
              weight.sym_sizes());
  const auto d = pair_arg(op, "dilation", dilation);
  Padding4 result{};
  for (int axis = 0; axis < 2; ++axis) {
    const int64_t total =
        checked_mul(op, "the \"same\" padding dilation * (k - 1)", d[axis], weight.size(2 + axis) - 1);
    result[axis] = total / 2;              // top / left
    result[axis + 2] = total - total / 2;  // bottom / right: the odd extra one
  }
  return result;
}

c10::SymInt conv_output_size(const c10::SymInt& in, int64_t kernel, int64_t stride,
                             int64_t pad_begin, int64_t pad_end, int64_t dilation) {
  // Floor division of a possibly negative numerator: compute on the shifted value instead, and
  // let callers reject results below 1.
  const auto span = in + pad_begin + pad_end - dilation * (kernel - 1) - 1;
  return span.sym_ge(0).guard_bool(__FILE__, __LINE__) ? span / stride + 1 : c10::SymInt(0);
}

namespace {

// The output's bytes must be countable (sizes at the int64 edge otherwise wrap in the
// allocator's arithmetic or in the kernels' index math).
void check_output_size(const char* op, const at::Tensor& input, const at::Tensor& weight,
                       at::IntArrayRef stride, at::IntArrayRef padding4, at::IntArrayRef dilation) {
  std::vector<int64_t> shape{0, 0, 0, 0};
  const std::array<c10::SymInt, 4> sizes{
      input.sym_size(0), weight.sym_size(0),
      conv_output_size(input.sym_size(2), weight.size(2), stride[0], padding4[0], padding4[2],
                       dilation[0]),
      conv_output_size(input.sym_size(3), weight.size(3), stride[1], padding4[1], padding4[3],
                       dilation[1])};
  for (size_t d = 0; d < sizes.size(); ++d) {
    const auto concrete = sizes[d].maybe_as_int();
    if (!concrete) return;
    shape[d] = *concrete;
  }
  check_allocation(op, "the output", shape, input.element_size());
}

}  // namespace

void check_conv_args(const char* op, const at::Tensor& input, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                     at::IntArrayRef padding4, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(input.dim() == 4, op, "(): input must be a 4-D tensor [N, C_in, H, W], got a ",
              input.dim(), "-D tensor of shape ", input.sym_sizes());
  TORCH_CHECK(weight.dim() == 4, op,
              "(): weight must be a 4-D tensor [C_out, C_in / groups, kH, kW], got a ",
              weight.dim(), "-D tensor of shape ", weight.sym_sizes());
  const auto dtype = input.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      op, "(): input must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(weight.scalar_type() == dtype, op, "(): weight must have the input's dtype ", dtype,
              ", got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == input.device(), op, "(): weight must be on the input's device ",
              input.device(), ", got ", weight.device());
  TORCH_CHECK(groups >= 1, op, "(): groups must be >= 1, got ", groups);
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, op,
              "(): stride must be two ints >= 1, got ", stride);
  TORCH_CHECK(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1, op,
              "(): dilation must be two ints >= 1, got ", dilation);
  TORCH_CHECK(padding4.size() == 4, op, "(): padding must have 4 entries, got ", padding4);
  for (const auto p : padding4) {
    TORCH_CHECK(p >= 0, op, "(): padding must be >= 0, got ", padding4);
  }
  const auto c_in = input.sym_size(1);
  const auto c_out = weight.sym_size(0);
  // One channel at least: with none, ATen's routes disagree on the output's shape.
  TORCH_SYM_CHECK(c_in.sym_ge(1), op, "(): input must have at least one channel, got shape ",
                  input.sym_sizes());
  if (const auto per_group = weight.sym_size(1).maybe_as_int()) {
    checked_mul(op, "weight.size(1) * groups", *per_group, groups);
  }
  TORCH_SYM_CHECK(c_in.sym_eq(weight.sym_size(1) * groups), op, "(): input has ", c_in,
                  " channels but weight of shape ", weight.sym_sizes(), " with groups=", groups,
                  " expects weight.size(1) * groups = ", weight.sym_size(1) * groups);
  TORCH_SYM_CHECK((c_out % groups).sym_eq(0), op, "(): groups=", groups,
                  " must divide the output channels weight.size(0) = ", c_out);
  TORCH_CHECK(weight.size(2) >= 1 && weight.size(3) >= 1, op,
              "(): weight's kernel size must be at least 1x1, got shape ", weight.sizes());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1, op, "(): bias must be a 1-D tensor of C_out = ", c_out,
                " entries, got shape ", bias->sym_sizes());
    TORCH_SYM_CHECK(bias->sym_size(0).sym_eq(c_out), op,
                    "(): bias must be a 1-D tensor of C_out = ", c_out, " entries, got shape ",
                    bias->sym_sizes());
    TORCH_CHECK(bias->scalar_type() == dtype, op, "(): bias must have the input's dtype ", dtype,
                ", got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == input.device(), op, "(): bias must be on the input's device ",
                input.device(), ", got ", bias->device());
  }
  for (int axis = 0; axis < 2; ++axis) {
    const auto in = input.sym_size(2 + axis);
    const int64_t k = weight.size(2 + axis);
    const char* side = axis == 0 ? "height" : "width";
    const int64_t pad = checked_add(op, "the total padding", padding4[axis], padding4[axis + 2]);
    const auto concrete_in = in.maybe_as_int();
    const c10::SymInt padded =
        concrete_in ? c10::SymInt(checked_add(op, "the padded input's size", *concrete_in, pad))
                    : in + pad;
    const int64_t reach =
        checked_add(op, "the dilated kernel's extent dilation * (k - 1) + 1",
                    checked_mul(op, "the dilated kernel's extent dilation * (k - 1) + 1",
                                dilation[axis], k - 1),
                    1);
    TORCH_SYM_CHECK(padded.sym_ge(reach), op, "(): the ", side,
                    " of the padded input (", padded, ") is smaller than the dilated kernel (",
                    reach, " = dilation * (k - 1) + 1): the output would be empty; input shape ",
                    input.sym_sizes(), ", weight shape ", weight.sizes(), ", padding ", padding4,
                    ", dilation ", dilation);
  }
  check_output_size(op, input, weight, stride, padding4, dilation);
}

ConvGeometry make_geometry(const at::Tensor& input, const at::Tensor& weight,
                           at::IntArrayRef stride, at::IntArrayRef padding4,
                           at::IntArrayRef dilation, int64_t groups) {
  ConvGeometry g{};
  g.n = input.size(0);
  g.c_in = input.size(1);
  g.h = input.size(2);
  g.w = input.size(3);
  g.c_out = weight.size(0);
  g.kh = weight.size(2);
  g.kw = weight.size(3);
  g.groups = groups;
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_top = padding4[0];
  g.pad_left = padding4[1];
  g.dil_h = dilation[0];
  g.dil_w = dilation[1];
  g.oh = (g.h + padding4[0] + padding4[2] - g.dil_h * (g.kh - 1) - 1) / g.stride_h + 1;
  g.ow = (g.w + padding4[1] + padding4[3] - g.dil_w * (g.kw - 1) - 1) / g.stride_w + 1;
  return g;
}

c10::MemoryFormat conv_memory_format(const at::Tensor& input) {
  return input.suggest_memory_format() == c10::MemoryFormat::ChannelsLast
             ? c10::MemoryFormat::ChannelsLast
             : c10::MemoryFormat::Contiguous;
}

void check_conv_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                              const at::Tensor& weight, const at::Tensor& saved,
                              at::IntArrayRef stride, at::IntArrayRef padding4,
                              at::IntArrayRef dilation, int64_t groups, Activation act) {
  check_conv_args("dilated_conv2d backward", input, weight, c10::nullopt, stride, padding4,
                  dilation, groups);
  const std::vector<c10::SymInt> expected{
      input.sym_size(0), weight.sym_size(0),
      conv_output_size(input.sym_size(2), weight.size(2), stride[0], padding4[0], padding4[2],
                       dilation[0]),
      conv_output_size(input.sym_size(3), weight.size(3), stride[1], padding4[1], padding4[3],
                       dilation[1])};
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.sym_sizes().equals(expected),
              "dilated_conv2d backward: grad_output must have the output's shape ", expected,
              ", got ", grad_output.sym_sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(),
              "dilated_conv2d backward: grad_output must have the input's dtype ",
              input.scalar_type(), ", got ", grad_output.scalar_type());
  if (act != Activation::None) {
    TORCH_CHECK(saved.sym_sizes().equals(expected), "dilated_conv2d backward: saved (the ",
                backward_needs_preact(act) ? "pre-activation" : "output",
                ") must have the output's shape ", expected, ", got ", saved.sym_sizes());
  }
}

void activate_(at::Tensor& v, Activation act) {
  switch (act) {
    case Activation::Relu:
      at::relu_(v);
      break;
    case Activation::Silu:
      at::silu_(v);
      break;
    case Activation::Gelu:
      at::gelu_(v, "none");
      break;
    case Activation::None:
      break;
  }
}

at::Tensor activation_backward(const at::Tensor& grad_output, const at::Tensor& saved,
                               Activation act) {
  switch (act) {
    case Activation::Relu:
      return at::threshold_backward(grad_output, saved, 0);
    case Activation::Silu:
      return at::silu_backward(grad_output, saved);
    case Activation::Gelu:
      return at::gelu_backward(grad_output, saved, "none");
    default:
      return grad_output;
  }
}

ForcedRoute forced_route() {
  const char* forced = std::getenv("TORCH_EXT_CONV_ROUTE");
  if (forced == nullptr) return ForcedRoute::None;
  const std::string_view value(forced);
  if (value == "own") return ForcedRoute::Own;
  if (value == "vendor") return ForcedRoute::Vendor;
  return ForcedRoute::None;
}

void check_route_args(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef padding4,
                      int64_t groups) {
  const std::array<int64_t, 2> ones{1, 1};
  check_conv_args("conv_route", input, weight, c10::nullopt, ones, padding4, ones, groups);
}

bool vendor_takes(const ConvGeometry& g) {
  constexpr int64_t limit = std::numeric_limits<int32_t>::max();
  for (const int64_t v : {g.stride_h, g.stride_w, g.dil_h, g.dil_w, g.pad_top, g.pad_left}) {
    if (v > limit) return false;
  }
  return true;
}

bool symmetric_padding(at::IntArrayRef padding4) {
  return padding4.size() == 4 && padding4[0] == padding4[2] && padding4[1] == padding4[3];
}

ConvGeometry route_geometry(const at::Tensor& input, at::IntArrayRef padding4, int64_t groups) {
  ConvGeometry g{};
  g.c_in = input.size(1);
  g.groups = groups;
  g.stride_h = g.stride_w = g.dil_h = g.dil_w = 1;
  g.pad_top = padding4[0];
  g.pad_left = padding4[1];
  return g;
}

bool takes_vendor_route(const ConvGeometry& g, at::IntArrayRef padding4, at::ScalarType dtype,
                        bool vendor_available) {
  const auto forced = forced_route();
  if (forced == ForcedRoute::Own) return false;
  if (!symmetric_padding(padding4) || !vendor_takes(g)) return false;
  if (forced == ForcedRoute::Vendor) return true;
  const bool vendor_dtype = dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
  return vendor_available && vendor_dtype && !g.depthwise();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vendor_conv_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& saved, at::IntArrayRef stride, at::IntArrayRef padding4,
    at::IntArrayRef dilation, int64_t groups, Activation act, std::array<bool, 3> output_mask) {
  auto [gi, gw, gb] = at::convolution_backward(activation_backward(grad_output, saved, act), input,
                                               weight, std::vector<int64_t>{weight.size(0)}, stride,
                                               {padding4[0], padding4[1]}, dilation, false, {0, 0},
                                               groups, output_mask);
  const auto none = at::empty({0}, input.options());
  return {output_mask[0] ? gi.contiguous(conv_memory_format(input)) : none,
          output_mask[1] ? gw.contiguous() : none, output_mask[2] ? gb : none};
}

namespace {

// ---------------------------------------------------------------- Meta kernels

std::vector<c10::SymInt> output_shape(const at::Tensor& input, const at::Tensor& weight,
                                      at::IntArrayRef stride, at::IntArrayRef padding4,
                                      at::IntArrayRef dilation) {
  return {input.sym_size(0), weight.sym_size(0),
          conv_output_size(input.sym_size(2), weight.size(2), stride[0], padding4[0], padding4[2],
                           dilation[0]),
          conv_output_size(input.sym_size(3), weight.size(3), stride[1], padding4[1], padding4[3],
                           dilation[1])};
}

std::tuple<at::Tensor, at::Tensor> conv_forward_meta(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding4, at::IntArrayRef dilation, int64_t groups,
    std::string_view activation, bool save_preact) {
  check_conv_args("dilated_conv2d", input, weight, bias, stride, padding4, dilation, groups);
  const auto act = parse_activation(activation);
  const auto options = input.options().memory_format(conv_memory_format(input));
  const auto shape = output_shape(input, weight, stride, padding4, dilation);
  auto output = at::empty_symint(shape, options);
  auto preact = save_preact && backward_needs_preact(act) ? at::empty_symint(shape, options)
                                                          : at::empty({0}, input.options());
  return {output, preact};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward_meta(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& saved, at::IntArrayRef stride, at::IntArrayRef padding4,
    at::IntArrayRef dilation, int64_t groups, std::string_view activation,
    std::array<bool, 3> output_mask) {
  check_conv_backward_args(grad_output, input, weight, saved, stride, padding4, dilation, groups,
                           parse_activation(activation));
  const auto none = at::empty({0}, input.options());
  return {output_mask[0] ? at::empty_symint(input.sym_sizes(), input.options().memory_format(
                                                                   conv_memory_format(input)))
                         : none,
          output_mask[1] ? at::empty_symint(weight.sym_sizes(), weight.options()) : none,
          output_mask[2] ? at::empty_symint({weight.sym_size(0)}, weight.options()) : none};
}

// ---------------------------------------------------------------- without autograd

at::Tensor conv_composite(const at::Tensor& input, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          std::string_view activation) {
  const auto s = pair_arg("dilated_conv2d", "stride", stride);
  const auto d = pair_arg("dilated_conv2d", "dilation", dilation);
  const auto p = padding4_from_ints("dilated_conv2d", padding);
  return std::get<0>(call_conv_forward(input, weight, bias, s, p, d, groups, activation, false));
}

at::Tensor conv_padding_composite(const at::Tensor& input, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  std::string_view padding, at::IntArrayRef dilation,
                                  int64_t groups, std::string_view activation) {
  const auto s = pair_arg("dilated_conv2d", "stride", stride);
  const auto d = pair_arg("dilated_conv2d", "dilation", dilation);
  const auto p = padding4_from_string("dilated_conv2d", padding, stride, dilation, weight);
  return std::get<0>(call_conv_forward(input, weight, bias, s, p, d, groups, activation, false));
}

}  // namespace
}  // namespace conv_impl

// ---------------------------------------------------------------- C++ API

at::Tensor dilated_conv2d(const at::Tensor& input, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          std::string_view activation) {
  return conv_impl::call_dilated_conv2d(input, weight, bias, stride, padding, dilation, groups,
                                        activation);
}

at::Tensor dilated_conv2d(const at::Tensor& input, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          ConvPadding padding, at::IntArrayRef dilation, int64_t groups,
                          std::string_view activation) {
  return conv_impl::call_dilated_conv2d(
      input, weight, bias, stride,
      std::string_view(padding == ConvPadding::Same ? "same" : "valid"), dilation, groups,
      activation);
}

}  // namespace torch_ext

// ---------------------------------------------------------------- schemas

TORCH_LIBRARY_FRAGMENT(torch_ext, m) {
  m.def(
      "dilated_conv2d(Tensor input, Tensor weight, Tensor? bias=None, int[2] stride=1, "
      "int[2] padding=0, int[2] dilation=1, int groups=1, str activation=\"none\") -> Tensor");
  m.def(
      "dilated_conv2d.padding(Tensor input, Tensor weight, Tensor? bias=None, int[2] stride=1, "
      "str padding=\"valid\", int[2] dilation=1, int groups=1, str activation=\"none\") -> Tensor");
  // The kernels' entry: padding as {top, left, bottom, right}. preact (the output before the
  // activation) is filled only when save_preact and the activation's backward needs it (silu,
  // gelu); it is an empty [0] otherwise.
  m.def(
      "_dilated_conv2d_forward(Tensor input, Tensor weight, Tensor? bias, int[2] stride, "
      "int[4] padding, int[2] dilation, int groups, str activation, bool save_preact) -> "
      "(Tensor output, Tensor preact)");
  // saved: the pre-activation for silu/gelu, the output for relu, anything for none.
  // Gradients not asked for by output_mask come back as empty [0] tensors.
  m.def(
      "_dilated_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor saved, "
      "int[2] stride, int[4] padding, int[2] dilation, int groups, str activation, "
      "bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // Which kernel the forward runs on these tensors' device: "depthwise", "gemm" or "vendor".
  m.def("_dilated_conv2d_route(Tensor input, Tensor weight, int[4] padding, int groups) -> str");
}

TORCH_LIBRARY_IMPL(torch_ext, Meta, m) {
  m.impl("_dilated_conv2d_forward", torch_ext::conv_impl::conv_forward_meta);
  m.impl("_dilated_conv2d_backward", torch_ext::conv_impl::conv_backward_meta);
}

TORCH_LIBRARY_IMPL(torch_ext, CompositeExplicitAutograd, m) {
  m.impl("dilated_conv2d", torch_ext::conv_impl::conv_composite);
  m.impl("dilated_conv2d.padding", torch_ext::conv_impl::conv_padding_composite);
}
