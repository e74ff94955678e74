#pragma once

// Shared by the metrics kernels of every backend: argument checks, how inputs are laid out
// for the kernels, and the out-of-range report.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <limits>
#include <optional>

namespace torch_ext::metrics_impl {

// report = int64 [2]: [0] number of out-of-range pixels, [1] the smallest key
// flat_pixel_index * 2 + (0: the value was in target, 1: in pred); kNoBadKey when none.
constexpr int64_t kNoBadKey = std::numeric_limits<int64_t>::max();

// Checks confusion_matrix's inputs; true when pred holds scores (float, class dim at 1).
bool check_confusion_args(const at::Tensor& pred, const at::Tensor& target, int64_t num_classes);

// Checks the state tensors of _confusion_matrix_accumulate against pred/target.
void check_accumulate_state(const at::Tensor& confmat, const at::Tensor& report,
                            const at::Tensor& target, int64_t num_classes);

// What the kernels read. Labels: pred and target contiguous, `pixels` elements each. Scores:
// [batch, K, pixels] with strides (batch_stride, class_stride, pixel_stride) (contiguous:
// class_stride = pixels; channels_last-like: class_stride = 1), target contiguous
// [batch * pixels]. Pixel p of sample n is target[n * pixels + p]; keys index that order.
struct ConfusionInputs {
  at::Tensor pred, target;
  bool scores;
  int64_t batch, pixels, batch_stride, class_stride, pixel_stride;
};

ConfusionInputs prepare_confusion_inputs(const at::Tensor& pred, const at::Tensor& target,
                                         int64_t num_classes);

// confusion_matrix on a real backend: zeroed state, _confusion_matrix_accumulate, and (when
// validate) one read of the report to raise on out-of-range labels.
at::Tensor confusion_matrix_via_accumulate(const at::Tensor& pred, const at::Tensor& target,
                                           int64_t num_classes, std::optional<int64_t> ignore_index,
                                           bool validate);

}  // namespace torch_ext::metrics_impl
