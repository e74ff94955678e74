// torch_ext::dilated_conv2d from C++ (no Python): forward and the three gradients through
// autograd against LibTorch's own torch::conv2d (+ activation) in float64, on both routes
// (depthwise direct kernel, im2col + GEMM), the "same" overload, and argument errors.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "test_helpers.h"
#include "torch_ext/torch_ext.h"

namespace {

constexpr double kTol = 1e-10;

struct ConvCase {
  std::vector<int64_t> input;  // N, C, H, W
  int64_t c_out, kh, kw;
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
  std::string activation;
};

torch::Tensor activate(const torch::Tensor& t, const std::string& activation) {
  if (activation == "relu") return torch::relu(t);
  if (activation == "silu") return torch::silu(t);
  if (activation == "gelu") return torch::gelu(t);
  return t;
}

void expect_matches_conv2d(const ConvCase& c) {
  SCOPED_TRACE("input " + c10::str(c.input) + " groups " + std::to_string(c.groups) + " " +
               c.activation);
  auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  auto x = torch::randn(c.input, opts).requires_grad_();
  auto w = torch::randn({c.c_out, c.input[1] / c.groups, c.kh, c.kw}, opts).requires_grad_();
  auto b = torch::randn({c.c_out}, opts).requires_grad_();
  auto out = torch_ext::dilated_conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups,
                                       c.activation);
  auto xr = x.detach().clone().requires_grad_();
  auto wr = w.detach().clone().requires_grad_();
  auto br = b.detach().clone().requires_grad_();
  auto ref = activate(torch::conv2d(xr, wr, br, c.stride, c.padding, c.dilation, c.groups),
                      c.activation);
  ASSERT_EQ(out.sizes(), ref.sizes());
  EXPECT_TRUE(torch::allclose(out, ref, kTol, kTol));
  auto grad = torch::randn_like(ref);
  out.backward(grad);
  ref.backward(grad);
  EXPECT_TRUE(torch::allclose(x.grad(), xr.grad(), kTol, kTol)) << "grad input";
  EXPECT_TRUE(torch::allclose(w.grad(), wr.grad(), kTol, kTol)) << "grad weight";
  EXPECT_TRUE(torch::allclose(b.grad(), br.grad(), kTol, kTol)) << "grad bias";
}

TEST(DilatedConv2d, DepthwiseMatchesConv2d) {
  torch::manual_seed(0);
  expect_matches_conv2d({{2, 4, 13, 11}, 4, 3, 3, {1, 1}, {2, 2}, {2, 2}, 4, "relu"});
  expect_matches_conv2d({{2, 3, 16, 9}, 6, 5, 3, {2, 1}, {4, 1}, {2, 3}, 3, "silu"});
  expect_matches_conv2d({{1, 2, 7, 7}, 2, 7, 7, {1, 1}, {3, 3}, {1, 1}, 2, "gelu"});
}

TEST(DilatedConv2d, DenseAndGroupedMatchConv2d) {
  torch::manual_seed(1);
  expect_matches_conv2d({{2, 6, 12, 10}, 5, 3, 3, {1, 1}, {6, 6}, {6, 6}, 1, "none"});
  expect_matches_conv2d({{3, 4, 9, 8}, 6, 2, 3, {3, 2}, {1, 0}, {3, 1}, 2, "gelu"});
  expect_matches_conv2d({{1, 3, 5, 5}, 4, 1, 1, {1, 1}, {0, 0}, {1, 1}, 1, "silu"});
}

TEST(DilatedConv2d, SamePaddingWithEvenKernel) {
  torch::manual_seed(2);
  auto x = torch::randn({2, 3, 9, 10}, torch::kFloat64);
  auto w = torch::randn({4, 3, 4, 2}, torch::kFloat64);
  auto out = torch_ext::dilated_conv2d(x, w, c10::nullopt, {1, 1},
                                       torch_ext::ConvPadding::Same, {3, 2}, 1, "none");
  auto ref = at::conv2d(x, w, {}, 1, "same", {3, 2});
  ASSERT_EQ(out.sizes(), ref.sizes());
  EXPECT_TRUE(torch::allclose(out, ref, kTol, kTol));
}

TEST(DilatedConv2d, OwnGemmRouteInFloat32) {
  // float32 dense convolutions take oneDNN on the CPU by default; force our GEMM path.
  setenv("TORCH_EXT_CONV_ROUTE", "own", 1);
  torch::manual_seed(3);
  auto x = torch::randn({2, 8, 16, 16});
  auto w = torch::randn({8, 8, 3, 3});
  auto out = torch_ext::dilated_conv2d(x, w, c10::nullopt, 1, 4, 4, 1, "relu");
  unsetenv("TORCH_EXT_CONV_ROUTE");
  auto ref = torch::relu(torch::conv2d(x.to(torch::kFloat64), w.to(torch::kFloat64), {}, 1, 4, 4));
  EXPECT_TRUE(torch::allclose(out.to(torch::kFloat64), ref, 1e-4, 1e-4));
}

TEST(DilatedConv2d, ErrorsNameTheArgument) {
  auto x = torch::randn({1, 4, 8, 8});
  auto w = torch::randn({4, 4, 3, 3});
  EXPECT_NE(error_message([&] { torch_ext::dilated_conv2d(x[0], w); }).find("4-D"),
            std::string::npos);
  EXPECT_NE(error_message([&] { torch_ext::dilated_conv2d(x, torch::randn({4, 3, 3, 3})); })
                .find("channels"),
            std::string::npos);
  EXPECT_NE(error_message([&] { torch_ext::dilated_conv2d(x, w, {}, 1, 0, 1, 3); })
                .find("groups"),
            std::string::npos);
  EXPECT_NE(error_message([&] { torch_ext::dilated_conv2d(x, w, {}, 1, 0, 5); })
                .find("smaller than the dilated kernel"),
            std::string::npos);
  EXPECT_NE(error_message([&] { torch_ext::dilated_conv2d(x, w, {}, 1, 1, 1, 1, "tanh"); })
                .find("activation"),
            std::string::npos);
  EXPECT_NE(error_message([&] { torch_ext::dilated_conv2d(x, w, {}, 2, torch_ext::ConvPadding::Same); })
                .find("stride 1"),
            std::string::npos);
  EXPECT_NE(
      error_message([&] { torch_ext::dilated_conv2d(x, w, torch::randn({3})); }).find("bias"),
      std::string::npos);
}

}  // namespace
