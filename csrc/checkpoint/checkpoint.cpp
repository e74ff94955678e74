// Gradient checkpointing for LibTorch (see torch_ext/checkpoint.h).
//
// A torch::autograd::Function whose inputs are fn's inputs followed by the parameters fn
// reads. Its forward runs fn without recording a graph and saves only the inputs; its backward
// re-runs fn on detached inputs, in the forward's grad mode, autocast state and (optionally)
// RNG state, and differentiates that recomputation with torch::autograd::grad, returning the
// gradients of the inputs and the parameters to the engine, which accumulates each once.

#include "torch_ext/checkpoint.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <atomic>
#include <mutex>
#include <string>
#include <utility>

namespace torch_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::atomic<int64_t> live_closures{0};

// The closure, owned by the autograd node (as a capsule in its saved data): freed with the
// graph, whether or not backward ran.
struct Closure : torch::CustomClassHolder {
  explicit Closure(CheckpointFunction f) : fn(std::move(f)) { ++live_closures; }
  ~Closure() override { --live_closures; }
  CheckpointFunction fn;
};

// ---------------------------------------------------------------- RNG state

struct RngState {
  at::Tensor cpu;
  std::vector<std::pair<c10::DeviceIndex, at::Tensor>> cuda;  // initialized devices only
};

RngState capture_rng() {
  RngState state;
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    state.cpu = gen.get_state();
  }
  if (at::globalContext().hasCUDA()) {
    const auto& hooks = at::detail::getCUDAHooks();
    for (c10::DeviceIndex i = 0; i < static_cast<c10::DeviceIndex>(hooks.deviceCount()); ++i) {
      if (!hooks.hasPrimaryContext(i)) continue;  // never initialized: nothing was drawn
      auto gen = at::globalContext().defaultGenerator(at::Device(at::kCUDA, i));
      std::lock_guard<std::mutex> lock(gen.mutex());
      state.cuda.emplace_back(i, gen.get_state());
    }
  }
  return state;
}

void restore_rng(const RngState& state) {
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(state.cpu);
  }
  for (const auto& [index, cuda_state] : state.cuda) {
    auto gen = at::globalContext().defaultGenerator(at::Device(at::kCUDA, index));
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(cuda_state);
  }
}

// ---------------------------------------------------------------- autocast state

struct AutocastState {
  bool cpu_enabled, cuda_enabled;
  at::ScalarType cpu_dtype, cuda_dtype;
};

AutocastState capture_autocast() {
  return {at::autocast::is_autocast_enabled(at::kCPU), at::autocast::is_autocast_enabled(at::kCUDA),
          at::autocast::get_autocast_dtype(at::kCPU), at::autocast::get_autocast_dtype(at::kCUDA)};
}

void apply_autocast(const AutocastState& state) {
  at::autocast::set_autocast_enabled(at::kCPU, state.cpu_enabled);
  at::autocast::set_autocast_enabled(at::kCUDA, state.cuda_enabled);
  at::autocast::set_autocast_dtype(at::kCPU, state.cpu_dtype);
  at::autocast::set_autocast_dtype(at::kCUDA, state.cuda_dtype);
}

// Runs the recomputation in the forward's autocast state and restores the caller's after,
// with autocast's weight cache off (its entries would outlive this scope).
class AutocastScope {
 public:
  explicit AutocastScope(const AutocastState& forward)
      : saved_(capture_autocast()), cache_(at::autocast::is_autocast_cache_enabled()) {
    apply_autocast(forward);
    at::autocast::set_autocast_cache_enabled(false);
  }
  ~AutocastScope() {
    apply_autocast(saved_);
    at::autocast::set_autocast_cache_enabled(cache_);
  }

 private:
  AutocastState saved_;
  bool cache_;
};

// ---------------------------------------------------------------- the autograd function

void check_outputs(const std::vector<at::Tensor>& outputs) {
  TORCH_CHECK(!outputs.empty(),
              "checkpoint(): fn returned no outputs; it must return at least one tensor");
  for (size_t i = 0; i < outputs.size(); ++i) {
    TORCH_CHECK(outputs[i].defined(), "checkpoint(): fn returned an undefined tensor at position ",
                i, "; every output must be a defined tensor");
  }
}

class CheckpointFunctionNode : public torch::autograd::Function<CheckpointFunctionNode> {
 public:
  // tensors = fn's inputs, then the parameters.
  static variable_list forward(AutogradContext* ctx, at::TensorList tensors, int64_t num_inputs,
                               c10::intrusive_ptr<Closure> closure, bool preserve_rng_state) {
    ctx->set_materialize_grads(false);  // outputs nobody differentiates stay undefined
    ctx->saved_data["num_inputs"] = num_inputs;
    ctx->saved_data["preserve_rng_state"] = preserve_rng_state;
    if (preserve_rng_state) {
      const RngState rng = capture_rng();
      ctx->saved_data["rng_cpu"] = rng.cpu;
      std::vector<int64_t> devices;
      std::vector<at::Tensor> states;
      for (const auto& [index, state] : rng.cuda) {
        devices.push_back(index);
        states.push_back(state);
      }
      ctx->saved_data["rng_cuda_devices"] = devices;
      ctx->saved_data["rng_cuda_states"] = states;
    }
    const AutocastState autocast = capture_autocast();
    ctx->saved_data["autocast_cpu"] = autocast.cpu_enabled;
    ctx->saved_data["autocast_cuda"] = autocast.cuda_enabled;
    ctx->saved_data["autocast_cpu_dtype"] = autocast.cpu_dtype;
    ctx->saved_data["autocast_cuda_dtype"] = autocast.cuda_dtype;
    ctx->saved_data["closure"] = c10::IValue::make_capsule(closure);
    ctx->save_for_backward(tensors.vec());

    const std::vector<at::Tensor> inputs(tensors.begin(), tensors.begin() + num_inputs);
    auto outputs = closure->fn(inputs);  // grad mode is off here: no graph, no activations kept
    check_outputs(outputs);
    variable_list non_differentiable;  // marked in one call: each call replaces the last
    for (const auto& out : outputs) {
      if (!at::isFloatingType(out.scalar_type()) && !at::isComplexType(out.scalar_type())) {
        non_differentiable.push_back(out);
      }
    }
    ctx->mark_non_differentiable(non_differentiable);
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const int64_t num_inputs = ctx->saved_data["num_inputs"].toInt();
    auto closure = ctx->saved_data["closure"].toCapsule();
    const auto& fn = static_cast<Closure*>(closure.get())->fn;

    // Inputs detached from the outer graph, so the recomputation is a graph of its own, unless
    // backward itself is being differentiated (create_graph, e.g. double backward): then the
    // gradients must stay connected to the saved inputs. Parameters as they are.
    const bool create_graph = at::GradMode::is_enabled();
    std::vector<at::Tensor> inputs;
    variable_list targets;  // what we differentiate with respect to
    std::vector<int64_t> target_of(saved.size(), -1);
    for (int64_t i = 0; i < static_cast<int64_t>(saved.size()); ++i) {
      at::Tensor t = saved[i];
      if (i < num_inputs) {
        if (!create_graph) t = t.detach().requires_grad_(saved[i].requires_grad());
        inputs.push_back(t);
      }
      if (t.requires_grad()) {
        target_of[i] = static_cast<int64_t>(targets.size());
        targets.push_back(t);
      }
    }

    std::vector<at::Tensor> outputs;
    {
      const AutocastScope autocast({ctx->saved_data["autocast_cpu"].toBool(),
                                    ctx->saved_data["autocast_cuda"].toBool(),
                                    ctx->saved_data["autocast_cpu_dtype"].toScalarType(),
                                    ctx->saved_data["autocast_cuda_dtype"].toScalarType()});
      const bool preserve_rng = ctx->saved_data["preserve_rng_state"].toBool();
      RngState current;
      if (preserve_rng) {
        current = capture_rng();  // fork: the caller's RNG continues as if nothing ran
        RngState forward{ctx->saved_data["rng_cpu"].toTensor(), {}};
        const auto devices = ctx->saved_data["rng_cuda_devices"].toIntVector();
        const auto states = ctx->saved_data["rng_cuda_states"].toTensorVector();
        for (size_t d = 0; d < devices.size(); ++d) {
          forward.cuda.emplace_back(static_cast<c10::DeviceIndex>(devices[d]), states[d]);
        }
        restore_rng(forward);
      }
      try {
        const at::AutoGradMode grad_mode(true);
        outputs = fn(inputs);
      } catch (...) {
        if (preserve_rng) restore_rng(current);
        throw;
      }
      if (preserve_rng) restore_rng(current);
    }
    check_outputs(outputs);
    TORCH_CHECK(outputs.size() == grad_outputs.size(), "checkpoint(): fn returned ", outputs.size(),
                " outputs when recomputed, ", grad_outputs.size(),
                " in the forward; fn must be deterministic in its structure");

    variable_list roots, root_grads;
    for (size_t i = 0; i < outputs.size(); ++i) {
      if (grad_outputs[i].defined() && outputs[i].requires_grad()) {
        roots.push_back(outputs[i]);
        root_grads.push_back(grad_outputs[i]);
      }
    }
    // One gradient per forward argument: the tensors, then num_inputs, closure and
    // preserve_rng_state, which get none.
    variable_list grads(saved.size() + 3);
    if (!roots.empty() && !targets.empty()) {
      const auto target_grads = torch::autograd::grad(roots, targets, root_grads,
                                                      /*retain_graph=*/create_graph, create_graph,
                                                      /*allow_unused=*/true);
      for (size_t i = 0; i < saved.size(); ++i) {
        if (target_of[i] >= 0) grads[i] = target_grads[target_of[i]];
      }
    }
    return grads;
  }
};

bool any_requires_grad(const std::vector<at::Tensor>& tensors) {
  for (const auto& t : tensors) {
    if (t.defined() && t.requires_grad()) return true;
  }
  return false;
}

}  // namespace

std::vector<at::Tensor> checkpoint(const CheckpointFunction& fn,
                                   const std::vector<at::Tensor>& inputs,
                                   const CheckpointOptions& options) {
  TORCH_CHECK(static_cast<bool>(fn), "checkpoint(): fn is empty");
  for (size_t i = 0; i < inputs.size(); ++i) {
    TORCH_CHECK(inputs[i].defined(), "checkpoint(): inputs[", i, "] is an undefined tensor");
  }
  for (size_t i = 0; i < options.parameters.size(); ++i) {
    TORCH_CHECK(options.parameters[i].defined(), "checkpoint(): options.parameters[", i,
                "] is an undefined tensor");
  }
  if (!at::GradMode::is_enabled()) {
    auto outputs = fn(inputs);  // inference: no graph, nothing to recompute
    check_outputs(outputs);
    return outputs;
  }
  TORCH_CHECK(any_requires_grad(inputs) || any_requires_grad(options.parameters),
              "checkpoint(): neither the inputs nor options.parameters require grad, so there is "
              "nothing to recompute for. Pass the parameters fn uses in options.parameters, or "
              "run fn directly (under torch::NoGradGuard checkpoint just runs fn)");
  std::vector<at::Tensor> tensors(inputs);
  tensors.insert(tensors.end(), options.parameters.begin(), options.parameters.end());
  auto closure = c10::make_intrusive<Closure>(fn);
  return CheckpointFunctionNode::apply(at::TensorList(tensors), static_cast<int64_t>(inputs.size()),
                                       closure, options.preserve_rng_state);
}

at::Tensor checkpoint_sequential(const torch::nn::Sequential& sequential, int64_t segments,
                                 const at::Tensor& input, bool preserve_rng_state) {
  const int64_t modules = static_cast<int64_t>(sequential->size());
  TORCH_CHECK(segments >= 1 && segments <= modules,
              "checkpoint_sequential(): segments must be in [1, ", modules,
              "] (the number of modules), got ", segments);
  // As torch.utils.checkpoint.checkpoint_sequential: segments - 1 checkpointed chunks of
  // modules / segments modules, then the rest run plainly (their activations are needed at once).
  const int64_t size = modules / segments;
  auto run_modules = [&sequential](int64_t begin, int64_t end) {
    std::vector<torch::nn::AnyModule> chunk(sequential->begin() + begin, sequential->begin() + end);
    return [chunk](const std::vector<at::Tensor>& in) -> std::vector<at::Tensor> {
      at::Tensor y = in[0];
      for (auto module : chunk) y = module.forward(y);  // copies share the module
      return {y};
    };
  };
  at::Tensor x = input;
  for (int64_t s = 0; s + 1 < segments; ++s) {
    CheckpointOptions options;
    options.preserve_rng_state = preserve_rng_state;
    for (int64_t m = s * size; m < (s + 1) * size; ++m) {
      for (const auto& p : sequential->begin()[m].ptr()->parameters()) {
        options.parameters.push_back(p);
      }
    }
    auto run = run_modules(s * size, (s + 1) * size);
    // A frozen chunk fed by a tensor without grad has nothing to recompute for: run it.
    const bool differentiable = any_requires_grad({x}) || any_requires_grad(options.parameters);
    x = differentiable ? checkpoint(run, {x}, options)[0] : run({x})[0];
  }
  x = run_modules((segments - 1) * size, modules)({x})[0];
  return x;
}

namespace nn {

CheckpointImpl::CheckpointImpl(torch::nn::AnyModule module, bool preserve_rng_state)
    : module_(std::move(module)), preserve_rng_state_(preserve_rng_state) {
  TORCH_CHECK(!module_.is_empty(), "nn::Checkpoint: module is empty");
  register_module("module", module_.ptr());
}

at::Tensor CheckpointImpl::forward(const at::Tensor& input) {
  CheckpointOptions options;
  options.preserve_rng_state = preserve_rng_state_;
  options.parameters = module_.ptr()->parameters();
  auto module = module_;
  if (!any_requires_grad({input}) && !any_requires_grad(options.parameters)) {
    return module.forward(input);  // frozen and fed without grad: nothing to recompute for
  }
  return checkpoint(
      [module](const std::vector<at::Tensor>& in) mutable -> std::vector<at::Tensor> {
        return {module.forward(in[0])};
      },
      {input}, options)[0];
}

}  // namespace nn

namespace detail {
int64_t live_checkpoint_closures() { return live_closures.load(); }
}  // namespace detail

}  // namespace torch_ext
