// torch_ext's C++ API (no Python): spp and sppf, forward and backward through autograd, against
// the ATen compositions they replace, in float64; plus argument errors and build information.

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include "test_helpers.h"
#include "torch_ext/torch_ext.h"

namespace {

constexpr double kTol = 1e-12;

// ---------------------------------------------------------------- references

torch::Tensor spp_reference(const torch::Tensor& x, const std::vector<int64_t>& levels,
                            const std::string& mode) {
  std::vector<torch::Tensor> parts;
  for (const int64_t l : levels) {
    auto pooled = mode == "max" ? std::get<0>(torch::adaptive_max_pool2d(x, {l, l}))
                                : torch::adaptive_avg_pool2d(x, {l, l});
    parts.push_back(pooled.flatten(1));
  }
  return torch::cat(parts, 1);
}

torch::Tensor sppf_reference(const torch::Tensor& x, int64_t kernel_size, int64_t repeats) {
  std::vector<torch::Tensor> stages{x};
  for (int64_t r = 0; r < repeats; ++r) {
    stages.push_back(torch::max_pool2d(stages.back(), {kernel_size, kernel_size}, {1, 1},
                                       {kernel_size / 2, kernel_size / 2}));
  }
  return torch::cat(stages, 1);
}

// ---------------------------------------------------------------- helpers

struct Result {
  torch::Tensor out, ref_out, grad, ref_grad;
};

// op(x) and ref(x') with x, x' equal float64 leaves (in x's layout), backward with the same
// random grad_output.
template <class Op, class Ref>
Result run_both(const torch::Tensor& data, Op op, Ref ref) {
  auto x = data.detach().clone().requires_grad_();
  auto x_ref = data.detach().clone().requires_grad_();
  auto out = op(x);
  auto ref_out = ref(x_ref);
  auto grad_out = torch::randn(out.sizes(), out.options());
  out.backward(grad_out);
  ref_out.backward(grad_out.to(ref_out.scalar_type()));
  return {out, ref_out, x.grad(), x_ref.grad()};
}

void expect_close(const torch::Tensor& a, const torch::Tensor& b, double tol = kTol) {
  ASSERT_EQ(a.sizes(), b.sizes());
  EXPECT_TRUE(torch::allclose(a.to(torch::kDouble), b.to(torch::kDouble), tol, tol))
      << "max abs difference " << (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max();
}

void expect_equal(const torch::Tensor& a, const torch::Tensor& b) {
  ASSERT_EQ(a.sizes(), b.sizes());
  EXPECT_TRUE(torch::equal(a, b)) << "max abs difference " << (a - b).abs().max();
}

torch::Tensor randn(std::vector<int64_t> shape) {
  return torch::randn(shape, torch::dtype(torch::kDouble));
}

// Integer values 0..2: most pooling windows have tied maxima.
torch::Tensor ties(std::vector<int64_t> shape) {
  return torch::randint(0, 3, shape, torch::dtype(torch::kDouble));
}

const std::vector<std::vector<int64_t>> kShapes = {{2, 3, 7, 9}, {1, 4, 3, 2}, {2, 20, 11, 37}};
const std::vector<std::vector<int64_t>> kLevels = {{1, 2, 4}, {3, 1}};

class TorchExtTest : public ::testing::Test {
 protected:
  void SetUp() override { torch::manual_seed(1234); }
};

// ---------------------------------------------------------------- spp

TEST_F(TorchExtTest, SppMatchesAtenComposition) {
  for (const std::string mode : {"max", "avg"}) {
    for (const auto& levels : kLevels) {
      for (const auto& shape : kShapes) {
        SCOPED_TRACE("mode " + mode + ", levels " + c10::str(levels) + ", shape " +
                     c10::str(shape));
        auto r = run_both(
            randn(shape), [&](const torch::Tensor& t) { return torch_ext::spp(t, levels, mode); },
            [&](const torch::Tensor& t) { return spp_reference(t, levels, mode); });
        int64_t bins = 0;
        for (const int64_t l : levels) bins += l * l;
        EXPECT_EQ(r.out.sizes(), (std::vector<int64_t>{shape[0], shape[1] * bins}));
        if (mode == "max") {
          expect_equal(r.out, r.ref_out);
        } else {
          expect_close(r.out, r.ref_out);
        }
        expect_close(r.grad, r.ref_grad);
      }
    }
  }
}

TEST_F(TorchExtTest, SppDefaultsAreLevels124Max) {
  const auto x = randn({2, 3, 6, 5});
  expect_equal(torch_ext::spp(x), spp_reference(x, {1, 2, 4}, "max"));
}

TEST_F(TorchExtTest, SppInferenceMatchesAtenComposition) {
  // Without grad the kernel skips the argmax bookkeeping: a separate code path.
  torch::NoGradGuard no_grad;
  for (const std::string mode : {"max", "avg"}) {
    for (const auto& shape : kShapes) {
      SCOPED_TRACE("mode " + mode + ", shape " + c10::str(shape));
      const auto x = randn(shape);
      expect_close(torch_ext::spp(x, {3, 1, 2}, mode), spp_reference(x, {3, 1, 2}, mode));
    }
  }
}

TEST_F(TorchExtTest, SppMaxTiesRouteGradientsLikeAten) {
  for (const bool channels_last : {false, true}) {
    SCOPED_TRACE(channels_last ? "channels_last" : "contiguous");
    auto data = ties({2, 17, 12, 37});
    if (channels_last) data = data.contiguous(at::MemoryFormat::ChannelsLast);
    auto r = run_both(
        data,
        [](const torch::Tensor& t) {
          return torch_ext::spp(t, {1, 2, 4}, "max");
        },
        [](const torch::Tensor& t) {
          return spp_reference(t, {1, 2, 4}, "max");
        });
    expect_equal(r.out, r.ref_out);
    expect_close(r.grad, r.ref_grad);
  }
}

TEST_F(TorchExtTest, SppChannelsLast) {
  for (const std::string mode : {"max", "avg"}) {
    SCOPED_TRACE("mode " + mode);
    const auto data = randn({2, 20, 9, 11}).contiguous(at::MemoryFormat::ChannelsLast);
    auto r = run_both(
        data,
        [&](const torch::Tensor& t) {
          return torch_ext::spp(t, {1, 2, 4}, mode);
        },
        [&](const torch::Tensor& t) {
          return spp_reference(t, {1, 2, 4}, mode);
        });
    expect_close(r.out, r.ref_out);
    expect_close(r.grad, r.ref_grad);
    EXPECT_TRUE(r.grad.is_contiguous(at::MemoryFormat::ChannelsLast));
  }
}

TEST_F(TorchExtTest, SppFloat32AgainstFloat64) {
  for (const std::string mode : {"max", "avg"}) {
    SCOPED_TRACE("mode " + mode);
    const auto x = randn({2, 5, 13, 10}).to(torch::kFloat);
    const auto out = torch_ext::spp(x, {1, 2, 4}, mode);
    EXPECT_EQ(out.scalar_type(), torch::kFloat);
    expect_close(out, spp_reference(x.to(torch::kDouble), {1, 2, 4}, mode), 1e-5);
  }
}

// ---------------------------------------------------------------- sppf

TEST_F(TorchExtTest, SppfMatchesMaxPoolCascade) {
  for (const int64_t kernel_size : {1, 3, 5, 7}) {
    for (const int64_t repeats : {1, 2, 3}) {
      for (const auto& shape : kShapes) {
        SCOPED_TRACE("kernel_size " + std::to_string(kernel_size) + ", repeats " +
                     std::to_string(repeats) + ", shape " + c10::str(shape));
        auto r = run_both(
            randn(shape),
            [&](const torch::Tensor& t) { return torch_ext::sppf(t, kernel_size, repeats); },
            [&](const torch::Tensor& t) { return sppf_reference(t, kernel_size, repeats); });
        expect_equal(r.out, r.ref_out);
        expect_close(r.grad, r.ref_grad);
      }
    }
  }
}

TEST_F(TorchExtTest, SppfDefaultsAreKernel5Repeats3) {
  const auto x = randn({2, 3, 6, 5});
  expect_equal(torch_ext::sppf(x), sppf_reference(x, 5, 3));
}

TEST_F(TorchExtTest, SppfTiesRouteGradientsLikeTheCascade) {
  for (const bool channels_last : {false, true}) {
    SCOPED_TRACE(channels_last ? "channels_last" : "contiguous");
    auto data = ties({2, 18, 9, 37});
    if (channels_last) data = data.contiguous(at::MemoryFormat::ChannelsLast);
    auto r = run_both(
        data, [](const torch::Tensor& t) { return torch_ext::sppf(t, 5, 3); },
        [](const torch::Tensor& t) { return sppf_reference(t, 5, 3); });
    expect_equal(r.out, r.ref_out);
    expect_close(r.grad, r.ref_grad);
  }
}

TEST_F(TorchExtTest, SppfChannelsLastKeepsTheLayout) {
  const auto data = randn({2, 20, 9, 11}).contiguous(at::MemoryFormat::ChannelsLast);
  auto r = run_both(
      data, [](const torch::Tensor& t) { return torch_ext::sppf(t, 5, 3); },
      [](const torch::Tensor& t) { return sppf_reference(t, 5, 3); });
  EXPECT_TRUE(r.out.is_contiguous(at::MemoryFormat::ChannelsLast));
  expect_equal(r.out, r.ref_out);
  expect_close(r.grad, r.ref_grad);
}

// ---------------------------------------------------------------- errors

TEST_F(TorchExtTest, BadArgumentsThrowNamingTheArgument) {
  const auto x = torch::zeros({2, 3, 6, 6});
  struct Case {
    std::string what;
    std::function<void()> call;
    std::vector<std::string> names;
  };
  const std::vector<Case> cases = {
      {"3-D input",
       [] {
         torch_ext::spp(torch::zeros({3, 6, 6}));
       },
       {"input"}},
      {"5-D input",
       [] {
         torch_ext::spp(torch::zeros({1, 2, 3, 6, 6}));
       },
       {"input"}},
      {"empty levels", [&] { torch_ext::spp(x, std::vector<int64_t>{}); }, {"levels"}},
      {"level 0",
       [&] {
         torch_ext::spp(x, {1, 0});
       },
       {"levels"}},
      {"negative level", [&] { torch_ext::spp(x, {-2}); }, {"levels"}},
      {"mode", [&] { torch_ext::spp(x, {1}, "sum"); }, {"mode"}},
      {"int64 input",
       [] {
         torch_ext::spp(torch::zeros({2, 3, 6, 6}, torch::kLong));
       },
       {"input", "float32"}},
      {"height 0",
       [] {
         torch_ext::spp(torch::zeros({2, 3, 0, 6}));
       },
       {"height"}},
      {"width 0",
       [] {
         torch_ext::spp(torch::zeros({2, 3, 6, 0}));
       },
       {"width"}},
      {"sppf 3-D input",
       [] {
         torch_ext::sppf(torch::zeros({3, 6, 6}));
       },
       {"input"}},
      {"sppf even kernel", [&] { torch_ext::sppf(x, 4); }, {"kernel_size"}},
      {"sppf kernel 0", [&] { torch_ext::sppf(x, 0); }, {"kernel_size"}},
      {"sppf repeats 0", [&] { torch_ext::sppf(x, 5, 0); }, {"repeats"}},
  };
  for (const auto& c : cases) {
    const auto message = error_message(c.call);
    for (const auto& name : c.names) {
      EXPECT_NE(message.find(name), std::string::npos)
          << c.what << ": expected the message to name \"" << name << "\", got: " << message;
    }
  }
}

// ---------------------------------------------------------------- build information

TEST(BuildInfo, VersionAndBackends) {
  EXPECT_FALSE(torch_ext::version().empty());
  const auto backends = torch_ext::compiled_backends();
  EXPECT_NE(std::find(backends.begin(), backends.end(), "CPU"), backends.end());
  const bool has_cuda = std::find(backends.begin(), backends.end(), "CUDA") != backends.end();
  EXPECT_EQ(has_cuda, !torch_ext::cuda_version().empty());
}

TEST(BuildInfo, BuiltAgainstTheseTorchHeaders) {
  const std::string expected = std::to_string(TORCH_VERSION_MAJOR) + "." +
                               std::to_string(TORCH_VERSION_MINOR) + "." +
                               std::to_string(TORCH_VERSION_PATCH);
  const auto built = torch_ext::torch_version();
  EXPECT_EQ(built.substr(0, built.find('+')), expected);
}

}  // namespace
