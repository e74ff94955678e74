// Segmentation metrics: op schemas, argument checks, Meta kernels, the C++ API, the metrics of
// a confusion matrix (composite), and the streaming accumulator.
// Backends: metrics_cpu.cpp (+ metrics_cpu_kernel.cpp), metrics_cuda.cu; autograd:
// metrics_autograd.cpp.

#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/nanmean.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <sstream>
#include <string>
#include <vector>

#include "common/checked_size.h"
#include "ops/metrics/metrics_common.h"
#include "ops/metrics/metrics_ops.h"
#include "torch_ext/metrics.h"

namespace torch_ext {
namespace metrics_impl {
namespace {

bool is_label_dtype(at::ScalarType t) {
  return t == at::kByte || t == at::kShort || t == at::kInt || t == at::kLong;
}

bool is_score_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

bool check_confusion_args(const at::Tensor& pred, const at::Tensor& target, int64_t num_classes) {
  TORCH_CHECK(num_classes >= 1, "confusion_matrix(): num_classes must be >= 1, got ", num_classes);
  check_allocation("confusion_matrix", "the [num_classes, num_classes] int64 matrix",
                   {num_classes, num_classes}, sizeof(int64_t));
  TORCH_CHECK(is_label_dtype(target.scalar_type()),
              "confusion_matrix(): target must hold labels of dtype uint8, int16, int32 or int64, "
              "got ",
              target.scalar_type());
  TORCH_CHECK(pred.device() == target.device(),
              "confusion_matrix(): pred and target must be on one device, got pred on ",
              pred.device(), " and target on ", target.device());
  if (is_label_dtype(pred.scalar_type())) {
    TORCH_CHECK(pred.sym_sizes() == target.sym_sizes(),
                "confusion_matrix(): pred labels must have target's shape ", target.sym_sizes(),
                ", got ", pred.sym_sizes());
    return false;
  }
  TORCH_CHECK(is_score_dtype(pred.scalar_type()),
              "confusion_matrix(): pred must be integer labels (uint8, int16, int32, int64) or "
              "float scores (float32, float64, float16, bfloat16), got ",
              pred.scalar_type());
  const auto ps = pred.sym_sizes();
  const auto ts = target.sym_sizes();
  bool shape_ok = pred.dim() == target.dim() + 1 && pred.dim() >= 2 && ps[0] == ts[0];
  for (int64_t d = 2; shape_ok && d < pred.dim(); ++d) shape_ok = ps[d] == ts[d - 1];
  TORCH_CHECK(shape_ok,
              "confusion_matrix(): pred scores must be [N, num_classes, *S] for target [N, *S] = ",
              ts, ", got pred of shape ", ps);
  TORCH_SYM_CHECK(ps[1].sym_eq(num_classes),
                  "confusion_matrix(): pred scores must have num_classes = ", num_classes,
                  " entries in dim 1, got shape ", ps);
  return true;
}

void check_accumulate_state(const at::Tensor& confmat, const at::Tensor& report,
                            const at::Tensor& target, int64_t num_classes) {
  TORCH_CHECK(confmat.scalar_type() == at::kLong && confmat.dim() == 2 &&
                  confmat.sym_size(0) == num_classes && confmat.sym_size(1) == num_classes &&
                  confmat.is_contiguous(),
              "_confusion_matrix_accumulate(): confmat must be a contiguous int64 [K, K] tensor, "
              "got ",
              confmat.scalar_type(), " ", confmat.sym_sizes());
  TORCH_CHECK(report.scalar_type() == at::kLong && report.dim() == 1 && report.sym_size(0) == 2 &&
                  report.is_contiguous(),
              "_confusion_matrix_accumulate(): report must be a contiguous int64 [2] tensor, got ",
              report.scalar_type(), " ", report.sym_sizes());
  TORCH_CHECK(confmat.device() == target.device() && report.device() == target.device(),
              "_confusion_matrix_accumulate(): confmat and report must be on target's device ",
              target.device(), ", got ", confmat.device(), " and ", report.device());
}

ConfusionInputs prepare_confusion_inputs(const at::Tensor& pred, const at::Tensor& target,
                                         int64_t num_classes) {
  const bool scores = check_confusion_args(pred, target, num_classes);
  ConfusionInputs in;
  in.target = target.contiguous();
  in.scores = scores;
  if (!scores) {
    in.pred = pred.contiguous();
    in.batch = 1;
    in.pixels = target.numel();
    in.batch_stride = in.class_stride = 0;
    in.pixel_stride = 1;
    return in;
  }
  const int64_t n = pred.size(0), k = pred.size(1);
  in.batch = n;
  in.pixels = n == 0 ? 0 : target.numel() / n;
  // Classes innermost in memory (channels_last and its N-d kin) read as they are; anything
  // else is made contiguous (classes planar).
  std::vector<int64_t> class_last_order{0};
  for (int64_t d = 2; d < pred.dim(); ++d) class_last_order.push_back(d);
  class_last_order.push_back(1);
  if (pred.dim() > 2 && pred.permute(class_last_order).is_contiguous()) {
    in.pred = pred;
    in.batch_stride = in.pixels * k;
    in.class_stride = 1;
    in.pixel_stride = k;
  } else {
    in.pred = pred.contiguous();
    in.batch_stride = in.pixels * k;
    in.class_stride = in.pixels;
    in.pixel_stride = 1;
  }
  return in;
}

namespace {

at::Tensor fresh_report(const at::TensorOptions& options) {
  // Device-side fills only: no host-to-device copy.
  auto report = at::full({2}, kNoBadKey, options.dtype(at::kLong));
  report.narrow(0, 0, 1).zero_();
  return report;
}

std::string format_index(int64_t flat, at::IntArrayRef shape) {
  std::vector<int64_t> index(shape.size());
  for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) {
    index[d] = shape[d] == 0 ? 0 : flat % shape[d];
    flat = shape[d] == 0 ? 0 : flat / shape[d];
  }
  std::ostringstream out;
  out << at::IntArrayRef(index);
  return out.str();
}

std::string range_text(int64_t num_classes, std::optional<int64_t> ignore_index) {
  std::ostringstream out;
  out << "outside [0, " << num_classes << ")";
  if (ignore_index) out << " (ignore_index=" << *ignore_index << ")";
  return out.str();
}

}  // namespace

at::Tensor confusion_matrix_via_accumulate(const at::Tensor& pred, const at::Tensor& target,
                                           int64_t num_classes, std::optional<int64_t> ignore_index,
                                           bool validate) {
  check_confusion_args(pred, target, num_classes);
  auto confmat = at::zeros({num_classes, num_classes}, target.options().dtype(at::kLong));
  auto report = fresh_report(target.options());
  call_confusion_matrix_accumulate(confmat, report, pred, target, ignore_index);
  if (!validate) return confmat;
  const auto host = report.cpu();  // the one synchronization validation needs
  const int64_t bad = host.const_data_ptr<int64_t>()[0];
  if (bad == 0) return confmat;
  const int64_t key = host.const_data_ptr<int64_t>()[1];
  const bool in_pred = (key & 1) != 0;
  const int64_t flat = key >> 1;
  const auto& holder = in_pred ? pred : target;
  const int64_t value = holder.reshape(-1)[flat].item<int64_t>();
  TORCH_CHECK(false, "confusion_matrix(): ", in_pred ? "pred" : "target", " holds ", value, " at ",
              format_index(flat, target.sizes()), ", ", range_text(num_classes, ignore_index), "; ",
              bad,
              " pixel(s) are out of range. Pass validate=False to skip such pixels unchecked.");
}

namespace {

// ---------------------------------------------------------------- Meta kernels

at::Tensor confusion_matrix_meta(const at::Tensor& pred, const at::Tensor& target,
                                 int64_t num_classes, std::optional<int64_t> ignore_index,
                                 bool validate) {
  check_confusion_args(pred, target, num_classes);
  return at::empty({num_classes, num_classes}, target.options().dtype(at::kLong));
}

void accumulate_meta(at::Tensor& confmat, at::Tensor& report, const at::Tensor& pred,
                     const at::Tensor& target, std::optional<int64_t> ignore_index) {
  check_confusion_args(pred, target, confmat.dim() == 2 ? confmat.size(0) : 0);
  check_accumulate_state(confmat, report, target, confmat.size(0));
}

// ---------------------------------------------------------------- metrics (composite)

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
segmentation_metrics_composite(const at::Tensor& confmat) {
  TORCH_CHECK(confmat.dim() == 2 && confmat.sym_size(0) == confmat.sym_size(1),
              "segmentation_metrics(): confmat must be a square [K, K] matrix, got shape ",
              confmat.sym_sizes());
  const auto cm = confmat.to(at::kDouble);
  const auto diag = cm.diagonal();
  const auto gt = cm.sum(1);    // pixels of each class in the ground truth (rows)
  const auto pred = cm.sum(0);  // pixels predicted as each class (columns)
  const auto total = cm.sum();
  const auto nan = at::full({}, std::numeric_limits<double>::quiet_NaN(), cm.options());
  // 0 / 0 is NaN: a class absent from the ground truth has no accuracy; absent from both, no
  // IoU and no Dice. Absent from the ground truth but predicted: IoU = Dice = 0 / pred = 0.
  const auto pixel_accuracy = diag.sum() / total;
  const auto class_accuracy = diag / gt;
  const auto iou = diag / (gt + pred - diag);
  const auto dice = 2 * diag / (gt + pred);
  const auto weighted = at::where(gt > 0, (gt / total) * iou, at::zeros_like(iou)).sum();
  const auto fw_iou = at::where(total > 0, weighted, nan);
  return {pixel_accuracy,   at::nanmean(class_accuracy), iou, at::nanmean(iou), fw_iou, dice,
          at::nanmean(dice)};
}

}  // namespace
}  // namespace metrics_impl

// ---------------------------------------------------------------- C++ API

at::Tensor confusion_matrix(const at::Tensor& pred, const at::Tensor& target, int64_t num_classes,
                            std::optional<int64_t> ignore_index, bool validate) {
  return metrics_impl::call_confusion_matrix(pred, target, num_classes, ignore_index, validate);
}

SegmentationMetrics segmentation_metrics(const at::Tensor& confmat) {
  auto [pa, mpa, iou, miou, fwiou, dice, mdice] = metrics_impl::call_segmentation_metrics(confmat);
  return {pa, mpa, iou, miou, fwiou, dice, mdice};
}

SegmentationMetricsAccumulator::SegmentationMetricsAccumulator(int64_t num_classes,
                                                               std::optional<int64_t> ignore_index,
                                                               at::Device device)
    : num_classes_(num_classes), ignore_index_(ignore_index) {
  TORCH_CHECK(num_classes >= 1, "SegmentationMetricsAccumulator: num_classes must be >= 1, got ",
              num_classes);
  const auto options = at::TensorOptions().device(device).dtype(at::kLong);
  confmat_ = at::zeros({num_classes, num_classes}, options);
  report_ = metrics_impl::fresh_report(options);
}

void SegmentationMetricsAccumulator::update(const at::Tensor& pred, const at::Tensor& target) {
  metrics_impl::call_confusion_matrix_accumulate(confmat_, report_, pred, target, ignore_index_);
}

SegmentationMetrics SegmentationMetricsAccumulator::compute() const {
  const auto host = report_.cpu();
  const int64_t bad = host.const_data_ptr<int64_t>()[0];
  if (bad > 0) {
    const int64_t key = host.const_data_ptr<int64_t>()[1];
    TORCH_CHECK(false, "SegmentationMetricsAccumulator: ", bad, " pixel(s) had labels ",
                metrics_impl::range_text(num_classes_, ignore_index_),
                " and were not counted; the first was in ", (key & 1) ? "pred" : "target",
                " at flat index ", key >> 1, " of its batch");
  }
  return segmentation_metrics(confmat_);
}

void SegmentationMetricsAccumulator::reset() {
  confmat_.zero_();
  report_ = metrics_impl::fresh_report(report_.options());
}

}  // namespace torch_ext

// ---------------------------------------------------------------- schemas

TORCH_LIBRARY_FRAGMENT(torch_ext, m) {
  m.def(
      "confusion_matrix(Tensor pred, Tensor target, int num_classes, int? ignore_index=None, "
      "bool validate=True) -> Tensor");
  // Adds a batch's counts to confmat and counts its out-of-range pixels into report, on the
  // device, without synchronizing (see metrics_common.h for report's layout).
  m.def(
      "_confusion_matrix_accumulate(Tensor(a!) confmat, Tensor(b!) report, Tensor pred, "
      "Tensor target, int? ignore_index=None) -> ()");
  m.def(
      "segmentation_metrics(Tensor confmat) -> (Tensor pixel_accuracy, Tensor "
      "mean_pixel_accuracy, Tensor iou, Tensor mean_iou, Tensor fw_iou, Tensor dice, Tensor "
      "mean_dice)");
}

TORCH_LIBRARY_IMPL(torch_ext, Meta, m) {
  m.impl("confusion_matrix", torch_ext::metrics_impl::confusion_matrix_meta);
  m.impl("_confusion_matrix_accumulate", torch_ext::metrics_impl::accumulate_meta);
}

TORCH_LIBRARY_IMPL(torch_ext, CompositeImplicitAutograd, m) {
  m.impl("segmentation_metrics", torch_ext::metrics_impl::segmentation_metrics_composite);
}
