#pragma once

// The interface between metrics_cpu.cpp and the loops of metrics_cpu_kernel.cpp (compiled once
// per CPU capability). Plain pointers and sizes.

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace torch_ext::metrics_impl {

struct ConfusionArgs {
  c10::ScalarType pred_dtype, target_dtype;
  const void* pred;    // labels [pixels] or scores [batch, K, pixels] with the strides below
  const void* target;  // labels [batch * pixels]
  bool scores;
  int64_t batch, pixels, batch_stride, class_stride, pixel_stride;
  int64_t num_classes;
  bool has_ignore;
  int64_t ignore_index;
  int64_t* confmat;  // [K, K], added to
  int64_t* report;   // [2], updated (see metrics_common.h)
};

struct MetricsCpuKernels {
  void (*confusion_accumulate)(const ConfusionArgs&);
};

extern const MetricsCpuKernels metrics_cpu_kernels_DEFAULT;
extern const MetricsCpuKernels metrics_cpu_kernels_AVX2;
extern const MetricsCpuKernels metrics_cpu_kernels_AVX512;

}  // namespace torch_ext::metrics_impl
