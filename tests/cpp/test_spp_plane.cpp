// The phases of the CUDA spp/sppf plane kernels (csrc/ops/spp/spp_plane.h), run on the CPU the
// way a thread block runs them: every thread of the block in turn, a barrier between phases,
// with a thread count that divides no plane. Checked against the library's CPU ops (which are
// checked against ATen): exactly, on values with ties, -inf and NaN, and integer-valued
// gradients (every sum exact, whatever its order). The kernels' launch code is not covered here
// (it needs a GPU); what each block computes is.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "ops/spp/spp_plane.h"
#include "torch_ext/torch_ext.h"

namespace {

namespace plane = torch_ext::spp_impl::plane;

constexpr int kThreads = 37;

// One barrier-separated phase of a block: phase(tid, threads) for every thread.
void phase(const std::function<void(int, int)>& body) {
  for (int tid = 0; tid < kThreads; ++tid) body(tid, kThreads);
}

// Small integers (many ties), a few -inf and, when asked, NaN.
torch::Tensor tied_values(std::vector<int64_t> shape, bool with_nan, int64_t seed) {
  torch::manual_seed(seed);
  auto x = torch::randint(-3, 4, shape, torch::kFloat);
  auto u = torch::rand(shape);
  x.masked_fill_(u < 0.05, -std::numeric_limits<float>::infinity());
  if (with_nan) x.masked_fill_(u > 0.97, std::numeric_limits<float>::quiet_NaN());
  return x;
}

// sppf_forward_plane_kernel's body, for every (image, group of `group` channels) block: NCHW
// maps with one channel per block and contiguous planes, channels_last ones (the tensors'
// memory in NHWC order) with the host's odd plane stride.
torch::Tensor sppf_forward_blocks(const torch::Tensor& x, int p, int repeats, int group,
                                  bool cl) {
  const int64_t N = x.size(0), C = x.size(1);
  const int H = static_cast<int>(x.size(2)), W = static_cast<int>(x.size(3)), hw = H * W;
  const int ld = cl ? (hw | 1) : hw;
  const auto format = cl ? torch::MemoryFormat::ChannelsLast : torch::MemoryFormat::Contiguous;
  auto out = torch::empty({N, (repeats + 1) * C, H, W}, x.options().memory_format(format));
  std::vector<float> cur(group * ld), tmp(group * ld);
  const int64_t out_channels = (repeats + 1) * C, channel = cl ? 1 : hw;
  const int64_t in_pixel = cl ? C : 1, out_pixel = cl ? out_channels : 1;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c0 = 0; c0 < C; c0 += group) {
      const int count = static_cast<int>(std::min<int64_t>(group, C - c0));
      const float* in = x.data_ptr<float>() + n * hw * C + c0 * channel;
      float* o = out.data_ptr<float>() + n * hw * out_channels + c0 * channel;
      phase([&](int t, int k) {
        plane::load_channels(t, k, in, in_pixel, channel, cur.data(), count, hw, ld);
      });
      phase([&](int t, int k) {
        plane::store_channels(t, k, cur.data(), o, out_pixel, channel, count, hw, ld);
      });
      for (int r = 1; r <= repeats; ++r) {
        phase([&](int t, int k) {
          plane::max_rows(t, k, cur.data(), tmp.data(), H, W, p, count, ld);
        });
        phase([&](int t, int k) {
          plane::max_cols(t, k, tmp.data(), cur.data(), H, W, p, count, ld);
        });
        phase([&](int t, int k) {
          plane::store_channels(t, k, cur.data(), o + r * C * channel, out_pixel, channel, count,
                                hw, ld);
        });
      }
    }
  }
  return out;
}

// sppf_backward_plane_kernel's body (its buffer reuse included), blocks as above.
torch::Tensor sppf_backward_blocks(const torch::Tensor& grad_output, const torch::Tensor& output,
                                   int p, int repeats, int group, bool cl) {
  const int64_t N = output.size(0), C = output.size(1) / (repeats + 1);
  const int H = static_cast<int>(output.size(2)), W = static_cast<int>(output.size(3));
  const int hw = H * W, ld = cl ? (hw | 1) : hw, span = group * ld;
  const int64_t out_channels = (repeats + 1) * C, channel = cl ? 1 : hw;
  const int64_t in_pixel = cl ? C : 1, out_pixel = cl ? out_channels : 1, stage = C * channel;
  const auto format = cl ? torch::MemoryFormat::ChannelsLast : torch::MemoryFormat::Contiguous;
  auto grad_input = torch::empty({N, C, H, W}, output.options().memory_format(format));
  std::vector<float> smem((repeats + 2) * span);
  std::vector<int> column(span), arg(span);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c0 = 0; c0 < C; c0 += group) {
      const int count = static_cast<int>(std::min<int64_t>(group, C - c0));
      const int64_t base = n * hw * out_channels + c0 * channel;
      const float* out = output.data_ptr<float>();
      const float* go = grad_output.data_ptr<float>();
      float* stages = smem.data();
      float* g = stages + repeats * span;
      float* g_prev = g + span;
      for (int r = 0; r < repeats; ++r) {
        phase([&](int t, int k) {
          plane::load_channels(t, k, out + base + r * stage, out_pixel, channel,
                               stages + r * span, count, hw, ld);
        });
      }
      phase([&](int t, int k) {
        plane::load_channels(t, k, go + base + repeats * stage, out_pixel, channel, g, count, hw,
                             ld);
      });
      for (int r = repeats; r >= 1; --r) {
        float* value = r == repeats ? g_prev : stages + r * span;
        const float* s = stages + (r - 1) * span;
        phase([&](int t, int k) {
          plane::argmax_rows(t, k, s, value, column.data(), H, W, p, count, ld);
        });
        phase([&](int t, int k) {
          plane::argmax_cols(t, k, value, column.data(), arg.data(), H, W, p, count, ld);
        });
        phase([&](int t, int k) {
          plane::load_channels(t, k, go + base + (r - 1) * stage, out_pixel, channel, g_prev,
                               count, hw, ld);
        });
        phase([&](int t, int k) {
          plane::gather(t, k, g, arg.data(), g_prev, g_prev, H, W, p, count, ld);
        });
        std::swap(g, g_prev);
      }
      float* gi = grad_input.data_ptr<float>() + n * hw * C + c0 * channel;
      phase([&](int t, int k) {
        plane::store_channels(t, k, g, gi, in_pixel, channel, count, hw, ld);
      });
    }
  }
  return grad_input;
}

struct SppfCase {
  std::vector<int64_t> shape;
  int64_t kernel, repeats;
  bool with_nan;
};

class SppfPlane : public ::testing::TestWithParam<SppfCase> {};

TEST_P(SppfPlane, BlocksMatchTheCpuOps) {
  const auto& cs = GetParam();
  const auto x = tied_values(cs.shape, cs.with_nan, 7);
  const int p = static_cast<int>(cs.kernel / 2), repeats = static_cast<int>(cs.repeats);
  const auto expected = torch_ext::sppf(x, cs.kernel, cs.repeats);
  const auto output = sppf_forward_blocks(x, p, repeats, 1, false);
  EXPECT_TRUE(torch::allclose(output, expected, 0, 0, /*equal_nan=*/true));

  // Gradients: integers, so that every sum is exact.
  torch::manual_seed(11);
  const auto grad_output = torch::randint(-4, 5, expected.sizes(), torch::kFloat);
  auto leaf = x.clone().requires_grad_(true);
  torch_ext::sppf(leaf, cs.kernel, cs.repeats).backward(grad_output);
  const auto grad_input = sppf_backward_blocks(grad_output, expected, p, repeats, 1, false);
  EXPECT_TRUE(torch::equal(grad_input, leaf.grad()))
      << "max |diff| " << (grad_input - leaf.grad()).abs().max().item<float>();

  // channels_last, in groups of channels that leave a partial last group.
  const auto cl = torch::MemoryFormat::ChannelsLast;
  const auto x_cl = x.contiguous(cl);
  const auto expected_cl = expected.contiguous(cl);
  const auto grad_output_cl = grad_output.contiguous(cl);
  for (const int group : {1, 2, 32}) {
    const auto output_cl = sppf_forward_blocks(x_cl, p, repeats, group, true);
    EXPECT_TRUE(torch::allclose(output_cl, expected, 0, 0, /*equal_nan=*/true)) << group;
    const auto grad_cl = sppf_backward_blocks(grad_output_cl, expected_cl, p, repeats, group,
                                              true);
    EXPECT_TRUE(torch::equal(grad_cl, leaf.grad())) << group;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, SppfPlane,
    ::testing::Values(SppfCase{{2, 3, 20, 20}, 5, 3, false}, SppfCase{{1, 2, 7, 13}, 5, 3, true},
                      SppfCase{{2, 2, 3, 9}, 3, 2, false}, SppfCase{{1, 3, 1, 1}, 5, 3, false},
                      SppfCase{{1, 2, 6, 5}, 9, 1, true}, SppfCase{{1, 1, 16, 4}, 1, 2, false}));

// spp_backward_plane_kernel's body, for every plane.
torch::Tensor spp_backward_blocks(const torch::Tensor& grad_output, const torch::Tensor& indices,
                                  std::vector<int64_t> levels, bool is_max,
                                  torch::IntArrayRef input_size) {
  const int64_t N = input_size[0], C = input_size[1];
  const int H = static_cast<int>(input_size[2]), W = static_cast<int>(input_size[3]);
  const int count = static_cast<int>(levels.size());
  int bins = 0;
  for (const int64_t l : levels) bins += static_cast<int>(l * l);
  auto grad_input = torch::empty(input_size, grad_output.options());
  std::vector<float> bin_grad(bins);
  std::vector<int> bin_index(bins), table(2 * count * (H + W));
  const plane::BinTables tables{table.data(), table.data() + count * H,
                                table.data() + 2 * count * H,
                                table.data() + 2 * count * H + count * W};
  for (int64_t id = 0; id < N * C; ++id) {
    const int64_t n = id / C, c = id % C, row = n * C * bins;
    phase([&](int t, int k) {
      plane::stage_bins(t, k, levels.data(), count, bins, grad_output.data_ptr<float>() + row,
                        is_max ? indices.data_ptr<int64_t>() + row : nullptr, C, c, H, W,
                        is_max, bin_grad.data(), bin_index.data());
      plane::build_bin_tables(t, k, levels.data(), count, H, W, tables);
    });
    float* gi = grad_input.data_ptr<float>() + id * H * W;
    phase([&](int t, int k) {
      plane::spp_gather(t, k, levels.data(), count, bin_grad.data(), bin_index.data(), tables,
                        is_max, gi, H, W);
    });
  }
  return grad_input;
}

struct SppCase {
  std::vector<int64_t> shape;
  std::vector<int64_t> levels;
  bool with_nan;
};

class SppPlane : public ::testing::TestWithParam<SppCase> {};

TEST_P(SppPlane, BackwardBlocksMatchTheCpuOps) {
  const auto& cs = GetParam();
  for (const bool is_max : {true, false}) {
    const auto x = tied_values(cs.shape, cs.with_nan && is_max, 3);
    const std::string mode = is_max ? "max" : "avg";
    const auto forward =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("torch_ext::_spp_forward", "")
            .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::IntArrayRef,
                                                      c10::string_view, bool)>();
    const auto [output, indices] = forward.call(x, cs.levels, mode, true);
    torch::manual_seed(5);
    const auto grad_output = torch::randint(-4, 5, output.sizes(), torch::kFloat);
    auto leaf = x.clone().requires_grad_(true);
    torch_ext::spp(leaf, cs.levels, mode).backward(grad_output);
    const auto grad_input =
        spp_backward_blocks(grad_output, indices, cs.levels, is_max, x.sizes());
    // avg divides by the bin areas: not exact, but the same divisions in the same order.
    EXPECT_TRUE(torch::allclose(grad_input, leaf.grad(), 1e-6, 1e-6)) << mode;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, SppPlane,
    ::testing::Values(SppCase{{2, 3, 16, 16}, {1, 2, 4}, false},
                      SppCase{{1, 2, 13, 7}, {1, 2, 3, 5}, true},  // overlapping bins
                      SppCase{{2, 1, 3, 2}, {1, 4}, false},        // bins wider than the map
                      SppCase{{1, 2, 9, 11}, {6, 1}, true}));

}  // namespace
