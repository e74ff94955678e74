// torch_ext's metrics from C++ (no Python): confusion_matrix against a hand-rolled counting loop,
// segmentation_metrics against hand-computed fractions, SegmentationMetricsAccumulator against
// both, plus validation and argument errors.

#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "test_helpers.h"
#include "torch_ext/metrics.h"
#include "torch_ext/torch_ext.h"

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---------------------------------------------------------------- references

// Rows = target, columns = pred; skips pixels whose target is ignore_index and pixels with a
// target or predicted class outside [0, K).
torch::Tensor count_loop(const std::vector<int64_t>& pred, const std::vector<int64_t>& target,
                         int64_t k, std::optional<int64_t> ignore_index) {
  std::vector<int64_t> counts(k * k, 0);
  for (size_t i = 0; i < target.size(); ++i) {
    const int64_t t = target[i], p = pred[i];
    if (ignore_index && t == *ignore_index) continue;
    if (t < 0 || t >= k || p < 0 || p >= k) continue;
    ++counts[t * k + p];
  }
  return torch::tensor(counts, torch::kLong).view({k, k});
}

// The logical values of any integer tensor, in row-major order.
std::vector<int64_t> values_of(const torch::Tensor& labels) {
  const auto flat = labels.to(torch::kLong).contiguous().view(-1);
  return {flat.data_ptr<int64_t>(), flat.data_ptr<int64_t>() + flat.numel()};
}

// argmax over dim 1 of [N, K, H, W] scores by a loop: the first maximum wins.
std::vector<int64_t> argmax_loop(const torch::Tensor& scores) {
  const auto s = scores.to(torch::kDouble).contiguous();
  const auto a = s.accessor<double, 4>();
  std::vector<int64_t> out;
  for (int64_t n = 0; n < s.size(0); ++n) {
    for (int64_t h = 0; h < s.size(2); ++h) {
      for (int64_t w = 0; w < s.size(3); ++w) {
        int64_t best = 0;
        for (int64_t c = 1; c < s.size(1); ++c) {
          if (a[n][c][h][w] > a[n][best][h][w]) best = c;
        }
        out.push_back(best);
      }
    }
  }
  return out;
}

torch::Tensor reference_labels(const torch::Tensor& pred, const torch::Tensor& target, int64_t k,
                               std::optional<int64_t> ignore_index = std::nullopt) {
  return count_loop(values_of(pred), values_of(target), k, ignore_index);
}

torch::Tensor reference_scores(const torch::Tensor& scores, const torch::Tensor& target, int64_t k,
                               std::optional<int64_t> ignore_index = std::nullopt) {
  return count_loop(argmax_loop(scores), values_of(target), k, ignore_index);
}

// ---------------------------------------------------------------- helpers

torch::Tensor labels(std::vector<int64_t> shape, int64_t k, torch::ScalarType dtype,
                     std::optional<int64_t> ignore_index = std::nullopt) {
  auto t = torch::randint(0, k, shape, torch::kLong);
  if (ignore_index) {
    t.masked_fill_(torch::rand(shape) < 0.15, *ignore_index);
  }
  return t.to(dtype);
}

void expect_equal(const torch::Tensor& out, const torch::Tensor& expected) {
  ASSERT_EQ(out.scalar_type(), torch::kLong);
  ASSERT_EQ(out.sizes(), expected.sizes());
  EXPECT_TRUE(torch::equal(out, expected)) << "got\n" << out << "\nexpected\n" << expected;
}

// A [] or [K] float64 metric against expected values (NaN equals NaN).
void expect_metric(const torch::Tensor& value, const std::vector<double>& expected,
                   const std::string& name) {
  SCOPED_TRACE(name);
  ASSERT_EQ(value.scalar_type(), torch::kDouble);
  const auto want = torch::tensor(expected, torch::kDouble);
  if (value.dim() == 0) {
    ASSERT_EQ(expected.size(), 1u);
  } else {
    ASSERT_EQ(value.sizes(), want.sizes());
  }
  EXPECT_TRUE(torch::allclose(value.reshape({-1}), want, 1e-12, 1e-15, /*equal_nan=*/true))
      << "got " << value << " expected " << want;
}

void expect_same_metrics(const torch_ext::SegmentationMetrics& a,
                         const torch_ext::SegmentationMetrics& b) {
  const std::vector<std::pair<std::string, std::pair<torch::Tensor, torch::Tensor>>> fields = {
      {"pixel_accuracy", {a.pixel_accuracy, b.pixel_accuracy}},
      {"mean_pixel_accuracy", {a.mean_pixel_accuracy, b.mean_pixel_accuracy}},
      {"iou", {a.iou, b.iou}},
      {"mean_iou", {a.mean_iou, b.mean_iou}},
      {"fw_iou", {a.fw_iou, b.fw_iou}},
      {"dice", {a.dice, b.dice}},
      {"mean_dice", {a.mean_dice, b.mean_dice}},
  };
  for (const auto& [name, pair] : fields) {
    SCOPED_TRACE(name);
    ASSERT_EQ(pair.first.sizes(), pair.second.sizes());
    EXPECT_TRUE(torch::allclose(pair.first, pair.second, 0, 0, /*equal_nan=*/true))
        << pair.first << " vs " << pair.second;
  }
}

void expect_mentions(const std::string& message, const std::vector<std::string>& fragments) {
  for (const auto& fragment : fragments) {
    EXPECT_NE(message.find(fragment), std::string::npos)
        << "'" << fragment << "' not in: " << message;
  }
}

class MetricsTest : public ::testing::Test {
 protected:
  void SetUp() override { torch::manual_seed(4321); }
};

// ---------------------------------------------------------------- confusion_matrix

TEST_F(MetricsTest, HandWrittenLabels) {
  const auto target = torch::tensor({0, 0, 1, 1, 1, 2, 2, 255, 0}, torch::kLong);
  const auto pred = torch::tensor({0, 1, 1, 1, 2, 2, 0, 2, 2}, torch::kLong);
  const auto expected = torch::tensor({1, 1, 1, 0, 2, 1, 1, 0, 1}, torch::kLong).view({3, 3});
  expect_equal(torch_ext::confusion_matrix(pred, target, 3, 255), expected);
}

TEST_F(MetricsTest, LabelsMatchTheLoop) {
  const std::vector<torch::ScalarType> dtypes = {torch::kByte, torch::kShort, torch::kInt,
                                                 torch::kLong};
  for (const auto pred_dtype : dtypes) {
    for (const auto target_dtype : dtypes) {
      SCOPED_TRACE(std::string("pred ") + c10::toString(pred_dtype) + ", target " +
                   c10::toString(target_dtype));
      const auto pred = labels({2, 9, 11}, 7, pred_dtype);
      const auto target = labels({2, 9, 11}, 7, target_dtype, 255);
      expect_equal(torch_ext::confusion_matrix(pred, target, 7, 255),
                   reference_labels(pred, target, 7, 255));
      // Non-contiguous views of both.
      const auto pred_t = pred.transpose(1, 2);
      const auto target_t = target.transpose(1, 2);
      ASSERT_FALSE(pred_t.is_contiguous());
      expect_equal(torch_ext::confusion_matrix(pred_t, target_t, 7, 255),
                   reference_labels(pred_t, target_t, 7, 255));
    }
  }
}

TEST_F(MetricsTest, ManyClassesDoNotOverflow) {
  for (const int64_t k : {200, 1000}) {
    SCOPED_TRACE("K " + std::to_string(k));
    const auto dtype = k == 200 ? torch::kByte : torch::kShort;
    const auto pred = labels({3, 40, 50}, k, dtype);
    const auto target = labels({3, 40, 50}, k, dtype);
    expect_equal(torch_ext::confusion_matrix(pred, target, k), reference_labels(pred, target, k));
  }
}

TEST_F(MetricsTest, ScoresMatchTheLoop) {
  for (const auto dtype : {torch::kFloat, torch::kDouble, torch::kHalf, torch::kBFloat16}) {
    for (const bool ties : {false, true}) {
      for (const bool channels_last : {false, true}) {
        SCOPED_TRACE(std::string(c10::toString(dtype)) + (ties ? " ties" : " randn") +
                     (channels_last ? " channels_last" : " contiguous"));
        auto scores = ties ? torch::randint(0, 3, {2, 5, 6, 7}, torch::kDouble)
                           : torch::randn({2, 5, 6, 7}, torch::kDouble);
        scores = scores.to(dtype);
        if (channels_last) scores = scores.contiguous(at::MemoryFormat::ChannelsLast);
        const auto target = labels({2, 6, 7}, 5, torch::kByte, 255);
        expect_equal(torch_ext::confusion_matrix(scores, target, 5, 255),
                     reference_scores(scores, target, 5, 255));
      }
    }
  }
}

TEST_F(MetricsTest, CallsFromInsideAParallelRegion) {
  // A caller that already runs on ATen's thread pool (the kernel then counts inline).
  std::vector<torch::Tensor> preds, targets, outs(4);
  for (int i = 0; i < 4; ++i) {
    preds.push_back(i % 2 ? torch::randn({2, 5, 60, 70}) : labels({2, 60, 70}, 5, torch::kInt));
    targets.push_back(labels({2, 60, 70}, 5, torch::kByte, 255));
  }
  at::parallel_for(0, 4, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      outs[i] = torch_ext::confusion_matrix(preds[i], targets[i], 5, 255);
    }
  });
  for (int i = 0; i < 4; ++i) {
    SCOPED_TRACE("input " + std::to_string(i));
    expect_equal(outs[i], i % 2 ? reference_scores(preds[i], targets[i], 5, 255)
                                : reference_labels(preds[i], targets[i], 5, 255));
  }
}

TEST_F(MetricsTest, IgnoreIndexInRange) {
  const auto pred = labels({2, 8, 9}, 4, torch::kLong);
  const auto target = labels({2, 8, 9}, 4, torch::kLong);
  const auto out = torch_ext::confusion_matrix(pred, target, 4, 0);
  expect_equal(out, reference_labels(pred, target, 4, 0));
  EXPECT_EQ(out[0].sum().item<int64_t>(), 0);
  EXPECT_GT(out.select(1, 0).sum().item<int64_t>(), 0);  // predictions of 0 still count
}

TEST_F(MetricsTest, EmptyInputsGiveZeros) {
  const auto zeros = torch::zeros({4, 4}, torch::kLong);
  expect_equal(torch_ext::confusion_matrix(torch::zeros({0, 5, 6}, torch::kLong),
                                           torch::zeros({0, 5, 6}, torch::kLong), 4),
               zeros);
  expect_equal(torch_ext::confusion_matrix(torch::zeros({0, 4, 5, 6}),
                                           torch::zeros({0, 5, 6}, torch::kByte), 4),
               zeros);
  // Every pixel ignored.
  expect_equal(torch_ext::confusion_matrix(torch::zeros({2, 3}, torch::kLong),
                                           torch::full({2, 3}, 255, torch::kByte), 4, 255),
               zeros);
}

TEST_F(MetricsTest, ValidationNamesTheValueAndWhere) {
  auto target = labels({2, 4, 5}, 5, torch::kLong);
  auto pred = labels({2, 4, 5}, 5, torch::kLong);
  target.index_put_({1, 2, 3}, 77);
  expect_mentions(error_message([&] { torch_ext::confusion_matrix(pred, target, 5); }),
                  {"target", "77", "[1, 2, 3]"});
  target.index_put_({1, 2, 3}, 1);
  pred.index_put_({0, 3, 1}, -13);
  expect_mentions(error_message([&] { torch_ext::confusion_matrix(pred, target, 5, 255); }),
                  {"pred", "-13", "[0, 3, 1]"});
  // validate = false: no error, and the bad pixel is not counted.
  const auto out = torch_ext::confusion_matrix(pred, target, 5, std::nullopt, false);
  expect_equal(out, reference_labels(pred, target, 5));
  EXPECT_EQ(out.sum().item<int64_t>(), 2 * 4 * 5 - 1);
}

TEST_F(MetricsTest, BadArgumentsThrowNamingTheArgument) {
  const auto good = torch::zeros({2, 3}, torch::kLong);
  struct Case {
    std::string what;
    std::function<void()> call;
    std::string name;
  };
  const std::vector<Case> cases = {
      {"num_classes 0", [&] { torch_ext::confusion_matrix(good, good, 0); }, "num_classes"},
      {"num_classes -2", [&] { torch_ext::confusion_matrix(good, good, -2); }, "num_classes"},
      {"float target",
       [&] {
         torch_ext::confusion_matrix(good, torch::zeros({2, 3}), 4);
       },
       "target"},
      {"bool target",
       [&] {
         torch_ext::confusion_matrix(good, torch::zeros({2, 3}, torch::kBool), 4);
       },
       "target"},
      {"pred shape",
       [&] {
         torch_ext::confusion_matrix(torch::zeros({2, 4}, torch::kLong), good, 4);
       },
       "pred"},
      {"scores classes",
       [&] {
         torch_ext::confusion_matrix(torch::zeros({2, 5, 3}), good, 4);
       },
       "pred"},
      {"accumulator num_classes",
       [&] { torch_ext::SegmentationMetricsAccumulator(0, std::nullopt, torch::kCPU); },
       "num_classes"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    EXPECT_THROW(c.call(), c10::Error);
    expect_mentions(error_message(c.call), {c.name});
  }
}

// ---------------------------------------------------------------- segmentation_metrics

TEST_F(MetricsTest, MetricsOfAHandComputed3x3Matrix) {
  // Rows = ground truth, columns = prediction.
  // clang-format off
  const auto cm = torch::tensor({3, 1, 1,   // gt 0: 5
                                 2, 4, 0,   // gt 1: 6
                                 1, 0, 6},  // gt 2: 7; predicted 6, 5, 7; total 18
                                torch::kLong).view({3, 3});
  // clang-format on
  const auto m = torch_ext::segmentation_metrics(cm);
  expect_metric(m.pixel_accuracy, {13.0 / 18}, "pixel_accuracy");
  expect_metric(m.mean_pixel_accuracy, {(3.0 / 5 + 4.0 / 6 + 6.0 / 7) / 3}, "mean_pixel_accuracy");
  expect_metric(m.iou, {3.0 / 8, 4.0 / 7, 6.0 / 8}, "iou");
  expect_metric(m.mean_iou, {(3.0 / 8 + 4.0 / 7 + 6.0 / 8) / 3}, "mean_iou");
  expect_metric(m.fw_iou, {5.0 / 18 * 3.0 / 8 + 6.0 / 18 * 4.0 / 7 + 7.0 / 18 * 6.0 / 8}, "fw_iou");
  expect_metric(m.dice, {6.0 / 11, 8.0 / 11, 12.0 / 14}, "dice");
  expect_metric(m.mean_dice, {(6.0 / 11 + 8.0 / 11 + 12.0 / 14) / 3}, "mean_dice");
}

TEST_F(MetricsTest, MetricsOfAbsentClasses) {
  // Class 2: absent from ground truth and prediction (NaN, out of the means). Class 3: absent
  // from ground truth, predicted 3 times (IoU 0, Dice 0, no accuracy).
  // clang-format off
  const auto cm = torch::tensor({5, 1, 0, 2,   // gt 0: 8
                                 0, 3, 0, 1,   // gt 1: 4
                                 0, 0, 0, 0,   // gt 2: 0
                                 0, 0, 0, 0},  // gt 3: 0; predicted 5, 4, 0, 3; total 12
                                torch::kLong).view({4, 4});
  // clang-format on
  const auto m = torch_ext::segmentation_metrics(cm);
  expect_metric(m.pixel_accuracy, {8.0 / 12}, "pixel_accuracy");
  expect_metric(m.mean_pixel_accuracy, {(5.0 / 8 + 3.0 / 4) / 2}, "mean_pixel_accuracy");
  expect_metric(m.iou, {5.0 / 8, 3.0 / 5, kNaN, 0.0}, "iou");
  expect_metric(m.mean_iou, {(5.0 / 8 + 3.0 / 5) / 3}, "mean_iou");
  expect_metric(m.fw_iou, {8.0 / 12 * 5.0 / 8 + 4.0 / 12 * 3.0 / 5}, "fw_iou");
  expect_metric(m.dice, {10.0 / 13, 6.0 / 8, kNaN, 0.0}, "dice");
  expect_metric(m.mean_dice, {(10.0 / 13 + 6.0 / 8) / 3}, "mean_dice");
}

TEST_F(MetricsTest, MetricsOfPerfectAndEmptyMatrices) {
  const auto perfect =
      torch_ext::segmentation_metrics(torch::diag(torch::tensor({4, 2, 7}, torch::kLong)));
  for (const auto& value : {perfect.pixel_accuracy, perfect.mean_pixel_accuracy, perfect.mean_iou,
                            perfect.fw_iou, perfect.mean_dice}) {
    expect_metric(value, {1.0}, "perfect");
  }
  expect_metric(perfect.iou, {1.0, 1.0, 1.0}, "perfect iou");
  expect_metric(perfect.dice, {1.0, 1.0, 1.0}, "perfect dice");
  const auto empty = torch_ext::segmentation_metrics(torch::zeros({3, 3}, torch::kLong));
  for (const auto& value : {empty.pixel_accuracy, empty.mean_pixel_accuracy, empty.mean_iou,
                            empty.fw_iou, empty.mean_dice}) {
    expect_metric(value, {kNaN}, "empty");
  }
  expect_metric(empty.iou, {kNaN, kNaN, kNaN}, "empty iou");
  expect_metric(empty.dice, {kNaN, kNaN, kNaN}, "empty dice");
}

// ---------------------------------------------------------------- the accumulator

TEST_F(MetricsTest, AccumulatorMatchesOneConfusionMatrix) {
  const int64_t k = 6;
  const auto pred_a = labels({2, 7, 8}, k, torch::kInt),
             target_a = labels({2, 7, 8}, k, torch::kByte, 255);
  const auto pred_b = labels({3, 7, 8}, k, torch::kInt),
             target_b = labels({3, 7, 8}, k, torch::kByte, 255);
  torch_ext::SegmentationMetricsAccumulator acc(k, 255, torch::kCPU);
  acc.update(pred_a, target_a);
  acc.update(pred_b, target_b);
  const auto pred = torch::cat({pred_a, pred_b}), target = torch::cat({target_a, target_b});
  const auto expected = reference_labels(pred, target, k, 255);
  expect_equal(acc.confusion_matrix(), expected);
  expect_same_metrics(acc.compute(), torch_ext::segmentation_metrics(expected));

  // Scores update the same matrix.
  const auto scores = torch::randn({2, k, 7, 8});
  acc.update(scores, target_a);
  expect_equal(acc.confusion_matrix(), expected + reference_scores(scores, target_a, k, 255));

  acc.reset();
  expect_equal(acc.confusion_matrix(), torch::zeros({k, k}, torch::kLong));
  const auto after_reset = acc.compute();
  EXPECT_TRUE(std::isnan(after_reset.mean_iou.item<double>()));
}

TEST_F(MetricsTest, AccumulatorReportsOutOfRangeLabelsAtCompute) {
  const int64_t k = 4;
  auto pred = labels({2, 5, 6}, k, torch::kLong);
  auto target = labels({2, 5, 6}, k, torch::kLong);
  target.index_put_({1, 2, 3}, 9);
  torch_ext::SegmentationMetricsAccumulator acc(k, std::nullopt, torch::kCPU);
  acc.update(pred, target);  // no throw: update does not synchronize
  EXPECT_THROW(acc.compute(), c10::Error);
  // The bad pixel was not counted.
  expect_equal(acc.confusion_matrix(), reference_labels(pred, target, k));
  EXPECT_EQ(acc.confusion_matrix().sum().item<int64_t>(), 2 * 5 * 6 - 1);
  acc.reset();  // forgets the bad batch too
  target.index_put_({1, 2, 3}, 0);
  acc.update(pred, target);
  EXPECT_NO_THROW(acc.compute());
  expect_equal(acc.confusion_matrix(), reference_labels(pred, target, k));
}

}  // namespace
