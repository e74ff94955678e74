// Autograd for spp and sppf: torch::autograd::Function subclasses whose backward calls the
// backward ops, so C++ training, Python eager and AOTAutograd all see the same graph.

#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>
#include <string_view>
#include <vector>

#include "common/non_differentiable.h"
#include "ops/spp/spp_common.h"
#include "ops/spp/spp_ops.h"

namespace torch_ext::spp_impl {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class SppFunction : public torch::autograd::Function<SppFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const std::vector<int64_t>& levels, const std::string& mode) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, indices] = call_spp_forward(input, levels, mode, /*need_indices=*/true);
    ctx->save_for_backward({indices});
    ctx->saved_data["input_size"] = c10::IValue(input.sym_sizes());
    ctx->saved_data["levels"] = levels;
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["channels_last"] =
        kernel_memory_format(input) == c10::MemoryFormat::ChannelsLast;
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto indices = ctx->get_saved_variables()[0];
    const auto input_size = ctx->saved_data["input_size"].toSymIntVector();
    const auto levels = ctx->saved_data["levels"].toIntVector();
    const auto mode = ctx->saved_data["mode"].toStringRef();
    const auto format = ctx->saved_data["channels_last"].toBool() ? c10::MemoryFormat::ChannelsLast
                                                                  : c10::MemoryFormat::Contiguous;
    const auto& grad = grad_outputs[0];
    if (!grad.defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    auto grad_input = call_spp_backward(grad, indices, input_size, levels, mode, format);
    return {grad_input, at::Tensor(), at::Tensor()};
  }
};

class SppfFunction : public torch::autograd::Function<SppfFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, int64_t kernel_size,
                            int64_t repeats) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto output = call_sppf(input, kernel_size, repeats);
    // The output holds every stage of the cascade, which is all the backward needs.
    ctx->save_for_backward({output});
    ctx->saved_data["kernel_size"] = kernel_size;
    ctx->saved_data["repeats"] = repeats;
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto output = ctx->get_saved_variables()[0];
    const auto& grad = grad_outputs[0];
    if (!grad.defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    auto grad_input = call_sppf_backward(grad, output, ctx->saved_data["kernel_size"].toInt(),
                                         ctx->saved_data["repeats"].toInt());
    return {grad_input, at::Tensor(), at::Tensor()};
  }
};

at::Tensor spp_autograd(const at::Tensor& input, at::IntArrayRef levels, std::string_view mode) {
  if (!(at::GradMode::is_enabled() && input.requires_grad())) {
    // Nothing to differentiate: skip the argmax bookkeeping of the training forward.
    at::AutoDispatchBelowADInplaceOrView guard;
    return std::get<0>(call_spp_forward(input, levels, mode, /*need_indices=*/false));
  }
  return SppFunction::apply(input, levels.vec(), std::string(mode));
}

at::Tensor sppf_autograd(const at::Tensor& input, int64_t kernel_size, int64_t repeats) {
  return SppfFunction::apply(input, kernel_size, repeats);
}

}  // namespace
}  // namespace torch_ext::spp_impl

TORCH_LIBRARY_IMPL(torch_ext, Autograd, m) {
  m.impl("spp", torch_ext::spp_impl::spp_autograd);
  m.impl("sppf", torch_ext::spp_impl::sppf_autograd);
  m.impl("_spp_forward", torch_ext::refusing_grad());
  m.impl("_spp_backward", torch_ext::refusing_grad());
  m.impl("_sppf_backward", torch_ext::refusing_grad());
}
