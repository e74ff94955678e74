// CPU kernels of the confusion matrix: checks and layout (metrics.cpp), then the loops of
// metrics_cpu_kernel.cpp for this CPU's instruction set.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "common/cpu_capability.h"
#include "ops/metrics/metrics_common.h"
#include "ops/metrics/metrics_cpu_kernel.h"

namespace torch_ext::metrics_impl {
namespace {

void accumulate_cpu(at::Tensor& confmat, at::Tensor& report, const at::Tensor& pred,
                    const at::Tensor& target, std::optional<int64_t> ignore_index) {
  const int64_t num_classes = confmat.dim() == 2 ? confmat.size(0) : 0;
  const ConfusionInputs in = prepare_confusion_inputs(pred, target, num_classes);
  check_accumulate_state(confmat, report, target, num_classes);
  if (in.target.numel() == 0) return;
  const auto& kernels = select_cpu_kernels(metrics_cpu_kernels_DEFAULT, metrics_cpu_kernels_AVX2,
                                           metrics_cpu_kernels_AVX512);
  kernels.confusion_accumulate(
      {in.pred.scalar_type(), in.target.scalar_type(), in.pred.const_data_ptr(),
       in.target.const_data_ptr(), in.scores, in.batch, in.pixels, in.batch_stride, in.class_stride,
       in.pixel_stride, num_classes, ignore_index.has_value(), ignore_index.value_or(0),
       confmat.mutable_data_ptr<int64_t>(), report.mutable_data_ptr<int64_t>()});
}

}  // namespace
}  // namespace torch_ext::metrics_impl

TORCH_LIBRARY_IMPL(torch_ext, CPU, m) {
  m.impl("confusion_matrix", torch_ext::metrics_impl::confusion_matrix_via_accumulate);
  m.impl("_confusion_matrix_accumulate", torch_ext::metrics_impl::accumulate_cpu);
}
