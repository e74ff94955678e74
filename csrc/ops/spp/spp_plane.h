#pragma once

// The per-plane work of the CUDA spp and sppf kernels that hold one (image, channel) plane of
// an NCHW map per thread block. Each function is one phase of a block: thread `tid` of
// `threads` takes the items tid, tid + threads, ...; the phases of a block are separated by a
// barrier (__syncthreads on the device), and no phase reads what another thread of the same
// phase writes. The functions are host-callable too: tests/cpp/test_spp_plane.cpp runs them on
// the CPU, playing every thread of a block in turn between barriers, against the CPU ops.
//
// Positions inside a plane are int (the kernels that use these hold a plane in shared memory,
// far below 2^31 elements). Values are in the accumulation type A (float for the half types).
// The sppf phases take `planes` planes of H x W, `ld` elements apart (a block of NHWC channels
// held as planes; an odd ld keeps the reads of one pixel's channels off a single bank), each on
// its own; on NCHW maps a block holds one plane.

#include <c10/macros/Macros.h>

#include <cstdint>

#include "common/numerics.h"

namespace torch_ext::spp_impl::plane {

template <class A>
C10_HOST_DEVICE inline A max_nan(A a, A b) {
  return numerics::max_nan(a, b);
}

C10_HOST_DEVICE inline int clamp_lo(int v) { return v < 0 ? 0 : v; }
C10_HOST_DEVICE inline int clamp_hi(int v, int size) { return v > size - 1 ? size - 1 : v; }

// dst[e] = A(src[e]) for e < n (a plane read into shared memory; consecutive threads read
// consecutive elements).
template <class T, class A>
C10_HOST_DEVICE inline void load(int tid, int threads, const T* src, A* dst, int n) {
  for (int e = tid; e < n; e += threads) dst[e] = static_cast<A>(src[e]);
}

// ---------------------------------------------------------------- sppf

// `count` channels of a map from channel c0 on (src: the first pixel's channel c0; pixels
// `pixel_stride`, channels `channel_stride` elements apart) into `count` planes of hw elements,
// ld apart, at dst, pixel by pixel: consecutive threads read consecutive channels of a pixel
// (NHWC), or consecutive pixels of the one channel (NCHW, count 1).
template <class T, class A>
C10_HOST_DEVICE inline void load_channels(int tid, int threads, const T* src, int64_t pixel_stride,
                                          int64_t channel_stride, A* dst, int count, int hw,
                                          int ld) {
  for (int e = tid; e < count * hw; e += threads) {
    const int pixel = e / count, c = e % count;
    dst[c * ld + pixel] = static_cast<A>(src[pixel * pixel_stride + c * channel_stride]);
  }
}

// The inverse: `count` planes of hw elements (ld apart) at src into a map's channels.
template <class A, class T>
C10_HOST_DEVICE inline void store_channels(int tid, int threads, const A* src, T* dst,
                                           int64_t pixel_stride, int64_t channel_stride,
                                           int count, int hw, int ld) {
  for (int e = tid; e < count * hw; e += threads) {
    const int pixel = e / count, c = e % count;
    dst[pixel * pixel_stride + c * channel_stride] = static_cast<T>(src[c * ld + pixel]);
  }
}

// Item e of `planes` planes of hw elements: its plane's first element (planes ld apart), and
// its position q in the plane.
C10_HOST_DEVICE inline int plane_base(int e, int hw, int ld, int& q) {
  const int k = e / hw;
  q = e - k * hw;
  return k * (ld > 0 ? ld : hw);
}

// One max_pool2d stage of sppf (kernel 2p + 1, stride 1, padding p with -inf, which amounts to
// windows clamped to the plane) in two phases: max_rows writes the row maxima of src into tmp,
// max_cols the column maxima of tmp into dst. NaN propagates, as in max_pool2d.
template <class A>
C10_HOST_DEVICE inline void max_rows(int tid, int threads, const A* src, A* tmp, int H, int W,
                                     int p, int planes = 1, int ld = 0) {
  const int hw = H * W;
  for (int e = tid; e < planes * hw; e += threads) {
    int q;
    const int base = plane_base(e, hw, ld, q), y = q / W, x = q % W;
    const A* row = src + base + y * W;
    const int x1 = clamp_hi(x + p, W);
    A m = row[clamp_lo(x - p)];
    for (int xx = clamp_lo(x - p) + 1; xx <= x1; ++xx) m = max_nan(m, row[xx]);
    tmp[base + q] = m;
  }
}

template <class A>
C10_HOST_DEVICE inline void max_cols(int tid, int threads, const A* tmp, A* dst, int H, int W,
                                     int p, int planes = 1, int ld = 0) {
  const int hw = H * W;
  for (int e = tid; e < planes * hw; e += threads) {
    int q;
    const int base = plane_base(e, hw, ld, q), y = q / W, x = q % W;
    const A* plane = tmp + base;
    const int y1 = clamp_hi(y + p, H);
    A m = plane[clamp_lo(y - p) * W + x];
    for (int yy = clamp_lo(y - p) + 1; yy <= y1; ++yy) m = max_nan(m, plane[yy * W + x]);
    dst[base + q] = m;
  }
}

// The argmax of every window of a stage s (max_pool2d's: the row-major scan with the takes_over
// rule, starting from -inf at the window's first element) in two phases. argmax_rows: for each
// window's row segment, scanned in order, its maximum and column (the segment's first column
// when nothing takes over). argmax_cols: the segments of a window's rows, scanned in row order
// with the same rule, give the window's argmax as a position in its plane. (A scan in row-major
// order is the scan of the rows' own results in row order: ties keep the earlier row, whose
// result is its first maximum; a NaN takes over, so the last NaN wins.)
template <class A>
C10_HOST_DEVICE inline void argmax_rows(int tid, int threads, const A* s, A* value, int* column,
                                        int H, int W, int p, int planes = 1, int ld = 0) {
  const int hw = H * W;
  for (int e = tid; e < planes * hw; e += threads) {
    int q;
    const int base = plane_base(e, hw, ld, q), y = q / W, x = q % W;
    const A* row = s + base + y * W;
    const int x0 = clamp_lo(x - p), x1 = clamp_hi(x + p, W);
    A best = numerics::neg_inf<A>();
    int best_x = x0;
    for (int xx = x0; xx <= x1; ++xx) {
      const A v = row[xx];
      if (numerics::takes_over(v, best)) {
        best = v;
        best_x = xx;
      }
    }
    value[base + q] = best;
    column[base + q] = best_x;
  }
}

template <class A>
C10_HOST_DEVICE inline void argmax_cols(int tid, int threads, const A* value, const int* column,
                                        int* arg, int H, int W, int p, int planes = 1,
                                        int ld = 0) {
  const int hw = H * W;
  for (int e = tid; e < planes * hw; e += threads) {
    int q;
    const int base = plane_base(e, hw, ld, q), y = q / W, x = q % W;
    const int y0 = clamp_lo(y - p), y1 = clamp_hi(y + p, H);
    A best = numerics::neg_inf<A>();
    int best_at = y0 * W + clamp_lo(x - p);
    for (int yy = y0; yy <= y1; ++yy) {
      const A v = value[base + yy * W + x];
      if (numerics::takes_over(v, best)) {
        best = v;
        best_at = yy * W + column[base + yy * W + x];
      }
    }
    arg[base + q] = best_at;
  }
}

// One step of sppf's backward through stage r: g_prev[t] = (the sum, over the windows q around
// t in row-major order whose argmax is t, of g[q]) + go[t], where g is stage r's gradient, arg
// the argmaxes of stage r's windows over stage r - 1, and go stage r - 1's own slice of
// grad_output, laid out like g (or go may be g_prev itself: each element is read before it is
// written, by the same thread). The order of the sums is that of the per-element kernels, so
// both give the same bits.
template <class A, class T>
C10_HOST_DEVICE inline void gather(int tid, int threads, const A* g, const int* arg, const T* go,
                                   A* g_prev, int H, int W, int p, int planes = 1, int ld = 0) {
  const int hw = H * W;
  for (int e = tid; e < planes * hw; e += threads) {
    int t;
    const int base = plane_base(e, hw, ld, t), y = t / W, x = t % W;
    const int y1 = clamp_hi(y + p, H), x0 = clamp_lo(x - p), x1 = clamp_hi(x + p, W);
    A sum = 0;
    for (int yy = clamp_lo(y - p); yy <= y1; ++yy) {
      for (int xx = x0; xx <= x1; ++xx) {
        const int q = base + yy * W + xx;
        if (arg[q] == t) sum += g[q];
      }
    }
    g_prev[base + t] = sum + static_cast<A>(go[base + t]);
  }
}

// ---------------------------------------------------------------- spp backward

// Bin b of a pyramid (levels in order, row-major within a level): its level's size l, row i,
// column j, and the bins of the earlier levels.
struct Bin {
  int level_offset, l, i, j;
};

C10_HOST_DEVICE inline Bin locate(const int64_t* levels, int count, int b) {
  int offset = 0;
  for (int li = 0; li < count; ++li) {
    const int l = static_cast<int>(levels[li]);
    if (b < l * l) return {offset, l, b / l, b % l};
    b -= l * l;
    offset += l * l;
  }
  return {offset, 1, 0, 0};  // unreachable for b < the pyramid's bins
}

// The bins of plane (n, c) for the backward: bin_grad[b] (for avg, over the bin's area, as the
// per-element kernel divides it) and, for max, bin_index[b], the bin's argmax (indices: the
// forward's, as grad_output's layout, [N, C * bins] with image n's row at the given pointers).
// Raw callers' indices are checked on the device (a device-side assert, as for ATen's index
// ops), never silently dropped.
template <class A, class T>
C10_HOST_DEVICE inline void stage_bins(int tid, int threads, const int64_t* levels, int count,
                                       int bins, const T* grad_row, const int64_t* index_row,
                                       int64_t C, int64_t c, int H, int W, bool is_max,
                                       A* bin_grad, int* bin_index) {
  for (int b = tid; b < bins; b += threads) {
    const Bin bin = locate(levels, count, b);
    const int64_t at = bin.level_offset * C + c * bin.l * bin.l + bin.i * bin.l + bin.j;
    const A grad = static_cast<A>(grad_row[at]);
    if (is_max) {
      const int64_t index = index_row[at];
#ifdef __CUDA_ARCH__
      CUDA_KERNEL_ASSERT(index >= 0 && index < int64_t{H} * W);
#endif
      bin_grad[b] = grad;
      // An index outside the plane (where the assert is compiled out) matches no element.
      bin_index[b] = index >= 0 && index < int64_t{H} * W ? static_cast<int>(index) : -1;
    } else {
      const int64_t kh = numerics::bin_end(bin.i, H, bin.l) - numerics::bin_start(bin.i, H, bin.l);
      const int64_t kw = numerics::bin_end(bin.j, W, bin.l) - numerics::bin_start(bin.j, W, bin.l);
      bin_grad[b] = grad / kh / kw;
      bin_index[b] = -1;
    }
  }
}

// For every level and every row h (column w) of the plane, the bins of that level whose rows
// (columns) contain it: [lo, hi), adaptive pooling's bins inverted. Laid out
// row_lo[level * H + h], row_hi[...], col_lo[level * W + w], col_hi[...].
struct BinTables {
  int* row_lo;
  int* row_hi;
  int* col_lo;
  int* col_hi;
};

C10_HOST_DEVICE inline void build_bin_tables(int tid, int threads, const int64_t* levels,
                                             int count, int H, int W, BinTables t) {
  for (int e = tid; e < count * (H + W); e += threads) {
    const int li = e / (H + W), k = e % (H + W);
    const int64_t l = levels[li];
    if (k < H) {
      t.row_lo[li * H + k] = static_cast<int>((k * l) / H);
      t.row_hi[li * H + k] = static_cast<int>(((k + 1) * l + H - 1) / H);
    } else {
      const int64_t w = k - H;
      t.col_lo[li * W + w] = static_cast<int>((w * l) / W);
      t.col_hi[li * W + w] = static_cast<int>(((w + 1) * l + W - 1) / W);
    }
  }
}

// grad_input of one plane (contiguous, written here) from its bins' gradients: bin_grad[b] for
// the bins b of all levels in order (level by level, row-major within a level); for mode max,
// bin_index[b] is the bin's argmax (a plane position) and an element gets the gradients of the
// bins whose argmax it is; for avg, bin_grad already holds the gradient over the bin's area
// and an element gets those of the bins that contain it. Summed level by level, bins in order,
// as the per-element kernel does.
template <class A, class T>
C10_HOST_DEVICE inline void spp_gather(int tid, int threads, const int64_t* levels, int count,
                                       const A* bin_grad, const int* bin_index, BinTables t,
                                       bool is_max, T* grad_input, int H, int W) {
  for (int e = tid; e < H * W; e += threads) {
    const int h = e / W, w = e % W;
    A sum = 0;
    int level_offset = 0;
    for (int li = 0; li < count; ++li) {
      const int l = static_cast<int>(levels[li]);
      const int i_hi = t.row_hi[li * H + h], j_lo = t.col_lo[li * W + w];
      const int j_hi = t.col_hi[li * W + w];
      for (int i = t.row_lo[li * H + h]; i < i_hi; ++i) {
        for (int j = j_lo; j < j_hi; ++j) {
          const int b = level_offset + i * l + j;
          if (!is_max || bin_index[b] == e) sum += bin_grad[b];
        }
      }
      level_offset += l * l;
    }
    grad_input[e] = static_cast<T>(sum);
  }
}

}  // namespace torch_ext::spp_impl::plane
