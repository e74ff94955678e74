#pragma once

// Gradient checkpointing for LibTorch: run a function without keeping its activations, and
// recompute it during backward.

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "torch_ext/macros.h"

namespace torch_ext {

using CheckpointFunction = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>;

struct CheckpointOptions {
  // Restore the RNG state of the forward (CPU, and every CUDA device already initialized)
  // around the recompute, so that dropout draws the same masks.
  bool preserve_rng_state = true;
  // Tensors fn reads besides its inputs that need gradients, such as the parameters of the
  // modules it calls. Their gradients are computed with torch::autograd::grad inside the
  // recompute and reach them once, through the checkpoint's node.
  std::vector<at::Tensor> parameters;
};

// Runs fn(inputs) without keeping its intermediate tensors and returns its outputs; backward
// recomputes fn (with the forward's grad mode, autocast state and, by default, RNG state) and
// differentiates the recomputation. Outputs that are not floating point are not
// differentiable. The closure is owned by the autograd graph and freed with it, also when
// backward never runs. Outside grad mode fn simply runs (no graph is built); in grad mode it is
// an error when neither the inputs nor the parameters require grad.
TORCH_EXT_API std::vector<at::Tensor> checkpoint(const CheckpointFunction& fn,
                                                 const std::vector<at::Tensor>& inputs,
                                                 const CheckpointOptions& options = {});

// Runs `sequential` in `segments` consecutive chunks, checkpointing every chunk but the last
// (as torch.utils.checkpoint.checkpoint_sequential does). Each chunk's parameters are found
// from its modules. segments must be in [1, number of modules].
TORCH_EXT_API at::Tensor checkpoint_sequential(const torch::nn::Sequential& sequential,
                                               int64_t segments, const at::Tensor& input,
                                               bool preserve_rng_state = true);

namespace nn {

// Wraps any module with forward(Tensor) -> Tensor so that its activations are recomputed in
// backward. The wrapped module is registered as the child "module", so the wrapper's
// parameters (and state_dict keys, prefixed "module.") are the module's.
class TORCH_EXT_API CheckpointImpl : public torch::nn::Module {
 public:
  explicit CheckpointImpl(torch::nn::AnyModule module, bool preserve_rng_state = true);
  at::Tensor forward(const at::Tensor& input);

 private:
  torch::nn::AnyModule module_;
  bool preserve_rng_state_;
};

TORCH_MODULE(Checkpoint);

}  // namespace nn

namespace detail {
// Checkpoint closures alive right now (tests use it to prove they are freed).
TORCH_EXT_API int64_t live_checkpoint_closures();
}  // namespace detail

}  // namespace torch_ext
