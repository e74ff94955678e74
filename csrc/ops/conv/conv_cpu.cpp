// CPU kernels of dilated_conv2d: checks, layout and dtype handling, the choice of route, and the
// GEMMs (through ATen, so MKL/OpenBLAS/oneDNN do the heavy part); the loops are in
// conv_cpu_kernel.cpp, compiled once per CPU capability.
//
// Routes:
//   depthwise (groups == C_in): the direct kernels of conv_cpu_kernel.cpp.
//   everything else: implicit GEMM in cache-sized tiles. The output pixels of every (image,
//   group) are cut into tiles of T columns; a tile's im2col block [C_in/groups * kh * kw, T]
//   (about 1 MiB) is built, multiplied by the group's weight straight into the output, and the
//   epilogue (bias, activation) runs on the tile while it is still in cache. The (image, group,
//   tile) items are spread over the threads, each with its own buffer and single-threaded GEMMs;
//   with fewer items than threads the items run in turn and each step is parallel inside.
//   A 1x1 convolution with stride 1 and no padding multiplies the input directly.
//   vendor: float32, bfloat16 and float16 dense (non-depthwise) convolutions with symmetric
//   padding go to ATen's convolution when it runs oneDNN for the dtype (onednn_has; the half
//   types only on CPUs oneDNN has kernels of them for): on this project's AMD machines MKL's
//   SGEMM runs its AVX2 code while oneDNN uses AVX-512, about 2x faster, and our GEMM path
//   computes the half types in float. The activation then runs as one pass over the output.
//   TORCH_EXT_CONV_ROUTE=own|vendor forces a route (tests, benchmarks).
// Depthwise forward reads and writes every dtype and both layouts itself (half types widened to
// float per plane or row, NHWC computed as NHWC when the channel multiplier is 1), and so does
// the NHWC backward with multiplier 1 (the input gradient as the forward on flipped taps at
// stride 1, the weight gradient from both NHWC maps). Elsewhere
// float16/bfloat16 compute in float32 (converted once per call) and round once at the end, and
// channels_last tensors are computed in NCHW and returned channels_last.

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/flip.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "common/cpu_capability.h"
#include "ops/conv/conv_common.h"
#include "ops/conv/conv_cpu_kernel.h"

namespace torch_ext::conv_impl {
namespace {

// wide: the channels_last depthwise kernels and the NCHW forward's register tiles, which run
// their AVX-512 copy by default where the CPU has it (measured faster there, float32 and
// bfloat16 alike, unlike the other NCHW loops; the tiles, Zen 5, [8,256,64,64] two threads:
// float32 k3d2/k5d2/k7d2 2.97/2.10/2.32x of F.conv2d against 2.84/2.20/1.61x on AVX2, bfloat16
// 2.31/1.66/1.47x against 1.77/1.44/1.11x).
const ConvCpuKernels& kernels(bool wide = false) {
  return select_cpu_kernels(conv_cpu_kernels_DEFAULT, conv_cpu_kernels_AVX2,
                            conv_cpu_kernels_AVX512, wide);
}

at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// The im2col tile width: about TORCH_EXT_CONV_TILE_BYTES (default 1 MiB) of column buffer,
// at least 64 columns, at most the whole map.
int64_t tile_columns(const ConvGeometry& g, int64_t element_size) {
  static const int64_t tile_bytes = [] {
    const char* env = std::getenv("TORCH_EXT_CONV_TILE_BYTES");
    const int64_t value = env != nullptr ? std::atoll(env) : 0;
    return value > 0 ? value : int64_t{1} << 20;
  }();
  const int64_t rows = std::max<int64_t>(1, g.c_in_per_group() * g.kh * g.kw);
  const int64_t columns = std::max<int64_t>(64, tile_bytes / element_size / rows);
  return std::min(columns, g.oh * g.ow);
}

enum class Route { Own, Vendor };

// PyTorch's own answer to a question that takes no arguments (mkldnn::_is_mkldnn_bf16_supported
// and the like); false when this build of PyTorch has no such op.
bool ask_torch(const char* op_name) {
  const auto op = c10::Dispatcher::singleton().findOp({op_name, ""});
  return op.has_value() && op->typed<bool()>().call();
}

// Whether ATen's convolution runs oneDNN for the dtype on this CPU. float32: wherever PyTorch has
// oneDNN. bfloat16 and float16: only where PyTorch's own checks say oneDNN has kernels for them
// on this CPU (bfloat16: AVX-512 BW/VL/DQ or better; float16: AVX512_FP16 or AMX-FP16).
// Elsewhere ATen's convolution computes them in its slow fallback: on an AVX2-only AMD EPYC,
// [1,256,32,32] -> 256 k3 d6 took 1.7 s (bfloat16) and 2.3 s (float16) there, 15 and 23 ms
// through our im2col + float GEMM.
bool onednn_has(at::ScalarType dtype) {
  if (!at::hasMKLDNN() || !at::globalContext().userEnabledMkldnn()) return false;
  static const bool bf16 = ask_torch("mkldnn::_is_mkldnn_bf16_supported");
  static const bool f16 = ask_torch("mkldnn::_is_mkldnn_fp16_supported");
  switch (dtype) {
    case at::kFloat:
      return true;
    case at::kBFloat16:
      return bf16;
    case at::kHalf:
      return f16;
    default:
      return false;
  }
}

// Dense float32, bfloat16 and float16 go to ATen's convolution when oneDNN runs them there
// (onednn_has): our im2col + GEMM computes the half types in float and loses to oneDNN's own
// kernels (float64 stays ours: oneDNN has no float64 kernels, and ATen's fallback is no faster).
// Depthwise stays ours in every layout.
Route cpu_route(const ConvGeometry& g, at::IntArrayRef padding4, at::ScalarType dtype) {
  return takes_vendor_route(g, padding4, dtype, onednn_has(dtype)) ? Route::Vendor : Route::Own;
}

// The activation in place on the vendor route's output (its pre-activation copied first when
// asked for): the epilogue kernel for float and double, ATen's own ops for the half types.
void activate_in_place(at::Tensor& out, at::Tensor& pre, bool with_preact, Activation act) {
  if (act == Activation::None || out.numel() == 0) return;
  if (out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble) {
    // Dense in memory either way: one pass over the elements, as a single row.
    kernels().epilogue({out.scalar_type(), out.mutable_data_ptr(), out.numel(), 1, out.numel(),
                        nullptr, with_preact ? pre.mutable_data_ptr() : nullptr, out.numel(),
                        act});
    return;
  }
  if (with_preact) pre.copy_(out);
  activate_(out, act);
}

bool is_pointwise(const ConvGeometry& g) {
  return g.kh == 1 && g.kw == 1 && g.stride_h == 1 && g.stride_w == 1 && g.pad_top == 0 &&
         g.pad_left == 0 && g.oh == g.h && g.ow == g.w;
}

// Runs body(begin, end) over [0, items): spread over the threads when there are enough items,
// else in one call (whose steps then parallelize inside). The body calls ATen ops (GEMMs), so
// the workers take the caller's thread-local state (below autograd, grad mode, ...).
template <class F>
void for_items(int64_t items, F&& body) {
  if (items >= at::get_num_threads() && at::get_num_threads() > 1 && !at::in_parallel_region()) {
    const at::ThreadLocalState state;
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      const at::ThreadLocalStateGuard guard(state);
      body(begin, end);
    });
  } else {
    body(0, items);
  }
}

// [rows, columns p0 .. p0 + len) of channel block [c0, c0 + rows) of image n of a [N, C, P] map.
at::Tensor block(const at::Tensor& map3, int64_t n, int64_t c0, int64_t rows, int64_t p0,
                 int64_t len) {
  return map3.select(0, n).narrow(0, c0, rows).narrow(1, p0, len);
}

// The [K, len] im2col block of pixels p0 .. p0 + len - 1 of (image n, group grp): the input
// itself for a pointwise convolution, else built in `col`.
at::Tensor im2col_block(const at::Tensor& x, const at::Tensor& x3, const ConvGeometry& g, int64_t n,
                        int64_t grp, int64_t p0, int64_t len, at::Tensor& col) {
  const int64_t cin_g = g.c_in_per_group(), K = cin_g * g.kh * g.kw;
  if (is_pointwise(g)) return block(x3, n, grp * cin_g, cin_g, p0, len);
  const auto* image = static_cast<const char*>(x.const_data_ptr()) +
                      (n * g.c_in + grp * cin_g) * g.h * g.w * x.element_size();
  kernels().im2col({x.scalar_type(), image, col.mutable_data_ptr(), g, p0, p0 + len});
  return col.narrow(0, 0, K * len).view({K, len});
}

// ---------------------------------------------------------------- forward

void gemm_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                  const ConvGeometry& g, Activation act, at::Tensor& out, at::Tensor& preact) {
  const int64_t P = g.oh * g.ow, K = g.c_in_per_group() * g.kh * g.kw;
  const int64_t cout_g = g.c_out_per_group();
  const int64_t T = tile_columns(g, x.element_size());
  const int64_t tiles = (P + T - 1) / T;
  const bool pointwise = is_pointwise(g);
  const auto w3 = w.view({g.groups, cout_g, K});
  const auto x3 = x.view({g.n, g.c_in, g.h * g.w});
  auto out3 = out.view({g.n, g.c_out, P});
  const bool with_preact = preact.defined() && preact.numel() > 0;
  for_items(g.n * g.groups * tiles, [&](int64_t begin, int64_t end) {
    at::Tensor col = pointwise ? at::Tensor() : at::empty({K * T}, x.options());
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / (g.groups * tiles), grp = item / tiles % g.groups;
      const int64_t p0 = item % tiles * T, len = std::min(T, P - p0);
      const auto a = im2col_block(x, x3, g, n, grp, p0, len, col);
      auto y = block(out3, n, grp * cout_g, cout_g, p0, len);
      at::mm_out(y, w3[grp], a);
      void* pre = with_preact ? static_cast<char*>(preact.mutable_data_ptr()) +
                                    ((n * g.c_out + grp * cout_g) * P + p0) * x.element_size()
                              : nullptr;
      const void* bias = b.defined() ? static_cast<const char*>(b.const_data_ptr()) +
                                           grp * cout_g * b.element_size()
                                     : nullptr;
      if (bias != nullptr || act != Activation::None) {
        kernels().epilogue(
            {x.scalar_type(), y.mutable_data_ptr(), P, cout_g, len, bias, pre, P, act});
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> conv_forward_cpu(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding4, at::IntArrayRef dilation, int64_t groups,
    std::string_view activation, bool save_preact) {
  check_conv_args("dilated_conv2d", input, weight, bias, stride, padding4, dilation, groups);
  const auto act = parse_activation(activation);
  const auto g = make_geometry(input, weight, stride, padding4, dilation, groups);
  const auto dtype = input.scalar_type(), cdtype = compute_dtype(dtype);
  const bool with_preact = save_preact && backward_needs_preact(act);
  const auto format = conv_memory_format(input);
  if (cpu_route(g, padding4, dtype) == Route::Vendor) {
    auto out = at::convolution(input, weight, bias, stride, {padding4[0], padding4[1]}, dilation,
                               false, {0, 0}, groups)
                   .contiguous(format);
    auto pre = with_preact ? at::empty_like(out) : at::empty({0}, input.options());
    activate_in_place(out, pre, with_preact, act);
    return {out, pre};
  }
  const auto w = weight.to(cdtype).contiguous();
  const auto b = bias.has_value() && bias->defined() ? bias->to(cdtype).contiguous() : at::Tensor();
  if (g.depthwise()) {
    // The kernel reads the input in its own dtype and layout (NHWC directly when the multiplier
    // is 1) and writes the output in them: no converted or transposed copy of a map.
    const bool nhwc = format == at::MemoryFormat::ChannelsLast && g.c_out == g.c_in;
    const auto kernel_format = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    const auto x = input.contiguous(kernel_format);
    const auto options = input.options().memory_format(kernel_format);
    auto out = at::empty({g.n, g.c_out, g.oh, g.ow}, options);
    auto pre = with_preact ? at::empty({g.n, g.c_out, g.oh, g.ow}, options)
                           : at::empty({0}, input.options());
    if (out.numel() > 0) {
      const bool wide = nhwc || depthwise_nchw_tiled(g, dtype);
      kernels(wide).depthwise_forward({dtype, x.const_data_ptr(), w.const_data_ptr(),
                                       b.defined() ? b.const_data_ptr() : nullptr,
                                       out.mutable_data_ptr(),
                                       with_preact ? pre.mutable_data_ptr() : nullptr, g, act,
                                       nhwc, cpu_native_bfloat16(wide)});
    }
    return {out.contiguous(format), with_preact ? pre.contiguous(format) : pre};
  }
  const auto x = input.to(cdtype).contiguous();
  auto out = at::empty({g.n, g.c_out, g.oh, g.ow}, x.options());
  auto pre = with_preact ? at::empty_like(out) : at::Tensor();
  if (out.numel() > 0) gemm_forward(x, w, b, g, act, out, pre);
  auto finish = [&](const at::Tensor& t) { return t.to(dtype).contiguous(format); };
  return {finish(out), with_preact ? finish(pre) : at::empty({0}, input.options())};
}

// ---------------------------------------------------------------- backward

void gemm_backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w,
                   const ConvGeometry& g, at::Tensor* grad_input, at::Tensor* grad_weight) {
  const int64_t P = g.oh * g.ow, K = g.c_in_per_group() * g.kh * g.kw;
  const int64_t cin_g = g.c_in_per_group(), cout_g = g.c_out_per_group();
  const int64_t T = tile_columns(g, x.element_size());
  const bool pointwise = is_pointwise(g);
  const auto w3 = w.view({g.groups, cout_g, K});
  const auto x3 = x.view({g.n, g.c_in, g.h * g.w});
  const auto gy3 = gy.view({g.n, g.c_out, P});
  // Tiles of one (image, group) overlap in the input, so an item is a whole (image, group); the
  // weight gradient is summed per thread and then across threads in a fixed order.
  const int64_t items = g.n * g.groups;
  const int64_t threads = at::get_num_threads();
  const bool spread = items >= threads && threads > 1;
  at::Tensor gw_parts;
  if (grad_weight != nullptr) {
    gw_parts = at::zeros({spread ? threads : 1, g.groups, cout_g, K}, x.options());
  }
  at::Tensor gi3;
  if (grad_input != nullptr) {
    *grad_input = pointwise ? at::empty_like(x) : at::zeros_like(x);
    gi3 = grad_input->view({g.n, g.c_in, g.h * g.w});
  }
  for_items(items, [&](int64_t begin, int64_t end) {
    const int64_t slot = spread ? at::get_thread_num() : 0;
    at::Tensor col = pointwise ? at::Tensor() : at::empty({K * T}, x.options());
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / g.groups, grp = item % g.groups;
      for (int64_t p0 = 0; p0 < P; p0 += T) {
        const int64_t len = std::min(T, P - p0);
        const auto gyb = block(gy3, n, grp * cout_g, cout_g, p0, len);
        if (grad_weight != nullptr) {
          const auto a = im2col_block(x, x3, g, n, grp, p0, len, col);
          auto part = gw_parts[slot][grp];
          part.addmm_(gyb, a.t());
        }
        if (grad_input != nullptr) {
          if (pointwise) {
            auto gib = block(gi3, n, grp * cin_g, cin_g, p0, len);
            at::mm_out(gib, w3[grp].t(), gyb);
          } else {
            auto dcol = col.narrow(0, 0, K * len).view({K, len});
            at::mm_out(dcol, w3[grp].t(), gyb);
            auto* image = static_cast<char*>(grad_input->mutable_data_ptr()) +
                          (n * g.c_in + grp * cin_g) * g.h * g.w * x.element_size();
            kernels().col2im({x.scalar_type(), dcol.const_data_ptr(), image, g, p0, p0 + len});
          }
        }
      }
    }
  });
  if (grad_weight != nullptr) *grad_weight = gw_parts.sum(0).view(w.sizes());
}

// The input gradient of a depthwise convolution with multiplier 1 and stride 1 whose paddings
// lie within the kernel's reach, as the forward kernel on grad_preact (NHWC when nhwc, else
// NCHW; in its own dtype) with the taps flipped and the paddings mirrored (pad' = dilation *
// (k - 1) - pad): the transposed convolution. Where it applies and the forward kernel is fast
// for it (NHWC, or the NCHW register tiles), writes grad_input and returns true.
bool input_gradient_by_forward(const at::Tensor& gy, const at::Tensor& w, const ConvGeometry& g,
                               bool nhwc, at::Tensor& grad_input) {
  const int64_t reach_h = (g.kh - 1) * g.dil_h, reach_w = (g.kw - 1) * g.dil_w;
  if (g.c_out != g.c_in || g.stride_h != 1 || g.stride_w != 1 || g.pad_top > reach_h ||
      g.pad_left > reach_w || g.h == 0 || g.w == 0) {
    return false;
  }
  ConvGeometry t = g;  // the transposed convolution: grad_preact in, grad_input out
  t.h = g.oh;
  t.w = g.ow;
  t.oh = g.h;
  t.ow = g.w;
  t.pad_top = reach_h - g.pad_top;
  t.pad_left = reach_w - g.pad_left;
  const auto dtype = gy.scalar_type();
  if (!nhwc && !depthwise_nchw_tiled(t, dtype)) return false;
  const auto format = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto flipped = w.flip({2, 3}).contiguous();
  grad_input = at::empty({g.n, g.c_in, g.h, g.w}, gy.options().memory_format(format));
  kernels(true).depthwise_forward({dtype, gy.const_data_ptr(), flipped.const_data_ptr(), nullptr,
                                   grad_input.mutable_data_ptr(), nullptr, t, Activation::None,
                                   nhwc, cpu_native_bfloat16(true)});
  return true;
}

// Depthwise with multiplier 1 on NHWC maps, in their own dtype and layout (no converted or
// transposed copy of a map): with stride 1 (and paddings within the kernel's reach), the input
// gradient is the NHWC forward of the flipped taps (input_gradient_by_forward); otherwise it
// goes through the NCHW kernel. The weight
// gradient reads both maps NHWC and sums the bias gradient on the way.
std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_backward_nhwc(
    const at::Tensor& grad_preact, const at::Tensor& input, const at::Tensor& weight,
    const ConvGeometry& g, std::array<bool, 3> output_mask) {
  const auto dtype = input.scalar_type(), cdtype = compute_dtype(dtype);
  const auto cl = at::MemoryFormat::ChannelsLast;
  const auto gy = grad_preact.contiguous(cl);
  const auto w = weight.to(cdtype).contiguous();
  const auto none = at::empty({0}, input.options());
  at::Tensor gi = none, gw = none, gb = none;
  if (output_mask[0] && !input_gradient_by_forward(gy, w, g, true, gi)) {
    const auto gyc = gy.to(cdtype).contiguous();
    auto gic = at::empty({g.n, g.c_in, g.h, g.w}, gyc.options());
    kernels().depthwise_backward_input(
        {cdtype, gyc.const_data_ptr(), w.const_data_ptr(), gic.mutable_data_ptr(), g});
    gi = gic.to(dtype).contiguous(cl);
  }
  if (output_mask[1]) {
    // The bias gradient comes with the weight's (one more sum over the rows the kernel reads).
    const auto x = input.contiguous(cl);
    auto gwc = at::empty_like(w);
    auto gbc = output_mask[2] ? at::empty({g.c_out}, w.options()) : at::Tensor();
    kernels(true).depthwise_backward_weight({dtype, gy.const_data_ptr(), x.const_data_ptr(),
                                             gwc.mutable_data_ptr(),
                                             output_mask[2] ? gbc.mutable_data_ptr() : nullptr, g,
                                             true});
    gw = gwc.to(dtype);
    if (output_mask[2]) gb = gbc.to(dtype);
  } else if (output_mask[2]) {
    // ATen's sum of a channels_last half-type map into float is slow (25 ms for [8,256,64,64]
    // bfloat16 here): converted first.
    gb = gy.to(cdtype).sum({0, 2, 3}).to(dtype);
  }
  return {gi, gw, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& saved, at::IntArrayRef stride, at::IntArrayRef padding4,
    at::IntArrayRef dilation, int64_t groups, std::string_view activation,
    std::array<bool, 3> output_mask) {
  const auto act = parse_activation(activation);
  check_conv_backward_args(grad_output, input, weight, saved, stride, padding4, dilation, groups,
                           act);
  const auto g = make_geometry(input, weight, stride, padding4, dilation, groups);
  const auto dtype = input.scalar_type(), cdtype = compute_dtype(dtype);
  if (cpu_route(g, padding4, dtype) == Route::Vendor) {
    return vendor_conv_backward(grad_output, input, weight, saved, stride, padding4, dilation,
                                groups, act, output_mask);
  }
  const bool empty = grad_output.numel() == 0;
  if (!empty && g.depthwise() && g.c_out == g.c_in &&
      conv_memory_format(input) == at::MemoryFormat::ChannelsLast) {
    return depthwise_backward_nhwc(activation_backward(grad_output, saved, act), input, weight, g,
                                   output_mask);
  }
  const auto gy = activation_backward(grad_output, saved, act).to(cdtype).contiguous();
  const auto x = input.to(cdtype).contiguous();
  const auto w = weight.to(cdtype).contiguous();
  at::Tensor gi, gw, gb;
  if (output_mask[0]) {
    if (empty) {
      gi = at::zeros_like(x);
    } else if (g.depthwise() && !input_gradient_by_forward(gy, w, g, false, gi)) {
      gi = at::empty_like(x);
      kernels().depthwise_backward_input(
          {cdtype, gy.const_data_ptr(), w.const_data_ptr(), gi.mutable_data_ptr(), g});
    }
  }
  if (output_mask[1]) {
    if (empty) {
      gw = at::zeros_like(w);
    } else if (g.depthwise()) {
      gw = at::empty_like(w);
      if (output_mask[2]) gb = at::empty({g.c_out}, w.options());
      kernels().depthwise_backward_weight({cdtype, gy.const_data_ptr(), x.const_data_ptr(),
                                           gw.mutable_data_ptr(),
                                           output_mask[2] ? gb.mutable_data_ptr() : nullptr, g,
                                           false});
    }
  }
  if (!empty && !g.depthwise() && (output_mask[0] || output_mask[1])) {
    gemm_backward(gy, x, w, g, output_mask[0] ? &gi : nullptr, output_mask[1] ? &gw : nullptr);
  }
  if (output_mask[2] && !gb.defined()) gb = gy.sum({0, 2, 3});
  const auto none = at::empty({0}, input.options());
  return {output_mask[0] ? gi.to(dtype).contiguous(conv_memory_format(input)) : none,
          output_mask[1] ? gw.to(dtype) : none, output_mask[2] ? gb.to(dtype) : none};
}

std::string conv_route_cpu(const at::Tensor& input, const at::Tensor& weight,
                           at::IntArrayRef padding4, int64_t groups) {
  check_route_args(input, weight, padding4, groups);
  const auto g = route_geometry(input, padding4, groups);
  if (cpu_route(g, padding4, input.scalar_type()) == Route::Vendor) return "vendor";
  return g.depthwise() ? "depthwise" : "gemm";
}

}  // namespace
}  // namespace torch_ext::conv_impl

TORCH_LIBRARY_IMPL(torch_ext, CPU, m) {
  m.impl("_dilated_conv2d_route", torch_ext::conv_impl::conv_route_cpu);
  m.impl("_dilated_conv2d_forward", torch_ext::conv_impl::conv_forward_cpu);
  m.impl("_dilated_conv2d_backward", torch_ext::conv_impl::conv_backward_cpu);
}
