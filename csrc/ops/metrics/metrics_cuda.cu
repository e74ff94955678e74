// CUDA kernels of the confusion matrix.
//
// Each thread counts chunks of kChunk consecutive pixels (read as one vector per tensor where
// alignment allows), merging runs of one (target, prediction) cell, which are the common case
// in segmentation maps: a run costs one atomic add. Each block counts into a private int32
// histogram in shared memory (opting in to more than 48 KiB where the GPU allows, so that
// ADE20K's 150 classes fit) and adds it to the int64 result with integer atomics at the end;
// when K * K does not fit, runs go to the result directly. Integer sums do not depend on their
// order: exact and deterministic. Out-of-range pixels are counted into `report` on the device;
// nothing synchronizes here (the functional op reads the report once when it validates).

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
constexpr int kChunk = 8;                        // consecutive pixels per thread and step

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

// The current run of one cell: `count` pixels not yet added.
struct Run {
  int64_t cell = 0;
  unsigned int count = 0;
};

__device__ __forceinline__ void flush(int* hist, const Problem& pb, Run& run) {
  if (run.count == 0) return;
  if (pb.shared_hist) {
    atomicAdd(hist + run.cell, static_cast<int>(run.count));
  } else {
    atomicAdd(reinterpret_cast<unsigned long long*>(pb.confmat + run.cell),
              static_cast<unsigned long long>(run.count));
  }
  run.count = 0;
}

__device__ __forceinline__ void tally(int* hist, const Problem& pb, BadPixels& bad, Run& run,
                                      int64_t i, int64_t t, int64_t p) {
  if (pb.has_ignore && t == pb.ignore_index) return;
  const int64_t k = pb.num_classes;
  const bool bad_target = t < 0 || t >= k;
  if (bad_target || p < 0 || p >= k) {
    ++bad.count;
    bad.first_key = min(bad.first_key, static_cast<long long>(2 * i + (bad_target ? 0 : 1)));
    return;
  }
  const int64_t cell = t * k + p;
  if (cell != run.cell) {
    flush(hist, pb, run);
    run.cell = cell;
  }
  ++run.count;
}

__device__ __forceinline__ void begin_block(int* hist, const Problem& pb) {
  if (!pb.shared_hist) return;
  for (int64_t c = threadIdx.x; c < pb.num_classes * pb.num_classes; c += blockDim.x) hist[c] = 0;
  __syncthreads();
}

__device__ __forceinline__ void end_block(int* hist, const Problem& pb, const BadPixels& bad,
                                          Run& run) {
  flush(hist, pb, run);
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

// N values read as one aligned vector.
template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <class T>
using Chunk = Pack<T, kChunk>;

// `vectorized`: both tensors' data are aligned to their Chunk (whole chunks are then read as
// one vector each; the last partial chunk element by element).
template <class P, class T>
__global__ void labels_kernel(const P* __restrict__ pred, const T* __restrict__ target,
                              int64_t total, Problem pb, bool vectorized) {
  extern __shared__ int hist[];
  begin_block(hist, pb);
  BadPixels bad;
  Run run;
  const int64_t chunks = total / kChunk + (total % kChunk != 0);
  for (int64_t ch = launch::grid_stride_first(); ch < chunks; ch += launch::grid_stride_step()) {
    const int64_t i0 = ch * kChunk;
    if (vectorized && i0 + kChunk <= total) {
      const Chunk<T> tc = reinterpret_cast<const Chunk<T>*>(target)[ch];
      const Chunk<P> pc = reinterpret_cast<const Chunk<P>*>(pred)[ch];
#pragma unroll
      for (int k = 0; k < kChunk; ++k) {
        tally(hist, pb, bad, run, i0 + k, static_cast<int64_t>(tc.v[k]),
              static_cast<int64_t>(pc.v[k]));
      }
    } else {
      const int64_t end = min(i0 + kChunk, total);
      for (int64_t i = i0; i < end; ++i) {
        tally(hist, pb, bad, run, i, static_cast<int64_t>(target[i]),
              static_cast<int64_t>(pred[i]));
      }
    }
  }
  end_block(hist, pb, bad, run);
}

// The argmax over the classes (ties to the lowest class, the first NaN wins, as torch.argmax),
// then the count. A thread takes kScorePixels consecutive pixels of one image at a time: where
// the pixels are contiguous (NCHW scores) and `vectorized` (the data, the class and batch
// strides aligned to the vector), each class's scores of the pixels are one vector load.
constexpr int kScorePixels = 4;

template <class S, class T>
__global__ void scores_kernel(const S* __restrict__ scores, const T* __restrict__ target,
                              int64_t batch, int64_t pixels, int64_t batch_stride,
                              int64_t class_stride, int64_t pixel_stride, Problem pb,
                              bool vectorized) {
  using acc = at::opmath_type<S>;
  using Scores = Pack<S, kScorePixels>;
  extern __shared__ int hist[];
  begin_block(hist, pb);
  BadPixels bad;
  Run run;
  const int64_t row_chunks = pixels / kScorePixels + (pixels % kScorePixels != 0);
  const int64_t chunks = batch * row_chunks;
  for (int64_t ch = launch::grid_stride_first(); ch < chunks; ch += launch::grid_stride_step()) {
    const int64_t b = ch / row_chunks, q0 = (ch % row_chunks) * kScorePixels;
    const int64_t i0 = b * pixels + q0;
    const S* s = scores + b * batch_stride + q0 * pixel_stride;
    if (vectorized && q0 + kScorePixels <= pixels) {
      const Scores first = *reinterpret_cast<const Scores*>(s);
      acc best[kScorePixels];
      int64_t arg[kScorePixels];
#pragma unroll
      for (int k = 0; k < kScorePixels; ++k) {
        best[k] = static_cast<acc>(first.v[k]);
        arg[k] = 0;
      }
      for (int64_t c = 1; c < pb.num_classes; ++c) {
        const Scores v = *reinterpret_cast<const Scores*>(s + c * class_stride);
#pragma unroll
        for (int k = 0; k < kScorePixels; ++k) {
          const acc value = static_cast<acc>(v.v[k]);
          if (numerics::argmax_takes_over(value, best[k])) {
            best[k] = value;
            arg[k] = c;
          }
        }
      }
#pragma unroll
      for (int k = 0; k < kScorePixels; ++k) {
        tally(hist, pb, bad, run, i0 + k, static_cast<int64_t>(target[i0 + k]), arg[k]);
      }
      continue;
    }
    const int64_t end = min(static_cast<int64_t>(kScorePixels), pixels - q0);
    for (int64_t k = 0; k < end; ++k) {
      const S* px = s + k * pixel_stride;
      acc best = static_cast<acc>(px[0]);
      int64_t arg = 0;
      for (int64_t c = 1; c < pb.num_classes; ++c) {
        const acc v = static_cast<acc>(px[c * class_stride]);
        if (numerics::argmax_takes_over(v, best)) {
          best = v;
          arg = c;
        }
      }
      tally(hist, pb, bad, run, i0 + k, static_cast<int64_t>(target[i0 + k]), arg);
    }
  }
  end_block(hist, pb, bad, run);
}

// `per_thread`: the pixels a thread takes per step.
unsigned int grid_for(int64_t total, int64_t per_thread, int device, int64_t smem) {
  const int sms = launch::multiprocessor_count(device);
  const int64_t wanted = (total + kThreads * per_thread - 1) / (kThreads * per_thread);
  // Enough blocks to fill the GPU (fewer per SM when each takes a large histogram), few enough
  // that private histograms pay off, and at least total / 2^30 so that no block's int32 count
  // can overflow.
  const int64_t per_sm = smem > launch::kDefaultSharedBytes ? 2 : 8;
  const int64_t blocks =
      std::max<int64_t>(std::min<int64_t>(wanted, int64_t{sms} * per_sm), (total >> 30) + 1);
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
  const int device = target.get_device();
  const bool shared_hist =
      cells * static_cast<int64_t>(sizeof(int)) <= launch::shared_bytes_opt_in(device);
  const Problem pb{num_classes,
                   ignore_index.has_value(),
                   ignore_index.value_or(0),
                   shared_hist,
                   confmat.mutable_data_ptr<int64_t>(),
                   report.mutable_data_ptr<int64_t>()};
  const int64_t smem = shared_hist ? cells * static_cast<int64_t>(sizeof(int)) : 0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_label_types(
      in.target.scalar_type(), "confusion_matrix CUDA kernel", [&](auto target_tag) {
        using T = decltype(target_tag);
        const T* t = in.target.const_data_ptr<T>();
        if (in.scores) {
          dispatch_float_types(in.pred.scalar_type(), "confusion_matrix CUDA kernel",
                               [&](auto tag) {
                                 using S = decltype(tag);
                                 const S* scores = in.pred.const_data_ptr<S>();
                                 const bool vectorized =
                                     in.pixel_stride == 1 &&
                                     in.class_stride % kScorePixels == 0 &&
                                     in.batch_stride % kScorePixels == 0 &&
                                     reinterpret_cast<uintptr_t>(scores) %
                                             sizeof(Pack<S, kScorePixels>) ==
                                         0;
                                 launch::launch_with_shared(
                                     scores_kernel<S, T>,
                                     grid_for(total, kScorePixels, device, smem), kThreads, smem,
                                     device, stream, scores, t, in.batch, in.pixels,
                                     in.batch_stride, in.class_stride, in.pixel_stride, pb,
                                     vectorized);
                               });
        } else {
          dispatch_label_types(
              in.pred.scalar_type(), "confusion_matrix CUDA kernel", [&](auto tag) {
                using P = decltype(tag);
                const P* p = in.pred.const_data_ptr<P>();
                const bool vectorized =
                    reinterpret_cast<uintptr_t>(p) % sizeof(Chunk<P>) == 0 &&
                    reinterpret_cast<uintptr_t>(t) % sizeof(Chunk<T>) == 0;
                launch::launch_with_shared(labels_kernel<P, T>,
                                           grid_for(total, kChunk, device, smem), kThreads, smem,
                                           device, stream, p, t, total, pb, vectorized);
              });
        }
      });
}

}  // namespace
}  // namespace torch_ext::metrics_impl

TORCH_LIBRARY_IMPL(torch_ext, CUDA, m) {
  m.impl("confusion_matrix", torch_ext::metrics_impl::confusion_matrix_via_accumulate);
  m.impl("_confusion_matrix_accumulate", torch_ext::metrics_impl::accumulate_cuda);
}
