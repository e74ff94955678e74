// CPU loops of sppf. Compiled once per CPU capability (DEFAULT, AVX2, AVX512; see
// CMakeLists.txt). Max pooling follows PyTorch's update rule (common/cpu_kernel_utils.h), so
// values and gradient routing equal the max_pool2d cascade's.
//
// NCHW input is split by planes (n, c), NHWC input by blocks of channels of one image; every
// output element is written by one thread and summed in a fixed order: deterministic.

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common/dispatch.h"
#include "ops/spp/spp_cpu_helpers.h"

namespace torch_ext::spp_impl {
inline namespace CPU_CAPABILITY {
namespace {

// Slack after a padded row, so that full vector loads near its end stay in the buffer.
constexpr int64_t kRowSlack = 64;

// Max filter of odd width k = 2p + 1 along each row of a contiguous [H, W] plane, windows
// clipped at the borders (equivalently padded with -inf, as max_pool2d pads). `padded` holds
// W + 2p + kRowSlack elements. Vector loads past a row's end read -inf slack and land only in
// lanes that are not stored, so rows of any width run without a scalar tail.
template <class T>
void max_filter_rows(const T* src, T* dst, int64_t H, int64_t W, int64_t p, T* padded) {
  const int64_t k = 2 * p + 1;
  std::fill(padded, padded + p, neg_inf<T>());
  std::fill(padded + p + W, padded + 2 * p + W + kRowSlack, neg_inf<T>());
  for (int64_t h = 0; h < H; ++h) {
    std::memcpy(padded + p, src + h * W, W * sizeof(T));
    T* out = dst + h * W;
    if constexpr (kVectorized<T>) {
      using Vec = at::vec::Vectorized<T>;
      static_assert(Vec::size() <= kRowSlack);
      for (int64_t w = 0; w < W; w += Vec::size()) {
        Vec m = Vec::loadu(padded + w);
        for (int64_t j = 1; j < k; ++j) m = at::vec::maximum(m, Vec::loadu(padded + w + j));
        m.store(out + w, std::min<int64_t>(Vec::size(), W - w));
      }
    } else {
      for (int64_t w = 0; w < W; ++w) {
        acc_t<T> m = padded[w];
        for (int64_t j = 1; j < k; ++j) m = max_nan(m, static_cast<acc_t<T>>(padded[w + j]));
        out[w] = static_cast<T>(m);
      }
    }
  }
}

// The same filter down the columns: each output row is the elementwise max of up to k rows.
template <class T>
void max_filter_cols(const T* src, T* dst, int64_t H, int64_t W, int64_t p) {
  for (int64_t h = 0; h < H; ++h) {
    const int64_t h0 = std::max<int64_t>(0, h - p), h1 = std::min<int64_t>(H, h + p + 1);
    T* out = dst + h * W;
    if constexpr (kVectorized<T>) {
      using Vec = at::vec::Vectorized<T>;
      for (int64_t w = 0; w < W; w += Vec::size()) {
        const int64_t lanes = std::min<int64_t>(Vec::size(), W - w);
        Vec m = Vec::loadu(src + h0 * W + w, lanes);
        for (int64_t r = h0 + 1; r < h1; ++r) {
          m = at::vec::maximum(m, Vec::loadu(src + r * W + w, lanes));
        }
        m.store(out + w, lanes);
      }
    } else {
      for (int64_t w = 0; w < W; ++w) {
        acc_t<T> m = src[h0 * W + w];
        for (int64_t r = h0 + 1; r < h1; ++r) {
          m = max_nan(m, static_cast<acc_t<T>>(src[r * W + w]));
        }
        out[w] = static_cast<T>(m);
      }
    }
  }
}

// NCHW: plane by plane, in cache.
template <class T>
void sppf_forward_planes(const SppfForwardArgs& a) {
  const MapShape& s = a.shape;
  const T* input = static_cast<const T*>(a.input);
  T* output = static_cast<T*>(a.output);
  const int64_t hw = s.h * s.w, p = a.kernel_size / 2;
  const int64_t out_channels = s.c * (a.repeats + 1);
  const int64_t grain = std::max<int64_t>(1, 16384 / hw);
  at::parallel_for(0, s.n * s.c, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> tmp(hw), padded(s.w + 2 * p + kRowSlack);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / s.c, c = plane % s.c;
      // Stage r lives in output channel r * C + c; each stage is filtered from the previous.
      const T* prev = input + plane * hw;
      for (int64_t r = 0; r <= a.repeats; ++r) {
        T* stage = output + (n * out_channels + r * s.c + c) * hw;
        if (r == 0) {
          std::memcpy(stage, prev, hw * sizeof(T));
        } else {
          max_filter_rows(prev, tmp.data(), s.h, s.w, p, padded.data());
          max_filter_cols(tmp.data(), stage, s.h, s.w, p);
        }
        prev = stage;
      }
    }
  });
}

// dst[i] = max(dst[i], src[i]), NaN-propagating, over n contiguous elements.
template <class T>
void max_into(T* dst, const T* src, int64_t n) {
  int64_t i = 0;
  if constexpr (kVectorized<T>) {
    using Vec = at::vec::Vectorized<T>;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      at::vec::maximum(Vec::loadu(dst + i), Vec::loadu(src + i)).store(dst + i);
    }
  }
  for (; i < n; ++i) {
    dst[i] = static_cast<T>(max_nan(static_cast<acc_t<T>>(dst[i]), static_cast<acc_t<T>>(src[i])));
  }
}

// NHWC: an image's block of channels at a time; every pixel is a vector of channels, and the
// separable max filter works on those vectors.
template <class T>
void sppf_forward_nhwc(const SppfForwardArgs& a) {
  const MapShape& s = a.shape;
  const T* input = static_cast<const T*>(a.input);
  T* output = static_cast<T*>(a.output);
  const int64_t hw = s.h * s.w, p = a.kernel_size / 2;
  const int64_t out_channels = s.c * (a.repeats + 1);
  const int64_t block = std::min<int64_t>(s.c, 64);
  const int64_t blocks = (s.c + block - 1) / block;
  at::parallel_for(0, s.n * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> cur(hw * block), tmp(hw * block);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = (task % blocks) * block;
      const int64_t width = std::min(block, s.c - c0);
      auto store_stage = [&](int64_t r) {
        for (int64_t q = 0; q < hw; ++q) {
          std::memcpy(output + (n * hw + q) * out_channels + r * s.c + c0, &cur[q * block],
                      width * sizeof(T));
        }
      };
      for (int64_t q = 0; q < hw; ++q) {
        std::memcpy(&cur[q * block], input + (n * hw + q) * s.c + c0, width * sizeof(T));
      }
      store_stage(0);
      for (int64_t r = 1; r <= a.repeats; ++r) {
        for (int64_t h = 0; h < s.h; ++h) {  // along rows: tmp = max over w' of cur
          for (int64_t w = 0; w < s.w; ++w) {
            const int64_t w0 = std::max<int64_t>(0, w - p), w1 = std::min<int64_t>(s.w, w + p + 1);
            T* dst = &tmp[(h * s.w + w) * block];
            std::memcpy(dst, &cur[(h * s.w + w0) * block], width * sizeof(T));
            for (int64_t x = w0 + 1; x < w1; ++x) max_into(dst, &cur[(h * s.w + x) * block], width);
          }
        }
        for (int64_t h = 0; h < s.h; ++h) {  // down columns: cur = max over h' of tmp
          const int64_t h0 = std::max<int64_t>(0, h - p), h1 = std::min<int64_t>(s.h, h + p + 1);
          for (int64_t w = 0; w < s.w; ++w) {
            T* dst = &cur[(h * s.w + w) * block];
            std::memcpy(dst, &tmp[(h0 * s.w + w) * block], width * sizeof(T));
            for (int64_t y = h0 + 1; y < h1; ++y) max_into(dst, &tmp[(y * s.w + w) * block], width);
          }
        }
        store_stage(r);
      }
    }
  });
}

template <class T>
void sppf_forward_typed(const SppfForwardArgs& a) {
  if (a.shape.channels_last) {
    sppf_forward_nhwc<T>(a);
  } else {
    sppf_forward_planes<T>(a);
  }
}

// Argmax of every k x k window (clipped at the borders) of a contiguous [H, W] plane under
// PyTorch's rule, separably: per row window the first column holding the row's maximum, then
// per column window the first row holding the overall maximum. This is the row-major-first
// maximum (last NaN with NaNs) that max_pool2d's scan finds. Scalar version for half types.
template <class T>
void window_argmax_scalar(const T* src, int64_t H, int64_t W, int64_t p, acc_t<T>* row_best,
                          int64_t* row_arg, int64_t* arg) {
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t w = 0; w < W; ++w) {
      const int64_t w0 = std::max<int64_t>(0, w - p), w1 = std::min<int64_t>(W, w + p + 1);
      acc_t<T> best = neg_inf<acc_t<T>>();
      int64_t best_w = w0;
      for (int64_t x = w0; x < w1; ++x) {
        const acc_t<T> v = src[h * W + x];
        if (takes_over(v, best)) {
          best = v;
          best_w = x;
        }
      }
      row_best[h * W + w] = best;
      row_arg[h * W + w] = best_w;
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    const int64_t h0 = std::max<int64_t>(0, h - p), h1 = std::min<int64_t>(H, h + p + 1);
    for (int64_t w = 0; w < W; ++w) {
      acc_t<T> best = neg_inf<acc_t<T>>();
      int64_t best_h = h0;
      for (int64_t r = h0; r < h1; ++r) {
        const acc_t<T> v = row_best[r * W + w];
        if (takes_over(v, best)) {
          best = v;
          best_h = r;
        }
      }
      arg[h * W + w] = best_h * W + row_arg[best_h * W + w];
    }
  }
}

// Whether row and column numbers of an H x W map (with p slots of padding) are exact in T.
template <class T>
bool indices_exact_in(int64_t H, int64_t W, int64_t p) {
  const int64_t exact = int64_t{1} << std::numeric_limits<T>::digits;
  return H + p < exact && W + 2 * p < exact;
}

// The same for float and double, a vector of neighbouring windows at a time. Row and column
// numbers ride in vectors of T, so maps too large for T to count exactly (2^24 for float) take
// the scalar version. `padded` holds a row with p slots of -inf on each side, which never take
// over, so clipped windows come out right.
template <class T>
void window_argmax(const T* src, int64_t H, int64_t W, int64_t p, acc_t<T>* row_best,
                   int64_t* row_arg, int64_t* arg, T* padded) {
  if constexpr (!kVectorized<T>) {
    window_argmax_scalar(src, H, W, p, row_best, row_arg, arg);
  } else if (!indices_exact_in<T>(H, W, p)) {
    window_argmax_scalar(src, H, W, p, row_best, row_arg, arg);
  } else {
    using Vec = at::vec::Vectorized<T>;
    const int64_t k = 2 * p + 1;
    const Vec zero(T(0));
    auto takes_over_mask = [](const Vec& v, const Vec& best) { return (v > best) | v.isnan(); };
    std::fill(padded, padded + p, neg_inf<T>());
    std::fill(padded + p + W, padded + 2 * p + W, neg_inf<T>());
    for (int64_t h = 0; h < H; ++h) {
      std::memcpy(padded + p, src + h * W, W * sizeof(T));
      for (int64_t w = 0; w < W; w += Vec::size()) {
        const int64_t lanes = std::min<int64_t>(Vec::size(), W - w);
        Vec best(neg_inf<T>());
        Vec best_w = at::vec::maximum(Vec::arange(T(w - p), T(1)), zero);  // window starts
        for (int64_t j = 0; j < k; ++j) {
          const Vec v =
              Vec::loadu(padded + w + j, std::min<int64_t>(Vec::size(), W + 2 * p - w - j));
          const Vec take = takes_over_mask(v, best);
          best = Vec::blendv(best, v, take);
          best_w = Vec::blendv(best_w, Vec::arange(T(w + j - p), T(1)), take);
        }
        best.store(row_best + h * W + w, lanes);
        alignas(64) T columns[Vec::size()];
        best_w.store(columns);
        for (int64_t l = 0; l < lanes; ++l) row_arg[h * W + w + l] = static_cast<int64_t>(columns[l]);
      }
    }
    for (int64_t h = 0; h < H; ++h) {
      const int64_t h0 = std::max<int64_t>(0, h - p), h1 = std::min<int64_t>(H, h + p + 1);
      for (int64_t w = 0; w < W; w += Vec::size()) {
        const int64_t lanes = std::min<int64_t>(Vec::size(), W - w);
        Vec best(neg_inf<T>());
        Vec best_h = Vec(static_cast<T>(h0));
        for (int64_t r = h0; r < h1; ++r) {
          const Vec v = Vec::loadu(row_best + r * W + w, lanes);
          const Vec take = takes_over_mask(v, best);
          best = Vec::blendv(best, v, take);
          best_h = Vec::blendv(best_h, Vec(static_cast<T>(r)), take);
        }
        alignas(64) T rows[Vec::size()];
        best_h.store(rows);
        for (int64_t l = 0; l < lanes; ++l) {
          const int64_t r = static_cast<int64_t>(rows[l]);
          arg[h * W + w + l] = r * W + row_arg[r * W + w + l];
        }
      }
    }
  }
}

// Scratch of one plane's backward step.
template <class T>
struct SppfBackwardScratch {
  std::vector<T> padded;
  std::vector<acc_t<T>> row_best, g_prev;
  std::vector<int64_t> row_arg, arg;
  SppfBackwardScratch(int64_t hw, int64_t w, int64_t p)
      : padded(w + 2 * p), row_best(hw), row_arg(hw), g_prev(hw), arg(hw) {}
};

// One step back through the cascade on a contiguous plane: g holds the gradient of stage r
// and becomes that of stage r - 1: routed to the argmax of each window of stage r - 1 (summed
// in row-major output order, as max_pool2d's CPU backward does), plus stage r - 1's own slice
// of grad_output.
template <class T>
void sppf_backward_step(const T* stage, const acc_t<T>* slice, acc_t<T>* g, int64_t H, int64_t W,
                        int64_t p, SppfBackwardScratch<T>& scratch) {
  const int64_t hw = H * W;
  window_argmax(stage, H, W, p, scratch.row_best.data(), scratch.row_arg.data(), scratch.arg.data(),
                scratch.padded.data());
  acc_t<T>* g_prev = scratch.g_prev.data();
  std::fill(g_prev, g_prev + hw, acc_t<T>(0));
  for (int64_t q = 0; q < hw; ++q) g_prev[scratch.arg[q]] += g[q];
  for (int64_t q = 0; q < hw; ++q) g[q] = g_prev[q] + slice[q];
}

// NCHW: plane by plane.
template <class T>
void sppf_backward_planes(const SppfBackwardArgs& a) {
  const MapShape& s = a.shape;
  const T* grad_output = static_cast<const T*>(a.grad_output);
  const T* output = static_cast<const T*>(a.output);
  T* grad_input = static_cast<T*>(a.grad_input);
  const int64_t hw = s.h * s.w, p = a.kernel_size / 2;
  const int64_t out_channels = s.c * (a.repeats + 1);
  const int64_t grain = std::max<int64_t>(1, 4096 / hw);
  at::parallel_for(0, s.n * s.c, grain, [&](int64_t begin, int64_t end) {
    SppfBackwardScratch<T> scratch(hw, s.w, p);
    std::vector<acc_t<T>> g(hw), slice(hw);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / s.c, c = plane % s.c;
      auto stage_offset = [&](int64_t r) { return (n * out_channels + r * s.c + c) * hw; };
      load_plane(grad_output + stage_offset(a.repeats), 1, hw, g.data());
      for (int64_t r = a.repeats; r >= 1; --r) {
        load_plane(grad_output + stage_offset(r - 1), 1, hw, slice.data());
        sppf_backward_step(output + stage_offset(r - 1), slice.data(), g.data(), s.h, s.w, p,
                           scratch);
      }
      store_plane(g.data(), hw, grad_input + plane * hw, 1);
    }
  });
}

// NHWC: a block of channels of one image at a time, transposed into contiguous planes in
// scratch (reading whole runs of channels per pixel), then the plane steps.
template <class T>
void sppf_backward_nhwc(const SppfBackwardArgs& a) {
  const MapShape& s = a.shape;
  const T* grad_output = static_cast<const T*>(a.grad_output);
  const T* output = static_cast<const T*>(a.output);
  T* grad_input = static_cast<T*>(a.grad_input);
  const int64_t hw = s.h * s.w, p = a.kernel_size / 2;
  const int64_t out_channels = s.c * (a.repeats + 1);
  const int64_t block = std::min<int64_t>(s.c, 16);
  const int64_t blocks = (s.c + block - 1) / block;
  // Channels [first, first + width) of every pixel of image n -> planes dst[c * hw + q].
  auto to_planes = [&](const T* src, int64_t channels, int64_t n, int64_t first, int64_t width,
                       auto* dst) {
    for (int64_t q = 0; q < hw; ++q) {
      const T* px = src + (n * hw + q) * channels + first;
      for (int64_t c = 0; c < width; ++c) dst[c * hw + q] = px[c];
    }
  };
  at::parallel_for(0, s.n * blocks, 1, [&](int64_t begin, int64_t end) {
    SppfBackwardScratch<T> scratch(hw, s.w, p);
    std::vector<acc_t<T>> g(block * hw), slice(block * hw);
    std::vector<T> stage(block * hw);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = (task % blocks) * block;
      const int64_t width = std::min(block, s.c - c0);
      to_planes(grad_output, out_channels, n, a.repeats * s.c + c0, width, g.data());
      for (int64_t r = a.repeats; r >= 1; --r) {
        to_planes(output, out_channels, n, (r - 1) * s.c + c0, width, stage.data());
        to_planes(grad_output, out_channels, n, (r - 1) * s.c + c0, width, slice.data());
        for (int64_t c = 0; c < width; ++c) {
          sppf_backward_step(&stage[c * hw], &slice[c * hw], &g[c * hw], s.h, s.w, p, scratch);
        }
      }
      for (int64_t q = 0; q < hw; ++q) {
        T* px = grad_input + (n * hw + q) * s.c + c0;
        for (int64_t c = 0; c < width; ++c) px[c] = static_cast<T>(g[c * hw + q]);
      }
    }
  });
}

template <class T>
void sppf_backward_typed(const SppfBackwardArgs& a) {
  if (a.shape.channels_last) {
    sppf_backward_nhwc<T>(a);
  } else {
    sppf_backward_planes<T>(a);
  }
}

void sppf_forward(const SppfForwardArgs& a) {
  dispatch_float_types(a.dtype, "torch_ext sppf CPU kernels",
                       [&](auto tag) { sppf_forward_typed<decltype(tag)>(a); });
}

void sppf_backward(const SppfBackwardArgs& a) {
  dispatch_float_types(a.dtype, "torch_ext sppf CPU kernels",
                       [&](auto tag) { sppf_backward_typed<decltype(tag)>(a); });
}
}  // namespace
}  // namespace CPU_CAPABILITY

const SppfCpuKernels TORCH_EXT_CPU_KERNEL_TABLE(sppf_cpu_kernels) = {
    &CPU_CAPABILITY::sppf_forward, &CPU_CAPABILITY::sppf_backward};

}  // namespace torch_ext::spp_impl
