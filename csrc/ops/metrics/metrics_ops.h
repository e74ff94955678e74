#pragma once

// The metrics family's ops through the dispatcher: one typed handle per op, looked up once. The
// C++ API, the composites and the streaming accumulator all call the ops through these.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace torch_ext::metrics_impl {

// confusion_matrix(Tensor pred, Tensor target, int num_classes, int? ignore_index,
//                  bool validate) -> Tensor
inline at::Tensor call_confusion_matrix(const at::Tensor& pred, const at::Tensor& target,
                                        int64_t num_classes, std::optional<int64_t> ignore_index,
                                        bool validate) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_ext::confusion_matrix", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t,
                                         std::optional<int64_t>, bool)>();
  return op.call(pred, target, num_classes, ignore_index, validate);
}

// _confusion_matrix_accumulate(Tensor(a!) confmat, Tensor(b!) report, Tensor pred, Tensor target,
//                              int? ignore_index) -> ()
inline void call_confusion_matrix_accumulate(at::Tensor& confmat, at::Tensor& report,
                                             const at::Tensor& pred, const at::Tensor& target,
                                             std::optional<int64_t> ignore_index) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_ext::_confusion_matrix_accumulate", "")
                       .typed<void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   std::optional<int64_t>)>();
  op.call(confmat, report, pred, target, ignore_index);
}

// segmentation_metrics(Tensor confmat) -> (pixel_accuracy, mean_pixel_accuracy, iou, mean_iou,
//                                         fw_iou, dice, mean_dice)
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                  at::Tensor>
call_segmentation_metrics(const at::Tensor& confmat) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_ext::segmentation_metrics", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                         at::Tensor, at::Tensor>(const at::Tensor&)>();
  return op.call(confmat);
}

}  // namespace torch_ext::metrics_impl
