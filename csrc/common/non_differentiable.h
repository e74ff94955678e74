#pragma once

// Autograd registration for ops whose outputs are not differentiable (integer results, or
// mutation of integer state): run the op below autograd. Registering this, rather than
// nothing, is what PyTorch asks of such ops (torch.library.opcheck checks it).

#include <ATen/core/dispatch/Dispatcher.h>
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

}  // namespace torch_ext
