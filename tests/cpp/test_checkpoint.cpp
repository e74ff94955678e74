// torch_ext::checkpoint (gradient checkpointing for LibTorch), checkpoint_sequential and
// nn::Checkpoint: every property is checked against the plain (non-checkpointed) run of the same
// computation on cloned tensors/parameters, which is the independent reference. Gradients,
// parameter accumulation, RNG replay, autocast replay, several/non-differentiable outputs,
// retain_graph, double backward, closure lifetime, threads, errors, no-grad mode, the sequential
// and module wrappers, and peak memory measured with a counting CPU allocator.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <ATen/autocast_mode.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "test_helpers.h"
#include "torch_ext/checkpoint.h"
#include "torch_ext/torch_ext.h"

namespace {

using torch::Tensor;
using torch_ext::CheckpointFunction;
using torch_ext::CheckpointOptions;
using Tensors = std::vector<Tensor>;

constexpr double kTol = 1e-10;

// ---------------------------------------------------------------- helpers

void expect_close(const Tensor& a, const Tensor& b, double tol = kTol) {
  ASSERT_TRUE(a.defined()) << "first tensor undefined";
  ASSERT_TRUE(b.defined()) << "second tensor undefined";
  ASSERT_EQ(a.sizes(), b.sizes());
  EXPECT_TRUE(torch::allclose(a.to(torch::kDouble), b.to(torch::kDouble), tol, tol))
      << "max abs difference " << (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max();
}

void expect_equal(const Tensor& a, const Tensor& b) {
  ASSERT_TRUE(a.defined()) << "first tensor undefined";
  ASSERT_TRUE(b.defined()) << "second tensor undefined";
  ASSERT_EQ(a.sizes(), b.sizes());
  ASSERT_EQ(a.scalar_type(), b.scalar_type());
  EXPECT_TRUE(torch::equal(a, b)) << "max abs difference "
                                  << (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max();
}

Tensor randn(std::vector<int64_t> shape) {
  return torch::randn(shape, torch::dtype(torch::kDouble));
}

Tensor leaf(const Tensor& t, bool requires_grad = true) {
  return t.detach().clone().requires_grad_(requires_grad);
}

std::vector<std::string> sorted_keys(const torch::OrderedDict<std::string, Tensor>& dict) {
  auto keys = dict.keys();
  std::sort(keys.begin(), keys.end());
  return keys;
}

// Linear(4, 8) tanh Linear(8, 8) tanh Linear(8, 3), float64.
torch::nn::Sequential small_mlp() {
  torch::nn::Sequential net(torch::nn::Linear(4, 8), torch::nn::Functional(torch::tanh),
                            torch::nn::Linear(8, 8), torch::nn::Functional(torch::tanh),
                            torch::nn::Linear(8, 3));
  net->to(torch::kDouble);
  return net;
}

torch::nn::Sequential clone_sequential(const torch::nn::Sequential& net) {
  auto copy = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(net->clone());
  TORCH_CHECK(copy, "clone of a Sequential is not a Sequential");
  return torch::nn::Sequential(copy);
}

// Every parameter's grad of `net` equals the one of the same name in `ref`.
void expect_param_grads_close(const torch::nn::Module& net, const torch::nn::Module& ref,
                              double tol = kTol) {
  const auto params = net.named_parameters();
  const auto ref_params = ref.named_parameters();
  ASSERT_EQ(params.size(), ref_params.size());
  ASSERT_GT(params.size(), 0U);
  for (const auto& item : params) {
    SCOPED_TRACE("parameter " + item.key());
    const Tensor* ref_param = ref_params.find(item.key());
    ASSERT_NE(ref_param, nullptr);
    ASSERT_TRUE(item.value().grad().defined()) << "no grad reached the parameter";
    ASSERT_TRUE(ref_param->grad().defined());
    expect_close(item.value().grad(), ref_param->grad(), tol);
  }
}

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(1234);
    closures_at_start_ = torch_ext::detail::live_checkpoint_closures();
  }
  void TearDown() override {
    // No test may leak a checkpoint closure.
    EXPECT_EQ(torch_ext::detail::live_checkpoint_closures(), closures_at_start_);
  }
  int64_t closures_at_start_ = 0;
};

// ---------------------------------------------------------------- 1, 2: gradients

// fn calls the module; options.parameters are its parameters; the plain run uses a clone.
void check_mlp_gradients(bool input_requires_grad) {
  auto net = small_mlp();
  auto ref = clone_sequential(net);
  const auto data = randn({5, 4});
  auto x = leaf(data, input_requires_grad);
  auto x_ref = leaf(data, input_requires_grad);

  int calls = 0;
  CheckpointFunction fn = [&](const Tensors& in) {
    ++calls;
    return Tensors{net->forward(in[0])};
  };
  CheckpointOptions options;
  options.parameters = net->parameters();
  auto outs = torch_ext::checkpoint(fn, {x}, options);
  ASSERT_EQ(outs.size(), 1U);
  EXPECT_EQ(calls, 1) << "forward must call fn once";
  EXPECT_TRUE(outs[0].requires_grad());
  auto out_ref = ref->forward(x_ref);
  expect_close(outs[0], out_ref);

  const auto grad_out = randn(out_ref.sizes().vec());
  outs[0].backward(grad_out);
  out_ref.backward(grad_out);
  EXPECT_EQ(calls, 2) << "backward must recompute fn exactly once";

  if (input_requires_grad) {
    expect_close(x.grad(), x_ref.grad());
  } else {
    EXPECT_FALSE(x.grad().defined());
  }
  expect_param_grads_close(*net, *ref);
}

TEST_F(CheckpointTest, GradientsMatchPlainRunForInputsAndParameters) {
  check_mlp_gradients(/*input_requires_grad=*/true);
}

TEST_F(CheckpointTest, GradientsMatchPlainRunWhenOnlyParametersRequireGrad) {
  check_mlp_gradients(/*input_requires_grad=*/false);
}

TEST_F(CheckpointTest, ParameterGradsAccumulatedExactlyOnce) {
  auto net = small_mlp();
  auto ref = clone_sequential(net);
  const auto data = randn({6, 4});
  auto x = leaf(data);
  auto x_ref = leaf(data);

  CheckpointFunction fn = [&](const Tensors& in) { return Tensors{net->forward(in[0])}; };
  CheckpointOptions options;
  options.parameters = net->parameters();
  auto out = torch_ext::checkpoint(fn, {x}, options)[0];
  out.sum().backward();
  ref->forward(x_ref).sum().backward();

  for (const auto& item : net->named_parameters()) {
    SCOPED_TRACE("parameter " + item.key());
    const auto& ref_grad = ref->named_parameters()[item.key()].grad();
    ASSERT_TRUE(item.value().grad().defined());
    expect_close(item.value().grad(), ref_grad);
    EXPECT_FALSE(torch::allclose(item.value().grad(), 2 * ref_grad))
        << "the parameter's gradient was accumulated twice";
  }
  expect_close(x.grad(), x_ref.grad());
}

TEST_F(CheckpointTest, ParameterAlsoUsedOutsideTheCheckpointGetsBothContributions) {
  // W is read by fn (through options.parameters) and, outside, by the loss: its grad is the
  // sum of both paths, each counted once.
  const auto w_data = randn({4, 4});
  auto w = leaf(w_data);
  auto w_ref = leaf(w_data);
  const auto x_data = randn({3, 4});
  auto x = leaf(x_data);
  auto x_ref = leaf(x_data);

  CheckpointOptions options;
  options.parameters = {w};
  auto out = torch_ext::checkpoint(
      [&](const Tensors& in) { return Tensors{torch::tanh(torch::mm(in[0], w))}; }, {x},
      options)[0];
  (out.sum() + (w * w).sum()).backward();
  (torch::tanh(torch::mm(x_ref, w_ref)).sum() + (w_ref * w_ref).sum()).backward();
  expect_close(w.grad(), w_ref.grad());
  expect_close(x.grad(), x_ref.grad());
}

TEST_F(CheckpointTest, MixedInputsIntegerAndNoGradInputsAreAccepted) {
  // Inputs that are not floating point or that do not require grad get no gradient, and
  // the differentiable input gets the plain run's.
  const auto x_data = randn({5, 3});
  const auto y = randn({5, 3});                                // does not require grad
  const auto idx = torch::tensor({4, 0, 2, 2}, torch::kLong);  // integer input
  auto x = leaf(x_data);
  auto x_ref = leaf(x_data);
  auto f = [](const Tensor& a, const Tensor& b, const Tensor& i) {
    return (a * b).sin().index_select(0, i).pow(2);
  };
  auto out = torch_ext::checkpoint(
      [&](const Tensors& in) { return Tensors{f(in[0], in[1], in[2])}; }, {x, y, idx})[0];
  auto out_ref = f(x_ref, y, idx);
  expect_close(out, out_ref);
  const auto g = randn(out_ref.sizes().vec());
  out.backward(g);
  out_ref.backward(g);
  expect_close(x.grad(), x_ref.grad());
  EXPECT_FALSE(y.grad().defined());
}

TEST_F(CheckpointTest, UnusedParameterIsAllowed) {
  // A tensor listed in options.parameters that this call of fn does not read (a module's
  // unused branch) must not break backward; it gets no gradient (undefined or zero).
  const auto x_data = randn({3, 4});
  auto x = leaf(x_data);
  auto x_ref = leaf(x_data);
  auto w = leaf(randn({4, 4}));
  auto unused = leaf(randn({7}));
  CheckpointOptions options;
  options.parameters = {w, unused};
  auto out = torch_ext::checkpoint(
      [&](const Tensors& in) { return Tensors{torch::mm(in[0], w).sin()}; }, {x}, options)[0];
  ASSERT_NO_THROW(out.sum().backward());
  torch::mm(x_ref, w.detach()).sin().sum().backward();
  expect_close(x.grad(), x_ref.grad());
  if (unused.grad().defined()) {
    EXPECT_TRUE(torch::equal(unused.grad(), torch::zeros_like(unused)));
  }
}

TEST_F(CheckpointTest, OutputThatIsAnInputUnchanged) {
  // fn may return one of its inputs as is (a pass-through next to a computed output).
  const auto data = randn({3, 4});
  auto x = leaf(data);
  auto x_ref = leaf(data);
  auto outs = torch_ext::checkpoint(
      [](const Tensors& in) {
        return Tensors{in[0], in[0].sin()};
      },
      {x});
  ASSERT_EQ(outs.size(), 2U);
  expect_equal(outs[0], data);
  (outs[0] * 3 + outs[1]).sum().backward();
  (x_ref * 3 + x_ref.sin()).sum().backward();
  expect_close(x.grad(), x_ref.grad());
}

// ---------------------------------------------------------------- 3: RNG

// Dropout plus multiplicative rand noise: the input gradient depends on both draws.
Tensors random_fn(const Tensors& in) {
  const auto& x = in[0];
  return {torch::dropout(x, 0.5, /*train=*/true) * (1 + torch::rand_like(x))};
}

struct RngRun {
  Tensor out, grad;
};

RngRun run_random(bool checkpointed, bool preserve_rng_state, uint64_t seed, const Tensor& data) {
  auto x = leaf(data);
  torch::manual_seed(seed);
  Tensor out;
  if (checkpointed) {
    CheckpointOptions options;
    options.preserve_rng_state = preserve_rng_state;
    out = torch_ext::checkpoint(random_fn, {x}, options)[0];
  } else {
    out = random_fn({x})[0];
  }
  out.sum().backward();
  return {out, x.grad()};
}

TEST_F(CheckpointTest, PreservedRngStateReplaysDropoutAndRandMasks) {
  const auto data = randn({16, 32});
  const auto plain = run_random(false, true, 77, data);
  const auto ckpt = run_random(true, true, 77, data);
  expect_equal(ckpt.out, plain.out);
  expect_equal(ckpt.grad, plain.grad);
}

TEST_F(CheckpointTest, WithoutPreservedRngStateRecomputeDrawsNewMasks) {
  const auto data = randn({16, 32});
  const auto plain = run_random(false, true, 77, data);
  const auto ckpt = run_random(true, /*preserve_rng_state=*/false, 77, data);
  // The forward is the same computation from the same seed ...
  expect_equal(ckpt.out, plain.out);
  // ... but the recompute draws other masks, so the gradient differs from the plain run's.
  ASSERT_TRUE(ckpt.grad.defined());
  EXPECT_FALSE(torch::allclose(ckpt.grad, plain.grad))
      << "preserve_rng_state=false gave the same gradient as the seeded plain run";
}

TEST_F(CheckpointTest, RngStateAfterBackwardIsNotRewound) {
  const auto data = randn({16, 32});
  torch::manual_seed(5);
  const auto first_after_seed = torch::rand({64});

  // Plain run: what the generator gives after forward + backward.
  auto x_ref = leaf(data);
  torch::manual_seed(5);
  random_fn({x_ref})[0].sum().backward();
  const auto next_ref = torch::rand({64});
  const auto next2_ref = torch::rand({64});

  auto x = leaf(data);
  torch::manual_seed(5);
  torch_ext::checkpoint(random_fn, {x})[0].sum().backward();
  const auto next = torch::rand({64});
  const auto next2 = torch::rand({64});

  EXPECT_FALSE(torch::equal(next, first_after_seed)) << "generator rewound to the seed";
  EXPECT_FALSE(torch::equal(next2, first_after_seed));
  EXPECT_FALSE(torch::equal(next, next2));
  expect_equal(next, next_ref);
  expect_equal(next2, next2_ref);
}

TEST_F(CheckpointTest, RngDrawsBetweenForwardAndBackwardAreNotRewound) {
  // The recompute restores the forward's RNG state only around itself: numbers drawn between
  // forward and backward are not drawn again after backward (as torch.utils.checkpoint's
  // fork_rng does).
  const auto data = randn({16, 32});
  auto x_ref = leaf(data);
  torch::manual_seed(9);
  auto out_ref = random_fn({x_ref})[0];
  const auto between_ref = torch::rand({64});
  out_ref.sum().backward();
  const auto after_ref = torch::rand({64});

  auto x = leaf(data);
  torch::manual_seed(9);
  auto out = torch_ext::checkpoint(random_fn, {x})[0];
  const auto between = torch::rand({64});
  out.sum().backward();
  const auto after = torch::rand({64});

  expect_equal(between, between_ref);
  expect_equal(x.grad(), x_ref.grad());
  EXPECT_FALSE(torch::equal(after, between)) << "backward rewound the generator";
  expect_equal(after, after_ref);
}

// ---------------------------------------------------------------- 4: autocast

// Enables CPU autocast to bfloat16 for its lifetime; restores the previous state and clears
// the cast cache like leaving a torch.autocast region.
class CpuAutocast {
 public:
  CpuAutocast()
      : enabled_(at::autocast::is_autocast_enabled(at::kCPU)),
        dtype_(at::autocast::get_autocast_dtype(at::kCPU)) {
    at::autocast::set_autocast_enabled(at::kCPU, true);
    at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
  }
  ~CpuAutocast() {
    at::autocast::set_autocast_enabled(at::kCPU, enabled_);
    at::autocast::set_autocast_dtype(at::kCPU, dtype_);
    at::autocast::clear_cache();
  }
  CpuAutocast(const CpuAutocast&) = delete;
  CpuAutocast& operator=(const CpuAutocast&) = delete;

 private:
  bool enabled_;
  at::ScalarType dtype_;
};

TEST_F(CheckpointTest, AutocastStateIsReplayedInRecompute) {
  const auto x_data = torch::randn({8, 16});  // float32: what autocast casts
  const auto w_data = torch::randn({16, 8});
  const auto v_data = torch::randn({8, 4});
  const auto grad_out = torch::randn({8, 4}).to(torch::kBFloat16);

  auto f = [](const Tensor& x, const Tensor& w, const Tensor& v) {
    return torch::mm(torch::mm(x, w).sin(), v);
  };

  // Plain run under autocast; backward after autocast is off.
  auto x_ref = leaf(x_data), w_ref = leaf(w_data), v_ref = leaf(v_data);
  Tensor out_ref;
  {
    CpuAutocast autocast;
    out_ref = f(x_ref, w_ref, v_ref);
  }
  out_ref.backward(grad_out);

  auto x = leaf(x_data), w = leaf(w_data), v = leaf(v_data);
  Tensor out;
  {
    CpuAutocast autocast;
    CheckpointOptions options;
    options.parameters = {w};
    out = torch_ext::checkpoint([&](const Tensors& in) { return Tensors{f(in[0], w, in[1])}; },
                                {x, v}, options)[0];
  }
  ASSERT_FALSE(at::autocast::is_autocast_enabled(at::kCPU));
  EXPECT_EQ(out_ref.scalar_type(), at::kBFloat16);
  EXPECT_EQ(out.scalar_type(), at::kBFloat16);
  expect_equal(out, out_ref);
  out.backward(grad_out);

  expect_close(x.grad(), x_ref.grad(), 1e-6);
  expect_close(w.grad(), w_ref.grad(), 1e-6);
  expect_close(v.grad(), v_ref.grad(), 1e-6);
  EXPECT_EQ(x.grad().scalar_type(), at::kFloat);

  // The test can tell: without autocast the gradients are visibly different.
  auto x_fp = leaf(x_data), w_fp = leaf(w_data), v_fp = leaf(v_data);
  f(x_fp, w_fp, v_fp).backward(grad_out.to(at::kFloat));
  EXPECT_FALSE(torch::allclose(x_fp.grad(), x_ref.grad(), 1e-6, 1e-6));
}

// ---------------------------------------------------------------- 5: several outputs

struct MultiRun {
  Tensor x, x_grad;
  Tensors outs;
};

// Outputs: sin(x*y) (differentiable), argmax (integer), a detached tensor, a second
// differentiable output, a second integer output (argmin).
Tensors multi_fn(const Tensors& in) {
  const auto& x = in[0];
  const auto& y = in[1];
  return {(x * y).sin(), x.argmax(1), (x * 3).detach(), x.pow(2).sum(0), x.argmin(0)};
}

TEST_F(CheckpointTest, SeveralOutputsNonDifferentiableOutputsAndPartialBackward) {
  const auto x_data = randn({5, 6});
  const auto y = randn({5, 6});

  // which: the outputs the loss uses.
  auto run = [&](bool checkpointed, const std::vector<int>& which) {
    MultiRun r;
    r.x = leaf(x_data);
    r.outs = checkpointed ? torch_ext::checkpoint(multi_fn, {r.x, y}) : multi_fn({r.x, y});
    Tensor loss = torch::zeros({}, torch::kDouble);
    for (const int i : which) loss = loss + (r.outs[i].to(torch::kDouble) * (i + 1)).sum();
    loss.backward();
    r.x_grad = r.x.grad();
    return r;
  };

  for (const auto& which : std::vector<std::vector<int>>{{0}, {3}, {0, 3}, {0, 2}, {2, 3}}) {
    SCOPED_TRACE("loss over outputs " + c10::str(which));
    const auto plain = run(false, which);
    const auto ckpt = run(true, which);
    ASSERT_EQ(ckpt.outs.size(), 5U);
    for (size_t i = 0; i < 5; ++i) expect_equal(ckpt.outs[i], plain.outs[i]);
    for (const int i : {1, 4}) {
      EXPECT_EQ(ckpt.outs[i].scalar_type(), torch::kLong);
      EXPECT_FALSE(ckpt.outs[i].requires_grad()) << "integer output " << i << " requires grad";
    }
    EXPECT_TRUE(ckpt.outs[0].requires_grad());
    EXPECT_TRUE(ckpt.outs[3].requires_grad());
    expect_close(ckpt.x_grad, plain.x_grad);
  }
}

// ---------------------------------------------------------------- 6: retain_graph

TEST_F(CheckpointTest, RetainGraphBackwardTwiceAccumulatesLikePlainRun) {
  auto net = small_mlp();
  auto ref = clone_sequential(net);
  const auto data = randn({4, 4});
  auto x = leaf(data);
  auto x_ref = leaf(data);

  CheckpointOptions options;
  options.parameters = net->parameters();
  auto out = torch_ext::checkpoint([&](const Tensors& in) { return Tensors{net->forward(in[0])}; },
                                   {x}, options)[0];
  auto out_ref = ref->forward(x_ref);
  const auto g = randn(out_ref.sizes().vec());

  out.backward(g, /*retain_graph=*/true);
  out_ref.backward(g, /*retain_graph=*/true);
  const auto x_grad_once = x.grad().clone();
  expect_close(x_grad_once, x_ref.grad());

  out.backward(g, /*retain_graph=*/true);
  out_ref.backward(g, /*retain_graph=*/true);
  expect_close(x.grad(), x_ref.grad());
  expect_close(x.grad(), 2 * x_grad_once);
  expect_param_grads_close(*net, *ref);
}

// ---------------------------------------------------------------- 7: double backward

TEST_F(CheckpointTest, DoubleBackwardThroughCheckpoint) {
  const auto data = randn({7});
  auto x = leaf(data);
  auto x_ref = leaf(data);

  auto y = torch_ext::checkpoint([](const Tensors& in) { return Tensors{torch::pow(in[0], 3)}; },
                                 {x})[0];
  auto y_ref = torch::pow(x_ref, 3);

  auto g = torch::autograd::grad({y.sum()}, {x}, {}, /*retain_graph=*/true,
                                 /*create_graph=*/true)[0];
  auto g_ref = torch::autograd::grad({y_ref.sum()}, {x_ref}, {}, true, true)[0];
  expect_close(g, g_ref);
  expect_close(g, 3 * data * data);
  ASSERT_TRUE(g.requires_grad()) << "first gradient is not differentiable (create_graph)";

  Tensor gg;
  try {
    gg = torch::autograd::grad({g.sum()}, {x})[0];
  } catch (const c10::Error& e) {
    FAIL() << "the first gradient's graph does not lead back to x (second-order gradient "
              "lost): "
           << std::string(e.what()).substr(0, 200);
  }
  auto gg_ref = torch::autograd::grad({g_ref.sum()}, {x_ref})[0];
  expect_close(gg, gg_ref);
  expect_close(gg, 6 * data);
}

// ---------------------------------------------------------------- 8: closure lifetime

TEST_F(CheckpointTest, ClosureFreedAfterForwardAndBackward) {
  const int64_t before = torch_ext::detail::live_checkpoint_closures();
  auto token = std::make_shared<int>(0);
  ASSERT_EQ(token.use_count(), 1);
  {
    auto x = leaf(randn({3, 3}));
    Tensors outs;
    {
      CheckpointFunction fn = [token](const Tensors& in) { return Tensors{in[0].sin() * 2}; };
      outs = torch_ext::checkpoint(fn, {x});
    }
    EXPECT_EQ(torch_ext::detail::live_checkpoint_closures(), before + 1)
        << "the counter does not count the live closure";
    EXPECT_GT(token.use_count(), 1) << "the closure does not hold fn";
    outs[0].sum().backward();
    EXPECT_TRUE(x.grad().defined());
  }
  EXPECT_EQ(torch_ext::detail::live_checkpoint_closures(), before);
  EXPECT_EQ(token.use_count(), 1) << "fn (and what it captures) leaked";
}

TEST_F(CheckpointTest, ClosureFreedWhenBackwardNeverRuns) {
  const int64_t before = torch_ext::detail::live_checkpoint_closures();
  auto token = std::make_shared<int>(0);
  {
    auto x = leaf(randn({3, 4}));
    auto net = small_mlp();
    CheckpointOptions options;
    options.parameters = net->parameters();
    Tensors outs;
    {
      CheckpointFunction fn = [token, net = net.ptr()](const Tensors& in) {
        return Tensors{net->forward(in[0]), in[0].argmax(1)};
      };
      outs = torch_ext::checkpoint(fn, {x}, options);
    }
    EXPECT_EQ(torch_ext::detail::live_checkpoint_closures(), before + 1);
    EXPECT_GT(token.use_count(), 1);
    auto loss = outs[0].sum();  // graph extended beyond the checkpoint, never run
  }
  EXPECT_EQ(torch_ext::detail::live_checkpoint_closures(), before);
  EXPECT_EQ(token.use_count(), 1) << "fn (and what it captures) leaked";
}

TEST_F(CheckpointTest, ClosureFreedAfterRetainedBackward) {
  const int64_t before = torch_ext::detail::live_checkpoint_closures();
  auto token = std::make_shared<int>(0);
  {
    auto x = leaf(randn({3, 3}));
    auto outs = torch_ext::checkpoint(
        [token](const Tensors& in) {
          return Tensors{in[0].exp(), in[0].cos()};
        },
        {x});
    outs[1].sum().backward({}, /*retain_graph=*/true);
    outs[0].sum().backward({}, /*retain_graph=*/true);
    EXPECT_EQ(torch_ext::detail::live_checkpoint_closures(), before + 1);
  }
  EXPECT_EQ(torch_ext::detail::live_checkpoint_closures(), before);
  EXPECT_EQ(token.use_count(), 1);
}

// ---------------------------------------------------------------- 9: threads

struct ThreadResult {
  Tensor x_grad;
  std::vector<Tensor> param_grads;
  std::string error;
};

TEST_F(CheckpointTest, BackwardOnOtherThreadsConcurrently) {
  constexpr int kGraphs = 4;
  std::vector<torch::nn::Sequential> nets, refs;
  std::vector<Tensor> xs, x_refs, outs, grads_out;
  for (int i = 0; i < kGraphs; ++i) {
    nets.push_back(small_mlp());
    refs.push_back(clone_sequential(nets.back()));
    const auto data = randn({6, 4});
    xs.push_back(leaf(data));
    x_refs.push_back(leaf(data));
    grads_out.push_back(randn({6, 3}));
  }

  // (a) forward here, backward on other threads, concurrently.
  for (int i = 0; i < kGraphs; ++i) {
    auto net = nets[i];
    CheckpointOptions options;
    options.parameters = net->parameters();
    outs.push_back(torch_ext::checkpoint(
        [net = net.ptr()](const Tensors& in) { return Tensors{net->forward(in[0]).tanh()}; },
        {xs[i]}, options)[0]);
  }
  std::vector<std::string> errors(kGraphs);
  {
    std::vector<std::thread> threads;
    for (int i = 0; i < kGraphs; ++i) {
      threads.emplace_back([&, i] {
        try {
          outs[i].backward(grads_out[i]);
        } catch (const std::exception& e) {
          errors[i] = e.what();
        }
      });
    }
    for (auto& t : threads) t.join();
  }
  for (int i = 0; i < kGraphs; ++i) {
    SCOPED_TRACE("graph " + std::to_string(i));
    EXPECT_EQ(errors[i], "");
    refs[i]->forward(x_refs[i]).tanh().backward(grads_out[i]);
    expect_close(xs[i].grad(), x_refs[i].grad());
    expect_param_grads_close(*nets[i], *refs[i]);
  }
  outs.clear();

  // (b) forward and backward each on its own thread, concurrently.
  std::vector<torch::nn::Sequential> nets_b, refs_b;
  std::vector<Tensor> data_b;
  for (int i = 0; i < kGraphs; ++i) {
    nets_b.push_back(small_mlp());
    refs_b.push_back(clone_sequential(nets_b.back()));
    data_b.push_back(randn({5, 4}));
  }
  std::vector<ThreadResult> results(kGraphs);
  {
    std::vector<std::thread> threads;
    for (int i = 0; i < kGraphs; ++i) {
      threads.emplace_back([&, i] {
        try {
          auto x = leaf(data_b[i]);
          auto net = nets_b[i];
          CheckpointOptions options;
          options.parameters = net->parameters();
          for (int rep = 0; rep < 3; ++rep) {
            auto out = torch_ext::checkpoint(
                [net = net.ptr()](const Tensors& in) { return Tensors{net->forward(in[0]).sin()}; },
                {x}, options)[0];
            out.sum().backward();
          }
          results[i].x_grad = x.grad();
        } catch (const std::exception& e) {
          results[i].error = e.what();
        }
      });
    }
    for (auto& t : threads) t.join();
  }
  for (int i = 0; i < kGraphs; ++i) {
    SCOPED_TRACE("thread " + std::to_string(i));
    EXPECT_EQ(results[i].error, "");
    auto x_ref = leaf(data_b[i]);
    for (int rep = 0; rep < 3; ++rep) refs_b[i]->forward(x_ref).sin().sum().backward();
    expect_close(results[i].x_grad, x_ref.grad());
    expect_param_grads_close(*nets_b[i], *refs_b[i]);
  }
}

TEST_F(CheckpointTest, NestedCheckpoint) {
  // The outer recompute runs an inner checkpoint (which builds its own node) during backward.
  auto net = small_mlp();
  auto ref = clone_sequential(net);
  const auto data = randn({4, 4});
  auto x = leaf(data);
  auto x_ref = leaf(data);
  CheckpointOptions options;
  options.parameters = net->parameters();
  CheckpointFunction inner = [&](const Tensors& in) { return Tensors{net->forward(in[0])}; };
  CheckpointFunction outer = [&](const Tensors& in) {
    auto h = torch_ext::checkpoint(inner, {in[0] * 2}, options)[0];
    return Tensors{h.sin()};
  };
  auto out = torch_ext::checkpoint(outer, {x}, options)[0];
  out.sum().backward();
  ref->forward(x_ref * 2).sin().sum().backward();
  expect_close(x.grad(), x_ref.grad());
  expect_param_grads_close(*net, *ref);
}

// ---------------------------------------------------------------- 10: errors

TEST_F(CheckpointTest, UndefinedOutputIsAnError) {
  auto x = leaf(randn({2, 2}));
  const auto message = error_message(
      [&] { torch_ext::checkpoint([](const Tensors&) { return Tensors{Tensor()}; }, {x}); });
  EXPECT_NE(message.find("undefined"), std::string::npos) << message;
}

TEST_F(CheckpointTest, NoOutputsIsAnError) {
  auto x = leaf(randn({2, 2}));
  const auto message =
      error_message([&] { torch_ext::checkpoint([](const Tensors&) { return Tensors{}; }, {x}); });
  EXPECT_NE(message.find("no outputs"), std::string::npos) << message;
}

TEST_F(CheckpointTest, NothingRequiresGradIsAnError) {
  // In grad mode, a checkpoint with nothing to differentiate is a mistake (typically the
  // parameters fn uses were not passed): a clear error, and no closure is kept.
  const int64_t before = torch_ext::detail::live_checkpoint_closures();
  const auto x = randn({3, 3});
  const auto w = randn({3, 3});  // a "parameter" that does not require grad
  int calls = 0;
  CheckpointOptions options;
  options.parameters = {w};
  try {
    torch_ext::checkpoint(
        [&](const Tensors& in) {
          ++calls;
          return Tensors{torch::mm(in[0], w)};
        },
        {x}, options);
    FAIL() << "expected c10::Error";
  } catch (const c10::Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("require grad"), std::string::npos) << message;
    EXPECT_NE(message.find("options.parameters"), std::string::npos) << message;
  }
  EXPECT_EQ(calls, 0);
  EXPECT_EQ(torch_ext::detail::live_checkpoint_closures(), before);
}

// ---------------------------------------------------------------- 11: no-grad mode

TEST_F(CheckpointTest, NoGradModeJustRunsFn) {
  const int64_t before = torch_ext::detail::live_checkpoint_closures();
  auto net = small_mlp();
  auto x = leaf(randn({3, 4}));
  int calls = 0;
  CheckpointOptions options;
  options.parameters = net->parameters();
  Tensors outs;
  {
    torch::NoGradGuard no_grad;
    outs = torch_ext::checkpoint(
        [&](const Tensors& in) {
          ++calls;
          return Tensors{net->forward(in[0])};
        },
        {x}, options);
  }
  EXPECT_EQ(calls, 1);
  ASSERT_EQ(outs.size(), 1U);
  EXPECT_FALSE(outs[0].requires_grad());
  EXPECT_EQ(torch_ext::detail::live_checkpoint_closures(), before);
  torch::NoGradGuard no_grad;
  expect_close(outs[0], net->forward(x));
}

// ---------------------------------------------------------------- 12: checkpoint_sequential

// Linear(6, 6), ReLU (counting its calls) six times: 12 modules.
struct CountedSequential {
  torch::nn::Sequential net;
  std::shared_ptr<std::vector<int>> relu_calls = std::make_shared<std::vector<int>>(6, 0);
};

CountedSequential counted_sequential() {
  CountedSequential s;
  for (int i = 0; i < 6; ++i) {
    s.net->push_back(torch::nn::Linear(6, 6));
    auto calls = s.relu_calls;
    s.net->push_back(torch::nn::Functional([calls, i](const Tensor& t) {
      ++(*calls)[i];
      return torch::relu(t);
    }));
  }
  s.net->to(torch::kDouble);
  return s;
}

TEST_F(CheckpointTest, CheckpointSequentialMatchesPlainRun) {
  for (const int64_t segments : {1, 2, 3, 4, 5, 6, 7, 12}) {
    for (const bool input_requires_grad : {true, false}) {
      SCOPED_TRACE("segments " + std::to_string(segments) +
                   (input_requires_grad ? ", input requires grad" : ", only parameters"));
      auto s = counted_sequential();
      auto ref = clone_sequential(s.net);  // shares the counters; reset below
      const auto data = randn({5, 6});
      auto x = leaf(data, input_requires_grad);
      auto x_ref = leaf(data, input_requires_grad);

      std::fill(s.relu_calls->begin(), s.relu_calls->end(), 0);
      const int64_t closures_before = torch_ext::detail::live_checkpoint_closures();
      auto out = torch_ext::checkpoint_sequential(s.net, segments, x);
      // segments chunks, all but the last checkpointed: segments - 1 closures alive.
      EXPECT_EQ(torch_ext::detail::live_checkpoint_closures() - closures_before, segments - 1)
          << "number of checkpointed chunks";
      EXPECT_TRUE(out.requires_grad());
      const auto g = randn({5, 6});
      out.backward(g);
      const std::vector<int> calls = *s.relu_calls;

      auto out_ref = ref->forward(x_ref);
      out_ref.backward(g);
      expect_close(out, out_ref);
      if (input_requires_grad) {
        expect_close(x.grad(), x_ref.grad());
      } else {
        EXPECT_FALSE(x.grad().defined());
      }
      expect_param_grads_close(*s.net, *ref);

      // As torch.utils.checkpoint.checkpoint_sequential: segments - 1 chunks of
      // 12 / segments (rounded down) modules are checkpointed, so their modules run twice
      // (forward and recompute); the last chunk takes the rest and runs once.
      const int64_t chunk = 12 / segments;
      for (int i = 0; i < 6; ++i) {
        const int64_t module_index = 2 * i + 1;
        const bool checkpointed = module_index < chunk * (segments - 1);
        EXPECT_EQ(calls[i], checkpointed ? 2 : 1)
            << "ReLU " << i << " (module " << module_index << ")";
      }
    }
  }
}

TEST_F(CheckpointTest, CheckpointSequentialPreservesRngForDropout) {
  torch::nn::Sequential net(torch::nn::Linear(8, 8), torch::nn::Dropout(0.5),
                            torch::nn::Linear(8, 8), torch::nn::Dropout(0.5),
                            torch::nn::Linear(8, 8), torch::nn::Dropout(0.5));
  net->to(torch::kDouble);
  auto ref = clone_sequential(net);
  const auto data = randn({16, 8});
  auto x = leaf(data);
  auto x_ref = leaf(data);
  torch::manual_seed(3);
  auto out = torch_ext::checkpoint_sequential(net, 3, x);
  out.sum().backward();
  torch::manual_seed(3);
  auto out_ref = ref->forward(x_ref);
  out_ref.sum().backward();
  expect_close(out, out_ref);
  expect_close(x.grad(), x_ref.grad());
  expect_param_grads_close(*net, *ref);
}

TEST_F(CheckpointTest, CheckpointSequentialRejectsBadSegments) {
  auto s = counted_sequential();
  auto x = leaf(randn({2, 6}));
  for (const int64_t segments : {0, 13, -1}) {
    SCOPED_TRACE("segments " + std::to_string(segments));
    const auto message =
        error_message([&] { torch_ext::checkpoint_sequential(s.net, segments, x); });
    EXPECT_NE(message.find("segments"), std::string::npos) << message;
  }
}

// ---------------------------------------------------------------- 13: nn::Checkpoint

TEST_F(CheckpointTest, CheckpointModuleWrapsLinear) {
  torch::nn::Linear linear(4, 3);
  linear->to(torch::kDouble);
  auto ref = std::dynamic_pointer_cast<torch::nn::LinearImpl>(linear->clone());
  ASSERT_TRUE(ref);
  torch_ext::nn::Checkpoint wrapper{torch::nn::AnyModule(linear)};

  EXPECT_EQ(sorted_keys(wrapper->named_parameters()),
            (std::vector<std::string>{"module.bias", "module.weight"}));
  EXPECT_TRUE(wrapper->named_parameters()["module.weight"].is_same(linear->weight));
  EXPECT_TRUE(wrapper->named_parameters()["module.bias"].is_same(linear->bias));

  const auto data = randn({5, 4});
  auto x = leaf(data);
  auto x_ref = leaf(data);
  auto out = wrapper->forward(x);
  auto out_ref = ref->forward(x_ref);
  expect_close(out, out_ref);
  const auto g = randn({5, 3});
  out.backward(g);
  out_ref.backward(g);
  expect_close(x.grad(), x_ref.grad());
  expect_close(linear->weight.grad(), ref->weight.grad());
  expect_close(linear->bias.grad(), ref->bias.grad());

  // Only parameters require grad.
  linear->zero_grad();
  ref->zero_grad();
  const auto x2 = randn({2, 4});
  wrapper->forward(x2).sum().backward();
  ref->forward(x2).sum().backward();
  expect_close(linear->weight.grad(), ref->weight.grad());
  expect_close(linear->bias.grad(), ref->bias.grad());
}

// A module counting its forward calls, to see that the wrapper really recomputes.
struct CountingLinearImpl : torch::nn::Module {
  CountingLinearImpl() : linear(register_module("linear", torch::nn::Linear(3, 3))) {}
  Tensor forward(const Tensor& x) {
    ++calls;
    return torch::tanh(linear->forward(x));
  }
  torch::nn::Linear linear;
  int calls = 0;
};
TORCH_MODULE(CountingLinear);

TEST_F(CheckpointTest, CheckpointModuleRecomputesInBackward) {
  CountingLinear inner;
  inner->to(torch::kDouble);
  torch_ext::nn::Checkpoint wrapper{torch::nn::AnyModule(inner)};
  EXPECT_EQ(sorted_keys(wrapper->named_parameters()),
            (std::vector<std::string>{"module.linear.bias", "module.linear.weight"}));
  auto x = leaf(randn({2, 3}));
  auto out = wrapper->forward(x);
  EXPECT_EQ(inner->calls, 1);
  out.sum().backward();
  EXPECT_EQ(inner->calls, 2);
  EXPECT_TRUE(inner->linear->weight.grad().defined());
}

TEST_F(CheckpointTest, CheckpointModulePreservesDropoutRng) {
  torch::nn::Dropout dropout(0.5);
  torch_ext::nn::Checkpoint wrapper{torch::nn::AnyModule(dropout)};
  const auto data = randn({8, 8});
  auto x = leaf(data);
  auto x_ref = leaf(data);
  torch::manual_seed(11);
  (wrapper->forward(x) * data).sum().backward();
  torch::manual_seed(11);
  (dropout->forward(x_ref) * data).sum().backward();
  expect_equal(x.grad(), x_ref.grad());
}

// ---------------------------------------------------------------- 14: memory

// Wraps the CPU allocator and tracks the bytes currently allocated through it and their peak.
class CountingAllocator final : public c10::Allocator {
 public:
  explicit CountingAllocator(c10::Allocator* inner) : inner_(inner) {}

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr inner = inner_->allocate(n);
    void* data = inner.get();
    auto* context = new Context{std::move(inner), n, this};
    const int64_t now = current_.fetch_add(static_cast<int64_t>(n)) + static_cast<int64_t>(n);
    int64_t peak = peak_.load();
    while (now > peak && !peak_.compare_exchange_weak(peak, now)) {
    }
    return {data, context, &CountingAllocator::free, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t current() const { return current_.load(); }
  int64_t peak() const { return peak_.load(); }
  void reset_peak() { peak_.store(current_.load()); }
  c10::Allocator* inner() const { return inner_; }

 private:
  struct Context {
    c10::DataPtr inner;
    size_t bytes;
    CountingAllocator* owner;
  };
  static void free(void* ctx) {
    auto* context = static_cast<Context*>(ctx);
    context->owner->current_.fetch_sub(static_cast<int64_t>(context->bytes));
    delete context;  // frees the inner allocation
  }

  c10::Allocator* inner_;
  std::atomic<int64_t> current_{0};
  std::atomic<int64_t> peak_{0};
};

// Installs the counting allocator for its lifetime. The allocator itself is never deleted:
// tensors it allocated may outlive the test (and SetCPUAllocator takes ownership).
class CountingAllocatorScope {
 public:
  static constexpr uint8_t kPriority = 200;
  CountingAllocatorScope() : original_(c10::GetCPUAllocator()) {
    allocator_ = new CountingAllocator(original_);
    c10::SetCPUAllocator(allocator_, kPriority);
  }
  ~CountingAllocatorScope() { c10::SetCPUAllocator(original_, kPriority); }
  CountingAllocatorScope(const CountingAllocatorScope&) = delete;
  CountingAllocatorScope& operator=(const CountingAllocatorScope&) = delete;
  bool installed() const { return c10::GetCPUAllocator() == allocator_; }
  CountingAllocator& allocator() { return *allocator_; }

 private:
  c10::Allocator* original_;
  CountingAllocator* allocator_;
};

// 16 blocks of Linear(256, 256) followed by a few elementwise ops, each of which keeps an
// activation of the plain run alive until backward; a checkpointed block keeps only its input.
Tensor mlp_block(torch::nn::Linear linear, const Tensor& x) {
  auto h = torch::tanh(linear->forward(x));
  auto s = torch::sigmoid(h);
  return torch::sin(h * s) + h;
}

TEST_F(CheckpointTest, CheckpointingEveryBlockLowersPeakMemory) {
  constexpr int kBlocks = 16;
  constexpr int64_t kWidth = 256, kBatch = 64;
  std::vector<torch::nn::Linear> blocks;
  std::vector<Tensor> params;
  for (int i = 0; i < kBlocks; ++i) {
    blocks.emplace_back(kWidth, kWidth);
    for (auto& p : blocks.back()->parameters()) params.push_back(p);
  }
  const auto data = torch::randn({kBatch, kWidth});

  // Returns the peak of bytes allocated (above those allocated before it) during forward +
  // backward; parameter grads exist beforehand so accumulation is in place for both runs.
  auto measure = [&](bool checkpointed, CountingAllocator& counter, Tensor* x_grad) {
    for (auto& p : params) p.mutable_grad() = torch::zeros_like(p);
    auto x = leaf(data);
    counter.reset_peak();
    const int64_t base = counter.current();
    {
      Tensor h = x;
      for (int i = 0; i < kBlocks; ++i) {
        if (checkpointed) {
          auto linear = blocks[i];
          CheckpointOptions options;
          options.parameters = linear->parameters();
          h = torch_ext::checkpoint(
              [linear](const Tensors& in) { return Tensors{mlp_block(linear, in[0])}; }, {h},
              options)[0];
        } else {
          h = mlp_block(blocks[i], h);
        }
      }
      h.sum().backward();
    }
    *x_grad = x.grad();
    return counter.peak() - base;
  };

  int64_t plain_peak = 0, ckpt_peak = 0;
  Tensor plain_grad, ckpt_grad;
  {
    CountingAllocatorScope scope;
    if (!scope.installed()) {
      GTEST_SKIP() << "c10::SetCPUAllocator did not install the counting allocator";
    }
    plain_peak = measure(false, scope.allocator(), &plain_grad);
    ckpt_peak = measure(true, scope.allocator(), &ckpt_grad);
  }
  ASSERT_NE(c10::GetCPUAllocator(), nullptr);
  const int64_t activation_bytes = kBatch * kWidth * static_cast<int64_t>(sizeof(float));
  std::cout << "[ memory ] peak above baseline: plain " << plain_peak << " B ("
            << plain_peak / activation_bytes << " activations), checkpointed " << ckpt_peak
            << " B (" << ckpt_peak / activation_bytes << " activations), ratio "
            << static_cast<double>(ckpt_peak) / static_cast<double>(plain_peak) << "\n";
  ASSERT_GT(plain_peak, kBlocks * activation_bytes) << "the counter did not see the activations";
  EXPECT_LT(static_cast<double>(ckpt_peak), 0.6 * static_cast<double>(plain_peak));
  expect_close(ckpt_grad, plain_grad, 1e-5);
}

}  // namespace

TEST_F(CheckpointTest, FrozenModuleFedWithoutGradJustRuns) {
  // Frozen layers (e.g. a fine-tuned model's first blocks) are not an error for the wrappers,
  // unlike a bare checkpoint with nothing to differentiate: they just run.
  torch::nn::Linear linear(4, 3);
  for (auto& p : linear->parameters()) p.set_requires_grad(false);
  torch_ext::nn::Checkpoint wrapped{torch::nn::AnyModule(linear)};
  const auto x = torch::randn({2, 4});
  at::Tensor y;
  ASSERT_NO_THROW(y = wrapped->forward(x));
  EXPECT_FALSE(y.requires_grad());
  EXPECT_TRUE(torch::equal(y, linear->forward(x)));

  torch::nn::Sequential seq(torch::nn::Linear(4, 4), torch::nn::ReLU(), torch::nn::Linear(4, 4));
  for (auto& p : seq->parameters()) p.set_requires_grad(false);
  at::Tensor z;
  ASSERT_NO_THROW(z = torch_ext::checkpoint_sequential(seq, 3, x));
  EXPECT_TRUE(torch::equal(z, seq->forward(x)));
}
