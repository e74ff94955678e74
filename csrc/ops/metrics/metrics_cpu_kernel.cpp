// CPU loops of the confusion matrix. Compiled once per CPU capability (see CMakeLists.txt).
//
// Each thread counts into a private histogram (merged at the end) when that memory is small
// next to the work; otherwise all threads add to the result with integer atomics. Integer sums
// do not depend on their order, so the result is exact and deterministic either way. Scores
// are argmaxed a block of pixels at a time, class by class, so the inner loop runs along
// contiguous pixels and vectorizes.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "common/cpu_kernel_utils.h"
#include "common/dispatch.h"
#include "ops/metrics/metrics_common.h"
#include "ops/metrics/metrics_cpu_kernel.h"

namespace torch_ext::metrics_impl {
inline namespace CPU_CAPABILITY {
namespace {

// One thread's counts: private histograms (two, for even and odd pixels, so that runs of one
// class do not chain every increment on the previous one), or the shared result (atomic).
struct Tally {
  int64_t* hist = nullptr;
  int64_t bad = 0;
  int64_t first_bad_key = kNoBadKey;
};

// The counting rules, copied into registers by each loop (they would otherwise be reloaded
// after every histogram store, which may alias them).
struct Rules {
  int64_t num_classes;
  bool has_ignore;
  int64_t ignore_index;
  int64_t cells;
};

// Counts pixels [begin, end): labels(i) gives (target, pred) of pixel i.
template <bool kAtomic, class Labels>
void count_pixels(Tally& tally, const Rules rules, int64_t begin, int64_t end, Labels&& labels) {
  int64_t* const hist = tally.hist;
  const uint64_t k = static_cast<uint64_t>(rules.num_classes);
  int64_t bad = 0, first_bad_key = kNoBadKey;
  for (int64_t i = begin; i < end; ++i) {
    const auto [t, p] = labels(i);
    if (rules.has_ignore && t == rules.ignore_index) continue;
    const bool target_ok = static_cast<uint64_t>(t) < k;  // also rejects negatives
    if (!target_ok || static_cast<uint64_t>(p) >= k) {
      ++bad;
      first_bad_key = std::min(first_bad_key, 2 * i + (target_ok ? 1 : 0));
      continue;
    }
    const int64_t cell = t * rules.num_classes + p;
    if constexpr (kAtomic) {
      __atomic_fetch_add(hist + cell, int64_t{1}, __ATOMIC_RELAXED);
    } else {
      ++hist[(i & 1) * rules.cells + cell];
    }
  }
  tally.bad += bad;
  tally.first_bad_key = std::min(tally.first_bad_key, first_bad_key);
}

// Runs count(tally, atomic, begin, end) over [0, total) in parallel, each thread with its own
// Tally, and folds the tallies into a.confmat and a.report.
template <class Count>
void parallel_tally(const ConfusionArgs& a, int64_t total, Count&& count) {
  const int64_t cells = a.num_classes * a.num_classes;
  const int64_t threads = at::get_num_threads();
  // Private histograms when their memory is small next to the pixels to count (and < 256 MiB).
  const int64_t private_cells = 2 * cells * threads;
  const bool privatize =
      private_cells <= std::max<int64_t>(total, 8192) && private_cells * 8 <= (int64_t{256} << 20);
  std::vector<int64_t> private_hists(privatize ? private_cells : 0, 0);
  std::vector<Tally> tallies(threads);
  for (int64_t t = 0; t < threads; ++t) {
    tallies[t].hist = privatize ? private_hists.data() + 2 * t * cells : a.confmat;
  }
  if (at::in_parallel_region()) {
    count(tallies[0], !privatize, 0, total);  // inside a parallel region: run inline
  } else {
    at::parallel_for(0, total, int64_t{1} << 15, [&](int64_t begin, int64_t end) {
      count(tallies[at::get_thread_num()], !privatize, begin, end);
    });
  }
  for (const Tally& tally : tallies) {
    if (privatize) {
      for (int64_t c = 0; c < 2 * cells; ++c) a.confmat[c % cells] += tally.hist[c];
    }
    a.report[0] += tally.bad;
    a.report[1] = std::min(a.report[1], tally.first_bad_key);
  }
}

Rules rules_of(const ConfusionArgs& a) {
  return {a.num_classes, a.has_ignore, a.ignore_index, a.num_classes * a.num_classes};
}

template <class P, class T>
void labels_accumulate(const ConfusionArgs& a) {
  const P* pred = static_cast<const P*>(a.pred);
  const T* target = static_cast<const T*>(a.target);
  const Rules rules = rules_of(a);
  auto labels = [pred, target](int64_t i) {
    return std::pair<int64_t, int64_t>(target[i], pred[i]);
  };
  parallel_tally(a, a.pixels, [&](Tally& tally, bool atomic, int64_t begin, int64_t end) {
    if (atomic) {
      count_pixels<true>(tally, rules, begin, end, labels);
    } else {
      count_pixels<false>(tally, rules, begin, end, labels);
    }
  });
}

// torch.argmax's rule, shared with the CUDA kernel (common/numerics.h).
using numerics::argmax_takes_over;

constexpr int64_t kPixelBlock = 64;

template <class S, class T>
void scores_accumulate(const ConfusionArgs& a) {
  using acc = acc_t<S>;
  const S* scores = static_cast<const S*>(a.pred);
  const T* target = static_cast<const T*>(a.target);
  const int64_t k = a.num_classes;
  const Rules rules = rules_of(a);
  parallel_tally(a, a.batch * a.pixels, [&](Tally& tally, bool atomic, int64_t begin, int64_t end) {
    acc best[kPixelBlock];
    int32_t arg[kPixelBlock];
    for (int64_t i = begin; i < end;) {
      const int64_t n = i / a.pixels, p = i % a.pixels;
      const int64_t len = std::min({kPixelBlock, end - i, a.pixels - p});
      const S* base = scores + n * a.batch_stride + p * a.pixel_stride;
      if (a.class_stride == 1) {  // classes contiguous per pixel
        for (int64_t j = 0; j < len; ++j) {
          const S* s = base + j * a.pixel_stride;
          acc b = static_cast<acc>(s[0]);
          int32_t c_best = 0;
          for (int64_t c = 1; c < k; ++c) {
            const acc v = static_cast<acc>(s[c]);
            if (argmax_takes_over(v, b)) {
              b = v;
              c_best = static_cast<int32_t>(c);
            }
          }
          arg[j] = c_best;
        }
      } else {  // planar classes: class by class along contiguous pixels
        for (int64_t j = 0; j < len; ++j) {
          best[j] = static_cast<acc>(base[j]);
          arg[j] = 0;
        }
        for (int64_t c = 1; c < k; ++c) {
          const S* row = base + c * a.class_stride;
          for (int64_t j = 0; j < len; ++j) {
            const acc v = static_cast<acc>(row[j]);
            const bool take = (v > best[j]) | ((v != v) & (best[j] == best[j]));
            best[j] = take ? v : best[j];
            arg[j] = take ? static_cast<int32_t>(c) : arg[j];
          }
        }
      }
      auto labels = [&](int64_t q) { return std::pair<int64_t, int64_t>(target[q], arg[q - i]); };
      if (atomic) {
        count_pixels<true>(tally, rules, i, i + len, labels);
      } else {
        count_pixels<false>(tally, rules, i, i + len, labels);
      }
      i += len;
    }
  });
}

void confusion_accumulate(const ConfusionArgs& a) {
  dispatch_label_types(a.target_dtype, "confusion_matrix CPU kernel", [&](auto target_tag) {
    using T = decltype(target_tag);
    if (a.scores) {
      dispatch_float_types(a.pred_dtype, "confusion_matrix CPU kernel",
                           [&](auto score_tag) { scores_accumulate<decltype(score_tag), T>(a); });
    } else {
      dispatch_label_types(a.pred_dtype, "confusion_matrix CPU kernel",
                           [&](auto pred_tag) { labels_accumulate<decltype(pred_tag), T>(a); });
    }
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY

const MetricsCpuKernels TORCH_EXT_CPU_KERNEL_TABLE(metrics_cpu_kernels) = {
    &CPU_CAPABILITY::confusion_accumulate};

}  // namespace torch_ext::metrics_impl
