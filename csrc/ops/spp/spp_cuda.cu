// CUDA kernels of spp and sppf.
//
// Max pooling follows PyTorch's rule (see spp_cpu_kernel.cpp): a value replaces the current
// maximum when it is strictly larger or NaN, so the argmax is the row-major-first maximum, or
// the last NaN. Parallel reductions combine (value, index) pairs with an associative rule that
// yields that same element whatever the order. Backward kernels gather (one thread per input
// element, fixed summation order): no atomics, deterministic.
//
// NCHW maps whose planes fit in shared memory (the common case) take kernels with one block per
// (image, channel) plane: the plane (and what the step needs of it) is read from global memory
// once, with consecutive threads on consecutive elements, and every reduction then reads shared
// memory; channels_last sppf does the same with a group of channels per block, held as planes.
// Their phases live in spp_plane.h (host-callable, tested on the CPU); the per-element kernels
// here serve channels_last spp and planes too large for shared memory.

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <utility>

#include "common/cuda_launch.cuh"
#include "common/dispatch.h"
#include "common/numerics.h"
#include "ops/spp/spp_common.h"
#include "ops/spp/spp_plane.h"

namespace torch_ext::spp_impl {
namespace {

constexpr int kMaxCudaLevels = 32;

struct Levels {
  int64_t value[kMaxCudaLevels];
  int64_t count;
  int64_t bins;  // sum of l * l
};

// Strides of a 4-D tensor, in elements.
struct Strides4 {
  int64_t n, c, h, w;
};

Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Max pooling's rules and adaptive bins, shared with the CPU kernels.
using numerics::bin_end;
using numerics::bin_start;
using numerics::is_nan;
using numerics::max_nan;
using numerics::neg_inf;
using numerics::scan_prefers_second;
using numerics::takes_over;

struct BinCoords {
  int64_t level_offset;  // sum of l * l over the earlier levels
  int64_t l, i, j;
};

__device__ BinCoords locate_bin(const Levels& levels, int64_t b) {
  int64_t offset = 0;
  for (int64_t li = 0; li < levels.count; ++li) {
    const int64_t l = levels.value[li];
    if (b < l * l) return {offset, l, b / l, b % l};
    b -= l * l;
    offset += l * l;
  }
  return {offset, 1, 0, 0};  // unreachable for b < levels.bins
}

struct Nchw {
  int64_t n, c, h, w;
};

// The sizes of a 4-D map and the order in which elementwise kernels enumerate it: the order
// of its memory layout, so that neighbouring threads touch neighbouring addresses (w fastest
// for NCHW, c fastest for NHWC). Scratch tensors of the map's size use the same order.
struct MapDims {
  int64_t N, C, H, W;
  bool channels_last;

  __host__ __device__ int64_t numel() const { return N * C * H * W; }

  __device__ Nchw unravel(int64_t e) const {
    if (channels_last) return {e / (C * W * H), e % C, (e / (C * W)) % H, (e / C) % W};
    return {e / (W * H * C), (e / (W * H)) % C, (e / W) % H, e % W};
  }

  __device__ int64_t index(int64_t n, int64_t c, int64_t h, int64_t w) const {
    return channels_last ? ((n * H + h) * W + w) * C + c : ((n * C + c) * H + h) * W + w;
  }
};

// ------------------------------------------------------------------ spp forward

constexpr int kWarp = 32;
constexpr int kPlaneThreads = 256;
// Dynamic shared memory a plane kernel may take without opting in to more (every GPU since
// Volta has at least this per block).
constexpr int64_t kPlaneSharedBytes = 48 * 1024;

// NCHW: one block per plane (n, c); each warp reduces whole bins, lanes striding over the bin's
// pixels. `staged`: the plane is first read into shared memory (every thread loading
// independent consecutive elements, so the loads overlap), and the bins read it there;
// otherwise (planes too large) they read global memory, where the plane stays in cache for the
// other levels.
template <class T>
__global__ void spp_forward_nchw_kernel(const T* __restrict__ input, T* __restrict__ output,
                                        int64_t* __restrict__ indices, int64_t C, int64_t H,
                                        int64_t W, Levels levels, bool is_max, bool staged) {
  using acc = at::opmath_type<T>;
  extern __shared__ unsigned char smem_raw[];
  acc* xs = reinterpret_cast<acc*>(smem_raw);
  const int64_t plane = blockIdx.x;
  const int64_t n = plane / C, c = plane % C;
  const T* x = input + plane * H * W;
  if (staged) {
    plane::load(threadIdx.x, blockDim.x, x, xs, static_cast<int>(H * W));
    __syncthreads();
  }
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  const int64_t features = C * levels.bins;
  for (int64_t b = warp; b < levels.bins; b += warps) {
    const BinCoords bin = locate_bin(levels, b);
    const int64_t h0 = bin_start(bin.i, H, bin.l), h1 = bin_end(bin.i, H, bin.l);
    const int64_t w0 = bin_start(bin.j, W, bin.l), w1 = bin_end(bin.j, W, bin.l);
    const int64_t bw = w1 - w0;
    acc value = is_max ? neg_inf<acc>() : acc(0);
    int64_t index = h0 * W + w0;
    auto visit = [&](int64_t pos) {
      const acc v = staged ? xs[pos] : static_cast<acc>(x[pos]);
      if (!is_max) {
        value += v;
      } else if (takes_over(v, value)) {
        value = v;
        index = pos;
      }
    };
    // Each lane visits its elements in row-major order (the update rule needs that); no
    // division per element. Wide bins: lanes stride along each row. Narrow bins: the warp
    // covers kWarp / bw rows at a time.
    if (bw >= kWarp) {
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t w = w0 + lane; w < w1; w += kWarp) visit(h * W + w);
      }
    } else {
      const int64_t rows_per_step = kWarp / bw, lane_row = lane / bw, lane_col = lane % bw;
      if (lane_row < rows_per_step) {
        for (int64_t h = h0 + lane_row; h < h1; h += rows_per_step) visit(h * W + w0 + lane_col);
      }
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const acc other = __shfl_down_sync(0xffffffffu, value, offset);
      const int64_t other_index = __shfl_down_sync(0xffffffffu, index, offset);
      if (!is_max) {
        value += other;
      } else if (scan_prefers_second(value, index, other, other_index)) {
        value = other;
        index = other_index;
      }
    }
    if (lane == 0) {
      const int64_t out =
          n * features + bin.level_offset * C + c * bin.l * bin.l + bin.i * bin.l + bin.j;
      output[out] = static_cast<T>(is_max ? value : value / (h1 - h0) / bw);
      if (indices != nullptr) indices[out] = index;
    }
  }
}

// NHWC: one thread per channel of one bin; neighbouring threads read neighbouring channels.
template <class T>
__global__ void spp_forward_nhwc_kernel(const T* __restrict__ input, T* __restrict__ output,
                                        int64_t* __restrict__ indices, int64_t C, int64_t H,
                                        int64_t W, Levels levels, bool is_max) {
  using acc = at::opmath_type<T>;
  const int64_t n = blockIdx.x / levels.bins, b = blockIdx.x % levels.bins;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const BinCoords bin = locate_bin(levels, b);
  const int64_t h0 = bin_start(bin.i, H, bin.l), h1 = bin_end(bin.i, H, bin.l);
  const int64_t w0 = bin_start(bin.j, W, bin.l), w1 = bin_end(bin.j, W, bin.l);
  acc value = is_max ? neg_inf<acc>() : acc(0);
  int64_t index = h0 * W + w0;
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t w = w0; w < w1; ++w) {
      const acc v = static_cast<acc>(input[((n * H + h) * W + w) * C + c]);
      if (!is_max) {
        value += v;
      } else if (takes_over(v, value)) {
        value = v;
        index = h * W + w;
      }
    }
  }
  const int64_t out =
      n * C * levels.bins + bin.level_offset * C + c * bin.l * bin.l + bin.i * bin.l + bin.j;
  output[out] = static_cast<T>(is_max ? value : value / (h1 - h0) / (w1 - w0));
  if (indices != nullptr) indices[out] = index;
}

// ------------------------------------------------------------------ spp backward

// One thread per input element: sums, level by level, the gradients of the bins that contain
// it (mode max: only the bins whose argmax it is).
template <class T>
__global__ void spp_backward_kernel(const T* __restrict__ grad_output,
                                    const int64_t* __restrict__ indices, T* __restrict__ grad_input,
                                    MapDims d, Strides4 gi, Levels levels, bool is_max) {
  using acc = at::opmath_type<T>;
  const int64_t C = d.C, H = d.H, W = d.W;
  for (int64_t e = launch::grid_stride_first(); e < d.numel();
       e += launch::grid_stride_step()) {
    const auto [n, c, h, w] = d.unravel(e);
    const int64_t pos = h * W + w;
    acc sum = 0;
    int64_t level_offset = 0;
    for (int64_t li = 0; li < levels.count; ++li) {
      const int64_t l = levels.value[li];
      const int64_t base = n * C * levels.bins + level_offset * C + c * l * l;
      const int64_t i_lo = (h * l) / H, i_hi = ((h + 1) * l + H - 1) / H;  // [i_lo, i_hi)
      const int64_t j_lo = (w * l) / W, j_hi = ((w + 1) * l + W - 1) / W;
      for (int64_t i = i_lo; i < i_hi; ++i) {
        for (int64_t j = j_lo; j < j_hi; ++j) {
          const int64_t out = base + i * l + j;
          if (is_max) {
            // Raw callers' indices are checked here, on the device (the CPU kernel checks them
            // on the host; a host check would synchronize): outside the map is a device-side
            // assert, as for ATen's index ops, never a silently dropped gradient.
            const int64_t index = indices[out];
            CUDA_KERNEL_ASSERT(index >= 0 && index < H * W);
            if (index == pos) sum += static_cast<acc>(grad_output[out]);
          } else {
            const int64_t kh = bin_end(i, H, l) - bin_start(i, H, l);
            const int64_t kw = bin_end(j, W, l) - bin_start(j, W, l);
            sum += static_cast<acc>(grad_output[out]) / kh / kw;
          }
        }
      }
      level_offset += l * l;
    }
    grad_input[n * gi.n + c * gi.c + h * gi.h + w * gi.w] = static_cast<T>(sum);
  }
}

// NCHW planes (grad_input contiguous): one block per plane. The plane's bins (their gradient,
// over their area for avg, and for max their argmax) and, per level, the bins that each row and
// column of the plane falls into go to shared memory; then every element sums its bins'
// gradients (plane::spp_gather: the per-element kernel's rule and order) and is written once.
template <class T>
__global__ void spp_backward_plane_kernel(const T* __restrict__ grad_output,
                                          const int64_t* __restrict__ indices,
                                          T* __restrict__ grad_input, int64_t C, int H, int W,
                                          Levels levels, bool is_max) {
  using acc = at::opmath_type<T>;
  extern __shared__ unsigned char smem_raw[];
  __shared__ int64_t level_sizes[kMaxCudaLevels];
  const int bins = static_cast<int>(levels.bins), count = static_cast<int>(levels.count);
  acc* bin_grad = reinterpret_cast<acc*>(smem_raw);
  int* bin_index = reinterpret_cast<int*>(bin_grad + bins);
  int* table = bin_index + bins;
  const plane::BinTables tables{table, table + count * H, table + 2 * count * H,
                                table + 2 * count * H + count * W};
  const int64_t plane_id = blockIdx.x;
  const int64_t n = plane_id / C, c = plane_id % C;
  const int64_t row = n * C * levels.bins;  // image n's row of grad_output and indices
  for (int li = threadIdx.x; li < count; li += blockDim.x) level_sizes[li] = levels.value[li];
  __syncthreads();
  plane::stage_bins(threadIdx.x, blockDim.x, level_sizes, count, bins, grad_output + row,
                    is_max ? indices + row : nullptr, C, c, H, W, is_max, bin_grad, bin_index);
  plane::build_bin_tables(threadIdx.x, blockDim.x, level_sizes, count, H, W, tables);
  __syncthreads();
  plane::spp_gather(threadIdx.x, blockDim.x, level_sizes, count, bin_grad, bin_index, tables,
                    is_max, grad_input + plane_id * H * W, H, W);
}

// ------------------------------------------------------------------ sppf forward

// One block per (image, group of `group` channels): the group's channels are read once into
// shared memory as planes `ld` elements apart, each stage is a row pass and a column pass there
// (windows clamped to the plane, which is max_pool2d's -inf padding), and every stage is
// written once. channels_last: a pixel's channels are adjacent, so groups of channels are read
// and written pixel by pixel; NCHW: one channel per block (group 1), its plane contiguous.
template <class T>
__global__ void sppf_forward_plane_kernel(const T* __restrict__ input, T* __restrict__ output,
                                          int64_t C, int H, int W, int p, int repeats, int group,
                                          int ld, bool channels_last) {
  using acc = at::opmath_type<T>;
  extern __shared__ unsigned char smem_raw[];
  const int hw = H * W;
  acc* cur = reinterpret_cast<acc*>(smem_raw);
  acc* tmp = cur + group * ld;
  const int64_t groups = (C + group - 1) / group;
  const int64_t n = blockIdx.x / groups, c0 = (blockIdx.x % groups) * group;
  const int count = static_cast<int>(std::min<int64_t>(group, C - c0));
  const int64_t out_channels = (int64_t{repeats} + 1) * C;
  const int64_t channel = channels_last ? 1 : hw;  // element strides of both maps
  const int64_t in_pixel = channels_last ? C : 1, out_pixel = channels_last ? out_channels : 1;
  T* out = output + n * hw * out_channels + c0 * channel;  // stage r: channels r * C on
  plane::load_channels(threadIdx.x, blockDim.x, input + n * hw * C + c0 * channel, in_pixel,
                       channel, cur, count, hw, ld);
  __syncthreads();
  plane::store_channels(threadIdx.x, blockDim.x, cur, out, out_pixel, channel, count, hw, ld);
  for (int64_t r = 1; r <= repeats; ++r) {
    plane::max_rows(threadIdx.x, blockDim.x, cur, tmp, H, W, p, count, ld);
    __syncthreads();
    plane::max_cols(threadIdx.x, blockDim.x, tmp, cur, H, W, p, count, ld);
    __syncthreads();
    plane::store_channels(threadIdx.x, blockDim.x, cur, out + r * C * channel, out_pixel, channel,
                          count, hw, ld);
  }
}


// One block per (plane, tile): the tile plus a halo of repeats * (k / 2) is loaded into shared
// memory once (outside the image: -inf, max_pool2d's padding); each stage is a separable max
// filter over a region that shrinks by k / 2 per stage, and every stage's tile is written out.
template <class T>
__global__ void sppf_forward_kernel(const T* __restrict__ input, T* __restrict__ output, int64_t C,
                                    int64_t H, int64_t W, Strides4 in_s, Strides4 out_s, int p,
                                    int repeats, int tile, int64_t tiles_w,
                                    int64_t tiles_per_plane) {
  using acc = at::opmath_type<T>;
  extern __shared__ unsigned char smem_raw[];
  const int side = tile + 2 * repeats * p;
  acc* cur = reinterpret_cast<acc*>(smem_raw);
  acc* tmp = cur + side * side;

  const int64_t plane = blockIdx.x / tiles_per_plane;
  const int64_t t = blockIdx.x % tiles_per_plane;
  const int64_t n = plane / C, c = plane % C;
  const int64_t oh = (t / tiles_w) * tile - repeats * p;  // image row of region row 0
  const int64_t ow = (t % tiles_w) * tile - repeats * p;
  auto inside = [&](int ry, int rx) {
    const int64_t h = oh + ry, w = ow + rx;
    return h >= 0 && h < H && w >= 0 && w < W;
  };

  for (int e = threadIdx.x; e < side * side; e += blockDim.x) {
    const int ry = e / side, rx = e % side;
    cur[e] = inside(ry, rx)
                 ? static_cast<acc>(
                       input[n * in_s.n + c * in_s.c + (oh + ry) * in_s.h + (ow + rx) * in_s.w])
                 : neg_inf<acc>();
  }
  __syncthreads();

  const int core = repeats * p;  // region offset of the tile
  auto write_tile = [&](int r) {
    for (int e = threadIdx.x; e < tile * tile; e += blockDim.x) {
      const int ry = core + e / tile, rx = core + e % tile;
      if (!inside(ry, rx)) continue;
      output[n * out_s.n + (r * C + c) * out_s.c + (oh + ry) * out_s.h + (ow + rx) * out_s.w] =
          static_cast<T>(cur[ry * side + rx]);
    }
  };
  write_tile(0);

  for (int r = 1; r <= repeats; ++r) {
    // Stage r is needed on region rows/cols [r p, side - r p); its row pass on rows
    // [(r - 1) p, side - (r - 1) p), where stage r - 1 is valid.
    const int lo = r * p, hi = side - r * p, rows_lo = (r - 1) * p, rows_hi = side - (r - 1) * p;
    const int width = hi - lo;
    for (int e = threadIdx.x; e < (rows_hi - rows_lo) * width; e += blockDim.x) {
      const int ry = rows_lo + e / width, rx = lo + e % width;
      acc m = cur[ry * side + rx - p];
      for (int d = -p + 1; d <= p; ++d) m = max_nan(m, cur[ry * side + rx + d]);
      tmp[ry * side + rx] = m;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < width * width; e += blockDim.x) {
      const int ry = lo + e / width, rx = lo + e % width;
      acc m = tmp[(ry - p) * side + rx];
      for (int d = -p + 1; d <= p; ++d) m = max_nan(m, tmp[(ry + d) * side + rx]);
      cur[ry * side + rx] = inside(ry, rx) ? m : neg_inf<acc>();
    }
    __syncthreads();
    write_tile(r);
  }
}

// Fallback when a tile with its halo does not fit in shared memory: stage r from stage r - 1
// (already in the output), one thread per element.
template <class T>
__global__ void sppf_stage_kernel(T* __restrict__ output, MapDims d, Strides4 out_s, int p, int r) {
  using acc = at::opmath_type<T>;
  const int64_t C = d.C, H = d.H, W = d.W;
  for (int64_t e = launch::grid_stride_first(); e < d.numel();
       e += launch::grid_stride_step()) {
    const auto [n, c, h, w] = d.unravel(e);
    const T* prev = output + n * out_s.n + ((r - 1) * C + c) * out_s.c;
    acc m = neg_inf<acc>();
    for (int64_t y = std::max<int64_t>(0, h - p); y < std::min<int64_t>(H, h + p + 1); ++y) {
      for (int64_t x = std::max<int64_t>(0, w - p); x < std::min<int64_t>(W, w + p + 1); ++x) {
        m = max_nan(m, static_cast<acc>(prev[y * out_s.h + x * out_s.w]));
      }
    }
    output[n * out_s.n + (r * C + c) * out_s.c + h * out_s.h + w * out_s.w] = static_cast<T>(m);
  }
}

template <class T>
__global__ void sppf_copy_input_kernel(const T* __restrict__ input, T* __restrict__ output,
                                       MapDims d, Strides4 in_s, Strides4 out_s) {
  for (int64_t e = launch::grid_stride_first(); e < d.numel();
       e += launch::grid_stride_step()) {
    const auto [n, c, h, w] = d.unravel(e);
    output[n * out_s.n + c * out_s.c + h * out_s.h + w * out_s.w] =
        input[n * in_s.n + c * in_s.c + h * in_s.h + w * in_s.w];
  }
}

// ------------------------------------------------------------------ sppf backward

// arg[q] = plane index of the max_pool2d argmax of q's window in stage r - 1 (row-major scan).
template <class T>
__global__ void sppf_argmax_kernel(const T* __restrict__ output, int64_t* __restrict__ arg,
                                   MapDims d, Strides4 out_s, int p, int r) {
  using acc = at::opmath_type<T>;
  const int64_t C = d.C, H = d.H, W = d.W;
  for (int64_t e = launch::grid_stride_first(); e < d.numel();
       e += launch::grid_stride_step()) {
    const auto [n, c, h, w] = d.unravel(e);
    const T* prev = output + n * out_s.n + ((r - 1) * C + c) * out_s.c;
    const int64_t y0 = std::max<int64_t>(0, h - p), x0 = std::max<int64_t>(0, w - p);
    acc best = neg_inf<acc>();
    int64_t best_index = y0 * W + x0;
    for (int64_t y = y0; y < std::min<int64_t>(H, h + p + 1); ++y) {
      for (int64_t x = x0; x < std::min<int64_t>(W, w + p + 1); ++x) {
        const acc v = static_cast<acc>(prev[y * out_s.h + x * out_s.w]);
        if (takes_over(v, best)) {
          best = v;
          best_index = y * W + x;
        }
      }
    }
    arg[e] = best_index;
  }
}

// g_prev[t] = sum over the windows q that contain t and have t as argmax of g[q] (row-major q
// order), plus stage r - 1's own slice of grad_output. g, g_prev and arg are scratch in the
// order of d (the accumulation type for g and g_prev).
template <class T>
__global__ void sppf_gather_kernel(const at::opmath_type<T>* __restrict__ g,
                                   const int64_t* __restrict__ arg,
                                   const T* __restrict__ grad_output,
                                   at::opmath_type<T>* __restrict__ g_prev, MapDims d,
                                   Strides4 go_s, int p, int r) {
  using acc = at::opmath_type<T>;
  const int64_t C = d.C, H = d.H, W = d.W;
  for (int64_t e = launch::grid_stride_first(); e < d.numel();
       e += launch::grid_stride_step()) {
    const auto [n, c, h, w] = d.unravel(e);
    const int64_t pos = h * W + w;
    acc sum = 0;
    for (int64_t y = std::max<int64_t>(0, h - p); y < std::min<int64_t>(H, h + p + 1); ++y) {
      for (int64_t x = std::max<int64_t>(0, w - p); x < std::min<int64_t>(W, w + p + 1); ++x) {
        const int64_t q = d.index(n, c, y, x);
        if (arg[q] == pos) sum += g[q];
      }
    }
    g_prev[e] =
        sum + static_cast<acc>(
                  grad_output[n * go_s.n + ((r - 1) * C + c) * go_s.c + h * go_s.h + w * go_s.w]);
  }
}

template <class T>
__global__ void sppf_load_last_grad_kernel(const T* __restrict__ grad_output,
                                           at::opmath_type<T>* __restrict__ g, MapDims d,
                                           Strides4 go_s, int repeats) {
  const int64_t C = d.C;
  for (int64_t e = launch::grid_stride_first(); e < d.numel();
       e += launch::grid_stride_step()) {
    const auto [n, c, h, w] = d.unravel(e);
    g[e] = static_cast<at::opmath_type<T>>(
        grad_output[n * go_s.n + (repeats * C + c) * go_s.c + h * go_s.h + w * go_s.w]);
  }
}

template <class T>
__global__ void sppf_store_grad_kernel(const at::opmath_type<T>* __restrict__ g,
                                       T* __restrict__ grad_input, MapDims d, Strides4 gi_s) {
  for (int64_t e = launch::grid_stride_first(); e < d.numel();
       e += launch::grid_stride_step()) {
    const auto [n, c, h, w] = d.unravel(e);
    grad_input[n * gi_s.n + c * gi_s.c + h * gi_s.h + w * gi_s.w] = static_cast<T>(g[e]);
  }
}

// The backward, blocks and planes as in sppf_forward_plane_kernel, all in shared memory:
// stages 0 .. R - 1 of the group are read from `output` (as the per-stage kernels do), stage
// R's gradient from grad_output; then for r = R .. 1, the argmax of each window of stage r - 1
// (plane::argmax_rows and argmax_cols), stage r - 1's slice of grad_output read into g_prev,
// and the gather into stage r - 1's gradient (plane::gather, which reads and overwrites g_prev
// element by element); the input's gradient is written once. The buffer of the row maxima is
// stage r's (no longer needed) for r < R, and g_prev (not yet written) for r = R.
template <class T>
__global__ void sppf_backward_plane_kernel(const T* __restrict__ grad_output,
                                           const T* __restrict__ output,
                                           T* __restrict__ grad_input, int64_t C, int H, int W,
                                           int p, int repeats, int group, int ld,
                                           bool channels_last) {
  using acc = at::opmath_type<T>;
  extern __shared__ unsigned char smem_raw[];
  const int hw = H * W, span = group * ld;
  acc* stages = reinterpret_cast<acc*>(smem_raw);  // [repeats][group][ld]
  acc* g = stages + repeats * span;
  acc* g_prev = g + span;
  int* column = reinterpret_cast<int*>(g_prev + span);
  int* arg = column + span;
  const int64_t groups = (C + group - 1) / group;
  const int64_t n = blockIdx.x / groups, c0 = (blockIdx.x % groups) * group;
  const int count = static_cast<int>(std::min<int64_t>(group, C - c0));
  const int64_t out_channels = (int64_t{repeats} + 1) * C;
  const int64_t channel = channels_last ? 1 : hw;  // element strides of all three maps
  const int64_t in_pixel = channels_last ? C : 1, out_pixel = channels_last ? out_channels : 1;
  const int64_t base = n * hw * out_channels + c0 * channel;  // stage r: channels r * C on
  const int64_t stage = C * channel;
  for (int64_t r = 0; r < repeats; ++r) {
    plane::load_channels(threadIdx.x, blockDim.x, output + base + r * stage, out_pixel, channel,
                         stages + r * span, count, hw, ld);
  }
  plane::load_channels(threadIdx.x, blockDim.x, grad_output + base + repeats * stage, out_pixel,
                       channel, g, count, hw, ld);
  __syncthreads();
  for (int64_t r = repeats; r >= 1; --r) {
    acc* value = r == repeats ? g_prev : stages + r * span;
    plane::argmax_rows(threadIdx.x, blockDim.x, stages + (r - 1) * span, value, column, H, W, p,
                       count, ld);
    __syncthreads();
    plane::argmax_cols(threadIdx.x, blockDim.x, value, column, arg, H, W, p, count, ld);
    __syncthreads();
    plane::load_channels(threadIdx.x, blockDim.x, grad_output + base + (r - 1) * stage,
                         out_pixel, channel, g_prev, count, hw, ld);
    __syncthreads();
    plane::gather(threadIdx.x, blockDim.x, g, arg, g_prev, g_prev, H, W, p, count, ld);
    __syncthreads();
    acc* swap = g;
    g = g_prev;
    g_prev = swap;
  }
  plane::store_channels(threadIdx.x, blockDim.x, g, grad_input + n * hw * C + c0 * channel,
                        in_pixel, channel, count, hw, ld);
}

// Shared memory per plane element of sppf_backward_plane_kernel: repeats + 2 values of the
// accumulation type and two ints (sppf_forward_plane_kernel: two values).
int64_t sppf_backward_bytes_per_element(int64_t repeats, size_t acc_size) {
  return (repeats + 2) * static_cast<int64_t>(acc_size) + 2 * int64_t{sizeof(int)};
}

// ------------------------------------------------------------------ host side



Levels make_levels(at::IntArrayRef levels) {
  TORCH_CHECK(static_cast<int64_t>(levels.size()) <= kMaxCudaLevels, "spp(): at most ",
              kMaxCudaLevels, " levels are supported on CUDA, got ", levels.size());
  Levels l{};
  l.count = static_cast<int64_t>(levels.size());
  for (int64_t i = 0; i < l.count; ++i) l.value[i] = levels[i];
  l.bins = total_bins(levels);
  return l;
}

std::tuple<at::Tensor, at::Tensor> spp_forward_cuda(const at::Tensor& input_,
                                                    at::IntArrayRef levels, std::string_view mode,
                                                    bool need_indices) {
  check_spp_args(input_, levels, mode);
  const c10::cuda::CUDAGuard guard(input_.device());
  const auto format = kernel_memory_format(input_);
  const auto input = input_.contiguous(format);
  const bool is_max = parse_mode(mode) == PoolMode::Max;
  const Levels lv = make_levels(levels);
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  auto output = at::empty({N, C * lv.bins}, input.options());
  const bool with_indices = need_indices && is_max;
  // Without indices: an empty [0], as the Meta kernel says.
  auto indices = with_indices ? at::empty({N, C * lv.bins}, input.options().dtype(at::kLong))
                              : at::empty({0}, input.options().dtype(at::kLong));
  if (output.numel() == 0) return {output, indices};
  TORCH_CHECK(N * C < (int64_t{1} << 31) && N * lv.bins < (int64_t{1} << 31),
              "spp(): input too large for the CUDA kernel's grid, got ", input.sizes());
  auto stream = c10::cuda::getCurrentCUDAStream();
  int64_t* idx = with_indices ? indices.mutable_data_ptr<int64_t>() : nullptr;
  dispatch_float_types(input.scalar_type(), "torch_ext spp CUDA kernels", [&](auto tag) {
    using T = decltype(tag);
    const T* in = input.const_data_ptr<T>();
    T* out = output.mutable_data_ptr<T>();
    if (format == c10::MemoryFormat::ChannelsLast) {
      const int threads = 128;
      const dim3 grid(static_cast<unsigned int>(N * lv.bins),
                      static_cast<unsigned int>((C + threads - 1) / threads));
      spp_forward_nhwc_kernel<T><<<grid, threads, 0, stream>>>(in, out, idx, C, H, W, lv, is_max);
    } else {
      const int64_t plane_bytes = H * W * static_cast<int64_t>(sizeof(at::opmath_type<T>));
      const bool staged = plane_bytes <= kPlaneSharedBytes;
      spp_forward_nchw_kernel<T><<<static_cast<unsigned int>(N * C), kPlaneThreads,
                                   staged ? plane_bytes : 0, stream>>>(in, out, idx, C, H, W, lv,
                                                                       is_max, staged);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {output, indices};
}

at::Tensor spp_backward_cuda(const at::Tensor& grad_output_, const at::Tensor& indices_,
                             at::IntArrayRef input_size, at::IntArrayRef levels,
                             std::string_view mode, c10::MemoryFormat memory_format) {
  check_spp_backward_args(grad_output_, indices_, input_size, levels, mode, memory_format);
  const c10::cuda::CUDAGuard guard(grad_output_.device());
  const bool is_max = parse_mode(mode) == PoolMode::Max;
  const Levels lv = make_levels(levels);
  const auto grad_output = grad_output_.contiguous();
  const auto indices = indices_.contiguous();
  auto grad_input = at::empty(input_size, grad_output.options().memory_format(memory_format));
  const int64_t total = grad_input.numel();
  if (total == 0) return grad_input;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = input_size[0], C = input_size[1], H = input_size[2], W = input_size[3];
  dispatch_float_types(grad_output.scalar_type(), "torch_ext spp CUDA kernels", [&](auto tag) {
    using T = decltype(tag);
    // Dynamic shared memory of the plane kernel: the bins' gradients and argmaxes, the level
    // tables (its static level_sizes come on top). One block per plane: only where the planes
    // are small or many enough to fill the GPU (a few huge planes take the grid-wide kernel).
    const int64_t plane_bytes =
        lv.bins * static_cast<int64_t>(sizeof(at::opmath_type<T>) + sizeof(int)) +
        2 * lv.count * (H + W) * static_cast<int64_t>(sizeof(int));
    const bool fills_gpu =
        H * W <= 16384 || N * C >= 2 * launch::multiprocessor_count(grad_output.get_device());
    if (memory_format == c10::MemoryFormat::Contiguous &&
        plane_bytes + kMaxCudaLevels * static_cast<int64_t>(sizeof(int64_t)) <=
            kPlaneSharedBytes &&
        fills_gpu && N * C < (int64_t{1} << 31) && H * W < (int64_t{1} << 31)) {
      spp_backward_plane_kernel<T>
          <<<static_cast<unsigned int>(N * C), kPlaneThreads, plane_bytes, stream>>>(
              grad_output.const_data_ptr<T>(),
              is_max ? indices.const_data_ptr<int64_t>() : nullptr,
              grad_input.mutable_data_ptr<T>(), C, static_cast<int>(H), static_cast<int>(W), lv,
              is_max);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    spp_backward_kernel<T><<<launch::grid_stride_blocks(total), launch::kBlockThreads, 0, stream>>>(
        grad_output.const_data_ptr<T>(), is_max ? indices.const_data_ptr<int64_t>() : nullptr,
        grad_input.mutable_data_ptr<T>(),
        MapDims{input_size[0], input_size[1], input_size[2], input_size[3],
                memory_format == c10::MemoryFormat::ChannelsLast},
        strides_of(grad_input), lv, is_max);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_input;
}

// Largest tile (32, 16 or 8) whose region with halo fits in 48 KiB of shared memory; 0 if none.
int pick_sppf_tile(int p, int repeats, size_t acc_size) {
  for (int tile : {32, 16, 8}) {
    const size_t side = tile + 2 * static_cast<size_t>(repeats) * p;
    if (2 * side * side * acc_size <= 48 * 1024) return tile;
  }
  return 0;
}

// The NHWC sppf kernels' plane stride: odd, so that one pixel's channels fall on different
// shared-memory banks.
int64_t nhwc_plane_stride(int64_t hw) { return hw | 1; }

// The channels per block of the NHWC sppf kernels: the most (32, 16, ..., 1, at most C) whose
// planes let two blocks share an SM, given the shared bytes per plane element; fewer (down to
// 32 bytes of channels per pixel) while the blocks would not fill the GPU twice over; 0 when
// not even one plane fits.
int nhwc_group(int64_t N, int64_t C, int64_t hw, int64_t bytes_per_element, size_t value_size,
               int device) {
  const int64_t budget = launch::shared_bytes_for_blocks(device, 2);
  const int64_t ld = nhwc_plane_stride(hw);
  int group = 32;
  while (group > 1 && (group > C || group * ld * bytes_per_element > budget)) group /= 2;
  if (ld * bytes_per_element > budget) return 0;
  const int64_t sms = launch::multiprocessor_count(device);
  const int floor = static_cast<int>(std::max<size_t>(1, 32 / value_size));
  while (group > floor && N * ((C + group - 1) / group) < 2 * sms) group /= 2;
  return group;
}

// How sppf's plane kernels split a map: `group` channels per block (0: the map takes the other
// kernels), their planes `ld` apart, `bytes` of shared memory per block, `blocks` blocks. NCHW:
// a channel per block while its plane fits without opting in to more shared memory;
// channels_last: nhwc_group's choice.
struct PlaneGroups {
  int group = 0, ld = 0;
  int64_t bytes = 0;
  unsigned int blocks = 0;
};

PlaneGroups plane_groups(int64_t N, int64_t C, int64_t hw, int64_t bytes_per_element,
                         size_t value_size, bool channels_last, int device) {
  PlaneGroups pg;
  if (hw >= (int64_t{1} << 24)) return pg;
  const int64_t ld = channels_last ? nhwc_plane_stride(hw) : hw;
  const int group = channels_last
                        ? nhwc_group(N, C, hw, bytes_per_element, value_size, device)
                        : static_cast<int>(hw * bytes_per_element <= kPlaneSharedBytes);
  const int64_t blocks = N * ((C + std::max(group, 1) - 1) / std::max(group, 1));
  if (group == 0 || blocks >= (int64_t{1} << 31)) return pg;
  pg.group = group;
  pg.ld = static_cast<int>(ld);
  pg.bytes = group * ld * bytes_per_element;
  pg.blocks = static_cast<unsigned int>(blocks);
  return pg;
}

at::Tensor sppf_cuda(const at::Tensor& input_, int64_t kernel_size, int64_t repeats) {
  check_sppf_args(input_, kernel_size, repeats);
  const c10::cuda::CUDAGuard guard(input_.device());
  const auto format = kernel_memory_format(input_);
  const auto input = input_.contiguous(format);
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  auto output = at::empty({N, C * (repeats + 1), H, W}, input.options().memory_format(format));
  if (output.numel() == 0) return output;
  const int p = static_cast<int>(effective_kernel_size(kernel_size, H, W) / 2);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types(input.scalar_type(), "torch_ext spp CUDA kernels", [&](auto tag) {
    using T = decltype(tag);
    using acc = at::opmath_type<T>;
    const T* in = input.const_data_ptr<T>();
    T* out = output.mutable_data_ptr<T>();
    const bool channels_last = format == c10::MemoryFormat::ChannelsLast;
    const PlaneGroups pg = plane_groups(N, C, H * W, 2 * sizeof(acc), sizeof(T), channels_last,
                                        input.get_device());
    if (pg.group > 0) {
      launch::launch_with_shared(sppf_forward_plane_kernel<T>, pg.blocks, kPlaneThreads, pg.bytes,
                                 input.get_device(), stream, in, out, C, static_cast<int>(H),
                                 static_cast<int>(W), p, static_cast<int>(repeats), pg.group,
                                 pg.ld, channels_last);
      return;
    }
    // The tiled kernel walks planes, which reads NHWC memory with a stride of C: channels_last
    // maps whose planes fit no group take the per-stage kernels, which enumerate them channels
    // first (coalesced).
    const int tile = channels_last ? 0 : pick_sppf_tile(p, static_cast<int>(repeats), sizeof(acc));
    const int64_t tiles_h = (H + std::max(tile, 1) - 1) / std::max(tile, 1);
    const int64_t tiles_w = (W + std::max(tile, 1) - 1) / std::max(tile, 1);
    if (tile > 0 && N * C * tiles_h * tiles_w < (int64_t{1} << 31)) {
      const int side = tile + 2 * static_cast<int>(repeats) * p;
      const size_t smem = 2 * static_cast<size_t>(side) * side * sizeof(acc);
      sppf_forward_kernel<T>
          <<<static_cast<unsigned int>(N * C * tiles_h * tiles_w), 256, smem, stream>>>(
              in, out, C, H, W, strides_of(input), strides_of(output), p, static_cast<int>(repeats),
              tile, tiles_w, tiles_h * tiles_w);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const MapDims d{N, C, H, W, channels_last};
    const unsigned int blocks = launch::grid_stride_blocks(d.numel());
    sppf_copy_input_kernel<T><<<blocks, launch::kBlockThreads, 0, stream>>>(
        in, out, d, strides_of(input), strides_of(output));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (int r = 1; r <= repeats; ++r) {
      sppf_stage_kernel<T>
          <<<blocks, launch::kBlockThreads, 0, stream>>>(out, d, strides_of(output), p, r);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return output;
}

at::Tensor sppf_backward_cuda(const at::Tensor& grad_output_, const at::Tensor& output_,
                              int64_t kernel_size, int64_t repeats) {
  check_sppf_backward_args(grad_output_, output_, kernel_size, repeats);
  const c10::cuda::CUDAGuard guard(output_.device());
  const auto format = kernel_memory_format(output_);
  const auto output = output_.contiguous(format);
  const auto grad_output = grad_output_.contiguous(format);
  const int64_t N = output.size(0), C = output.size(1) / (repeats + 1), H = output.size(2),
                W = output.size(3);
  auto grad_input = at::empty({N, C, H, W}, output.options().memory_format(format));
  const int64_t total = grad_input.numel();
  if (total == 0) return grad_input;
  const int p = static_cast<int>(effective_kernel_size(kernel_size, H, W) / 2);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto acc_dtype = output.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const MapDims d{N, C, H, W, format == c10::MemoryFormat::ChannelsLast};
  const unsigned int blocks = launch::grid_stride_blocks(total);
  dispatch_float_types(output.scalar_type(), "torch_ext spp CUDA kernels", [&](auto tag) {
    using T = decltype(tag);
    using acc = at::opmath_type<T>;
    const PlaneGroups pg =
        plane_groups(N, C, H * W, sppf_backward_bytes_per_element(repeats, sizeof(acc)),
                     sizeof(T), d.channels_last, output.get_device());
    if (pg.group > 0) {
      launch::launch_with_shared(
          sppf_backward_plane_kernel<T>, pg.blocks, kPlaneThreads, pg.bytes, output.get_device(),
          stream, grad_output.const_data_ptr<T>(), output.const_data_ptr<T>(),
          grad_input.mutable_data_ptr<T>(), C, static_cast<int>(H), static_cast<int>(W), p,
          static_cast<int>(repeats), pg.group, pg.ld, d.channels_last);
      return;
    }
    // Scratch in the enumeration order of d (plain contiguous tensors, indexed by MapDims).
    auto g = at::empty({total}, output.options().dtype(acc_dtype));
    auto g_prev = at::empty_like(g);
    auto arg = at::empty({total}, output.options().dtype(at::kLong));
    const Strides4 out_s = strides_of(output), go_s = strides_of(grad_output);
    sppf_load_last_grad_kernel<T><<<blocks, launch::kBlockThreads, 0, stream>>>(
        grad_output.const_data_ptr<T>(), g.mutable_data_ptr<acc>(), d, go_s,
        static_cast<int>(repeats));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (int r = static_cast<int>(repeats); r >= 1; --r) {
      sppf_argmax_kernel<T><<<blocks, launch::kBlockThreads, 0, stream>>>(
          output.const_data_ptr<T>(), arg.mutable_data_ptr<int64_t>(), d, out_s, p, r);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sppf_gather_kernel<T><<<blocks, launch::kBlockThreads, 0, stream>>>(
          g.const_data_ptr<acc>(), arg.const_data_ptr<int64_t>(), grad_output.const_data_ptr<T>(),
          g_prev.mutable_data_ptr<acc>(), d, go_s, p, r);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      std::swap(g, g_prev);
    }
    sppf_store_grad_kernel<T><<<blocks, launch::kBlockThreads, 0, stream>>>(
        g.const_data_ptr<acc>(), grad_input.mutable_data_ptr<T>(), d, strides_of(grad_input));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_input;
}

}  // namespace
}  // namespace torch_ext::spp_impl

TORCH_LIBRARY_IMPL(torch_ext, CUDA, m) {
  m.impl("_spp_forward", torch_ext::spp_impl::spp_forward_cuda);
  m.impl("_spp_backward", torch_ext::spp_impl::spp_backward_cuda);
  m.impl("sppf", torch_ext::spp_impl::sppf_cuda);
  m.impl("_sppf_backward", torch_ext::spp_impl::sppf_backward_cuda);
}
