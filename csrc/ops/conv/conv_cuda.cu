// CUDA kernels of dilated_conv2d.
//
// Depthwise (groups == C_in): a tiled direct kernel. A block computes an 8 x 32 tile of one
// (image, channel) plane; it stages the input patch the tile reads (all dilated taps) and the
// channel's taps in shared memory, so every input element is read from global memory once per
// tile instead of once per tap; bias and activation are applied before the single store. A plain
// one-thread-per-output kernel serves patches too large for shared memory. The input gradient is
// a gather (one thread per input element over the taps that reach it), the weight gradient for
// 3x3/5x5/7x7 kernels every tap of a channel at once over a share of its positions, the shares
// added in order (other sizes: one block per (channel, tap)), with fixed-order trees: no
// atomics, deterministic. 32-bit indices wherever they fit. channels_last maps with multiplier 1
// run NHWC kernels of their own (no layout copies).
//
// General: im2col for a chunk of images and one group, a batched cuBLAS GEMM (at::matmul), and
// an epilogue kernel that writes the GEMM result into the output with bias and activation. The
// backward multiplies by the transposed weight and folds the columns back with a gather kernel
// (col2im, one thread per input element); the weight gradient is a batched GEMM summed over the
// chunk. float16/bfloat16 accumulate in float32.
//
// Dense float32/bfloat16/float16 convolutions with symmetric padding go to ATen's convolution
// (cuDNN) with the activation after it (see vendor_route); TORCH_EXT_CONV_ROUTE=own forces these
// kernels, =vendor sends every call there. Other channels_last maps go through NCHW copies.

#include <ATen/Context.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <string_view>

#include "common/cuda_launch.cuh"
#include "common/dispatch.h"
#include "ops/conv/conv_common.h"

namespace torch_ext::conv_impl {
namespace {

constexpr int kTileH = 8;
constexpr int kTileW = 32;
constexpr int kThreads = launch::kBlockThreads;
constexpr int64_t kMaxSharedBytes = 48 * 1024;

// The geometry, as plain fields usable on the device.
struct Geo {
  int64_t n, c_in, h, w, c_out, kh, kw, groups;
  int64_t sh, sw, pt, pl, dh, dw, oh, ow;
};

Geo to_geo(const ConvGeometry& g) {
  return {g.n,        g.c_in,     g.h,       g.w,        g.c_out, g.kh,    g.kw, g.groups,
          g.stride_h, g.stride_w, g.pad_top, g.pad_left, g.dil_h, g.dil_w, g.oh, g.ow};
}

template <class A>
__device__ __forceinline__ A activate(A v, int act) {
  switch (act) {
    case static_cast<int>(Activation::Relu):
      return (v > A(0) || v != v) ? v : A(0);  // NaN stays NaN, like torch.relu
    case static_cast<int>(Activation::Silu):
      return v / (A(1) + exp(-v));
    case static_cast<int>(Activation::Gelu):
      return A(0.5) * v * (A(1) + erf(v * A(0.70710678118654752440)));
    default:
      return v;
  }
}

// ---------------------------------------------------------------- depthwise

// The geometry in the index type I of a depthwise kernel: int32 where every size, offset and
// element count of the maps fits (integer division and modulo in 32 bits are several times
// cheaper than in 64), int64 otherwise.
template <class I>
struct GeoI {
  I n, c_in, h, w, c_out, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow;
};

template <class I>
GeoI<I> geo_as(const Geo& g) {
  return {static_cast<I>(g.n),  static_cast<I>(g.c_in), static_cast<I>(g.h),
          static_cast<I>(g.w),  static_cast<I>(g.c_out), static_cast<I>(g.kh),
          static_cast<I>(g.kw), static_cast<I>(g.sh),   static_cast<I>(g.sw),
          static_cast<I>(g.pt), static_cast<I>(g.pl),   static_cast<I>(g.dh),
          static_cast<I>(g.dw), static_cast<I>(g.oh),   static_cast<I>(g.ow)};
}

// Whether every index a depthwise kernel computes for g fits int32 with room to spare: element
// counts and positions along each axis (an output position times the stride plus the kernel's
// extent and the padding) below 2^30, so that a grid-stride step (at most 2^28) past the last
// element cannot overflow either.
bool fits_int32(const Geo& g) {
  constexpr int64_t limit = int64_t{1} << 30;
  const auto below = [&](int64_t a, int64_t b) { return a == 0 || b <= limit / a; };
  const bool counts = below(g.n * g.c_in, g.h * g.w) && below(g.n * g.c_out, g.oh * g.ow) &&
                      below(g.n * g.c_in, g.h) && below(g.n * g.c_out, g.oh) &&
                      g.n * g.c_in < limit && g.n * g.c_out < limit && g.h * g.w < limit &&
                      g.oh * g.ow < limit;
  const auto axis = [&](int64_t in, int64_t out, int64_t stride, int64_t pad, int64_t k,
                        int64_t dil) {
    return out < limit / std::max<int64_t>(stride, 1) && k < limit / std::max<int64_t>(dil, 1) &&
           out * stride + k * dil + pad + in < limit / 2;
  };
  return counts && axis(g.h, g.oh, g.sh, g.pt, g.kh, g.dh) &&
         axis(g.w, g.ow, g.sw, g.pl, g.kw, g.dw) && g.c_out * g.kh * g.kw < limit;
}

// Patch of input the tile reads, and its size in elements.
template <class I>
__host__ __device__ inline I patch_rows(const GeoI<I>& g) {
  return (kTileH - 1) * g.sh + (g.kh - 1) * g.dh + 1;
}
template <class I>
__host__ __device__ inline I patch_cols(const GeoI<I>& g) {
  return (kTileW - 1) * g.sw + (g.kw - 1) * g.dw + 1;
}

template <class T, class I>
__global__ void depthwise_forward_tiled(const T* __restrict__ x, const T* __restrict__ w,
                                        const T* __restrict__ b, T* __restrict__ y,
                                        T* __restrict__ pre, GeoI<I> g, int act, int64_t plane0) {
  using A = at::opmath_type<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* patch = reinterpret_cast<A*>(smem_raw);
  const I prow = patch_rows(g), pcol = patch_cols(g), taps = g.kh * g.kw;
  A* wsh = patch + prow * pcol;
  const I plane = static_cast<I>(plane0 + blockIdx.z);  // n * c_out + co
  const I co = plane % g.c_out, n = plane / g.c_out;
  const I ci = co / (g.c_out / g.c_in);
  const I oh0 = static_cast<I>(blockIdx.y) * kTileH, ow0 = static_cast<I>(blockIdx.x) * kTileW;
  const I ih0 = oh0 * g.sh - g.pt, iw0 = ow0 * g.sw - g.pl;
  const T* xp = x + (n * g.c_in + ci) * g.h * g.w;
  const I tid = threadIdx.y * kTileW + threadIdx.x;
  for (I k = tid; k < prow * pcol; k += kThreads) {
    const I ih = ih0 + k / pcol, iw = iw0 + k % pcol;
    patch[k] = (ih >= 0 && ih < g.h && iw >= 0 && iw < g.w) ? A(xp[ih * g.w + iw]) : A(0);
  }
  for (I k = tid; k < taps; k += kThreads) wsh[k] = A(w[co * taps + k]);
  __syncthreads();
  const I oh = oh0 + threadIdx.y, ow = ow0 + threadIdx.x;
  if (oh >= g.oh || ow >= g.ow) return;
  A acc = b != nullptr ? A(b[co]) : A(0);
  const A* base = patch + threadIdx.y * g.sh * pcol + threadIdx.x * g.sw;
  for (I i = 0; i < g.kh; ++i) {
    for (I j = 0; j < g.kw; ++j) {
      acc += wsh[i * g.kw + j] * base[i * g.dh * pcol + j * g.dw];
    }
  }
  const I o = plane * g.oh * g.ow + oh * g.ow + ow;
  if (pre != nullptr) pre[o] = T(acc);
  y[o] = T(activate(acc, act));
}

template <class T, class I>
__global__ void depthwise_forward_direct(const T* __restrict__ x, const T* __restrict__ w,
                                         const T* __restrict__ b, T* __restrict__ y,
                                         T* __restrict__ pre, GeoI<I> g, int act) {
  using A = at::opmath_type<T>;
  const I total = g.n * g.c_out * g.oh * g.ow;
  for (I o = static_cast<I>(launch::grid_stride_first()); o < total;
       o += static_cast<I>(launch::grid_stride_step())) {
    const I ow = o % g.ow, oh = o / g.ow % g.oh, plane = o / (g.ow * g.oh);
    const I co = plane % g.c_out, n = plane / g.c_out, ci = co / (g.c_out / g.c_in);
    const T* xp = x + (n * g.c_in + ci) * g.h * g.w;
    const T* wp = w + co * g.kh * g.kw;
    A acc = b != nullptr ? A(b[co]) : A(0);
    for (I i = 0; i < g.kh; ++i) {
      const I ih = oh * g.sh - g.pt + i * g.dh;
      if (ih < 0 || ih >= g.h) continue;
      for (I j = 0; j < g.kw; ++j) {
        const I iw = ow * g.sw - g.pl + j * g.dw;
        if (iw < 0 || iw >= g.w) continue;
        acc += A(wp[i * g.kw + j]) * A(xp[ih * g.w + iw]);
      }
    }
    if (pre != nullptr) pre[o] = T(acc);
    y[o] = T(activate(acc, act));
  }
}

// Output index along one axis reached from input position `in` by tap `t`, or -1 (stride 1:
// no division).
template <bool kUnitStride, class I>
__device__ __forceinline__ I source_index(I in, I t, I pad, I dil, I stride, I out) {
  const I s = in + pad - t * dil;
  if constexpr (kUnitStride) {
    return s >= 0 && s < out ? s : I(-1);
  } else {
    if (s < 0 || s % stride != 0) return -1;
    const I o = s / stride;
    return o < out ? o : I(-1);
  }
}

template <class T, class I, bool kUnitStride>
__global__ void depthwise_backward_input(const T* __restrict__ gy, const T* __restrict__ w,
                                         T* __restrict__ gx, GeoI<I> g) {
  using A = at::opmath_type<T>;
  const I mult = g.c_out / g.c_in, total = g.n * g.c_in * g.h * g.w;
  for (I e = static_cast<I>(launch::grid_stride_first()); e < total;
       e += static_cast<I>(launch::grid_stride_step())) {
    const I iw = e % g.w, ih = e / g.w % g.h, plane = e / (g.w * g.h);
    const I ci = plane % g.c_in, n = plane / g.c_in;
    A acc = 0;
    for (I m = 0; m < mult; ++m) {
      const I co = ci * mult + m;
      const T* gp = gy + (n * g.c_out + co) * g.oh * g.ow;
      const T* wp = w + co * g.kh * g.kw;
      for (I i = 0; i < g.kh; ++i) {
        const I oh = source_index<kUnitStride>(ih, i, g.pt, g.dh, g.sh, g.oh);
        if (oh < 0) continue;
        for (I j = 0; j < g.kw; ++j) {
          const I ow = source_index<kUnitStride>(iw, j, g.pl, g.dw, g.sw, g.ow);
          if (ow < 0) continue;
          acc += A(wp[i * g.kw + j]) * A(gp[oh * g.ow + ow]);
        }
      }
    }
    gx[e] = T(acc);
  }
}

// One block per (channel, tap): sum over (n, oh, ow) of gy * x, tree-reduced in a fixed order.
template <class T, class I>
__global__ void depthwise_backward_weight(const T* __restrict__ gy, const T* __restrict__ x,
                                          T* __restrict__ gw, GeoI<I> g) {
  using A = at::opmath_type<T>;
  __shared__ A partial[kThreads];
  const I taps = g.kh * g.kw;
  const I co = static_cast<I>(blockIdx.x) / taps, tap = static_cast<I>(blockIdx.x) % taps;
  const I i = tap / g.kw, j = tap % g.kw, ci = co / (g.c_out / g.c_in);
  const I per_image = g.oh * g.ow;
  A acc = 0;
  for (I e = threadIdx.x; e < g.n * per_image; e += kThreads) {
    const I n = e / per_image, p = e % per_image, oh = p / g.ow, ow = p % g.ow;
    const I ih = oh * g.sh - g.pt + i * g.dh, iw = ow * g.sw - g.pl + j * g.dw;
    if (ih < 0 || ih >= g.h || iw < 0 || iw >= g.w) continue;
    acc +=
        A(gy[(n * g.c_out + co) * per_image + p]) * A(x[((n * g.c_in + ci) * g.h + ih) * g.w + iw]);
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) gw[co * taps + tap] = T(partial[0]);
}

// The weight gradient for KH x KW kernels (the common 3x3, 5x5, 7x7): a block sums every tap
// at once over its share of one channel's (n, oh, ow) positions (split `splits` ways, so that
// enough blocks fill the GPU), so grad_output is read once for all taps, not once per tap; each
// thread sums its positions in order, the lanes of a warp by a fixed shuffle tree, the warps in
// order; depthwise_weight_total then adds the splits in order. No float atomics: deterministic.
// acc[i * KW + j] += go * x[ih * row + iw * col] for the taps (ih = ih0 + i * dh, iw = iw0 + j *
// dw) inside the map: one output position's share of every tap's weight gradient (x: the
// channel's plane, element strides `row` and `col`: NCHW w and 1, NHWC w * C and C).
template <int KH, int KW, class A, class T, class I>
__device__ __forceinline__ void add_tap_products(A (&acc)[KH * KW], A go, const T* x, I ih0,
                                                 I iw0, const GeoI<I>& g, I row, I col) {
#pragma unroll
  for (int i = 0; i < KH; ++i) {
    const I ih = ih0 + i * g.dh;
    if (ih < 0 || ih >= g.h) continue;
#pragma unroll
    for (int j = 0; j < KW; ++j) {
      const I iw = iw0 + j * g.dw;
      if (iw >= 0 && iw < g.w) acc[i * KW + j] += go * A(x[ih * row + iw * col]);
    }
  }
}

// The output positions [begin, end) of split `split` of `splits` over `total`.
template <class I>
__device__ __forceinline__ void split_range(I total, int splits, int split, I& begin, I& end) {
  const I chunk = (total + splits - 1) / splits;
  begin = chunk * static_cast<I>(split);
  end = begin + chunk < total ? begin + chunk : total;
}

template <class T, class I, int KH, int KW>
__global__ void depthwise_weight_partials(const T* __restrict__ gy, const T* __restrict__ x,
                                          at::opmath_type<T>* __restrict__ partials, GeoI<I> g,
                                          int splits) {
  using A = at::opmath_type<T>;
  constexpr int kTaps = KH * KW, kWarps = kThreads / 32;
  __shared__ A warp_sums[kWarps][kTaps];
  const I co = static_cast<I>(blockIdx.x), ci = co / (g.c_out / g.c_in);
  const I per_image = g.oh * g.ow;
  I begin, end;
  split_range(g.n * per_image, splits, blockIdx.y, begin, end);
  A acc[kTaps];
#pragma unroll
  for (int t = 0; t < kTaps; ++t) acc[t] = A(0);
  for (I e = begin + threadIdx.x; e < end; e += kThreads) {
    const I n = e / per_image, p = e % per_image, oh = p / g.ow, ow = p % g.ow;
    const A go = A(gy[(n * g.c_out + co) * per_image + p]);
    add_tap_products<KH, KW>(acc, go, x + (n * g.c_in + ci) * g.h * g.w, oh * g.sh - g.pt,
                             ow * g.sw - g.pl, g, g.w, I(1));
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int t = 0; t < kTaps; ++t) {
    A v = acc[t];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) warp_sums[warp][t] = v;
  }
  __syncthreads();
  if (threadIdx.x < kTaps) {
    A sum = 0;
    for (int w = 0; w < kWarps; ++w) sum += warp_sums[w][threadIdx.x];
    partials[(static_cast<int64_t>(co) * splits + blockIdx.y) * kTaps + threadIdx.x] = sum;
  }
}

// gw[co, tap] = the sum over the splits, in order, of the partial sums.
template <class T>
__global__ void depthwise_weight_total(const at::opmath_type<T>* __restrict__ partials,
                                       T* __restrict__ gw, int64_t c_out, int64_t taps,
                                       int splits) {
  using A = at::opmath_type<T>;
  for (int64_t e = launch::grid_stride_first(); e < c_out * taps;
       e += launch::grid_stride_step()) {
    const int64_t co = e / taps, t = e % taps;
    A sum = 0;
    for (int s = 0; s < splits; ++s) sum += partials[(co * splits + s) * taps + t];
    gw[e] = T(sum);
  }
}

// The weight gradient through partial sums: partials(part) launches the kernel that writes
// [c_out][splits][taps] partial sums into `part`, then depthwise_weight_total adds them up.
template <class T, class Launch>
void weight_from_partials(T* gw, int64_t c_out, int64_t taps, int splits,
                          const at::TensorOptions& options, cudaStream_t stream,
                          Launch&& partials) {
  using A = at::opmath_type<T>;
  at::Tensor buffer =
      at::empty({c_out * splits * taps}, options.dtype(c10::CppTypeToScalarType<A>::value));
  A* part = buffer.mutable_data_ptr<A>();
  partials(part);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  depthwise_weight_total<T><<<launch::grid_stride_blocks(c_out * taps), kThreads, 0, stream>>>(
      part, gw, c_out, taps, splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class T, class I, int KH, int KW>
void run_weight_all_taps(const T* gy, const T* x, T* gw, const Geo& g, const GeoI<I>& geo,
                         const at::TensorOptions& options, cudaStream_t stream) {
  const int sms = launch::multiprocessor_count(options.device().index());
  const int64_t positions = g.n * g.oh * g.ow;
  // Four blocks per SM in all, each with at least a few thousand positions.
  const int splits = static_cast<int>(std::clamp<int64_t>(
      std::min((4 * int64_t{sms} + g.c_out - 1) / g.c_out, positions / 4096), 1, 64));
  weight_from_partials(gw, g.c_out, KH * KW, splits, options, stream, [&](auto* part) {
    depthwise_weight_partials<T, I, KH, KW>
        <<<dim3(static_cast<unsigned int>(g.c_out), splits), kThreads, 0, stream>>>(
            gy, x, part, geo, splits);
  });
}

// fn(std::integral_constant<int, K>{}) when the kernel (kh x kw) is K x K with K = 3, 5 or 7
// (the sizes the all-taps weight gradients are compiled for); false, without calling it,
// otherwise.
template <class F>
bool with_square_kernel(int64_t kh, int64_t kw, F&& fn) {
  if (kw != kh) return false;
  switch (kh) {
    case 3:
      fn(std::integral_constant<int, 3>{});
      return true;
    case 5:
      fn(std::integral_constant<int, 5>{});
      return true;
    case 7:
      fn(std::integral_constant<int, 7>{});
      return true;
    default:
      return false;
  }
}

// Launches the all-taps weight gradient when the kernel is 3x3, 5x5 or 7x7; false otherwise.
template <class T, class I>
bool launch_weight_all_taps(const T* gy, const T* x, T* gw, const Geo& g, const GeoI<I>& geo,
                            const at::TensorOptions& options, cudaStream_t stream) {
  if (g.c_out >= (int64_t{1} << 31)) return false;
  return with_square_kernel(g.kh, g.kw, [&](auto size) {
    constexpr int K = decltype(size)::value;
    run_weight_all_taps<T, I, K, K>(gy, x, gw, g, geo, options, stream);
  });
}

// ---------------------------------------------------------------- depthwise, channels_last
// Multiplier 1, maps in NHWC as they are (no layout copies): one thread per element, channels
// fastest, so that consecutive threads read and write consecutive channels of one pixel.

template <class T, class I>
__global__ void depthwise_forward_nhwc(const T* __restrict__ x, const T* __restrict__ w,
                                       const T* __restrict__ b, T* __restrict__ y,
                                       T* __restrict__ pre, GeoI<I> g, int act) {
  using A = at::opmath_type<T>;
  const I C = g.c_in, taps = g.kh * g.kw, total = g.n * g.oh * g.ow * C;
  for (I e = static_cast<I>(launch::grid_stride_first()); e < total;
       e += static_cast<I>(launch::grid_stride_step())) {
    const I c = e % C, pixel = e / C;
    const I ow = pixel % g.ow, oh = pixel / g.ow % g.oh, n = pixel / (g.ow * g.oh);
    const T* wp = w + c * taps;
    A acc = b != nullptr ? A(b[c]) : A(0);
    for (I i = 0; i < g.kh; ++i) {
      const I ih = oh * g.sh - g.pt + i * g.dh;
      if (ih < 0 || ih >= g.h) continue;
      const T* row = x + (n * g.h + ih) * g.w * C + c;
      for (I j = 0; j < g.kw; ++j) {
        const I iw = ow * g.sw - g.pl + j * g.dw;
        if (iw < 0 || iw >= g.w) continue;
        acc += A(wp[i * g.kw + j]) * A(row[iw * C]);
      }
    }
    if (pre != nullptr) pre[e] = T(acc);
    y[e] = T(activate(acc, act));
  }
}

template <class T, class I, bool kUnitStride>
__global__ void depthwise_backward_input_nhwc(const T* __restrict__ gy, const T* __restrict__ w,
                                              T* __restrict__ gx, GeoI<I> g) {
  using A = at::opmath_type<T>;
  const I C = g.c_in, taps = g.kh * g.kw, total = g.n * g.h * g.w * C;
  for (I e = static_cast<I>(launch::grid_stride_first()); e < total;
       e += static_cast<I>(launch::grid_stride_step())) {
    const I c = e % C, pixel = e / C;
    const I iw = pixel % g.w, ih = pixel / g.w % g.h, n = pixel / (g.w * g.h);
    const T* wp = w + c * taps;
    A acc = 0;
    for (I i = 0; i < g.kh; ++i) {
      const I oh = source_index<kUnitStride>(ih, i, g.pt, g.dh, g.sh, g.oh);
      if (oh < 0) continue;
      const T* row = gy + (n * g.oh + oh) * g.ow * C + c;
      for (I j = 0; j < g.kw; ++j) {
        const I ow = source_index<kUnitStride>(iw, j, g.pl, g.dw, g.sw, g.ow);
        if (ow < 0) continue;
        acc += A(wp[i * g.kw + j]) * A(row[ow * C]);
      }
    }
    gx[e] = T(acc);
  }
}

// The weight gradient's partial sums: block (channel block, split) walks the split's output
// positions in order, each thread one channel with an accumulator per tap; partials laid out
// [channel][split][tap], as depthwise_weight_total sums them.
template <class T, class I, int KH, int KW>
__global__ void depthwise_weight_partials_nhwc(const T* __restrict__ gy, const T* __restrict__ x,
                                               at::opmath_type<T>* __restrict__ partials,
                                               GeoI<I> g, int splits) {
  using A = at::opmath_type<T>;
  constexpr int kTaps = KH * KW;
  const I C = g.c_in;
  const I c = static_cast<I>(blockIdx.x) * kThreads + static_cast<I>(threadIdx.x);
  if (c >= C) return;
  const I per_image = g.oh * g.ow;
  I begin, end;
  split_range(g.n * per_image, splits, blockIdx.y, begin, end);
  A acc[kTaps];
#pragma unroll
  for (int t = 0; t < kTaps; ++t) acc[t] = A(0);
  for (I p = begin; p < end; ++p) {
    const I n = p / per_image, q = p % per_image, oh = q / g.ow, ow = q % g.ow;
    const A go = A(gy[p * C + c]);
    add_tap_products<KH, KW>(acc, go, x + n * g.h * g.w * C + c, oh * g.sh - g.pt,
                             ow * g.sw - g.pl, g, g.w * C, C);
  }
#pragma unroll
  for (int t = 0; t < kTaps; ++t) {
    partials[(static_cast<int64_t>(c) * splits + blockIdx.y) * kTaps + t] = acc[t];
  }
}

template <class T, class I, int KH, int KW>
void run_weight_nhwc(const T* gy, const T* x, T* gw, const Geo& g, const GeoI<I>& geo,
                     const at::TensorOptions& options, cudaStream_t stream) {
  const int sms = launch::multiprocessor_count(options.device().index());
  const int64_t channel_blocks = (g.c_in + kThreads - 1) / kThreads;
  const int64_t active = std::min<int64_t>(g.c_in, kThreads);  // working threads per block
  const int64_t positions = g.n * g.oh * g.ow;
  // Four blocks' worth of working threads per SM in all (more splits when fewer channels keep
  // a block's threads busy), each split with at least 64 positions.
  const int64_t wanted = (4 * int64_t{sms} * kThreads + channel_blocks * active - 1) /
                         (channel_blocks * active);
  const int splits =
      static_cast<int>(std::clamp<int64_t>(std::min(wanted, positions / 64), 1, 1024));
  weight_from_partials(gw, g.c_in, KH * KW, splits, options, stream, [&](auto* part) {
    depthwise_weight_partials_nhwc<T, I, KH, KW>
        <<<dim3(static_cast<unsigned int>(channel_blocks), splits), kThreads, 0, stream>>>(
            gy, x, part, geo, splits);
  });
}

// Whether channels_last depthwise convolutions of g run on the NHWC kernels: multiplier 1 and,
// when the backward needs the weight gradient, a 3x3, 5x5 or 7x7 kernel (with another kernel
// size, such a backward goes through NCHW copies, its input gradient included).
bool nhwc_depthwise(const ConvGeometry& g, at::MemoryFormat format, bool weight_gradient) {
  return format == at::MemoryFormat::ChannelsLast && g.depthwise() && g.c_out == g.c_in &&
         g.c_in < (int64_t{1} << 31) &&
         (!weight_gradient || with_square_kernel(g.kh, g.kw, [](auto) {}));
}

// Launches `unit` (the kernel specialized for stride 1) or `general` over `blocks` blocks.
template <class Unit, class General, class... Args>
void launch_by_stride(const Geo& g, unsigned int blocks, cudaStream_t stream, Unit unit,
                      General general, Args... args) {
  if (g.sh == 1 && g.sw == 1) {
    unit<<<blocks, kThreads, 0, stream>>>(args...);
  } else {
    general<<<blocks, kThreads, 0, stream>>>(args...);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// f(I{}) with the depthwise kernels' index type for g.
template <class F>
void with_index_type(const Geo& g, F&& f) {
  if (fits_int32(g)) return f(int32_t{});
  f(int64_t{});
}

// ---------------------------------------------------------------- general (im2col + GEMM)

// col[b, r, p] for images n0 + b of group grp: r = (ci * kh + i) * kw + j, p = oh * ow + ow.
template <class T>
__global__ void im2col_kernel(const T* __restrict__ x, T* __restrict__ col, Geo g, int64_t n0,
                              int64_t nb, int64_t grp) {
  const int64_t cin = g.c_in / g.groups, K = cin * g.kh * g.kw, P = g.oh * g.ow;
  const int64_t total = nb * K * P;
  for (int64_t e = launch::grid_stride_first(); e < total;
       e += launch::grid_stride_step()) {
    const int64_t p = e % P, r = e / P % K, b = e / (P * K);
    const int64_t j = r % g.kw, i = r / g.kw % g.kh, ci = r / (g.kw * g.kh);
    const int64_t oh = p / g.ow, ow = p % g.ow;
    const int64_t ih = oh * g.sh - g.pt + i * g.dh, iw = ow * g.sw - g.pl + j * g.dw;
    const bool inside = ih >= 0 && ih < g.h && iw >= 0 && iw < g.w;
    col[e] = inside ? x[(((n0 + b) * g.c_in + grp * cin + ci) * g.h + ih) * g.w + iw] : T(0);
  }
}

// grad_input[n0 + b, grp * cin + ci, ih, iw] = sum over the taps that reach it of dcol.
template <class T>
__global__ void col2im_kernel(const T* __restrict__ dcol, T* __restrict__ gx, Geo g, int64_t n0,
                              int64_t nb, int64_t grp) {
  using A = at::opmath_type<T>;
  const int64_t cin = g.c_in / g.groups, K = cin * g.kh * g.kw, P = g.oh * g.ow;
  const int64_t total = nb * cin * g.h * g.w;
  for (int64_t e = launch::grid_stride_first(); e < total;
       e += launch::grid_stride_step()) {
    const int64_t iw = e % g.w, ih = e / g.w % g.h, ci = e / (g.w * g.h) % cin;
    const int64_t b = e / (g.w * g.h * cin);
    A acc = 0;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t oh = source_index<false>(ih, i, g.pt, g.dh, g.sh, g.oh);
      if (oh < 0) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t ow = source_index<false>(iw, j, g.pl, g.dw, g.sw, g.ow);
        if (ow < 0) continue;
        acc += A(dcol[(b * K + (ci * g.kh + i) * g.kw + j) * P + oh * g.ow + ow]);
      }
    }
    gx[(((n0 + b) * g.c_in + grp * cin + ci) * g.h + ih) * g.w + iw] = T(acc);
  }
}

// out[n0 + b, grp * cout + r, p] = act(ybuf[b, r, p] + bias), preact alike.
template <class T>
__global__ void epilogue_kernel(const T* __restrict__ ybuf, const T* __restrict__ bias,
                                T* __restrict__ out, T* __restrict__ pre, Geo g, int64_t n0,
                                int64_t nb, int64_t grp, int act) {
  using A = at::opmath_type<T>;
  const int64_t cout = g.c_out / g.groups, P = g.oh * g.ow, total = nb * cout * P;
  for (int64_t e = launch::grid_stride_first(); e < total;
       e += launch::grid_stride_step()) {
    const int64_t p = e % P, r = e / P % cout, b = e / (P * cout);
    const int64_t c = grp * cout + r;
    const A v = A(ybuf[e]) + (bias != nullptr ? A(bias[c]) : A(0));
    const int64_t o = ((n0 + b) * g.c_out + c) * P + p;
    if (pre != nullptr) pre[o] = T(v);
    out[o] = T(activate(v, act));
  }
}

// Images per chunk: the column buffer of one chunk stays under about 256 MiB.
int64_t chunk_images(const Geo& g, int64_t element_size) {
  const int64_t per_image =
      std::max<int64_t>(1, (g.c_in / g.groups) * g.kh * g.kw * g.oh * g.ow * element_size);
  return std::clamp<int64_t>((int64_t{256} << 20) / per_image, 1, std::max<int64_t>(g.n, 1));
}

// Dense float32, bfloat16 and float16 go to ATen's convolution (cuDNN, under PyTorch's TF32
// policy for cuDNN convolutions, torch.backends.cudnn.allow_tf32) when cuDNN is there: its
// implicit GEMM beats our im2col + cuBLAS by ~10x on an H200. float64, depthwise and
// four-sided padding stay ours.
bool vendor_route(const ConvGeometry& g, at::IntArrayRef padding4, at::ScalarType dtype) {
  const bool cudnn = at::Context::hasCuDNN() && at::globalContext().userEnabledCuDNN();
  return takes_vendor_route(g, padding4, dtype, cudnn);
}

at::Tensor activate_tensor(const at::Tensor& v, Activation act) {
  switch (act) {
    case Activation::Relu:
      return at::relu(v);
    case Activation::Silu:
      return at::silu(v);
    case Activation::Gelu:
      return at::gelu(v, "none");
    default:
      return v;
  }
}

// ---------------------------------------------------------------- entry points

std::tuple<at::Tensor, at::Tensor> conv_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding4, at::IntArrayRef dilation, int64_t groups,
    std::string_view activation, bool save_preact) {
  check_conv_args("dilated_conv2d", input, weight, bias, stride, padding4, dilation, groups);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto act = parse_activation(activation);
  const auto cg = make_geometry(input, weight, stride, padding4, dilation, groups);
  const Geo g = to_geo(cg);
  const bool with_preact = save_preact && backward_needs_preact(act);
  const auto format = conv_memory_format(input);
  if (vendor_route(cg, padding4, input.scalar_type())) {
    auto z = at::convolution(input, weight, bias, stride, {padding4[0], padding4[1]}, dilation,
                             false, {0, 0}, groups)
                 .contiguous(format);
    // One pass for the activation: a new tensor when the pre-activation is kept, else in place.
    if (with_preact) return {activate_tensor(z, act), z};
    activate_(z, act);
    return {z, at::empty({0}, input.options())};
  }
  const auto w = weight.contiguous();
  const auto b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (nhwc_depthwise(cg, format, false)) {
    const auto x = input.contiguous(at::MemoryFormat::ChannelsLast);
    const auto options = x.options().memory_format(at::MemoryFormat::ChannelsLast);
    auto out = at::empty({g.n, g.c_out, g.oh, g.ow}, options);
    auto pre = with_preact ? at::empty({g.n, g.c_out, g.oh, g.ow}, options)
                           : at::empty({0}, input.options());
    if (out.numel() > 0) {
      dispatch_float_types(x.scalar_type(), "dilated_conv2d", [&](auto tag) {
        using T = decltype(tag);
        with_index_type(g, [&](auto index_tag) {
          using I = decltype(index_tag);
          depthwise_forward_nhwc<T, I>
              <<<launch::grid_stride_blocks(out.numel()), kThreads, 0, stream>>>(
                  x.const_data_ptr<T>(), w.const_data_ptr<T>(),
                  b.defined() ? b.const_data_ptr<T>() : nullptr, out.mutable_data_ptr<T>(),
                  with_preact ? pre.mutable_data_ptr<T>() : nullptr, geo_as<I>(g),
                  static_cast<int>(act));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    }
    return {out, pre};
  }
  const auto x = input.contiguous();
  auto out = at::empty({g.n, g.c_out, g.oh, g.ow}, x.options());
  auto pre = with_preact ? at::empty_like(out) : at::Tensor();
  if (out.numel() > 0) {
    dispatch_float_types(x.scalar_type(), "dilated_conv2d", [&](auto tag) {
      using T = decltype(tag);
      using A = at::opmath_type<T>;
      const T* bp = b.defined() ? b.const_data_ptr<T>() : nullptr;
      T* pp = with_preact ? pre.mutable_data_ptr<T>() : nullptr;
      if (cg.depthwise()) {
        with_index_type(g, [&](auto index_tag) {
          using I = decltype(index_tag);
          const GeoI<I> gi = geo_as<I>(g);
          const GeoI<int64_t> gl = geo_as<int64_t>(g);
          const int64_t smem = (patch_rows(gl) * patch_cols(gl) + g.kh * g.kw) * sizeof(A);
          const int64_t row_tiles = (g.oh + kTileH - 1) / kTileH;
          // (Strides, dilations and kernel sizes beyond 2^16 could wrap the patch's size.)
          const bool modest = std::max({g.sh, g.sw, g.dh, g.dw, g.kh, g.kw}) <= (1 << 16);
          if (modest && smem <= kMaxSharedBytes && row_tiles <= 65535) {
            // Planes go on grid.z, at most 65535 per launch.
            const int64_t planes = g.n * g.c_out;
            for (int64_t plane0 = 0; plane0 < planes; plane0 += 65535) {
              const dim3 grid((g.ow + kTileW - 1) / kTileW, row_tiles,
                              std::min<int64_t>(65535, planes - plane0));
              depthwise_forward_tiled<T, I><<<grid, dim3(kTileW, kTileH), smem, stream>>>(
                  x.const_data_ptr<T>(), w.const_data_ptr<T>(), bp, out.mutable_data_ptr<T>(),
                  pp, gi, static_cast<int>(act), plane0);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            }
          } else {
            depthwise_forward_direct<T, I>
                <<<launch::grid_stride_blocks(out.numel()), kThreads, 0, stream>>>(
                    x.const_data_ptr<T>(), w.const_data_ptr<T>(), bp, out.mutable_data_ptr<T>(),
                    pp, gi, static_cast<int>(act));
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        });
        return;
      }
      const int64_t cin = g.c_in / g.groups, cout = g.c_out / g.groups;
      const int64_t K = cin * g.kh * g.kw, P = g.oh * g.ow;
      const int64_t chunk = chunk_images(g, x.element_size());
      const auto w3 = w.view({g.groups, cout, K});
      auto col = at::empty({chunk, K, P}, x.options());
      for (int64_t n0 = 0; n0 < g.n; n0 += chunk) {
        const int64_t nb = std::min(chunk, g.n - n0);
        auto colb = col.narrow(0, 0, nb);
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          im2col_kernel<T><<<launch::grid_stride_blocks(nb * K * P), kThreads, 0, stream>>>(
              x.const_data_ptr<T>(), colb.mutable_data_ptr<T>(), g, n0, nb, grp);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          const auto ybuf = at::matmul(w3[grp], colb).contiguous();  // [nb, cout, P]
          epilogue_kernel<T><<<launch::grid_stride_blocks(ybuf.numel()), kThreads, 0, stream>>>(
              ybuf.const_data_ptr<T>(), bp, out.mutable_data_ptr<T>(), pp, g, n0, nb, grp,
              static_cast<int>(act));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
    });
  }
  return {out.contiguous(format),
          with_preact ? pre.contiguous(format) : at::empty({0}, input.options())};
}

// The backward of a channels_last depthwise convolution (see nhwc_depthwise) on NHWC maps.
std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_backward_nhwc(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& saved, const Geo& g, Activation act, std::array<bool, 3> output_mask) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  const auto gy = activation_backward(grad_output, saved, act).contiguous(cl);
  const auto x = input.contiguous(cl);
  const auto w = weight.contiguous();
  const auto none = at::empty({0}, input.options());
  at::Tensor gi = output_mask[0] ? at::empty_like(x, x.options().memory_format(cl)) : none;
  at::Tensor gw = output_mask[1] ? at::empty_like(w) : none;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (gy.numel() == 0 || x.numel() == 0) {  // nothing to sum: zero gradients, as on the CPU
    if (output_mask[0]) gi.zero_();
    if (output_mask[1]) gw.zero_();
  } else {
    dispatch_float_types(x.scalar_type(), "dilated_conv2d backward", [&](auto tag) {
      using T = decltype(tag);
      with_index_type(g, [&](auto index_tag) {
        using I = decltype(index_tag);
        const GeoI<I> geo = geo_as<I>(g);
        if (output_mask[0]) {
          launch_by_stride(g, launch::grid_stride_blocks(gi.numel()), stream,
                           depthwise_backward_input_nhwc<T, I, true>,
                           depthwise_backward_input_nhwc<T, I, false>, gy.const_data_ptr<T>(),
                           w.const_data_ptr<T>(), gi.mutable_data_ptr<T>(), geo);
        }
        if (output_mask[1]) {
          const T* gyp = gy.const_data_ptr<T>();
          const T* xp = x.const_data_ptr<T>();
          T* gwp = gw.mutable_data_ptr<T>();
          const auto options = x.options();
          const bool done = with_square_kernel(g.kh, g.kw, [&](auto size) {
            constexpr int K = decltype(size)::value;
            run_weight_nhwc<T, I, K, K>(gyp, xp, gwp, g, geo, options, stream);
          });
          TORCH_CHECK(done, "dilated_conv2d: no NHWC weight gradient for a ", g.kh, "x", g.kw,
                      " kernel (internal routing error)");
        }
      });
    });
  }
  return {gi, gw,
          output_mask[2]
              ? gy.sum({0, 2, 3}, false, at::toOpMathType(gy.scalar_type())).to(gy.scalar_type())
              : none};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& saved, at::IntArrayRef stride, at::IntArrayRef padding4,
    at::IntArrayRef dilation, int64_t groups, std::string_view activation,
    std::array<bool, 3> output_mask) {
  const auto act = parse_activation(activation);
  check_conv_backward_args(grad_output, input, weight, saved, stride, padding4, dilation, groups,
                           act);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto cg = make_geometry(input, weight, stride, padding4, dilation, groups);
  const Geo g = to_geo(cg);
  const auto format = conv_memory_format(input);
  const auto none = at::empty({0}, input.options());
  if (vendor_route(cg, padding4, input.scalar_type())) {
    return vendor_conv_backward(grad_output, input, weight, saved, stride, padding4, dilation,
                                groups, act, output_mask);
  }
  if (nhwc_depthwise(cg, format, output_mask[1])) {
    return depthwise_backward_nhwc(grad_output, input, weight, saved, g, act, output_mask);
  }
  const auto gy = activation_backward(grad_output, saved, act).contiguous();
  const auto x = input.contiguous();
  const auto w = weight.contiguous();
  at::Tensor gi = output_mask[0] ? at::empty_like(x) : at::Tensor();
  at::Tensor gw = output_mask[1] ? at::empty_like(w) : at::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (gy.numel() == 0 || x.numel() == 0) {  // nothing to sum: zero gradients, as on the CPU
    if (gi.defined()) gi.zero_();
    if (gw.defined()) gw.zero_();
  } else {
    dispatch_float_types(x.scalar_type(), "dilated_conv2d backward", [&](auto tag) {
      using T = decltype(tag);
      if (cg.depthwise()) {
        with_index_type(g, [&](auto index_tag) {
          using I = decltype(index_tag);
          const GeoI<I> geo = geo_as<I>(g);
          if (gi.defined()) {
            launch_by_stride(g, launch::grid_stride_blocks(gi.numel()), stream,
                             depthwise_backward_input<T, I, true>,
                             depthwise_backward_input<T, I, false>, gy.const_data_ptr<T>(),
                             w.const_data_ptr<T>(), gi.mutable_data_ptr<T>(), geo);
          }
          if (gw.defined() &&
              !launch_weight_all_taps<T, I>(gy.const_data_ptr<T>(), x.const_data_ptr<T>(),
                                            gw.mutable_data_ptr<T>(), g, geo, x.options(),
                                            stream)) {
            depthwise_backward_weight<T, I><<<g.c_out * g.kh * g.kw, kThreads, 0, stream>>>(
                gy.const_data_ptr<T>(), x.const_data_ptr<T>(), gw.mutable_data_ptr<T>(), geo);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        });
        return;
      }
      const int64_t cin = g.c_in / g.groups, cout = g.c_out / g.groups;
      const int64_t K = cin * g.kh * g.kw, P = g.oh * g.ow;
      const int64_t chunk = chunk_images(g, x.element_size());
      const auto w3 = w.view({g.groups, cout, K});
      const auto gy3 = gy.view({g.n, g.c_out, P});
      auto col = at::empty({chunk, K, P}, x.options());
      at::Tensor gw_acc;
      if (gw.defined()) {
        gw_acc =
            at::zeros({g.groups, cout, K}, x.options().dtype(at::toOpMathType(x.scalar_type())));
      }
      for (int64_t n0 = 0; n0 < g.n; n0 += chunk) {
        const int64_t nb = std::min(chunk, g.n - n0);
        auto colb = col.narrow(0, 0, nb);
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          const auto gyb = gy3.narrow(0, n0, nb).narrow(1, grp * cout, cout);  // [nb, cout, P]
          if (gw.defined()) {
            im2col_kernel<T><<<launch::grid_stride_blocks(nb * K * P), kThreads, 0, stream>>>(
                x.const_data_ptr<T>(), colb.mutable_data_ptr<T>(), g, n0, nb, grp);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            // One GEMM over the chunk's nb * P columns (cuBLAS accumulates in float32): [cout, K].
            const auto gy2 = gyb.permute({1, 0, 2}).reshape({cout, nb * P});
            const auto col2 = colb.permute({1, 0, 2}).reshape({K, nb * P});
            gw_acc[grp] += at::matmul(gy2, col2.t()).to(gw_acc.scalar_type());
          }
          if (gi.defined()) {
            const auto dcol = at::matmul(w3[grp].t(), gyb).contiguous();  // [nb, K, P]
            col2im_kernel<T><<<launch::grid_stride_blocks(nb * cin * g.h * g.w), kThreads, 0, stream>>>(
                dcol.const_data_ptr<T>(), gi.mutable_data_ptr<T>(), g, n0, nb, grp);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        }
      }
      if (gw.defined()) gw.copy_(gw_acc.view(w.sizes()));
    });
  }
  return {output_mask[0] ? gi.contiguous(format) : none, output_mask[1] ? gw : none,
          output_mask[2]
              ? gy.sum({0, 2, 3}, false, at::toOpMathType(gy.scalar_type())).to(gy.scalar_type())
              : none};
}

std::string conv_route_cuda(const at::Tensor& input, const at::Tensor& weight,
                            at::IntArrayRef padding4, int64_t groups) {
  check_route_args(input, weight, padding4, groups);
  const auto g = route_geometry(input, padding4, groups);
  if (vendor_route(g, padding4, input.scalar_type())) return "vendor";
  return g.depthwise() ? "depthwise" : "gemm";
}

}  // namespace
}  // namespace torch_ext::conv_impl

TORCH_LIBRARY_IMPL(torch_ext, CUDA, m) {
  m.impl("_dilated_conv2d_route", torch_ext::conv_impl::conv_route_cuda);
  m.impl("_dilated_conv2d_forward", torch_ext::conv_impl::conv_forward_cuda);
  m.impl("_dilated_conv2d_backward", torch_ext::conv_impl::conv_backward_cuda);
}
