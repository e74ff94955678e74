// torch_ext's varlen ops from C++ (no Python): unpad/pad against ATen's nonzero and cumsum,
// gradients through autograd, position ids, packing plans, and argument errors.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "test_helpers.h"
#include "torch_ext/torch_ext.h"

namespace {

TEST(Varlen, UnpadMatchesNonzeroAndPadRestores) {
  torch::manual_seed(0);
  auto mask = torch::rand({4, 9}) > 0.4;
  mask[1].fill_(false);  // a fully padded row
  auto hidden = torch::randn({4, 9, 3, 2}, torch::kFloat64).requires_grad_();
  auto r = torch_ext::unpad_input(hidden, mask);
  auto indices = torch::nonzero(mask.flatten()).flatten();
  auto seqlens = mask.sum(-1).to(torch::kInt);
  EXPECT_TRUE(torch::equal(r.indices, indices));
  EXPECT_TRUE(torch::equal(r.hidden, hidden.flatten(0, 1).index_select(0, indices)));
  EXPECT_TRUE(torch::equal(r.seqused, seqlens));
  EXPECT_TRUE(torch::equal(r.cu_seqlens.slice(0, 1), torch::cumsum(seqlens, 0).to(torch::kInt)));
  EXPECT_EQ(r.cu_seqlens[0].item<int>(), 0);
  EXPECT_EQ(r.max_seqlen, seqlens.max().item<int64_t>());

  auto padded = torch_ext::pad_input(r.hidden * 2, r.indices, 4, 9);
  auto expected = hidden * 2 * mask.unsqueeze(-1).unsqueeze(-1);
  EXPECT_TRUE(torch::equal(padded, expected));
  padded.sum().backward();
  // Real tokens get 2, padded slots exactly 0.
  EXPECT_TRUE(torch::equal(hidden.grad(),
                           (2 * mask.to(torch::kFloat64)).view({4, 9, 1, 1}).expand({4, 9, 3, 2})));
}

TEST(Varlen, TotalTokensSkipsTheCountAndBoundsMaxSeqlen) {
  auto mask = torch::tensor({{1, 1, 0}, {0, 1, 1}}, torch::kInt);
  auto hidden = torch::arange(6, torch::kFloat).view({2, 3});
  auto r = torch_ext::unpad_input(hidden, mask, /*total_tokens=*/4);
  EXPECT_EQ(r.max_seqlen, 3);  // the padded length when only total_tokens is given
  EXPECT_TRUE(torch::equal(r.hidden, torch::tensor({0.f, 1.f, 4.f, 5.f})));
  EXPECT_EQ(torch_ext::unpad_input(hidden, mask, 4, 2).max_seqlen, 2);
  EXPECT_NE(error_message([&] { torch_ext::unpad_input(hidden, mask, 5); }).find("total_tokens"),
            std::string::npos);
}

TEST(Varlen, PositionIdsAndPacking) {
  auto pos = torch::tensor({{0, 1, 2, 0, 1}, {0, 1, 2, 3, 0}});
  auto [cu, longest] = torch_ext::cu_seqlens_from_position_ids(pos);
  EXPECT_TRUE(torch::equal(cu, torch::tensor({0, 3, 5, 9, 10}, torch::kInt)));
  EXPECT_EQ(longest, 4);
  // First-fit-decreasing by hand: 8 -> 0, 7 -> 1, 5 -> 2, 4 -> 2, 3 -> 1, 2 -> 0, 1 -> 2.
  auto packs = torch_ext::plan_packing(torch::tensor({5, 3, 8, 2, 7, 1, 4}), 10);
  EXPECT_TRUE(torch::equal(packs, torch::tensor({2, 1, 0, 0, 1, 2, 2})));
  EXPECT_NE(
      error_message([&] { torch_ext::plan_packing(torch::tensor({11}), 10); }).find("capacity"),
      std::string::npos);
}

TEST(Varlen, ErrorsNameTheArgument) {
  auto hidden = torch::randn({2, 4, 3});
  EXPECT_NE(error_message([&] {
              torch_ext::unpad_input(hidden, torch::ones({2, 5}) > 0);
            }).find("attention_mask"),
            std::string::npos);
  EXPECT_NE(error_message([&] {
              torch_ext::index_first_axis(hidden, torch::tensor({0, 2}));
            }).find("indices"),
            std::string::npos);
  EXPECT_NE(error_message([&] {
              torch_ext::index_first_axis(hidden, torch::tensor({0, 2}, torch::kInt));
            }).find("int64"),
            std::string::npos);
}

}  // namespace
