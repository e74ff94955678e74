#pragma once

// Autograd registration for ops whose outputs are not differentiable (integer results, or
// mutation of integer state): run the op below autograd. Registering this, rather than
// nothing, is what PyTorch asks of such ops (torch.library.opcheck checks it).

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace torch_ext {

inline void call_below_autograd(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  at::AutoDispatchBelowADInplaceOrView guard;
  op.callBoxed(stack);
}

inline torch::CppFunction non_differentiable() {
  return torch::CppFunction::makeFromBoxedFunction<&call_below_autograd>();
}

// Autograd registration for ops that take float tensors but have no derivative of their own:
// the private forward and backward ops that the public ops' autograd Functions call. Called with
// an argument that requires grad (grad mode on), they refuse to run instead of returning a
// result that autograd would treat as a constant (zero derivatives). For a backward op that
// means a backward with create_graph=True (double backward, gradient penalties) through it.
inline void call_refusing_grad(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    const auto& schema = op.schema();
    const auto n = schema.arguments().size();
    for (size_t i = 0; i < n; ++i) {
      const auto& value = (*stack)[stack->size() - n + i];
      TORCH_CHECK(!(value.isTensor() && value.toTensor().requires_grad()), schema.name(),
                  " is not differentiable, but its argument ", schema.arguments()[i].name(),
                  " requires grad. For a backward op: a backward with create_graph=True (double "
                  "backward, gradient penalties) is not supported through it; for a private "
                  "forward op: call the public op, which is differentiable.");
    }
  }
  call_below_autograd(op, stack);
}

inline torch::CppFunction refusing_grad() {
  return torch::CppFunction::makeFromBoxedFunction<&call_refusing_grad>();
}

}  // namespace torch_ext
