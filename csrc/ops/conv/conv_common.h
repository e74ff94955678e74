#pragma once

// What every backend of dilated_conv2d shares: the geometry of one call, the fused activation,
// and the argument checks (errors name the argument, the expectation and what arrived).

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <array>
#include <cstdint>
#include <string_view>

namespace torch_ext::conv_impl {

// The activation applied after the bias, in the same pass as the convolution's epilogue.
enum class Activation { None, Relu, Silu, Gelu };

// Parses "none" / "relu" / "silu" / "gelu"; anything else is an error naming the argument.
Activation parse_activation(std::string_view activation);

// Silu and gelu need their input (the pre-activation) in the backward; relu needs only the
// output (relu'(z) = output > 0), none needs nothing.
inline bool backward_needs_preact(Activation act) {
  return act == Activation::Silu || act == Activation::Gelu;
}

// Padding as the kernels take it: {top, left, bottom, right}, so that "same" with an even
// effective kernel pads one more row/column at the end, like F.conv2d.
using Padding4 = std::array<int64_t, 4>;

// Everything a kernel needs to know about one call; plain integers, no tensors.
struct ConvGeometry {
  int64_t n, c_in, h, w;  // input
  int64_t c_out, kh, kw;  // weight [c_out, c_in / groups, kh, kw]
  int64_t groups;
  int64_t stride_h, stride_w;
  int64_t pad_top, pad_left;  // the end paddings only shape oh, ow
  int64_t dil_h, dil_w;
  int64_t oh, ow;  // output

  int64_t c_in_per_group() const { return c_in / groups; }
  int64_t c_out_per_group() const { return c_out / groups; }
  // Depthwise: every group is one input channel (with c_out / c_in output channels each).
  bool depthwise() const { return groups == c_in && groups > 1; }
};

// Checks the arguments of a convolution (public op and _dilated_conv2d_forward alike).
// `padding` is already in the 4-entry form; `op` names the caller in messages.
void check_conv_args(const char* op, const at::Tensor& input, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                     at::IntArrayRef padding4, at::IntArrayRef dilation, int64_t groups);

// The arguments of _dilated_conv2d_route: those of a convolution with stride and dilation 1
// (which any valid call also satisfies).
void check_route_args(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef padding4,
                      int64_t groups);

// The 4-entry padding of the int overload ({ph, pw} or {p}) and of the string overload
// ("valid", or "same": total dilation * (k - 1), the odd extra row/column at the end).
Padding4 padding4_from_ints(const char* op, at::IntArrayRef padding);
Padding4 padding4_from_string(const char* op, std::string_view padding, at::IntArrayRef stride,
                              at::IntArrayRef dilation, const at::Tensor& weight);

// stride and dilation as two entries (an int list of length 1 is broadcast, like conv2d).
std::array<int64_t, 2> pair_arg(const char* op, const char* name, at::IntArrayRef values);

// Output extent along one axis (SymInt so that Meta kernels keep dynamic sizes symbolic).
c10::SymInt conv_output_size(const c10::SymInt& in, int64_t kernel, int64_t stride,
                             int64_t pad_begin, int64_t pad_end, int64_t dilation);

// The geometry of a checked call with concrete sizes.
ConvGeometry make_geometry(const at::Tensor& input, const at::Tensor& weight,
                           at::IntArrayRef stride, at::IntArrayRef padding4,
                           at::IntArrayRef dilation, int64_t groups);

// ChannelsLast when the input is laid out NHWC (the output follows it, like conv2d).
c10::MemoryFormat conv_memory_format(const at::Tensor& input);

// The backward's arguments: shapes of grad_output and the saved tensor against the geometry.
void check_conv_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                              const at::Tensor& weight, const at::Tensor& saved,
                              at::IntArrayRef stride, at::IntArrayRef padding4,
                              at::IntArrayRef dilation, int64_t groups, Activation act);

// v = act(v) in place, with ATen's own activation ops (any device, any floating dtype).
void activate_(at::Tensor& v, Activation act);

// The gradient reaching the convolution's output through the activation, from what the forward
// saved (see backward_needs_preact); ATen's own activation backward ops, on any device.
at::Tensor activation_backward(const at::Tensor& grad_output, const at::Tensor& saved,
                               Activation act);

// ---------------------------------------------------------------- the vendor route
// Where a backend routes a call to ATen's own convolution (oneDNN / cuDNN). Only symmetric
// padding goes there (ATen's convolution takes one padding per axis).

enum class ForcedRoute { None, Own, Vendor };

// TORCH_EXT_CONV_ROUTE ("own" / "vendor"), read on every call so tests and benchmarks can flip it.
ForcedRoute forced_route();

bool symmetric_padding(at::IntArrayRef padding4);

// Whether the vendor libraries take these values (oneDNN / cuDNN refuse strides, paddings and
// dilations beyond 32 bits with internal errors; our kernels take them).
bool vendor_takes(const ConvGeometry& g);

// Whether a call goes to the vendor route: forced by TORCH_EXT_CONV_ROUTE (own / vendor, the
// latter only where the vendor takes the call), else dense (non-depthwise) float32, bfloat16
// and float16 convolutions with symmetric padding when the backend's vendor library is
// available (`vendor_available`: oneDNN on the CPU, cuDNN on CUDA). float64 and depthwise stay
// ours, as do four-sided paddings.
bool takes_vendor_route(const ConvGeometry& g, at::IntArrayRef padding4, at::ScalarType dtype,
                        bool vendor_available);

// The geometry _dilated_conv2d_route decides on: input channels, groups and padding (stride and
// dilation 1, as the op assumes); after check_route_args.
ConvGeometry route_geometry(const at::Tensor& input, at::IntArrayRef padding4, int64_t groups);

// ATen's convolution_backward of the vendor route, after the activation's backward; gradients
// in the layouts the Meta kernel promises, empty [0] tensors where output_mask is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor> vendor_conv_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& saved, at::IntArrayRef stride, at::IntArrayRef padding4,
    at::IntArrayRef dilation, int64_t groups, Activation act, std::array<bool, 3> output_mask);

}  // namespace torch_ext::conv_impl
