// CPU loops of spp. Compiled once per CPU capability (DEFAULT, AVX2, AVX512; see
// CMakeLists.txt). Max pooling follows PyTorch's update rule (common/cpu_kernel_utils.h).
//
// NCHW input is split by planes (n, c), NHWC input by (n, bin); every output element is written
// by one thread and summed in a fixed order, so results are deterministic.

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/dispatch.h"
#include "ops/spp/spp_cpu_helpers.h"

namespace torch_ext::spp_impl {
inline namespace CPU_CAPABILITY {
namespace {

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
}  // namespace
}  // namespace CPU_CAPABILITY

const SppCpuKernels TORCH_EXT_CPU_KERNEL_TABLE(spp_cpu_kernels) = {&CPU_CAPABILITY::spp_forward,
                                                                   &CPU_CAPABILITY::spp_backward};

}  // namespace torch_ext::spp_impl
