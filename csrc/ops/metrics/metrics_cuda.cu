// CUDA kernels of the confusion matrix.
//
// Each block counts into a private int32 histogram in shared memory and adds it to the int64
// result with integer atomics at the end; when K * K does not fit in shared memory, threads add
// to the result directly. Integer sums do not depend on their order: exact and deterministic.
// Out-of-range pixels are counted into `report` on the device; nothing synchronizes here (the
// functional op reads the report once when it validates).

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda_launch.cuh"
#include "common/dispatch.h"
#include "common/numerics.h"
#include "ops/metrics/metrics_common.h"

namespace torch_ext::metrics_impl {
namespace {

constexpr int kThreads = launch::kBlockThreads;
constexpr int64_t kMaxSharedCells = 12 * 1024;  // int32 counts: 48 KiB of shared memory

struct Problem {
  int64_t num_classes;
  bool has_ignore;
  int64_t ignore_index;
  bool shared_hist;
  int64_t* confmat;
  int64_t* report;
};

// Per-thread bookkeeping of out-of-range pixels, flushed once per thread.
struct BadPixels {
  unsigned long long count = 0;
  long long first_key = kNoBadKey;
};

__device__ __forceinline__ void tally(int* hist, const Problem& pb, BadPixels& bad, int64_t i,
                                      int64_t t, int64_t p) {
  if (pb.has_ignore && t == pb.ignore_index) return;
  const int64_t k = pb.num_classes;
  const bool bad_target = t < 0 || t >= k;
  if (bad_target || p < 0 || p >= k) {
    ++bad.count;
    bad.first_key = min(bad.first_key, static_cast<long long>(2 * i + (bad_target ? 0 : 1)));
    return;
  }
  if (pb.shared_hist) {
    // Warp-aggregated: lanes with the same cell (runs of one class are the common case) add
    // once, through their lowest lane.
    const unsigned long long cell = static_cast<unsigned long long>(t * k + p);
    const unsigned same = __match_any_sync(__activemask(), cell);
    if ((threadIdx.x % 32) == static_cast<unsigned>(__ffs(same) - 1)) {
      atomicAdd(hist + cell, __popc(same));
    }
  } else {
    atomicAdd(reinterpret_cast<unsigned long long*>(pb.confmat + t * k + p), 1ull);
  }
}

__device__ __forceinline__ void begin_block(int* hist, const Problem& pb) {
  if (!pb.shared_hist) return;
  for (int64_t c = threadIdx.x; c < pb.num_classes * pb.num_classes; c += blockDim.x) hist[c] = 0;
  __syncthreads();
}

__device__ __forceinline__ void end_block(int* hist, const Problem& pb, const BadPixels& bad) {
  if (bad.count > 0) {
    atomicAdd(reinterpret_cast<unsigned long long*>(pb.report), bad.count);
    atomicMin(reinterpret_cast<long long*>(pb.report + 1), bad.first_key);
  }
  if (!pb.shared_hist) return;
  __syncthreads();
  for (int64_t c = threadIdx.x; c < pb.num_classes * pb.num_classes; c += blockDim.x) {
    if (hist[c] != 0) {
      atomicAdd(reinterpret_cast<unsigned long long*>(pb.confmat + c),
                static_cast<unsigned long long>(hist[c]));
    }
  }
}

template <class P, class T>
__global__ void labels_kernel(const P* __restrict__ pred, const T* __restrict__ target,
                              int64_t total, Problem pb) {
  extern __shared__ int hist[];
  begin_block(hist, pb);
  BadPixels bad;
  for (int64_t i = launch::grid_stride_first(); i < total;
       i += launch::grid_stride_step()) {
    tally(hist, pb, bad, i, static_cast<int64_t>(target[i]), static_cast<int64_t>(pred[i]));
  }
  end_block(hist, pb, bad);
}

// One thread per pixel: argmax over the classes (ties to the lowest class, the first NaN wins,
// as torch.argmax), then the count.
template <class S, class T>
__global__ void scores_kernel(const S* __restrict__ scores, const T* __restrict__ target,
                              int64_t batch, int64_t pixels, int64_t batch_stride,
                              int64_t class_stride, int64_t pixel_stride, Problem pb) {
  using acc = at::opmath_type<S>;
  extern __shared__ int hist[];
  begin_block(hist, pb);
  BadPixels bad;
  const int64_t total = batch * pixels;
  for (int64_t i = launch::grid_stride_first(); i < total;
       i += launch::grid_stride_step()) {
    const S* s = scores + (i / pixels) * batch_stride + (i % pixels) * pixel_stride;
    acc best = static_cast<acc>(s[0]);
    int64_t arg = 0;
    for (int64_t c = 1; c < pb.num_classes; ++c) {
      const acc v = static_cast<acc>(s[c * class_stride]);
      if (numerics::argmax_takes_over(v, best)) {
        best = v;
        arg = c;
      }
    }
    tally(hist, pb, bad, i, static_cast<int64_t>(target[i]), arg);
  }
  end_block(hist, pb, bad);
}

unsigned int grid_for(int64_t total, int device) {
  const int sms = launch::multiprocessor_count(device);
  const int64_t wanted = (total + kThreads - 1) / kThreads;
  // Enough blocks to fill the GPU, few enough that private histograms pay off, and at least
  // total / 2^30 so that no block's int32 count can overflow.
  const int64_t blocks =
      std::max<int64_t>(std::min<int64_t>(wanted, int64_t{sms} * 8), (total >> 30) + 1);
  return static_cast<unsigned int>(blocks);
}

void accumulate_cuda(at::Tensor& confmat, at::Tensor& report, const at::Tensor& pred,
                     const at::Tensor& target, std::optional<int64_t> ignore_index) {
  const int64_t num_classes = confmat.dim() == 2 ? confmat.size(0) : 0;
  const ConfusionInputs in = prepare_confusion_inputs(pred, target, num_classes);
  check_accumulate_state(confmat, report, target, num_classes);
  const int64_t total = in.target.numel();
  if (total == 0) return;
  const c10::cuda::CUDAGuard guard(target.device());
  const int64_t cells = num_classes * num_classes;
  const Problem pb{num_classes,
                   ignore_index.has_value(),
                   ignore_index.value_or(0),
                   cells <= kMaxSharedCells,
                   confmat.mutable_data_ptr<int64_t>(),
                   report.mutable_data_ptr<int64_t>()};
  const size_t smem = pb.shared_hist ? cells * sizeof(int) : 0;
  const unsigned int blocks = grid_for(total, target.get_device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_label_types(
      in.target.scalar_type(), "confusion_matrix CUDA kernel", [&](auto target_tag) {
        using T = decltype(target_tag);
        const T* t = in.target.const_data_ptr<T>();
        if (in.scores) {
          dispatch_float_types(in.pred.scalar_type(), "confusion_matrix CUDA kernel",
                               [&](auto tag) {
                                 using S = decltype(tag);
                                 scores_kernel<S, T><<<blocks, kThreads, smem, stream>>>(
                                     in.pred.const_data_ptr<S>(), t, in.batch, in.pixels,
                                     in.batch_stride, in.class_stride, in.pixel_stride, pb);
                               });
        } else {
          dispatch_label_types(
              in.pred.scalar_type(), "confusion_matrix CUDA kernel", [&](auto tag) {
                using P = decltype(tag);
                labels_kernel<P, T>
                    <<<blocks, kThreads, smem, stream>>>(in.pred.const_data_ptr<P>(), t, total, pb);
              });
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace
}  // namespace torch_ext::metrics_impl

TORCH_LIBRARY_IMPL(torch_ext, CUDA, m) {
  m.impl("confusion_matrix", torch_ext::metrics_impl::confusion_matrix_via_accumulate);
  m.impl("_confusion_matrix_accumulate", torch_ext::metrics_impl::accumulate_cuda);
}
