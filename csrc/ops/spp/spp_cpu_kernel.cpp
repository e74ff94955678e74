// CPU loops of spp and sppf. Compiled once per CPU capability (DEFAULT, AVX2, AVX512; see
// CMakeLists.txt); CPU_CAPABILITY names the inline namespace, so the copies never collide.
//
// Max pooling follows PyTorch's update rule everywhere: a value takes a bin's place when it is
// strictly larger than the current maximum or is NaN. So ties go to the first element in
// row-major order, NaN propagates, and with NaNs the last NaN is the argmax: the same values
// and the same gradient routing as adaptive_max_pool2d and max_pool2d.
//
// Work is split by planes (n, c) or, for spp on NHWC input, by (n, bin); every output element
// is written by one thread and summed in a fixed order, so results are deterministic.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/dispatch.h"
#include "ops/spp/spp_cpu_kernel.h"

namespace torch_ext::spp_impl {
inline namespace CPU_CAPABILITY {
namespace {

template <class T>
using acc_t = at::opmath_type<T>;

// float and double go through ATen's vector types; half types are converted per element.
template <class T>
constexpr bool kVectorized = std::is_same_v<T, float> || std::is_same_v<T, double>;

template <class A>
inline bool is_nan(A v) {
  return v != v;
}

template <class A>
inline bool takes_over(A value, A best) {
  return value > best || is_nan(value);
}

template <class A>
inline A max_nan(A a, A b) {
  return (a > b || is_nan(a)) ? a : b;
}

template <class A>
constexpr A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

// Adaptive pooling bins (PyTorch's rule): bin i of `bins` over `size` spans
// [floor(i * size / bins), ceil((i + 1) * size / bins)).
inline int64_t bin_start(int64_t i, int64_t size, int64_t bins) { return (i * size) / bins; }
inline int64_t bin_end(int64_t i, int64_t size, int64_t bins) {
  return ((i + 1) * size + bins - 1) / bins;
}

// Pixel (h * W + w) of plane (n, c) sits at plane_offset + pixel * pixel_stride, in NCHW
// (stride 1) and in NHWC (stride C) alike.
inline int64_t plane_offset(const MapShape& s, int64_t channels, int64_t n, int64_t c) {
  return s.channels_last ? n * channels * s.h * s.w + c : (n * channels + c) * s.h * s.w;
}
inline int64_t pixel_stride(const MapShape& s, int64_t channels) {
  return s.channels_last ? channels : 1;
}

template <class Src, class Dst>
void load_plane(const Src* src, int64_t stride, int64_t count, Dst* dst) {
  if constexpr (std::is_same_v<Src, Dst>) {
    if (stride == 1) {
      std::memcpy(dst, src, count * sizeof(Dst));
      return;
    }
  }
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<Dst>(src[i * stride]);
}

template <class Src, class Dst>
void store_plane(const Src* src, int64_t count, Dst* dst, int64_t stride) {
  if constexpr (std::is_same_v<Src, Dst>) {
    if (stride == 1) {
      std::memcpy(dst, src, count * sizeof(Dst));
      return;
    }
  }
  for (int64_t i = 0; i < count; ++i) dst[i * stride] = static_cast<Dst>(src[i]);
}

// ------------------------------------------------------------------ contiguous reductions

// Max (NaN-propagating) or sum of a bin's rectangle [h0, h1) x [w0, w1) of a contiguous plane
// with rows of `stride` elements. Vector lanes accumulate over all rows and are reduced once;
// a row's last partial vector is padded with the reduction's identity.
template <class T, bool is_max>
acc_t<T> bin_reduce(const T* x, int64_t stride, int64_t h0, int64_t h1, int64_t w0, int64_t w1) {
  const int64_t width = w1 - w0;
  if constexpr (kVectorized<T>) {
    using Vec = at::vec::Vectorized<T>;
    const Vec identity(is_max ? neg_inf<T>() : T(0));
    // Four accumulators in turn: the max's latency chain would otherwise bound the loop.
    Vec acc[4] = {identity, identity, identity, identity};
    int64_t turn = 0;
    auto take = [&](const Vec& v) {
      Vec& a = acc[turn++ & 3];
      a = is_max ? at::vec::maximum(a, v) : a + v;
    };
    const int64_t full = width - width % Vec::size();
    for (int64_t h = h0; h < h1; ++h) {
      const T* row = x + h * stride + w0;
      for (int64_t i = 0; i < full; i += Vec::size()) take(Vec::loadu(row + i));
      if (full < width)
        take(Vec::set(identity, Vec::loadu(row + full, width - full), width - full));
    }
    const Vec a01 = is_max ? at::vec::maximum(acc[0], acc[1]) : acc[0] + acc[1];
    const Vec a23 = is_max ? at::vec::maximum(acc[2], acc[3]) : acc[2] + acc[3];
    const Vec all = is_max ? at::vec::maximum(a01, a23) : a01 + a23;
    alignas(64) T lanes[Vec::size()];
    all.store(lanes);
    T result = lanes[0];
    for (int64_t k = 1; k < Vec::size(); ++k) {
      result = is_max ? max_nan(result, lanes[k]) : result + lanes[k];
    }
    return result;
  } else {
    acc_t<T> result = is_max ? neg_inf<acc_t<T>>() : acc_t<T>(0);
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t w = w0; w < w1; ++w) {
        const acc_t<T> v = static_cast<acc_t<T>>(x[h * stride + w]);
        result = is_max ? max_nan(result, v) : result + v;
      }
    }
    return result;
  }
}

// First k with p[k] == value, or -1.
template <class T>
int64_t find_first_equal(const T* p, int64_t n, acc_t<T> value) {
  int64_t i = 0;
  if constexpr (kVectorized<T>) {
    using Vec = at::vec::Vectorized<T>;
    const Vec target(value);
    const int all_lanes = static_cast<int>((1ull << Vec::size()) - 1);
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const int unequal = (Vec::loadu(p + i) == target).zero_mask();
      if (unequal != all_lanes) break;  // a lane matched: the scalar loop finds which
    }
  }
  for (; i < n; ++i) {
    if (static_cast<acc_t<T>>(p[i]) == value) return i;
  }
  return -1;
}

// dst[i] = max(dst[i], src[i]) with NaN propagation, dst in the accumulation type.
template <class T>
void accumulate_max(acc_t<T>* dst, const T* src, int64_t n) {
  int64_t i = 0;
  if constexpr (kVectorized<T>) {
    using Vec = at::vec::Vectorized<T>;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      at::vec::maximum(Vec::loadu(dst + i), Vec::loadu(src + i)).store(dst + i);
    }
  }
  for (; i < n; ++i) dst[i] = max_nan(dst[i], static_cast<acc_t<T>>(src[i]));
}

template <class T>
void accumulate_sum(acc_t<T>* dst, const T* src, int64_t n) {
  int64_t i = 0;
  if constexpr (kVectorized<T>) {
    using Vec = at::vec::Vectorized<T>;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      (Vec::loadu(dst + i) + Vec::loadu(src + i)).store(dst + i);
    }
  }
  for (; i < n; ++i) dst[i] += static_cast<acc_t<T>>(src[i]);
}

// ------------------------------------------------------------------ spp

// One bin of one level, in the order of the output features.
struct Bin {
  int64_t h0, h1, w0, w1;
  int64_t feature;         // output column of channel 0: level_offset * C + i * l + j
  int64_t channel_stride;  // l * l: distance between the columns of consecutive channels
  int64_t r0, r1, c0, c1;  // the bin as a block of cells of the CellGrid
};

// All levels' bin boundaries cut each axis into segments, and the plane into a grid of cells;
// every bin is a block of whole cells. Reducing each cell once and each bin from its cells
// reads every element once instead of once per level.
struct CellGrid {
  std::vector<int64_t> row_cuts, col_cuts;  // segment k spans [cuts[k], cuts[k + 1])
  std::vector<Bin> bins;
};

std::vector<int64_t> axis_cuts(int64_t size, const int64_t* levels, int64_t num_levels) {
  std::vector<int64_t> cuts;
  for (int64_t li = 0; li < num_levels; ++li) {
    for (int64_t i = 0; i < levels[li]; ++i) {
      cuts.push_back(bin_start(i, size, levels[li]));
      cuts.push_back(bin_end(i, size, levels[li]));
    }
  }
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  return cuts;
}

int64_t segment_of(const std::vector<int64_t>& cuts, int64_t cut) {
  return std::lower_bound(cuts.begin(), cuts.end(), cut) - cuts.begin();
}

CellGrid make_grid(const MapShape& s, const int64_t* levels, int64_t num_levels) {
  CellGrid g{axis_cuts(s.h, levels, num_levels), axis_cuts(s.w, levels, num_levels), {}};
  int64_t level_offset = 0;
  for (int64_t li = 0; li < num_levels; ++li) {
    const int64_t l = levels[li];
    for (int64_t i = 0; i < l; ++i) {
      for (int64_t j = 0; j < l; ++j) {
        Bin b{bin_start(i, s.h, l),
              bin_end(i, s.h, l),
              bin_start(j, s.w, l),
              bin_end(j, s.w, l),
              level_offset * s.c + i * l + j,
              l * l,
              0,
              0,
              0,
              0};
        b.r0 = segment_of(g.row_cuts, b.h0);
        b.r1 = segment_of(g.row_cuts, b.h1);
        b.c0 = segment_of(g.col_cuts, b.w0);
        b.c1 = segment_of(g.col_cuts, b.w1);
        g.bins.push_back(b);
      }
    }
    level_offset += l * l;
  }
  return g;
}

// The argmax of the rectangle [h0, h1) x [w0, w1) whose maximum m is known: the first element
// equal to m in row-major order, or with NaNs the last NaN (PyTorch's rule). Plane index.
template <class T>
int64_t rect_argmax(const T* x, int64_t stride, int64_t h0, int64_t h1, int64_t w0, int64_t w1,
                    acc_t<T> m) {
  if (!is_nan(m)) {
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t k = find_first_equal(x + h * stride + w0, w1 - w0, m);
      if (k >= 0) return h * stride + w0 + k;
    }
  } else {
    for (int64_t h = h1 - 1; h >= h0; --h) {
      for (int64_t w = w1 - 1; w >= w0; --w) {
        if (is_nan(x[h * stride + w])) return h * stride + w;
      }
    }
  }
  return h0 * stride + w0;  // unreachable: m is an element of the rectangle
}

// A bin's argmax from its cells' argmaxes: among the cells holding the bin's maximum v the
// smallest plane index (row-major first); with NaNs the largest index of a NaN cell (last NaN).
template <class A>
int64_t bin_argmax_from_cells(const Bin& b, const std::vector<A>& cells,
                              const std::vector<int64_t>& cell_args, int64_t cols, A v) {
  int64_t index = -1;
  for (int64_t r = b.r0; r < b.r1; ++r) {
    for (int64_t q = b.c0; q < b.c1; ++q) {
      const A cell = cells[r * cols + q];
      const int64_t arg = cell_args[r * cols + q];
      if (is_nan(v)) {
        if (is_nan(cell)) index = std::max(index, arg);
      } else if (cell == v && (index < 0 || arg < index)) {
        index = arg;
      }
    }
  }
  return index;
}

// Planes of an NCHW input: cells first (rows of a cell are contiguous segments), then bins.
template <class T>
void spp_forward_planes(const SppForwardArgs& a, const CellGrid& grid) {
  const MapShape& s = a.shape;
  const T* input = static_cast<const T*>(a.input);
  T* output = static_cast<T*>(a.output);
  const bool is_max = a.mode == PoolMode::Max;
  const int64_t features = s.c * static_cast<int64_t>(grid.bins.size());
  const int64_t rows = grid.row_cuts.size() - 1, cols = grid.col_cuts.size() - 1;
  const int64_t grain = std::max<int64_t>(1, 32768 / (s.h * s.w));
  const bool with_indices = is_max && a.indices != nullptr;
  at::parallel_for(0, s.n * s.c, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t<T>> cells(rows * cols);
    std::vector<int64_t> cell_args(with_indices ? rows * cols : 0);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / s.c, c = plane % s.c;
      const T* x = input + plane * s.h * s.w;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t q = 0; q < cols; ++q) {
          const int64_t h0 = grid.row_cuts[r], h1 = grid.row_cuts[r + 1];
          const int64_t w0 = grid.col_cuts[q], w1 = grid.col_cuts[q + 1];
          auto& cell = cells[r * cols + q];
          cell = is_max ? bin_reduce<T, true>(x, s.w, h0, h1, w0, w1)
                        : bin_reduce<T, false>(x, s.w, h0, h1, w0, w1);
          if (with_indices) cell_args[r * cols + q] = rect_argmax(x, s.w, h0, h1, w0, w1, cell);
        }
      }
      for (const Bin& b : grid.bins) {
        acc_t<T> v = is_max ? neg_inf<acc_t<T>>() : acc_t<T>(0);
        for (int64_t r = b.r0; r < b.r1; ++r) {
          for (int64_t q = b.c0; q < b.c1; ++q) {
            v = is_max ? max_nan(v, cells[r * cols + q]) : v + cells[r * cols + q];
          }
        }
        const int64_t out = n * features + b.feature + c * b.channel_stride;
        output[out] = static_cast<T>(is_max ? v : v / (b.h1 - b.h0) / (b.w1 - b.w0));
        if (with_indices) a.indices[out] = bin_argmax_from_cells(b, cells, cell_args, cols, v);
      }
    }
  });
}

// NHWC input: a bin's pixels are vectors of C channels, reduced elementwise.
template <class T>
void spp_forward_nhwc(const SppForwardArgs& a, const std::vector<Bin>& bins) {
  const MapShape& s = a.shape;
  const T* input = static_cast<const T*>(a.input);
  T* output = static_cast<T*>(a.output);
  const int64_t num_bins = static_cast<int64_t>(bins.size());
  const int64_t features = s.c * num_bins;
  at::parallel_for(0, s.n * num_bins, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t<T>> acc(s.c);
    std::vector<int64_t> arg(a.indices != nullptr ? s.c : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / num_bins;
      const Bin& b = bins[task % num_bins];
      const bool is_max = a.mode == PoolMode::Max;
      std::fill(acc.begin(), acc.end(), is_max ? neg_inf<acc_t<T>>() : acc_t<T>(0));
      std::fill(arg.begin(), arg.end(), b.h0 * s.w + b.w0);
      for (int64_t h = b.h0; h < b.h1; ++h) {
        for (int64_t w = b.w0; w < b.w1; ++w) {
          const T* px = input + ((n * s.h + h) * s.w + w) * s.c;
          if (!is_max) {
            accumulate_sum(acc.data(), px, s.c);
          } else if (a.indices == nullptr) {
            accumulate_max(acc.data(), px, s.c);
          } else {
            for (int64_t c = 0; c < s.c; ++c) {
              const acc_t<T> v = px[c];
              if (takes_over(v, acc[c])) {
                acc[c] = v;
                arg[c] = h * s.w + w;
              }
            }
          }
        }
      }
      for (int64_t c = 0; c < s.c; ++c) {
        const int64_t out = n * features + b.feature + c * b.channel_stride;
        output[out] = static_cast<T>(is_max ? acc[c] : acc[c] / (b.h1 - b.h0) / (b.w1 - b.w0));
        if (!arg.empty()) a.indices[out] = arg[c];
      }
    }
  });
}

template <class T>
void spp_backward_typed(const SppBackwardArgs& a) {
  const MapShape& s = a.shape;
  const auto bins = make_grid(s, a.levels, a.num_levels).bins;
  const T* grad_output = static_cast<const T*>(a.grad_output);
  T* grad_input = static_cast<T*>(a.grad_input);
  const int64_t features = s.c * static_cast<int64_t>(bins.size());
  const int64_t hw = s.h * s.w;
  const int64_t stride = pixel_stride(s, s.c);
  const int64_t grain = std::max<int64_t>(1, 32768 / hw);
  at::parallel_for(0, s.n * s.c, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t<T>> g(hw);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / s.c, c = plane % s.c;
      std::fill(g.begin(), g.end(), acc_t<T>(0));
      for (const Bin& b : bins) {
        const int64_t out = n * features + b.feature + c * b.channel_stride;
        const acc_t<T> go = static_cast<acc_t<T>>(grad_output[out]);
        if (a.mode == PoolMode::Max) {
          g[a.indices[out]] += go;
          continue;
        }
        const acc_t<T> share = go / (b.h1 - b.h0) / (b.w1 - b.w0);
        for (int64_t h = b.h0; h < b.h1; ++h) {
          acc_t<T>* row = g.data() + h * s.w;
          for (int64_t w = b.w0; w < b.w1; ++w) row[w] += share;
        }
      }
      store_plane(g.data(), hw, grad_input + plane_offset(s, s.c, n, c), stride);
    }
  });
}

// ------------------------------------------------------------------ sppf

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
                          acc_t<T>* row_arg, int64_t* arg) {
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
      row_arg[h * W + w] = static_cast<acc_t<T>>(best_w);
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
      arg[h * W + w] = best_h * W + static_cast<int64_t>(row_arg[best_h * W + w]);
    }
  }
}

// The same for float and double, a vector of neighbouring windows at a time. Indices ride in
// vectors of T (exact: plane sizes stay far below 2^24). `padded` holds a row with p slots of
// -inf on each side, which never take over, so clipped windows come out right.
template <class T>
void window_argmax(const T* src, int64_t H, int64_t W, int64_t p, acc_t<T>* row_best,
                   acc_t<T>* row_arg, int64_t* arg, T* padded) {
  if constexpr (!kVectorized<T>) {
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
        best_w.store(row_arg + h * W + w, lanes);
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
          arg[h * W + w + l] = r * W + static_cast<int64_t>(row_arg[r * W + w + l]);
        }
      }
    }
  }
}

// Scratch of one plane's backward step.
template <class T>
struct SppfBackwardScratch {
  std::vector<T> padded;
  std::vector<acc_t<T>> row_best, row_arg, g_prev;
  std::vector<int64_t> arg;
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

// ------------------------------------------------------------------ entry points

void spp_forward(const SppForwardArgs& a) {
  const CellGrid grid = make_grid(a.shape, a.levels, a.num_levels);
  dispatch_float_types(a.dtype, "torch_ext spp CPU kernels", [&](auto tag) {
    using T = decltype(tag);
    if (a.shape.channels_last) {
      spp_forward_nhwc<T>(a, grid.bins);
    } else {
      spp_forward_planes<T>(a, grid);
    }
  });
}

void spp_backward(const SppBackwardArgs& a) {
  dispatch_float_types(a.dtype, "torch_ext spp CPU kernels",
                       [&](auto tag) { spp_backward_typed<decltype(tag)>(a); });
}

void sppf_forward(const SppfForwardArgs& a) {
  dispatch_float_types(a.dtype, "torch_ext spp CPU kernels",
                       [&](auto tag) { sppf_forward_typed<decltype(tag)>(a); });
}

void sppf_backward(const SppfBackwardArgs& a) {
  dispatch_float_types(a.dtype, "torch_ext spp CPU kernels",
                       [&](auto tag) { sppf_backward_typed<decltype(tag)>(a); });
}

}  // namespace
}  // namespace CPU_CAPABILITY

#define TORCH_EXT_CONCAT_(a, b) a##b
#define TORCH_EXT_CONCAT(a, b) TORCH_EXT_CONCAT_(a, b)

const SppCpuKernels TORCH_EXT_CONCAT(spp_cpu_kernels_, CPU_CAPABILITY) = {
    &CPU_CAPABILITY::spp_forward, &CPU_CAPABILITY::spp_backward, &CPU_CAPABILITY::sppf_forward,
    &CPU_CAPABILITY::sppf_backward};

}  // namespace torch_ext::spp_impl
