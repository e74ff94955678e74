#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "torch_ext/macros.h"

namespace torch_ext {

// The confusion matrix of a segmentation (or classification): int64 [K, K], rows = ground
// truth, columns = prediction, K = num_classes.
//   pred    integer labels of target's shape (uint8, int16, int32, int64), or float scores with
//           the class dimension at dim 1 ([N, K, ...] against target [N, ...]); scores are
//           argmaxed in the kernel (ties to the lowest class, NaN wins, as torch.argmax).
//   target  integer labels; pixels equal to ignore_index are skipped.
// Any other value outside [0, K) in target or pred is an error naming the value and where it
// was found (on CUDA this costs one device-to-host copy); validate = false skips that check and
// the bad pixels. Counts are exact and deterministic on every backend.
TORCH_EXT_API at::Tensor confusion_matrix(const at::Tensor& pred, const at::Tensor& target,
                                          int64_t num_classes,
                                          std::optional<int64_t> ignore_index = std::nullopt,
                                          bool validate = true);

// Metrics of a confusion matrix (float64, on its device), as FCN, mmsegmentation and the
// Cityscapes scripts define them. A class absent from both ground truth and prediction is NaN
// per class and left out of every mean; a class absent from the ground truth but predicted has
// IoU 0 and Dice 0 and no accuracy (left out of the mean pixel accuracy).
struct SegmentationMetrics {
  at::Tensor pixel_accuracy;       // [] sum(diag) / sum(all)
  at::Tensor mean_pixel_accuracy;  // [] mean over classes present in ground truth of diag / gt
  at::Tensor iou;                  // [K] diag / (gt + pred - diag)
  at::Tensor mean_iou;             // [] nan-mean of iou
  at::Tensor fw_iou;               // [] sum of (gt / total) * iou over classes present in gt
  at::Tensor dice;                 // [K] 2 diag / (gt + pred)
  at::Tensor mean_dice;            // [] nan-mean of dice
};

TORCH_EXT_API SegmentationMetrics segmentation_metrics(const at::Tensor& confmat);

// Accumulates confusion matrices over batches on the device, with no host synchronization in
// update(): out-of-range labels are counted on the device and reported by compute().
class TORCH_EXT_API SegmentationMetricsAccumulator {
 public:
  SegmentationMetricsAccumulator(int64_t num_classes, std::optional<int64_t> ignore_index,
                                 at::Device device);

  void update(const at::Tensor& pred, const at::Tensor& target);
  // The metrics of everything accumulated; throws if any update saw out-of-range labels.
  SegmentationMetrics compute() const;
  void reset();
  // The accumulated int64 [K, K] matrix (e.g. to all-reduce across processes).
  const at::Tensor& confusion_matrix() const { return confmat_; }
  at::Tensor& confusion_matrix() { return confmat_; }

 private:
  int64_t num_classes_;
  std::optional<int64_t> ignore_index_;
  at::Tensor confmat_;
  at::Tensor report_;  // int64 [2]: out-of-range pixel count, first bad key
};

}  // namespace torch_ext
