// CPU loops of dilated_conv2d. Compiled once per CPU capability (DEFAULT, AVX2, AVX512; see
// CMakeLists.txt); float and double. Every output element is written by one thread and summed in
// a fixed order, so results are deterministic for a given thread count.
//
// Depthwise: one input plane per task, copied into a zero-padded buffer so that no tap needs a
// bounds check. Forward: at stride 1 with square kernels of width 3, 5, 7, register tiles of four
// output rows a dilation apart, the epilogue (bias, activation, rounding) in registers
// (nchw_plane_tiles); otherwise each output row accumulated in registers across all taps and
// through the epilogue while it is in L1, at stride 2 along the width on the padded rows split
// into even and odd columns (split_even_odd: each tap's columns consecutive). With stride 1 the
// input gradient is the same kernel on the padded output gradient with the taps flipped (a
// gather; with multiplier 1 and the tiles' kernels, the tiled forward itself, conv_cpu.cpp); with
// larger strides it is a scatter that stays inside the plane its task owns. The weight gradient
// (float maps, kernels 3, 5, 7 wide at stride 1 along the width) sums each plane in vector
// registers, flushed to double every few rows (plane_weight_sums); otherwise a dot product per
// tap and output row (stride 2: on the split rows); summed in double per channel (the bias
// gradient, when asked for, beside it).
// channels_last (NHWC) input with multiplier 1 goes through its own forward and weight gradient.
// The forward at stride 1 with square kernels of width 3, 5, 7 (not float64) runs register tiles
// read straight from the map on AVX-512 (depthwise_forward_nhwc_tiles); otherwise a group of
// channel blocks at a time, the rows the kernel spans held in small rings (the
// forward's in the map's own type, half types widened as the taps load them, bfloat16 a pair of
// lanes at a time (split_pairs); stride-1 rows in runs of pixels a dilation apart; the weight
// gradient's in the compute type; see NhwcRings, depthwise_forward_nhwc,
// depthwise_backward_weight_nhwc); its input gradient at stride 1 is that forward on the flipped
// taps (conv_cpu.cpp).

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include <unistd.h>

#include "common/cpu_kernel_utils.h"
#include "common/dispatch.h"
#include "ops/conv/conv_cpu_kernel.h"

namespace torch_ext::conv_impl {
inline namespace CPU_CAPABILITY {
namespace {

template <class T>
using Vec = at::vec::Vectorized<T>;

// The type a map of S is computed in: double for double, float otherwise.
template <class S>
using compute_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

// Whether the kernels of maps of S get copies unrolled for the common kernel widths (3, 5, 7:
// the NHWC loops, the NCHW forward's tiles and weight-gradient plane sums): in the vector copies
// of the kernels, for every type but double; the DEFAULT copy (vectors
// emulated in scalar code, for CPUs without AVX2) keeps the any-width loops only, which compile
// in a fraction of the time (the unrolled copies are most of this file's compile time, several
// times that under the sanitizers).
template <class S>
constexpr bool kUnrolledWidths =
#if defined(CPU_CAPABILITY_DEFAULT)
    false;
#else
    !std::is_same_v<S, double>;
#endif

// dst[k] = T(src[k]) for k < n: a copy, or half types widened to float a vector at a time.
template <class S, class T>
inline void widen(const S* __restrict__ src, T* __restrict__ dst, int64_t n) {
  if constexpr (std::is_same_v<S, T>) {
    std::memcpy(dst, src, n * sizeof(T));
  } else {
    static_assert(std::is_same_v<T, float>);
    constexpr int64_t L = Vec<float>::size();
    int64_t k = 0;
    for (; k + 2 * L <= n; k += 2 * L) {
      Vec<float> lo, hi;
      at::vec::load_to_float<S>(src + k, lo, hi);
      lo.store(dst + k);
      hi.store(dst + k + L);
    }
    for (; k < n; ++k) dst[k] = static_cast<float>(src[k]);
  }
}

// dst[k] = S(src[k]) for k < n: a copy, or float rounded to a half type.
template <class T, class S>
inline void narrow(const T* __restrict__ src, S* __restrict__ dst, int64_t n) {
  if constexpr (std::is_same_v<S, T>) {
    std::memcpy(dst, src, n * sizeof(T));
  } else {
    at::vec::convert(src, dst, n);
  }
}

// y[k] += a * x[k] for k < n.
template <class T>
inline void axpy(T* __restrict__ y, const T* __restrict__ x, T a, int64_t n) {
  constexpr int64_t L = Vec<T>::size();
  const Vec<T> va(a);
  int64_t k = 0;
  for (; k + L <= n; k += L) {
    at::vec::fmadd(Vec<T>::loadu(x + k), va, Vec<T>::loadu(y + k)).store(y + k);
  }
  for (; k < n; ++k) y[k] += a * x[k];
}

// y[k] += x[k] for k < n.
template <class T>
inline void add_to(T* __restrict__ y, const T* __restrict__ x, int64_t n) {
  constexpr int64_t L = Vec<T>::size();
  int64_t k = 0;
  for (; k + L <= n; k += L) (Vec<T>::loadu(y + k) + Vec<T>::loadu(x + k)).store(y + k);
  for (; k < n; ++k) y[k] += x[k];
}

// sum of a[k] * b[k] for k < n, in the vector width's partial sums, then across them.
template <class T>
inline T dot(const T* a, const T* b, int64_t n) {
  constexpr int64_t L = Vec<T>::size();
  Vec<T> acc0(T(0)), acc1(T(0));
  int64_t k = 0;
  for (; k + 2 * L <= n; k += 2 * L) {
    acc0 = at::vec::fmadd(Vec<T>::loadu(a + k), Vec<T>::loadu(b + k), acc0);
    acc1 = at::vec::fmadd(Vec<T>::loadu(a + k + L), Vec<T>::loadu(b + k + L), acc1);
  }
  for (; k + L <= n; k += L)
    acc0 = at::vec::fmadd(Vec<T>::loadu(a + k), Vec<T>::loadu(b + k), acc0);
  T lanes[L];
  (acc0 + acc1).store(lanes);
  T sum = 0;
  for (int64_t l = 0; l < L; ++l) sum += lanes[l];
  for (; k < n; ++k) sum += a[k] * b[k];
  return sum;
}

// The output columns [lo, hi) of a tap whose input column (ow * stride + offset) lies in
// [0, size), among out columns.
inline void tap_columns(int64_t offset, int64_t stride, int64_t size, int64_t out, int64_t& lo,
                        int64_t& hi) {
  lo = offset >= 0 ? 0 : (-offset - 1) / stride + 1;  // ceil(-offset / stride), no overflow
  hi = size - 1 - offset >= 0 ? std::min(out, (size - 1 - offset) / stride + 1) : 0;
  lo = std::min(lo, out);
  hi = std::max(hi, lo);
}

template <class T>
inline Vec<T> activate(const Vec<T>& v, Activation act) {
  switch (act) {
    case Activation::Relu:
      return at::vec::clamp_min(v, Vec<T>(T(0)));  // NaN stays NaN, like torch.relu
    case Activation::Silu:
      return v / (Vec<T>(T(1)) + v.neg().exp());
    case Activation::Gelu:
      return v * Vec<T>(T(0.5)) * (Vec<T>(T(1)) + (v * Vec<T>(T(M_SQRT1_2))).erf());
    default:
      return v;
  }
}

// data[k] = act(data[k] + bias), preact[k] = data[k] + bias (when preact), k < n.
template <class T>
inline void epilogue_row(T* data, int64_t n, T bias, T* preact, Activation act) {
  constexpr int64_t L = Vec<T>::size();
  if (act == Activation::None && preact == nullptr && bias == T(0)) return;
  const Vec<T> vb(bias);
  for (int64_t k = 0; k < n; k += L) {
    const int64_t count = std::min(L, n - k);
    const auto v = Vec<T>::loadu(data + k, count) + vb;
    if (preact != nullptr) v.store(preact + k, count);
    activate(v, act).store(data + k, count);
  }
}

// out[k] (+)= sum over taps t of weight[t] * base[k + offset[t]], k < n: the output row in
// registers (four vectors at a time) across all taps, each input element loaded once per tap.
// The caller guarantees that every base[k + offset[t]] is inside its (zero-padded) buffer.
template <class T>
inline void tap_rows(const T* base, const int64_t* offset, const Vec<T>* weight, int64_t taps,
                     T* out, int64_t n, bool accumulate) {
  constexpr int64_t L = Vec<T>::size();
  int64_t k = 0;
  for (; k + 4 * L <= n; k += 4 * L) {
    Vec<T> a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
    if (accumulate) {
      a0 = Vec<T>::loadu(out + k);
      a1 = Vec<T>::loadu(out + k + L);
      a2 = Vec<T>::loadu(out + k + 2 * L);
      a3 = Vec<T>::loadu(out + k + 3 * L);
    }
    for (int64_t t = 0; t < taps; ++t) {
      const T* p = base + k + offset[t];
      a0 = at::vec::fmadd(Vec<T>::loadu(p), weight[t], a0);
      a1 = at::vec::fmadd(Vec<T>::loadu(p + L), weight[t], a1);
      a2 = at::vec::fmadd(Vec<T>::loadu(p + 2 * L), weight[t], a2);
      a3 = at::vec::fmadd(Vec<T>::loadu(p + 3 * L), weight[t], a3);
    }
    a0.store(out + k);
    a1.store(out + k + L);
    a2.store(out + k + 2 * L);
    a3.store(out + k + 3 * L);
  }
  for (; k < n; k += L) {
    const int64_t count = std::min(L, n - k);
    Vec<T> acc = accumulate ? Vec<T>::loadu(out + k, count) : Vec<T>(T(0));
    for (int64_t t = 0; t < taps; ++t) {
      acc = at::vec::fmadd(Vec<T>::loadu(base + k + offset[t], count), weight[t], acc);
    }
    acc.store(out + k, count);
  }
}

// Copies plane [rows, cols] into buf [prows, pcols] at (row0, col0) (which may be negative:
// cropped), zero everywhere else.
template <class S, class T>
inline void pad_plane(const S* plane, int64_t rows, int64_t cols, T* buf, int64_t prows,
                      int64_t pcols, int64_t row0, int64_t col0) {
  const int64_t c_lo = std::clamp<int64_t>(col0, 0, pcols);
  const int64_t c_hi = std::clamp<int64_t>(col0 + cols, c_lo, pcols);
  for (int64_t r = 0; r < prows; ++r) {
    T* dst = buf + r * pcols;
    const int64_t src_row = r - row0;
    if (src_row < 0 || src_row >= rows || c_hi <= c_lo) {
      std::fill(dst, dst + pcols, T(0));
      continue;
    }
    std::fill(dst, dst + c_lo, T(0));
    widen(plane + src_row * cols + (c_lo - col0), dst + c_lo, c_hi - c_lo);
    std::fill(dst + c_hi, dst + pcols, T(0));
  }
}

// ---------------------------------------------------------------- depthwise

// Each row of buf [rows, cols] rearranged as its even columns followed by its odd ones
// ((cols + 1) / 2 and cols / 2 of them), through tmp (cols elements): the taps of a stride-2 row
// then read consecutive elements.
template <class T>
inline void split_even_odd(T* buf, int64_t rows, int64_t cols, T* tmp) {
  constexpr int64_t L = Vec<T>::size();
  const int64_t evens = (cols + 1) / 2;
  for (int64_t r = 0; r < rows; ++r) {
    T* row = buf + r * cols;
    int64_t c = 0;
    for (; c + 2 * L <= cols; c += 2 * L) {
      const auto halves =
          at::vec::deinterleave2(Vec<T>::loadu(row + c), Vec<T>::loadu(row + c + L));
      halves.first.store(tmp + c / 2);
      halves.second.store(tmp + evens + c / 2);
    }
    for (; c < cols; ++c) tmp[(c % 2 == 0 ? 0 : evens) + c / 2] = row[c];
    std::memcpy(row, tmp, cols * sizeof(T));
  }
}

// Where column col of a row lies once split_even_odd has split it (evens = (cols + 1) / 2).
inline int64_t split_column(int64_t col, int64_t evens) {
  return col % 2 == 0 ? col / 2 : evens + col / 2;
}


// The zero-padded input plane every tap of every output reads: rows ih + pad_top, columns
// iw + pad_left.
inline int64_t padded_rows(const ConvGeometry& g) {
  return (g.oh - 1) * g.stride_h + (g.kh - 1) * g.dil_h + 1;
}
inline int64_t padded_cols(const ConvGeometry& g) {
  return (g.ow - 1) * g.stride_w + (g.kw - 1) * g.dil_w + 1;
}

// v stored at p (aligned to the vector's size) past the caches, a non-temporal store, where the
// instruction set has one. The caller fences (store_fence) before another thread reads the data.
template <class S>
C10_ALWAYS_INLINE void store_streaming(const Vec<S>& v, S* p) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<S, float>) {
    _mm512_stream_ps(p, v);
  } else if constexpr (std::is_same_v<S, double>) {
    _mm512_stream_pd(p, v);
  } else {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<S, float>) {
    _mm256_stream_ps(p, v);
  } else if constexpr (std::is_same_v<S, double>) {
    _mm256_stream_pd(p, v);
  } else {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
  }
#else
  v.store(p);
#endif
}

// Orders this thread's streaming stores before its later stores (the end of a parallel task).
inline void store_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Whether a forward writes its outputs (and pre-activations) with streaming stores: more than a
// megabyte of them per thread (they leave the caches before anything reads them), and every
// whole vector of S aligned: the maps y and pre (or nullptr) and each run of `unit` elements
// (C for NHWC, ow for NCHW).
template <class S>
bool stream_outputs(int64_t elements, int64_t unit, const S* y, const S* pre) {
  constexpr int64_t kStream = 1 << 20, kAlign = int64_t(sizeof(Vec<S>));
  const auto aligned = [](const S* p) {
    return p == nullptr || reinterpret_cast<uintptr_t>(p) % kAlign == 0;
  };
  return elements * int64_t(sizeof(S)) >= kStream * at::get_num_threads() &&
         (unit * int64_t(sizeof(S))) % kAlign == 0 && aligned(y) && aligned(pre);
}

// The next task's `lines` cache lines from `base` (nullptr: none), prefetched `share` lines at
// each step() of this task's sweep, so that they arrive while this task computes.
class SweepPrefetch {
 public:
  SweepPrefetch(const void* base, int64_t lines, int64_t share)
      : base_(static_cast<const char*>(base)), lines_(base == nullptr ? 0 : lines),
        share_(share) {}
  C10_ALWAYS_INLINE void step() {
    for (const int64_t end = std::min(lines_, fetched_ + share_); fetched_ < end; ++fetched_) {
      __builtin_prefetch(base_ + fetched_ * 64, 0, 3);
    }
  }

 private:
  const char* base_;
  int64_t lines_, share_, fetched_ = 0;
};

#if defined(CPU_CAPABILITY_AVX512)
// Two vectors of floats rounded to bfloat16 by the CPU (VCVTNE2PS2BF16 of AVX512_BF16), lo's
// lanes in the low half. Inline assembly rather than the intrinsic: the AVX-512 copy is not
// compiled for AVX512_BF16 (the compiler could then place its instructions anywhere), and the
// kernels take this path only where the CPU has it (DepthwiseForwardArgs::native_bf16). About a
// tenth of the bfloat16 NHWC forward's time went into rounding in software (Zen 5).
C10_ALWAYS_INLINE __m512i native_bf16(const Vec<float>& lo, const Vec<float>& hi) {
  __m512i packed;
  asm("vcvtne2ps2bf16 {%2, %1, %0|%0, %1, %2}" : "=v"(packed) : "v"(__m512(hi)), "v"(__m512(lo)));
  return packed;
}
#endif

// Two vectors of floats as one of the half type S (a's lanes first), rounded to nearest even:
// by the CPU where `native` (bfloat16, AVX-512 copy), else as at::vec rounds.
template <class S>
C10_ALWAYS_INLINE Vec<S> round_pair(const Vec<float>& a, const Vec<float>& b, bool native) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    if (native) return Vec<S>(native_bf16(a, b));
  }
#endif
  return at::vec::convert_from_float<S>(a, b);
}

// The first `count` lanes of V vectors of the compute type, stored as S at p (half types rounded,
// two vectors at a time where whole; by the CPU where `native`, see round_pair). stream: whole
// vectors of S go through store_streaming (p aligned to Vec<S>'s size).
template <class S, int V>
C10_ALWAYS_INLINE void store_vectors(const Vec<compute_t<S>> (&v)[V], S* p, int64_t count,
                                     bool stream, bool native) {
  using T = compute_t<S>;
  constexpr int64_t L = Vec<T>::size();
  if (count == V * L) {
    if constexpr (std::is_same_v<S, T>) {
      for (int i = 0; i < V; ++i) {
        if (stream) {
          store_streaming(v[i], p + i * L);
        } else {
          v[i].store(p + i * L);
        }
      }
    } else if constexpr (V % 2 == 0) {
      for (int i = 0; i < V; i += 2) {
        const auto h = round_pair<S>(v[i], v[i + 1], native);
        if (stream) {
          store_streaming(h, p + i * L);
        } else {
          h.store(p + i * L);
        }
      }
    } else {
      for (int i = 0; i < V; ++i) round_pair<S>(v[i], v[i], native).store(p + i * L, L);
    }
    return;
  }
  for (int i = 0; i < V && i * L < count; ++i) {
    const int64_t n = std::min(L, count - i * L);
    if constexpr (std::is_same_v<S, T>) {
      v[i].store(p + i * L, n);
    } else {
      round_pair<S>(v[i], v[i], native).store(p + i * L, n);
    }
  }
}

// One vector of the compute type T from p: loaded, or (half types) loaded and widened in the
// register.
template <class T, class R>
C10_ALWAYS_INLINE Vec<T> load_compute(const R* p) {
  if constexpr (std::is_same_v<R, T>) {
    return Vec<T>::loadu(p);
  } else {
    Vec<float> v;
    at::vec::load_to_float<R>(p, v);
    return v;
  }
}

// A broadcast weight for the NCHW tiles, kept from being hoisted out of the tile's loops (where
// the compiler would hold all kh * kw of them in registers and spill them to the stack): one
// broadcast from L1 per use, which measured faster than the spills.
template <class T>
C10_ALWAYS_INLINE Vec<T> tap_weight(const T* w) {
  Vec<T> v(*w);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    __m512 raw = v;
#else
    __m256 raw = v;
#endif
    asm("" : "+v"(raw));
    v = Vec<T>(raw);
  }
#endif
  return v;
}

// The stride-1 NCHW forward of square kernels (K = 3, 5, 7) in register tiles: R = 4 output rows
// a dilation apart (they read the same input rows under different kernel rows, so each input
// vector loaded serves up to four rows' sums) by V vectors of columns, kernel columns outermost
// (one pointer walks down the rows). Unaligned vector loads issue about one per cycle here,
// fused multiply-adds two: tap_rows (one row of four vectors over all taps) was bound by its
// four chains' latency and by the loads. V = 4 on AVX-512 (16 accumulators) where the map is
// wider than 32 columns, else 2. Tiles R x V of 8x1, 4x2, 4x4, 2x4 and 4x1, interleaved in one
// process, Zen 5, [8,256,64,64] two threads, float32 and bfloat16 k3d2/k5d2/k7d2: on AVX-512
// 4x4 best in four cases of six and within 7% in the others (float32 2.97/2.10/2.32x of
// F.conv2d), on AVX2 4x2 best or within 2% (2.84/2.20/1.61x). At [32,256,32,32], AVX-512, 4x2
// against 4x4: 2.47/2.16/1.88x against 1.55/1.15/0.84x (k3d1/k3d2/k5d2, float32).
constexpr int kTileRows = 4;
template <int V>
constexpr int64_t tile_row_slack(int64_t dil_h, int64_t pcols) {
  return (kTileRows - 1) * dil_h * pcols + V * Vec<float>::size();
}

// One plane: out rows [0, oh) and columns [0, ow) of act(bias + sum over taps), from the
// zero-padded plane buf (pitch pcols; zero slack past it, tile_row_slack, for the tiles that
// overhang the map: their sums are not stored). Sums start from the bias; the pre-activation and
// the activation are applied in registers and the rows stored as S (half types rounded once;
// stream: streaming stores, rows aligned). The next plane's `next_lines` cache lines at `next`
// are prefetched a share per tile row (nullptr: none).
template <class S, int K, int V>
void nchw_plane_tiles(const float* buf, int64_t pcols, const ConvGeometry& g, const float* w,
                      float bias, Activation act, S* y, S* pre, bool stream, bool native,
                      const char* next, int64_t next_lines) {
  constexpr int64_t L = Vec<float>::size();
  constexpr int R = kTileRows;
  const int64_t dh = g.dil_h, dw = g.dil_w, step = dh * pcols;
  SweepPrefetch prefetch(next, next_lines, g.oh == 0 ? 0 : (next_lines * R + g.oh - 1) / g.oh);
  for (int64_t block = 0; block < g.oh; block += R * dh) {
    for (int64_t r0 = block; r0 < std::min(block + dh, g.oh); ++r0) {
      prefetch.step();
      for (int64_t ow = 0; ow < g.ow; ow += V * L) {
        Vec<float> acc[R][V];
        for (int r = 0; r < R; ++r) {
          for (int v = 0; v < V; ++v) acc[r][v] = Vec<float>(bias);
        }
        const float* col = buf + r0 * pcols + ow;
#pragma GCC unroll 8
        for (int j = 0; j < K; ++j) {
          const float* p = col + j * dw;
#pragma GCC unroll 16
          for (int m = 0; m < R + K - 1; ++m, p += step) {
            Vec<float> x[V];
#pragma GCC unroll 4
            for (int v = 0; v < V; ++v) x[v] = Vec<float>::loadu(p + v * L);
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
              const int i = m - r;
              if (i < 0 || i >= K) continue;
              const auto wt = tap_weight(w + i * K + j);
#pragma GCC unroll 4
              for (int v = 0; v < V; ++v) acc[r][v] = at::vec::fmadd(x[v], wt, acc[r][v]);
            }
          }
        }
        const int64_t count = std::min(V * L, g.ow - ow);
        for (int r = 0; r < R; ++r) {
          const int64_t oh = r0 + r * dh;
          if (oh >= g.oh) break;
          if (pre != nullptr) {
            store_vectors<S, V>(acc[r], pre + oh * g.ow + ow, count, stream, native);
          }
          if (act != Activation::None) {
            for (int v = 0; v < V; ++v) acc[r][v] = activate(acc[r][v], act);
          }
          store_vectors<S, V>(acc[r], y + oh * g.ow + ow, count, stream, native);
        }
      }
    }
  }
}

// The tiled forward: a task per input plane, copied (half types widened) into a zero-padded
// buffer; the next plane of the task prefetched while this one runs; streaming stores where the
// output is larger than a megabyte per thread (both measured faster at [8,256,64,64], Zen 5:
// without the prefetch 0.79x, without streaming 0.77x for float32 k3d2).
template <class S, int V>
void depthwise_forward_nchw_tiles(const DepthwiseForwardArgs& a) {
  const auto& g = a.g;
  const S* x = static_cast<const S*>(a.input);
  const float* w = static_cast<const float*>(a.weight);
  const float* b = static_cast<const float*>(a.bias);
  S* y = static_cast<S*>(a.output);
  S* pre = static_cast<S*>(a.preact);
  const int64_t K = g.kh, mult = g.c_out / g.c_in;
  const int64_t prows = padded_rows(g), pcols = padded_cols(g);
  const int64_t buf_size = prows * pcols + tile_row_slack<V>(g.dil_h, pcols);
  const int64_t taps = K * K, plane_in = g.h * g.w, plane_out = g.oh * g.ow;
  const bool stream = stream_outputs(g.n * g.c_out * plane_out, g.ow, y, pre);
  const int64_t lines = (plane_in * int64_t(sizeof(S)) + 63) / 64;
  at::parallel_for(0, g.n * g.c_in, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(buf_size);  // the slack stays zero
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / g.c_in, ci = plane % g.c_in;
      pad_plane(x + plane * plane_in, g.h, g.w, buf.data(), prows, pcols, g.pad_top, g.pad_left);
      for (int64_t m = 0; m < mult; ++m) {
        const int64_t co = ci * mult + m;
        S* yp = y + (n * g.c_out + co) * plane_out;
        S* pp = pre != nullptr ? pre + (n * g.c_out + co) * plane_out : nullptr;
        const char* next = m + 1 == mult && plane + 1 < end
                               ? reinterpret_cast<const char*>(x + (plane + 1) * plane_in)
                               : nullptr;
        const float bias = b != nullptr ? b[co] : 0.f;
        const auto run = [&](auto k) {
          nchw_plane_tiles<S, decltype(k)::value, V>(buf.data(), pcols, g, w + co * taps, bias,
                                                     a.act, yp, pp, stream, a.native_bf16, next,
                                                     lines);
        };
        if (K == 3) {
          run(std::integral_constant<int, 3>{});
        } else if (K == 5) {
          run(std::integral_constant<int, 5>{});
        } else {
          run(std::integral_constant<int, 7>{});
        }
      }
    }
    if (stream) store_fence();
  });
}

// Each input plane is copied once into a zero-padded buffer (a few tens of KiB, cache resident;
// half types widened to float on the way), so every tap of every output is in bounds. The tiles
// where they apply (depthwise_nchw_tiled; V = 4 vectors on AVX-512 where the map is wider than
// 32 columns, else 2); otherwise, with stride 1 along the width, tap_rows keeps the output row in
// registers across all taps.
template <class S>
void depthwise_forward_nchw(const DepthwiseForwardArgs& a) {
  using T = compute_t<S>;
  if constexpr (kUnrolledWidths<S>) {
    if (depthwise_nchw_tiled(a.g, a.dtype)) {
      if constexpr (Vec<float>::size() >= 16) {
        if (a.g.ow > 2 * Vec<float>::size()) return depthwise_forward_nchw_tiles<S, 4>(a);
      }
      return depthwise_forward_nchw_tiles<S, 2>(a);
    }
  }
  constexpr bool kSame = std::is_same_v<S, T>;
  const auto& g = a.g;
  const S* x = static_cast<const S*>(a.input);
  const T* w = static_cast<const T*>(a.weight);
  const T* b = static_cast<const T*>(a.bias);
  S* y = static_cast<S*>(a.output);
  S* pre = static_cast<S*>(a.preact);
  const int64_t mult = g.c_out / g.c_in;
  const int64_t prows = padded_rows(g), pcols = padded_cols(g);
  const int64_t taps = g.kh * g.kw, plane_in = g.h * g.w, plane_out = g.oh * g.ow;
  // Stride 2 along the width: the padded rows split into even and odd columns
  // (split_even_odd), where each tap's columns are consecutive, so tap_rows serves it too.
  const bool split = g.stride_w == 2;
  const int64_t evens = (pcols + 1) / 2;
  std::vector<int64_t> offset(taps);
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t col = j * g.dil_w;
      offset[i * g.kw + j] = i * g.dil_h * pcols + (split ? split_column(col, evens) : col);
    }
  }
  at::parallel_for(0, g.n * g.c_in, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(prows * pcols), split_row(split ? pcols : 0);
    std::vector<Vec<T>> wv(taps);
    // Half types: the output row (and its pre-activation) in float, rounded once when stored.
    std::vector<T> row(kSame ? 0 : g.ow), pre_row(kSame || pre == nullptr ? 0 : g.ow);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / g.c_in, ci = plane % g.c_in;
      pad_plane(x + plane * plane_in, g.h, g.w, buf.data(), prows, pcols, g.pad_top, g.pad_left);
      if (split) split_even_odd(buf.data(), prows, pcols, split_row.data());
      for (int64_t m = 0; m < mult; ++m) {
        const int64_t co = ci * mult + m;
        for (int64_t t = 0; t < taps; ++t) wv[t] = Vec<T>(w[co * taps + t]);
        S* yp = y + (n * g.c_out + co) * plane_out;
        S* pp = pre != nullptr ? pre + (n * g.c_out + co) * plane_out : nullptr;
        for (int64_t oh = 0; oh < g.oh; ++oh) {
          T* yr;
          T* pr = nullptr;
          if constexpr (kSame) {
            yr = yp + oh * g.ow;
            if (pp != nullptr) pr = pp + oh * g.ow;
          } else {
            yr = row.data();
            if (pp != nullptr) pr = pre_row.data();
          }
          const T* base = buf.data() + oh * g.stride_h * pcols;
          if (g.stride_w == 1 || split) {
            tap_rows(base, offset.data(), wv.data(), taps, yr, g.ow, false);
          } else {
            for (int64_t ow = 0; ow < g.ow; ++ow) {
              T acc = 0;
              for (int64_t t = 0; t < taps; ++t) {
                acc += w[co * taps + t] * base[ow * g.stride_w + offset[t]];
              }
              yr[ow] = acc;
            }
          }
          epilogue_row(yr, g.ow, b != nullptr ? b[co] : T(0), pr, a.act);
          if constexpr (!kSame) {
            narrow(yr, yp + oh * g.ow, g.ow);
            if (pp != nullptr) narrow(pr, pp + oh * g.ow, g.ow);
          }
        }
      }
    }
  });
}

// V vectors of lanes of S at src, into a ring of R at dst: copied as they are (R = S), or widened
// to the compute type (R = compute_t<S>).
template <class S, class R, int V>
inline void load_block(const S* src, R* dst) {
  using T = compute_t<S>;
  constexpr int64_t L = Vec<T>::size();
  if constexpr (std::is_same_v<S, R>) {
    // Whole vectors where they fit (the inlined memcpy moved 16 bytes at a time: AVX2 float32
    // NHWC forwards measured 2-10% slower with it).
    constexpr int64_t kLanes = Vec<S>::size();
    if constexpr (V * L % kLanes == 0) {
      for (int64_t i = 0; i < V * L; i += kLanes) Vec<S>::loadu(src + i).store(dst + i);
    } else {
      std::memcpy(dst, src, V * L * sizeof(S));
    }
  } else {
    static_assert(std::is_same_v<R, T>);
    for (int i = 0; i < V; ++i) load_compute<T>(src + i * L).store(dst + i * L);
  }
}

// bfloat16 lanes taken in pairs. A bfloat16 is the top half of the float it stands for, so a
// vector register of 2L bfloat16 (the channels c, c + 1, ... c + 2L - 1 of a pixel) is also two
// vectors of L floats: shifted left by 16 bits, the even channels (c, c + 2, ...), masked to its
// top halves, the odd ones; exactly, in two single-cycle integer operations for 2L lanes. The
// widening the taps otherwise do (a zero-extending shuffle and a shift per L lanes) was the
// largest part of the bfloat16 NHWC forward's time (Zen 5, AVX-512). Weights and bias go into
// the same order (pair_order), and join_pairs rounds the two vectors back (to nearest even, NaN
// to 0xffff, as at::vec does; or by the CPU, see round_pair) and interleaves them into channel
// order. Vector capabilities only.
#if defined(CPU_CAPABILITY_AVX512)
C10_ALWAYS_INLINE void split_pairs(const c10::BFloat16* p, Vec<float>& even, Vec<float>& odd) {
  const __m512i raw = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(int32_t(0xffff0000u))));
}
// The float's bfloat16 bits, rounded, in the top half of each 32-bit lane (the low half junk).
C10_ALWAYS_INLINE __m512i round_to_top(const Vec<float>& v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 number = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
  return _mm512_mask_blend_epi32(number, _mm512_set1_epi32(-1), rounded);
}
C10_ALWAYS_INLINE __m512i join_pairs(const Vec<float>& even, const Vec<float>& odd,
                                     bool native) {
  if (native) {
    // Rounded by the CPU into [even 0..15, odd 0..15], then interleaved by one word permute.
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                           24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                           16, 0);
    return _mm512_permutexvar_epi16(order, native_bf16(even, odd));
  }
  return _mm512_or_si512(
      _mm512_srli_epi32(round_to_top(even), 16),
      _mm512_and_si512(round_to_top(odd), _mm512_set1_epi32(int32_t(0xffff0000u))));
}
constexpr bool kPairs = true;
#elif defined(CPU_CAPABILITY_AVX2)
C10_ALWAYS_INLINE void split_pairs(const c10::BFloat16* p, Vec<float>& even, Vec<float>& odd) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(int32_t(0xffff0000u))));
}
C10_ALWAYS_INLINE __m256i round_to_top(const Vec<float>& v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256 number = _mm256_cmp_ps(v, v, _CMP_ORD_Q);
  return _mm256_blendv_epi8(_mm256_set1_epi32(-1), rounded, _mm256_castps_si256(number));
}
C10_ALWAYS_INLINE __m256i join_pairs(const Vec<float>& even, const Vec<float>& odd,
                                     bool /*native: AVX-512 only*/) {
  return _mm256_or_si256(
      _mm256_srli_epi32(round_to_top(even), 16),
      _mm256_and_si256(round_to_top(odd), _mm256_set1_epi32(int32_t(0xffff0000u))));
}
constexpr bool kPairs = true;
#else
constexpr bool kPairs = false;
#endif

// Whether blocks of V vectors of a map of S held in rings of R take their lanes in pairs.
template <class S, class R, int V>
constexpr bool kPaired =
    kPairs && std::is_same_v<S, c10::BFloat16> && std::is_same_v<R, S> && V % 2 == 0;

// Where channel i of a block of 2L (i < 2L) sits when the block's lanes go in pairs: even
// channels in the first vector, odd ones in the second.
inline int64_t pair_order(int64_t i, int64_t L) { return (i % 2) * L + i / 2; }

// Kernel rows in pairs, by the CPU's bfloat16 dot product (VDPBF16PS of AVX512_BF16: per 32-bit
// lane, acc += a.lo * b.lo + a.hi * b.hi, the bfloat16 halves multiplied exactly and added in
// float, to nearest even, denormals flushed). A block's column of 2L bfloat16 in kernel row i and
// the same column in row i + 1, interleaved word by word (unpack low and high: one operation for
// L lanes each), hold each channel's two taps in one lane, so one instruction does the two
// multiply-adds of L channels for which the split pairs above take two, plus their splits. The
// weights go in pairs of rows ([w(i, j), w(i + 1, j)] per lane; a row left over pairs with zero,
// its input with a zero vector) and in the unpacked order of the channels (unpack_order), the bias
// too; join_unpacked rounds (by the CPU) and puts the channels back. Taken where the CPU has
// AVX512_BF16 (DepthwiseForwardArgs::native_bf16), for the wide blocks; bfloat16 NHWC forwards
// on Zen 5 in depthwise_forward_nhwc (the rings; the register tiles, which take strides 1 and 2
// with square kernels of width 3, 5, 7, sum in float).
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kDotPairs = true;
C10_ALWAYS_INLINE void dot_bf16(__m512& acc, const __m512i& a, const __m512i& b) {
  asm("vdpbf16ps {%2, %1, %0|%0, %1, %2}" : "+v"(acc) : "v"(a), "v"(b));
}
// Two vectors in unpacked order rounded and put back into channel order: lane l of the first
// holds channel 8 (l / 4) + l % 4, of the second that + 4.
C10_ALWAYS_INLINE __m512i join_unpacked(const Vec<float>& first, const Vec<float>& second) {
  const __m512i order = _mm512_set_epi16(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10,
                                         9, 8, 23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2,
                                         1, 0);
  return _mm512_permutexvar_epi16(order, native_bf16(first, second));
}
#else
constexpr bool kDotPairs = false;
#endif

// Where channel i of a block of 2L (i < 2L, L = 16) sits in the unpacked order of the row pairs.
inline int64_t unpack_order(int64_t i) { return ((i / 4) % 2) * 16 + (i / 8) * 4 + i % 4; }

// NHWC depthwise output pixels of one output row, summed from a ring of input rows held as R (the
// map's own type; half types widened to float as each tap loads them) in blocks of V vectors of
// the compute type's lanes per pixel, zero-padded left and right: `rows`
// kernel rows fall inside the map (row: the ring row; row_tap: its kernel row). For P
// neighbouring pixels (sharing each weight load), the sum over the taps stays in P * V vector
// registers (compile-time counts), then goes through the epilogue (bias, pre-activation,
// activation) in registers and is stored once, pixel p at out + p * C (`count` channels of the
// block: V * L but at the last channels; streamed past the caches when `stream`).
template <class T, class R>
struct RingTaps {
  const R* const* row;
  const int64_t* row_tap;
  int64_t rows;
  int64_t kw, dil_w, stride_w;
  int64_t pitch;  // elements from one ring column to the next
  const T* weight;  // [tap][weight_stride], the block's channels at offset c
  int64_t weight_stride;
  const T* bias;
  Activation act;
  int64_t C;
  bool stream;
  bool native;  // bfloat16 rounded by the CPU (round_pair)
  // Wide bfloat16 blocks in kernel-row pairs (kDotPairs), or nullptr: [2 kh][kw][weight_stride]
  // 32-bit lanes, entry 2 i the rows (i, i + 1), entry 2 i + 1 row i with zero.
  const uint32_t* dot_weight;
  // With dot_weight, a row's taps in column pairs: [kh][kw][weight_stride], entry (i, j) for even
  // j the taps (j, j + 1) of row i, and for j = kw - 1 with kw odd that tap with zero.
  const uint32_t* dot_columns;

  // One column of the block: V vectors of the compute type from the ring at p (split from pairs
  // of bfloat16 where the lanes go in pairs, widened for other half types).
  template <int V, class S>
  C10_ALWAYS_INLINE static void load_column(const R* p, Vec<T> (&x)[V]) {
    constexpr int64_t L = Vec<T>::size();
    if constexpr (kPaired<S, R, V>) {
      _Pragma("GCC unroll 16") for (int v = 0; v < V; v += 2) {
        split_pairs(p + v * L, x[v], x[v + 1]);
      }
    } else {
      _Pragma("GCC unroll 16") for (int v = 0; v < V; ++v) x[v] = load_compute<T>(p + v * L);
    }
  }

  // The sums of P pixels start from the bias of the block's channels (the epilogue then has one
  // add less per vector).
  template <int P, int V, class A>
  C10_ALWAYS_INLINE void start_sums(A (&acc)[P][V], int64_t c) const {
    constexpr int64_t L = Vec<T>::size();
    _Pragma("GCC unroll 16") for (int v = 0; v < V; ++v) {
      const Vec<T> b = Vec<T>::loadu(bias + c + v * L);
      _Pragma("GCC unroll 16") for (int p = 0; p < P; ++p) acc[p][v] = b;
    }
  }

  // col: the padded column of pixel 0's first tap; P pixels stride_w columns apart, stored C
  // elements apart. KW: the kernel width when it is one of the common ones (the tap loop
  // unrolled), 0 otherwise. kLight: no pre-activation to keep and an activation of none or relu,
  // so that the epilogue needs no call (a call would spill every accumulator).
  template <int P, int V, int KW, bool kLight, class S>
  C10_ALWAYS_INLINE void block(int64_t col, int64_t c, int64_t count, S* out, S* pre) const {
    constexpr int64_t L = Vec<T>::size();
    const int64_t width = KW > 0 ? KW : kw;
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kDotPairs && kPaired<S, R, V>) {
      if (dot_weight != nullptr) return dot<P, V, KW, kLight, false>(col, c, count, out, pre);
    }
#endif
    Vec<T> acc[P][V];
    start_sums(acc, c);
    // Pixels stride_w columns apart, taps dil_w columns apart.
    const int64_t pixel_step = stride_w * pitch, tap_step = dil_w * pitch;
    for (int64_t r = 0; r < rows; ++r) {
      const R* px = row[r] + col * pitch;
      const T* wp = weight + row_tap[r] * width * weight_stride + c;
      _Pragma("GCC unroll 8") for (int64_t j = 0; j < width; ++j) {
        Vec<T> wv[V];
        _Pragma("GCC unroll 16") for (int v = 0; v < V; ++v) wv[v] = Vec<T>::loadu(wp + v * L);
        _Pragma("GCC unroll 16") for (int p = 0; p < P; ++p) {
          Vec<T> x[V];
          load_column<V, S>(px + p * pixel_step, x);
          _Pragma("GCC unroll 16") for (int v = 0; v < V; ++v) {
            acc[p][v] = at::vec::fmadd(x[v], wv[v], acc[p][v]);
          }
        }
        px += tap_step;
        wp += weight_stride;
      }
    }
    finish<P, V, kLight>(acc, c, count, out, pre, C);
  }

  // As block, for stride 1 and a kernel width KW > 0, with the P pixels dil_w columns apart
  // (stored dil_w * C elements apart). Pixel p's tap j then reads ring column p + j (in steps
  // of dil_w), so each of the P + KW - 1 columns is loaded (and split or widened) once and
  // serves up to KW taps, where block loads a column for every tap of every pixel. The loads and
  // their widening, not the multiply-adds, had bounded the bfloat16 forward.
  template <int P, int V, int KW, bool kLight, class S>
  C10_ALWAYS_INLINE void spread(int64_t col, int64_t c, int64_t count, S* out, S* pre) const {
    static_assert(KW > 0);
    constexpr int64_t L = Vec<T>::size();
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kDotPairs && kPaired<S, R, V>) {
      if (dot_weight != nullptr) return dot<P, V, KW, kLight, true>(col, c, count, out, pre);
    }
#endif
    Vec<T> acc[P][V];
    start_sums(acc, c);
    const int64_t tap_step = dil_w * pitch;
    for (int64_t r = 0; r < rows; ++r) {
      const R* px = row[r] + col * pitch;
      const T* wp = weight + row_tap[r] * KW * weight_stride + c;
      Vec<T> wv[KW][V];
      _Pragma("GCC unroll 8") for (int j = 0; j < KW; ++j) {
        _Pragma("GCC unroll 16") for (int v = 0; v < V; ++v) {
          wv[j][v] = Vec<T>::loadu(wp + j * weight_stride + v * L);
        }
      }
      _Pragma("GCC unroll 16") for (int q = 0; q < P + KW - 1; ++q) {
        Vec<T> x[V];
        load_column<V, S>(px + q * tap_step, x);
        _Pragma("GCC unroll 8") for (int j = 0; j < KW; ++j) {
          const int p = q - j;
          if (p < 0 || p >= P) continue;
          _Pragma("GCC unroll 16") for (int v = 0; v < V; ++v) {
            acc[p][v] = at::vec::fmadd(x[v], wv[j][v], acc[p][v]);
          }
        }
      }
    }
    finish<P, V, kLight>(acc, c, count, out, pre, dil_w * C);
  }

#if defined(CPU_CAPABILITY_AVX512)
  // block (kSpread false) or spread (true) for a wide bfloat16 block in kernel-row pairs
  // (kDotPairs): the same pixels and columns, each column of a pair of rows loaded and
  // unpacked once for the taps that read it (spread) or once per tap (block).
  template <int P, int V, int KW, bool kLight, bool kSpread, class S>
  C10_ALWAYS_INLINE void dot(int64_t col, int64_t c, int64_t count, S* out, S* pre) const {
    static_assert(V == 2 && std::is_same_v<S, c10::BFloat16> && std::is_same_v<R, S>);
    __m512 acc[P][V];
    start_sums(acc, c);
    int64_t r = 0;
    for (; r + 1 < rows; r += 2) dot_rows<P, V, KW, kSpread, true>(acc, r, col, c);
    if (r < rows) {
      // The row left over: in column pairs where the pixels go in runs (spread's widths are odd).
      if constexpr (kSpread) {
        dot_row_columns<P, V, KW>(acc, r, col, c);
      } else {
        dot_rows<P, V, KW, false, false>(acc, r, col, c);
      }
    }
    Vec<T> sums[P][V];
    _Pragma("GCC unroll 16") for (int p = 0; p < P; ++p) {
      _Pragma("GCC unroll 16") for (int v = 0; v < V; ++v) sums[p][v] = acc[p][v];
    }
    finish<P, V, kLight>(sums, c, count, out, pre, kSpread ? dil_w * C : C);
  }

  // The sums of dot over kernel rows r and r + 1 (kTwo), or r alone (with zero).
  template <int P, int V, int KW, bool kSpread, bool kTwo>
  C10_ALWAYS_INLINE void dot_rows(__m512 (&acc)[P][V], int64_t r, int64_t col, int64_t c) const {
    constexpr int64_t L = Vec<T>::size();
    const int64_t width = KW > 0 ? KW : kw;
    const int64_t pixel_step = stride_w * pitch, tap_step = dil_w * pitch;
    const R* p0 = row[r] + col * pitch;
    const R* p1 = kTwo ? row[r + 1] + col * pitch : p0;
    const uint32_t* wp = dot_weight + (2 * row_tap[r] + (kTwo ? 0 : 1)) * width * weight_stride + c;
    if constexpr (kSpread) {
      __m512i wv[KW][V];
      _Pragma("GCC unroll 8") for (int j = 0; j < KW; ++j) {
        _Pragma("GCC unroll 16") for (int v = 0; v < V; ++v) {
          wv[j][v] = _mm512_loadu_si512(wp + j * weight_stride + v * L);
        }
      }
      _Pragma("GCC unroll 16") for (int q = 0; q < P + KW - 1; ++q) {
        const __m512i a = _mm512_loadu_si512(p0 + q * tap_step);
        const __m512i b = kTwo ? _mm512_loadu_si512(p1 + q * tap_step) : _mm512_setzero_si512();
        const __m512i x[V] = {_mm512_unpacklo_epi16(a, b), _mm512_unpackhi_epi16(a, b)};
        _Pragma("GCC unroll 8") for (int j = 0; j < KW; ++j) {
          const int p = q - j;
          if (p < 0 || p >= P) continue;
          _Pragma("GCC unroll 16") for (int v = 0; v < V; ++v) dot_bf16(acc[p][v], x[v], wv[j][v]);
        }
      }
    } else {
      _Pragma("GCC unroll 8") for (int64_t j = 0; j < width; ++j) {
        __m512i wv[V];
        _Pragma("GCC unroll 16") for (int v = 0; v < V; ++v) {
          wv[v] = _mm512_loadu_si512(wp + j * weight_stride + v * L);
        }
        _Pragma("GCC unroll 16") for (int p = 0; p < P; ++p) {
          const int64_t at = p * pixel_step + j * tap_step;
          const __m512i a = _mm512_loadu_si512(p0 + at);
          const __m512i b = kTwo ? _mm512_loadu_si512(p1 + at) : _mm512_setzero_si512();
          const __m512i x[V] = {_mm512_unpacklo_epi16(a, b), _mm512_unpackhi_epi16(a, b)};
          _Pragma("GCC unroll 16") for (int v = 0; v < V; ++v) dot_bf16(acc[p][v], x[v], wv[v]);
        }
      }
    }
  }
#endif

#if defined(CPU_CAPABILITY_AVX512)
  // The sums of dot over kernel row r alone, for spread (stride 1, an odd kernel width KW > 1):
  // the row's taps in column pairs, (j, j + 1) for even j from the columns q and q + 1 unpacked
  // together, the last tap with zero: (KW + 1) / 2 products per pixel instead of KW, for two
  // unpacks more per column.
  template <int P, int V, int KW>
  C10_ALWAYS_INLINE void dot_row_columns(__m512 (&acc)[P][V], int64_t r, int64_t col,
                                         int64_t c) const {
    static_assert(KW % 2 == 1 && KW > 1 && V == 2);
    constexpr int64_t L = Vec<T>::size();
    constexpr int kPairs = KW / 2, kColumns = P + KW - 1;
    const int64_t tap_step = dil_w * pitch;
    const R* p0 = row[r] + col * pitch;
    const uint32_t* wp = dot_columns + row_tap[r] * KW * weight_stride + c;
    __m512i wv[kPairs + 1][V];
    _Pragma("GCC unroll 8") for (int k = 0; k <= kPairs; ++k) {
      _Pragma("GCC unroll 16") for (int v = 0; v < V; ++v) {
        wv[k][v] = _mm512_loadu_si512(wp + 2 * k * weight_stride + v * L);
      }
    }
    const __m512i zero = _mm512_setzero_si512();
    __m512i a = _mm512_loadu_si512(p0);
    _Pragma("GCC unroll 16") for (int q = 0; q < kColumns; ++q) {
      // Column q starts the pair (j, j + 1) of pixel q - j (j even), and is the last tap of
      // pixel q - KW + 1.
      bool pair = false;
      _Pragma("GCC unroll 8") for (int k = 0; k < kPairs; ++k) {
        pair = pair || (q - 2 * k >= 0 && q - 2 * k < P);
      }
      const int last = q - (KW - 1);
      const __m512i b = q + 1 < kColumns ? _mm512_loadu_si512(p0 + (q + 1) * tap_step) : zero;
      if (pair) {
        const __m512i x[V] = {_mm512_unpacklo_epi16(a, b), _mm512_unpackhi_epi16(a, b)};
        _Pragma("GCC unroll 8") for (int k = 0; k < kPairs; ++k) {
          const int p = q - 2 * k;
          if (p < 0 || p >= P) continue;
          _Pragma("GCC unroll 16") for (int v = 0; v < V; ++v) dot_bf16(acc[p][v], x[v], wv[k][v]);
        }
      }
      if (last >= 0 && last < P) {
        const __m512i x[V] = {_mm512_unpacklo_epi16(a, zero), _mm512_unpackhi_epi16(a, zero)};
        _Pragma("GCC unroll 16") for (int v = 0; v < V; ++v) {
          dot_bf16(acc[last][v], x[v], wv[kPairs][v]);
        }
      }
      a = b;
    }
  }
#endif

  // The epilogue of P pixels' sums (the bias in them already): pre-activation, activation;
  // pixel p stored at out + p * out_step.
  template <int P, int V, bool kLight, class S>
  C10_ALWAYS_INLINE void finish(Vec<T> (&acc)[P][V], int64_t c, int64_t count, S* out, S* pre,
                                int64_t out_step) const {
    constexpr int64_t L = Vec<T>::size();
    const bool relu = act == Activation::Relu;
    _Pragma("GCC unroll 16") for (int p = 0; p < P; ++p) {
      Vec<T> y[V];
      _Pragma("GCC unroll 16") for (int v = 0; v < V; ++v) y[v] = acc[p][v];
      if constexpr (kLight) {
        if (relu) {
          _Pragma("GCC unroll 16") for (int v = 0; v < V; ++v) {
            y[v] = at::vec::clamp_min(y[v], Vec<T>(T(0)));  // NaN stays NaN, as in activate
          }
        }
      } else {
        if (pre != nullptr) store(y, pre + p * out_step, count);
        if (act != Activation::None) {
          _Pragma("GCC unroll 16") for (int v = 0; v < V; ++v) y[v] = activate(y[v], act);
        }
      }
      store(y, out + p * out_step, count);
    }
  }

  // V vectors of a block (count lanes of them) stored at p: in pairs where the block's lanes
  // go in pairs (its blocks are always whole).
  template <int V, class S>
  C10_ALWAYS_INLINE void store(const Vec<T> (&y)[V], S* p, int64_t count) const {
    if constexpr (kPaired<S, R, V>) {
      constexpr int64_t L = Vec<T>::size();
      _Pragma("GCC unroll 16") for (int v = 0; v < V; v += 2) {
#if defined(CPU_CAPABILITY_AVX512)
        const Vec<S> h(dot_weight != nullptr ? join_unpacked(y[v], y[v + 1])
                                             : join_pairs(y[v], y[v + 1], native));
#else
        const Vec<S> h(join_pairs(y[v], y[v + 1], native));
#endif
        if (stream) {
          store_streaming(h, p + v * L);
        } else {
          h.store(p + v * L);
        }
      }
    } else {
      store_vectors<S, V>(y, p, count, stream, native);
    }
  }
};

// The channels of an NHWC map in blocks of lanes: wide blocks of kVectors vectors of T, then
// single vectors (the last one partial). Block b covers channels [channel(b), channel(b) +
// lanes(b)), count(b) of them inside C; c_pad rounds C up to whole vectors.
template <class T, int kVectors>
struct ChannelBlocks {
  static constexpr int64_t L = Vec<T>::size();
  static constexpr int64_t kWide = kVectors * L;
  int64_t C, c_pad, blocked, blocks;

  explicit ChannelBlocks(int64_t channels)
      : C(channels),
        c_pad((channels + L - 1) / L * L),
        blocked(channels / kWide),
        blocks(blocked + (c_pad - blocked * kWide) / L) {}
  bool wide(int64_t b) const { return b < blocked; }
  int64_t channel(int64_t b) const {
    return b < blocked ? b * kWide : (blocked * kVectors + b - blocked) * L;
  }
  int64_t lanes(int64_t b) const { return b < blocked ? kWide : L; }
  int64_t count(int64_t b) const { return std::min(lanes(b), C - channel(b)); }
};

// Rows of one NHWC image [rows, cols, C] held as R (S itself, or S widened to the compute type),
// for a group of channel blocks [b0, b1): rings of `slots` rows (map row r in slot r % slots),
// each `width` columns wide, the map's columns at [copy_lo, copy_lo + copy_cols) (pad_left
// columns of zeros first, the columns past the ring cropped) and zeros elsewhere and past C. A row
// is read once and copied or widened once, a pixel's channels of the group at a time (one
// contiguous read, which the hardware prefetchers follow). Two layouts:
// - by blocks: a ring per block, a block's lanes of one pixel contiguous and consecutive pixels
//   too (the taps then read contiguous memory; in the map the pixels lie C elements apart, a
//   stride that maps them all onto a few cache sets). The copy writes every block's ring in turn.
// - by pixels (`pixel_major`, R the map's own type): one ring, each column the group's channels
//   of a pixel, `pitch` elements apart, as the map holds them. The copy of a row is one memcpy
//   where the group is all the channels and C fills whole vectors, else a memcpy per pixel. On
//   Zen 5 a copy of [8,256,64,64] bfloat16 rows by blocks took 0.72-0.95 ms at two threads, in
//   one memcpy per row 0.53-0.59 ms. The same contiguous copy in vector loads and stores was
//   nearly as slow as by blocks (a standalone test): probably the stores read each ring line into
//   the cache before writing it, and the library's memcpy (string moves, at this size) does not.
template <class S, int kVectors, class R>
struct NhwcRings {
  using T = compute_t<S>;
  using Blocks = ChannelBlocks<T, kVectors>;
  static constexpr int64_t L = Blocks::L;

  const Blocks& cb;
  int64_t cols, width, slots, copy_lo, copy_cols;
  int64_t ring_size;  // elements of one block's ring at a wide block's lanes
  bool pixel_major;
  int64_t pitch = 0;  // by pixels: the group's lanes (a pixel's column in the ring)
  int64_t channels = 0;  // by pixels: the group's channels inside C
  std::unique_ptr<R[]> data;  // uninitialized: start zeroes what load does not write
  const S* image = nullptr;
  int64_t b0 = 0, b1 = 0, wide_end = 0;
  int64_t loaded_to = 0;  // the rows below it that the window has reached are in the rings

  // One block's ring at its widest, in bytes (groups are sized from it).
  static int64_t block_bytes(int64_t width, int64_t slots) {
    return slots * width * Blocks::kWide * int64_t(sizeof(R));
  }

  NhwcRings(const Blocks& blocks, int64_t map_cols, int64_t ring_width, int64_t ring_slots,
            int64_t pad_left, int64_t group_blocks, bool by_pixels = false)
      : cb(blocks),
        cols(map_cols),
        width(ring_width),
        slots(ring_slots),
        copy_lo(std::min(pad_left, ring_width)),
        copy_cols(std::clamp<int64_t>(ring_width - pad_left, 0, map_cols)),
        ring_size(ring_slots * ring_width * Blocks::kWide),
        pixel_major(by_pixels && std::is_same_v<R, S>),
        data(new R[group_blocks * ring_size]) {}

  // Another image or group of blocks: the padding zeroed, no rows held.
  void start(const S* image_start, int64_t first_block, int64_t end_block) {
    image = image_start;
    b0 = first_block;
    b1 = end_block;
    wide_end = std::clamp(cb.blocked, b0, b1);  // blocks [b0, wide_end) are wide
    loaded_to = std::numeric_limits<int64_t>::min();
    if (pixel_major) {
      const int64_t c0 = cb.channel(b0);
      pitch = cb.channel(b1 - 1) + cb.lanes(b1 - 1) - c0;
      channels = std::min(cb.C, c0 + pitch) - c0;
      for (int64_t slot = 0; slot < slots; ++slot) {
        zero_padding(data.get() + slot * width * pitch, pitch, channels);
      }
      return;
    }
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t lanes = cb.lanes(blk);
      for (int64_t slot = 0; slot < slots; ++slot) {
        zero_padding(data.get() + (blk - b0) * ring_size + slot * width * lanes, lanes,
                     cb.count(blk));
      }
    }
  }

  // Zeroes a ring row's padding: r's columns of `step` elements outside the map's, and each
  // column's elements past `count` (past C). Zero is all bits clear in every R (float, double,
  // bfloat16, half); memset, as std::fill goes an element at a time for the half types.
  void zero_padding(R* r, int64_t step, int64_t count) const {
    std::memset(r, 0, copy_lo * step * sizeof(R));
    std::memset(r + (copy_lo + copy_cols) * step, 0,
                (width - copy_lo - copy_cols) * step * sizeof(R));
    if (count < step) {
      for (int64_t col = copy_lo; col < copy_lo + copy_cols; ++col) {
        std::memset(r + col * step + count, 0, (step - count) * sizeof(R));
      }
    }
  }

  // Makes the map rows [first, last) present (last inside the map, first >= last - slots): reads
  // those the window has not reached yet. By pixels, a memcpy per row (or per pixel); by blocks,
  // a pixel's wide blocks at a time, then the single vectors block by block.
  void load(int64_t first, int64_t last) {
    const int64_t C = cb.C, c0 = cb.channel(b0);
    for (int64_t r = std::max({loaded_to, first, int64_t(0)}); r < last; ++r) {
      const S* src = image + r * cols * C;
      if constexpr (std::is_same_v<R, S>) {
        if (pixel_major) {
          R* dst = data.get() + ((r % slots) * width + copy_lo) * pitch;
          if (channels == C && pitch == C) {
            std::memcpy(dst, src, copy_cols * C * sizeof(S));
          } else {
            for (int64_t col = 0; col < copy_cols; ++col) {
              std::memcpy(dst + col * pitch, src + col * C + c0, channels * sizeof(S));
            }
          }
          continue;
        }
      }
      R* dst = data.get() + ((r % slots) * width + copy_lo) * Blocks::kWide;
      for (int64_t col = 0; col < copy_cols; ++col, dst += Blocks::kWide) {
        for (int64_t blk = b0; blk < wide_end; ++blk) {
          load_block<S, R, kVectors>(src + col * C + cb.channel(blk),
                                     dst + (blk - b0) * ring_size);
        }
      }
      for (int64_t blk = wide_end; blk < b1; ++blk) {
        const int64_t count = cb.count(blk);
        R* single = data.get() + (blk - b0) * ring_size + ((r % slots) * width + copy_lo) * L;
        for (int64_t col = 0; col < copy_cols; ++col) {
          if (count == L) {
            load_block<S, R, 1>(src + col * C + cb.channel(blk), single + col * L);
          } else {
            widen(src + col * C + cb.channel(blk), single + col * L, count);
          }
        }
      }
    }
    loaded_to = std::max(loaded_to, last);
  }

  // Asks for the map rows [first, last) on their way into the cache (first at least the rows
  // loaded so far): share `part` of `parts` of their columns, all the group's channels of a
  // pixel at a time (a row's requests spread over the work before its load).
  void prefetch(int64_t first, int64_t last, int64_t part = 0, int64_t parts = 1) const {
    const int64_t C = cb.C, c0 = cb.channel(b0);
    const int64_t c1 = std::min(C, cb.channel(b1 - 1) + Blocks::kWide);
    const int64_t bytes = (c1 - c0) * int64_t(sizeof(S));
    const int64_t col0 = copy_cols * part / parts, col1 = copy_cols * (part + 1) / parts;
    for (int64_t r = std::max({loaded_to, first, int64_t(0)}); r < last; ++r) {
      const char* src = reinterpret_cast<const char*>(image + r * cols * C + c0);
      for (int64_t col = col0; col < col1; ++col) {
        for (int64_t byte = 0; byte < bytes; byte += 64) {
          __builtin_prefetch(src + col * C * int64_t(sizeof(S)) + byte);
        }
      }
    }
  }

  // Map row r of block blk: `width` columns of lanes(blk) lanes, step(blk) elements apart.
  const R* row(int64_t blk, int64_t r) const {
    if (pixel_major) {
      return data.get() + (r % slots) * width * pitch + cb.channel(blk) - cb.channel(b0);
    }
    return data.get() + (blk - b0) * ring_size + (r % slots) * width * cb.lanes(blk);
  }
  int64_t step(int64_t blk) const { return pixel_major ? pitch : cb.lanes(blk); }
};

// What the rings of one task may take: four times a core's L2 cache, from 1 to 8 MiB (2 MiB where
// the system does not say). Blocks of channels are grouped up to it. One group of all the
// channels reads each input pixel whole (one contiguous run, which the hardware prefetchers follow
// best), and that counts for more than keeping the rings in L2: on an AVX2 Zen 3 core (512 KiB
// L2), float32 [8,256,64,64] forwards at 2 threads took 13-15 ms instead of 17-23 ms (k3d2, k5d2)
// with one group of 2 MiB of rings instead of 2-3 groups of at most 256 KiB (half the L2, the
// earlier rule; on a Zen 4 core, 512 KiB had taken k3d2 from 1.03x to 1.14-1.16x of F.conv2d).
// TORCH_EXT_CONV_RING_BYTES, read on every call, sets it (tests: several groups on any machine).
inline int64_t ring_budget() {
  if (const char* env = std::getenv("TORCH_EXT_CONV_RING_BYTES")) {
    const int64_t value = std::atoll(env);
    if (value > 0) return value;
  }
  static const int64_t bytes = [] {
    int64_t l2 = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return l2 > 0 ? std::clamp<int64_t>(4 * l2, int64_t{1} << 20, int64_t{8} << 20)
                  : int64_t{2} << 20;
  }();
  return bytes;
}

// Whether the NHWC forward's rings go by pixels (NhwcRings), given the rule's answer:
// TORCH_EXT_CONV_RINGS=pixels or blocks, read on every call, overrides it (tests: both layouts
// on any map); set at all, it also keeps the forward on the rings where the register tiles
// (depthwise_forward_nhwc_tiles, AVX-512 and AVX2) would take it.
inline bool rings_by_pixels(bool rule) {
  if (const char* env = std::getenv("TORCH_EXT_CONV_RINGS")) {
    if (std::strcmp(env, "pixels") == 0) return true;
    if (std::strcmp(env, "blocks") == 0) return false;
  }
  return rule;
}

// The input rows and columns one output row's taps reach, for the NHWC rings: `width` padded
// columns (every column a tap of an output pixel reaches), the kernel's `span` of rows, and the
// rings' `slots` (the span, at most the map's height). Output row oh reaches the map rows
// [top(oh), last(oh)).
struct KernelWindow {
  int64_t width, span, slots;
  int64_t stride_h, pad_top, h;
  explicit KernelWindow(const ConvGeometry& g)
      : width((g.ow - 1) * g.stride_w + (g.kw - 1) * g.dil_w + 1),
        span((g.kh - 1) * g.dil_h + 1),
        slots(std::min(span, g.h)),
        stride_h(g.stride_h),
        pad_top(g.pad_top),
        h(g.h) {}
  int64_t top(int64_t oh) const { return oh * stride_h - pad_top; }
  int64_t last(int64_t oh) const { return std::min(top(oh) + span, h); }
};

// Groups of channel blocks whose rings (block_bytes each) fit `budget` bytes together.
struct BlockGroups {
  int64_t groups, group_blocks;
  BlockGroups(int64_t blocks, int64_t block_bytes, int64_t budget) {
    const int64_t fit = std::clamp<int64_t>(budget / block_bytes, 1, blocks);
    groups = (blocks + fit - 1) / fit;
    group_blocks = (blocks + groups - 1) / groups;
  }
  int64_t first(int64_t group) const { return group * group_blocks; }
  int64_t end(int64_t group, int64_t blocks) const {
    return std::min(blocks, (group + 1) * group_blocks);
  }
};

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// The NHWC tiles' vector of floats, a register of the instruction set (AVX-512: 16 lanes; AVX2:
// 8), and which of its first lanes a masked load reads (AVX-512: a mask; AVX2: their count).
#if defined(CPU_CAPABILITY_AVX512)
using TileVec = __m512;
using TileLanes = __mmask16;
C10_ALWAYS_INLINE TileLanes tile_lanes(int64_t n) { return __mmask16((1u << n) - 1); }
C10_ALWAYS_INLINE TileVec tile_load(const float* p) { return _mm512_loadu_ps(p); }
C10_ALWAYS_INLINE TileVec tile_fmadd(TileVec a, TileVec b, TileVec c) {
  return _mm512_fmadd_ps(a, b, c);
}
#else
using TileVec = __m256;
using TileLanes = int;
C10_ALWAYS_INLINE TileLanes tile_lanes(int64_t n) { return int(n); }
C10_ALWAYS_INLINE TileVec tile_load(const float* p) { return _mm256_loadu_ps(p); }
C10_ALWAYS_INLINE TileVec tile_fmadd(TileVec a, TileVec b, TileVec c) {
  return _mm256_fmadd_ps(a, b, c);
}
#endif
constexpr int kTileLanes = int(sizeof(TileVec) / sizeof(float));

// The NHWC forward at stride ST of 1 or 2 with square kernels of width 3, 5 or 7 (multiplier 1;
// float32 and the half types), in register tiles read straight from the map: R output rows a
// dilation apart by P output columns a dilation apart by one vector of 16 channels (8 on AVX2,
// with smaller tiles for its 16 registers and a compiler barrier per input row; half types
// widened as they are loaded, rounded once as they are stored). Rows a dilation apart make the
// taps' pattern independent of the dilation: output row r reads input row ST * r + i (in steps of
// the dilation) under kernel row i, and likewise the columns. The tile's
// (ST * (R - 1) + K) x (ST * (P - 1) + K) input pixels go through a table of pointers (the zero
// pixel where a tap falls into the padding), so neither a copy of the map nor a bounds check in
// the taps is needed. Each input row of the tile is loaded
// once and serves every kernel row that reaches it (up to min(R, K) output rows, K taps each);
// each weight is loaded from L1 as its kernel row needs it (kept from being hoisted: the compiler
// otherwise held them, spilling the sums), and the table is read again for each vector of
// channels (held in registers, its pointers had spilled the sums too). The rings
// (depthwise_forward_nhwc) copy every input row once, then sum one output row at a time.
// Interleaved in one process, Zen 5, two threads, against F.conv2d, rings -> tiles:
// float32 [8,256,64,64] k3d2 0.99x -> 1.30x, k5d2 0.99x -> 1.26x, k7d3 8.4x -> 9.6x;
// [64,256,28,28] k3d1 1.03x -> 1.37x, k3d2 1.06x -> 1.25x, k5d1 0.84x -> 1.22x; [128,256,16,16]
// k3d1 0.80x -> 1.24x, k3d2 0.93x -> 1.69x; one thread [1,256,64,64] k3d2 1.04x -> 1.59x.
// bfloat16 [8,256,64,64] k3d2 0.84-0.87x -> 0.98-1.16x, k5d2 1.13x -> 1.18-1.23x, k7d3 15x ->
// 15.7x; float16 (F.conv2d has no fast kernel for it here) 8-26% faster than the rings.
// float16 uses float32's tiles (not tuned for it). R x P of 3 x 4 (k3), 2 x 6 (k5) and 2 x 4 (k7)
// were best or within a few percent for float32
// among 4 x 4, 4 x 5, 3 x 6, 3 x 4 (k3), 4 x 4, 3 x 4, 3 x 5, 2 x 6 (k5) and 4 x 3, 3 x 3, 3 x 4,
// 2 x 4 (k7); bfloat16 measured with 2 x 4 (k3, k5) and 2 x 3 (k7). Tiles of bfloat16 in the
// CPU's dot product (kernel rows in pairs unpacked word by word, as the rings do it) were
// slower than these float tiles at k3d2 and k5d2 (0.85-0.91x, 1.05-1.09x of F.conv2d), faster
// only at k7d3 (17x).
// Stride 2 (the rings before), interleaved in one process, Zen 5, against F.conv2d, rings ->
// tiles, two runs: [8,256,64,64] two threads float32 k3d1 0.91-0.96x -> 0.81-1.17x, k5d1
// 0.70-0.80x -> 0.78-1.01x, k7d1 0.73-0.74x -> 0.77-0.78x, k3d2 0.61-0.69x -> 0.70-0.82x;
// bfloat16 k3d1 0.68-0.71x -> 0.92-1.09x, k5d1 0.60-0.63x -> 1.10-1.11x, k7d1 0.60-0.61x ->
// 0.81-0.97x, k3d2 0.55-0.59x -> 0.68-0.78x; [1,256,64,64] one thread float32 k3d1 0.90x ->
// 1.07x, k5d1 1.04x -> 1.43x, k3d2 0.94x -> 1.33x, bfloat16 k3d1 0.86x -> 1.29x, k5d1 0.76x ->
// 1.48x, k3d2 0.60x -> 1.20x. Two rows by four columns (two for k7): at C = 256 float32 a pixel
// is 1 KiB, so one vector of a tile's pixels falls into four L1 sets, and tiles of more pixels
// (3 x 4 for k3, 2 x 3 for k7) measured slower (k3 by 10-30%), as did one row (1 x 6 for k3,
// 1 x 4 for k5, 1 x 3 for k7: 5-30% slower).
template <int K, class S, int ST>
struct NhwcTile {
  static constexpr bool kBf16 = std::is_same_v<S, c10::BFloat16>;
#if defined(CPU_CAPABILITY_AVX512)
  static constexpr int R = ST == 1 && K == 3 && !kBf16 ? 3 : 2;
  static constexpr int P =
      ST == 1 ? (kBf16 ? (K == 7 ? 3 : 4) : (K == 5 ? 6 : 4)) : (K == 7 ? 2 : 4);
#else
  // AVX2 (16 registers): measured with float32 only, emulated on Zen 5 (the AVX2 copies of these
  // kernels and of oneDNN), one thread [1,256,64,64] and two [8,256,64,64], rings -> tiles,
  // against F.conv2d: k3d2 0.82-0.89x -> 0.98-1.03x, k5d2 1.05x / 0.85x -> 1.08x / 0.82x, k7d3
  // 40x -> 45x; stride 2 k3 0.73x / 1.32x -> 0.86x / 1.47x, k5 0.88x / 1.23x -> 0.95x / 1.29x;
  // k7 at stride 2 stays on the rings (1.22x / 1.49x against 0.81x / 0.95x). Shapes tried beside
  // these: 3 x 2 (k3), 1 x 4 (k5), 1 x 3 (k7) at stride 1; 1 x 3, 1 x 2, 1 x 3 at stride 2.
  static constexpr int R = ST == 1 ? 2 : (K == 3 ? 2 : 1);
  static constexpr int P = ST == 1 ? (K == 3 ? 3 : 2) : (K == 5 ? 3 : 2);
#endif
  // The tile's input rows and columns (output row r, kernel row i read input row ST * r + i).
  static constexpr int F = ST * (R - 1) + K, E = ST * (P - 1) + K;
  using Pixels = const S* [F][E];
};

// kTileLanes lanes of S at p as floats (the first of them in `lanes` where kMasked, the rest
// zero).
template <class S, bool kMasked>
C10_ALWAYS_INLINE TileVec load_lanes(const S* p, TileLanes lanes) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<S, float>) {
    return kMasked ? _mm512_maskz_loadu_ps(lanes, p) : _mm512_loadu_ps(p);
  } else {
    const __m256i raw = kMasked ? _mm256_maskz_loadu_epi16(lanes, p)
                                : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (std::is_same_v<S, c10::BFloat16>) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    } else {
      return _mm512_cvtph_ps(raw);
    }
  }
#else
  if constexpr (std::is_same_v<S, float>) {
    if constexpr (kMasked) {
      const __m256i first = _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes),
                                               _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      return _mm256_maskload_ps(p, first);
    }
    return _mm256_loadu_ps(p);
  } else {
    __m128i raw;
    if constexpr (kMasked) {  // AVX2 has no masked load of 16-bit lanes
      alignas(16) uint16_t part[8] = {};
      std::memcpy(part, p, size_t(lanes) * sizeof(S));
      raw = _mm_load_si128(reinterpret_cast<const __m128i*>(part));
    } else {
      raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    }
    if constexpr (std::is_same_v<S, c10::BFloat16>) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    } else {
      return _mm256_cvtph_ps(raw);
    }
  }
#endif
}

// kTileLanes floats stored as S at p (half types rounded to nearest even; bfloat16 by the CPU
// where `native`, AVX-512 only), past the caches where `stream` (p aligned to the stored
// vector's size).
template <class S>
C10_ALWAYS_INLINE void store_lanes(TileVec v, S* p, bool stream, bool native) {
  if constexpr (std::is_same_v<S, float>) {
    if (stream) {
      store_streaming(Vec<float>(v), p);
    } else {
      Vec<float>(v).store(p);
    }
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    __m256i h;
    if constexpr (std::is_same_v<S, c10::BFloat16>) {
      if (native) {
        asm("vcvtneps2bf16 {%1, %0|%0, %1}" : "=v"(h) : "v"(v));
      } else {
        h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_to_top(Vec<float>(v)), 16));
      }
    } else {
      h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    if (stream) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), h);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
    }
#else
    (void)native;
    __m128i h;
    if constexpr (std::is_same_v<S, c10::BFloat16>) {
      const __m256i top = _mm256_srli_epi32(round_to_top(Vec<float>(v)), 16);
      h = _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
    } else {
      h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    if (stream) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(p), h);
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
    }
#endif
  }
}

// The sums (from the bias) of one tile for the kTileLanes channels at c: the first of them in
// `lanes` where kMasked (the last vector of a C that is not a multiple of kTileLanes; weights and
// bias are zero-padded to whole vectors, and so is the zero pixel).
template <int K, int ST, bool kMasked, class S>
C10_ALWAYS_INLINE void nhwc_tile_sums(const typename NhwcTile<K, S, ST>::Pixels& px, int64_t c,
                                      TileLanes lanes, const float* wt, int64_t c_pad,
                                      const float* bias,
                                      TileVec (&sum)[NhwcTile<K, S, ST>::R]
                                                    [NhwcTile<K, S, ST>::P]) {
  using Tile = NhwcTile<K, S, ST>;
  constexpr int R = Tile::R, P = Tile::P, E = Tile::E;
  const TileVec b = tile_load(bias + c);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int k = 0; k < P; ++k) sum[r][k] = b;
  }
#pragma GCC unroll 16
  for (int f = 0; f < Tile::F; ++f) {
    // AVX2's 16 registers: the row's loads kept from being hoisted above the rows before it.
    if constexpr (kTileLanes == 8) asm volatile("" : : : "memory");
    TileVec x[E];
#pragma GCC unroll 16
    for (int e = 0; e < E; ++e) {
      x[e] = load_lanes<S, kMasked>(px[f][e] + c, lanes);
    }
    // Input row f is kernel row i = f - ST * r of output row r.
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int i = f - ST * r;
      if (i < 0 || i >= K) continue;
#pragma GCC unroll 8
      for (int j = 0; j < K; ++j) {
        TileVec w = tile_load(wt + (i * K + j) * c_pad + c);
        asm("" : "+v"(w));
#pragma GCC unroll 8
        for (int k = 0; k < P; ++k) sum[r][k] = tile_fmadd(x[ST * k + j], w, sum[r][k]);
      }
    }
  }
}

// The epilogue of a tile's sums past the registers (stored to `sums` first: the activations'
// calls would otherwise spill the sums inside the taps' loop): pre-activation, activation and
// the stores (plain ones, also where the output streams) of `rows` x `cols` pixels, pixel (r, k)
// at r * row_step + k * col_step; `count` channels each.
template <int R, int P, class S>
C10_NOINLINE void nhwc_tile_epilogue(const float (&sums)[R * P][kTileLanes], int rows, int cols,
                                     int64_t count, Activation act, S* y, S* pre,
                                     int64_t row_step, int64_t col_step, bool native) {
  const auto put = [&](const Vec<float>& v, S* p) {
    if constexpr (std::is_same_v<S, float>) {
      v.store(p, count);
    } else {
      round_pair<S>(v, v, native).store(p, count);
    }
  };
  for (int r = 0; r < rows; ++r) {
    for (int k = 0; k < cols; ++k) {
      const int64_t at = r * row_step + k * col_step;
      const Vec<float> v = Vec<float>::loadu(sums[r * P + k]);
      if (pre != nullptr) put(v, pre + at);
      put(activate(v, act), y + at);
    }
  }
}

// A task per (image, band of R * dil_h output rows; and group of channel vectors where there are
// few bands): the band's dil_h sets of rows a dilation apart, each swept in tiles of P columns a
// dilation apart, the vectors of channels innermost (the tile's table of pointers serves them
// all). The input rows the next task reads first are
// prefetched a share per tile position (float32 k3d2, interleaved: 1.20x -> 1.63x of F.conv2d).
template <class S, int K, int ST>
void depthwise_forward_nhwc_tiles(const DepthwiseForwardArgs& a) {
  using Tile = NhwcTile<K, S, ST>;
  constexpr int R = Tile::R, P = Tile::P, F = Tile::F, E = Tile::E;
  constexpr int64_t L = kTileLanes;
  const auto& g = a.g;
  const S* x = static_cast<const S*>(a.input);
  const float* w = static_cast<const float*>(a.weight);
  const float* b = static_cast<const float*>(a.bias);
  S* y = static_cast<S*>(a.output);
  S* pre = static_cast<S*>(a.preact);
  const int64_t C = g.c_in, taps = K * K, c_pad = (C + L - 1) / L * L;
  // The weight transposed to [tap][c_pad] and the bias to [c_pad], zero past C.
  std::vector<float> wt(taps * c_pad, 0.f), bias(c_pad, 0.f);
  const std::vector<S> zero(c_pad, S(0));
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t t = 0; t < taps; ++t) wt[t * c_pad + c] = w[c * taps + t];
    if (b != nullptr) bias[c] = b[c];
  }
  const int64_t dh = g.dil_h, dw = g.dil_w, band = R * dh;
  const int64_t bands = (g.oh + band - 1) / band;
  // Tasks (image, group of channel vectors, band): the channels in groups only where the images'
  // bands leave fewer than four tasks per thread.
  const int64_t vectors = c_pad / L;
  const int64_t groups = std::clamp<int64_t>(
      (4 * at::get_num_threads() + g.n * bands - 1) / (g.n * bands), 1, vectors);
  const int64_t group_vectors = (vectors + groups - 1) / groups;
  const bool stream = stream_outputs(g.n * g.oh * g.ow * C, C, y, pre);
  const bool light = pre == nullptr && (a.act == Activation::None || a.act == Activation::Relu);
  const bool relu = a.act == Activation::Relu;
  const int64_t row_step = dh * g.ow * C, col_step = dw * C;
  const TileLanes all = tile_lanes(L), tail = tile_lanes(C % L);
  // Input rows [first_row(b), last_row(b)) are band b's.
  const auto first_row = [&](int64_t b) {
    return std::clamp<int64_t>(b * band * ST - g.pad_top, 0, g.h);
  };
  const auto last_row = [&](int64_t b) {
    const int64_t last_out = std::min(g.oh, (b + 1) * band) - 1;
    return std::clamp<int64_t>(last_out * ST + (K - 1) * dh - g.pad_top + 1, 0, g.h);
  };
  const int64_t positions =
      std::min(dh, g.oh) * ((g.ow + P * dw - 1) / (P * dw)) * std::min(dw, g.ow);
  at::parallel_for(0, g.n * groups * bands, 1, [&](int64_t begin, int64_t end) {
    typename Tile::Pixels px;
    alignas(64) float sums_out[R * P][kTileLanes];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / bands / groups, oh_band = task % bands * band;
      const int64_t group = task / bands % groups;
      const int64_t c_begin = group * group_vectors * L;
      const int64_t c_end = std::min(C, (group + 1) * group_vectors * L);
      const S* image = x + n * g.h * g.w * C;
      // The rows of the next task that this one does not read (whole rows: only without groups).
      const S* next = nullptr;
      int64_t lines = 0;
      if (groups == 1 && task + 1 < end) {
        const int64_t nb = (task + 1) % bands;
        const int64_t lo = nb == 0 ? first_row(0) : std::max(first_row(nb), last_row(nb - 1));
        const int64_t hi = last_row(nb);
        if (hi > lo) {
          next = x + ((task + 1) / bands * g.h + lo) * g.w * C;
          lines = ((hi - lo) * g.w * C * int64_t(sizeof(S)) + 63) / 64;
        }
      }
      SweepPrefetch prefetch(next, lines, (lines + positions - 1) / positions);
      for (int64_t oh0 = oh_band; oh0 < std::min(oh_band + dh, g.oh); ++oh0) {
        const int rows = int(std::min<int64_t>(R, (g.oh - 1 - oh0) / dh + 1));
        for (int64_t group = 0; group < g.ow; group += P * dw) {
          for (int64_t ow0 = group; ow0 < std::min(group + dw, g.ow); ++ow0) {
            prefetch.step();
            const int cols = int(std::min<int64_t>(P, (g.ow - 1 - ow0) / dw + 1));
            for (int f = 0; f < F; ++f) {
              const int64_t ih = oh0 * ST - g.pad_top + f * dh;
              for (int e = 0; e < E; ++e) {
                const int64_t iw = ow0 * ST - g.pad_left + e * dw;
                px[f][e] = ih >= 0 && ih < g.h && iw >= 0 && iw < g.w
                               ? image + (ih * g.w + iw) * C
                               : zero.data();
              }
            }
            const int64_t at = ((n * g.oh + oh0) * g.ow + ow0) * C;
            for (int64_t c = c_begin; c < c_end; c += L) {
              asm volatile("" : : "r"(&px) : "memory");  // the table read again, see above
              const bool whole = c + L <= C;
              TileVec sum[R][P];
              if (whole) {
                nhwc_tile_sums<K, ST, false, S>(px, c, all, wt.data(), c_pad, bias.data(), sum);
              } else {
                nhwc_tile_sums<K, ST, true, S>(px, c, tail, wt.data(), c_pad, bias.data(), sum);
              }
              if (light && whole) {
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r) {
                  if (r >= rows) break;
#pragma GCC unroll 8
                  for (int k = 0; k < P; ++k) {
                    if (k >= cols) break;
                    TileVec v = sum[r][k];
                    if (relu) v = at::vec::clamp_min(Vec<float>(v), Vec<float>(0.f));
                    store_lanes(v, y + at + r * row_step + k * col_step + c, stream,
                                a.native_bf16);
                  }
                }
              } else {
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
                  for (int k = 0; k < P; ++k) Vec<float>(sum[r][k]).store(sums_out[r * P + k]);
                }
                nhwc_tile_epilogue<R, P, S>(sums_out, rows, cols, std::min(L, C - c), a.act,
                                            y + at + c, pre != nullptr ? pre + at + c : nullptr,
                                            row_step, col_step, a.native_bf16);
              }
            }
          }
        }
      }
    }
    if (stream) store_fence();
  });
}
#endif  // CPU_CAPABILITY_AVX512 || CPU_CAPABILITY_AVX2

// NHWC, multiplier 1. On AVX-512 and AVX2, strides 1 and 2 with square kernels of width 3, 5, 7 go
// to the tiles above (AVX2: but k7 at stride 2; the figures below are the rings' own, measured
// before the tiles took those cases). The channels go in blocks of kVectors vectors (then single
// vectors, the last one partial); a task is (image, group of blocks, band of output rows). The
// group's slices of the input rows the kernel spans are kept in rings (NhwcRings: each input
// element is read from the map once per task, widened once, and the taps never need a bounds check;
// as many blocks in a group as fit ring_budget()). Each output row is swept block by block, kPixels
// pixels at a time (at stride 1 mostly kPixels pixels dil_w apart, RingTaps::spread; AVX-512 Zen 5,
// one thread, [1,256,64,64]: float32 k3d2 1.02-1.13x -> 1.12-1.18x of F.conv2d, bfloat16 with the
// pairs too 0.54x -> 0.73-0.83x; with the CPU's dot product on kernel-row pairs, kDotPairs, against
// the split pairs, interleaved: k3d2 0.84-0.98x -> 0.88-1.01x, k5d2 1.02-1.03x -> 1.22x, k7d3 11x
// -> 15x, and at [8,256,64,64], two threads, k3d2 0.74-0.79x -> 0.86-0.88x, k5d2 0.82x -> 1.04x; a
// kernel row left over from the pairs in column pairs, RingTaps::dot_row_columns, against pairing
// it with zero, interleaved, two runs: one thread k3d2 and k5d2 +2-8%, k7d3 +20-27%; two threads at
// [1,256,64,64] k3d2 +10%, k5d2 +8%, at [8,256,64,64] 0-5%): the taps summed in registers, then the
// epilogue, and stored once; past the caches when the output is larger than the threads' L2 caches
// (stream_outputs: read-for-ownership of lines a pixel apart otherwise stalls the stores). The
// rings hold a band's rows as it moves down: each output row first loads, in one pass, only the
// input rows it is the first to reach. Copying them instead block by block into the row before, as
// each block finished with its oldest rows (so the copy would overlap the taps), was slower in all
// 24 cases measured on Zen 5 (AVX-512), interleaved in one process, two runs: k3d2, k5d2, k7d3,
// float32 and bfloat16, [1,256,64,64] one thread 3-25%, [8,256,64,64] two threads 3-16%. The fill
// and the taps do not overlap either way ([8,256,64,64] bfloat16 k3d2, two threads: taps alone 0.82
// ms, fill alone 0.77-0.95 ms, both 1.65-1.78 ms), and a deferred copy of whole pixels, an eighth
// of the row after each block (one more ring slot), was no faster than block by block. The rings go
// by pixels (one memcpy per row where the group is all the channels) where the output streams (the
// input comes from memory, the copy weighs most) and the kernel has at most 9 taps; by blocks
// otherwise, as the taps read a block's columns a pitch of the group's channels apart then (at 256
// float32 channels, 1 KiB: a few cache sets). By pixels against by blocks, interleaved in one
// process, Zen 5: [8,256,64,64] two threads k3d2 bfloat16 +15-17%, float32 +24-28% (the avx512 and
// avx2 copies: +10% and +9% bfloat16, +24% and +16% float32); but k5d2 -6% to +4%, k7d3 -14% to
// +7%, and at [1,256,64,64] one thread (input in cache) k3d2 -7% to +4%, k5d2 -23% to -2%.
template <class S>
void depthwise_forward_nhwc(const DepthwiseForwardArgs& a) {
  using T = compute_t<S>;
  constexpr int kVectors = 2;
  // The rings keep the map's own type: half types are widened as the taps load them. Half the
  // bytes of float rings to fill, hold and read: bfloat16 [8,256,64,64] forwards 1.3-1.5x faster
  // at batch 8 (two threads), no change at batch 1 (one thread, input in cache).
  using Rings = NhwcRings<S, kVectors, S>;
  constexpr int64_t L = Rings::L;
  // Accumulators: 16 registers for 32-register ISAs (AVX-512), 8 otherwise.
  constexpr int kPixels = Vec<float>::size() >= 16 ? 8 : 4;
  const auto& g = a.g;
  const S* x = static_cast<const S*>(a.input);
  const T* w = static_cast<const T*>(a.weight);
  const T* b = static_cast<const T*>(a.bias);
  S* y = static_cast<S*>(a.output);
  S* pre = static_cast<S*>(a.preact);
  const int64_t C = g.c_in, taps = g.kh * g.kw;
  if (g.n == 0 || g.oh == 0 || g.ow == 0 || C == 0) return;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (kUnrolledWidths<S>) {
    if (g.stride_h == g.stride_w && g.stride_h <= 2 && g.kh == g.kw &&
        std::getenv("TORCH_EXT_CONV_RINGS") == nullptr) {
      const bool s1 = g.stride_h == 1;
      switch (g.kh) {
        case 3:
          return s1 ? depthwise_forward_nhwc_tiles<S, 3, 1>(a)
                    : depthwise_forward_nhwc_tiles<S, 3, 2>(a);
        case 5:
          return s1 ? depthwise_forward_nhwc_tiles<S, 5, 1>(a)
                    : depthwise_forward_nhwc_tiles<S, 5, 2>(a);
        case 7:
          if (s1) return depthwise_forward_nhwc_tiles<S, 7, 1>(a);
          // AVX2: the rings (k7 at stride 2 in tiles of 16 registers measured slower).
          if (kTileLanes == 8) break;
          return depthwise_forward_nhwc_tiles<S, 7, 2>(a);
        default:
          break;
      }
    }
  }
#endif
  const typename Rings::Blocks cb(C);
  // The weight transposed to [tap][c_pad] and the bias to [c_pad], zero past C, so that a
  // block's weights and bias are whole vector loads.
  const int64_t c_pad = cb.c_pad;
  // Wide blocks of bfloat16 take their lanes in pairs (kPaired): their weights and bias in the
  // same order.
  // With the CPU's bfloat16 dot product, the wide blocks take kernel rows in pairs instead
  // (kDotPairs): their weights as pairs of bfloat16, weights and bias in the unpacked order.
  std::vector<T> wt(taps * c_pad, T(0)), bias(c_pad, T(0));
  constexpr bool paired = kPaired<S, S, kVectors>;
  const bool dot = kDotPairs && paired && a.native_bf16;
  std::vector<uint32_t> dot_wt(dot ? 3 * taps * c_pad : 0, 0);
  uint32_t* const dot_cols = dot_wt.data() + 2 * taps * c_pad;
  const auto bf16_bits = [](T v) { return uint32_t(c10::BFloat16(float(v)).x); };
  for (int64_t c = 0; c < C; ++c) {
    const int64_t lane = c % (2 * L);
    const bool in_wide = c < cb.blocked * Rings::Blocks::kWide;
    const int64_t at = paired && in_wide
                           ? c - lane + (dot ? unpack_order(lane) : pair_order(lane, L))
                           : c;
    for (int64_t t = 0; t < taps; ++t) wt[t * c_pad + at] = w[c * taps + t];
    if (b != nullptr) bias[at] = b[c];
    if (dot && in_wide) {
      for (int64_t i = 0; i < g.kh; ++i) {
        for (int64_t j = 0; j < g.kw; ++j) {
          const uint32_t lo = bf16_bits(w[c * taps + i * g.kw + j]);
          const uint32_t hi = i + 1 < g.kh ? bf16_bits(w[c * taps + (i + 1) * g.kw + j]) : 0;
          dot_wt[((2 * i) * g.kw + j) * c_pad + at] = lo | hi << 16;
          dot_wt[((2 * i + 1) * g.kw + j) * c_pad + at] = lo;
          if (j % 2 == 0) {
            const uint32_t next = j + 1 < g.kw ? bf16_bits(w[c * taps + i * g.kw + j + 1]) : 0;
            dot_cols[(i * g.kw + j) * c_pad + at] = lo | next << 16;
          }
        }
      }
    }
  }
  const KernelWindow win(g);
  const BlockGroups bg(cb.blocks, Rings::block_bytes(win.width, win.slots), ring_budget());
  // Bands of output rows: enough tasks for every thread (four each), else whole maps.
  const int64_t threads = at::get_num_threads();
  const int64_t bands =
      std::clamp<int64_t>((4 * threads + g.n * bg.groups - 1) / (g.n * bg.groups), 1, g.oh);
  const int64_t band_rows = (g.oh + bands - 1) / bands;
  const bool light = pre == nullptr && (a.act == Activation::None || a.act == Activation::Relu);
  const bool stream = stream_outputs(g.n * g.oh * g.ow * C, C, y, pre);
  const bool by_pixels = rings_by_pixels(stream && taps <= 9);
  at::parallel_for(0, g.n * bg.groups * bands, 1, [&](int64_t begin, int64_t end) {
    Rings rings(cb, g.w, win.width, win.slots, g.pad_left, bg.group_blocks, by_pixels);
    std::vector<const S*> row(g.kh);
    std::vector<int64_t> row_tap(g.kh);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t band = task % bands, group = task / bands % bg.groups;
      const int64_t n = task / bands / bg.groups;
      const int64_t b0 = bg.first(group), b1 = bg.end(group, cb.blocks);
      rings.start(x + n * g.h * g.w * C, b0, b1);
      const int64_t oh_begin = band * band_rows, oh_end = std::min(g.oh, oh_begin + band_rows);
      for (int64_t oh = oh_begin; oh < oh_end; ++oh) {
        const int64_t top = win.top(oh);
        // The rows this output row is the first to reach, in one pass of contiguous reads.
        rings.load(top, win.last(oh));
        const int64_t row_start = (n * g.oh + oh) * g.ow * C;
        for (int64_t blk = b0; blk < b1; ++blk) {
          // The rows the next output row will load, on their way to the cache while this one
          // runs: a share of the columns before each block.
          if (oh + 1 < oh_end) rings.prefetch(win.top(oh + 1), win.last(oh + 1), blk - b0, b1 - b0);
          const bool wide = cb.wide(blk);
          const int64_t c = cb.channel(blk), count = cb.count(blk);
          int64_t rows = 0;
          for (int64_t i = 0; i < g.kh; ++i) {
            const int64_t ih = top + i * g.dil_h;
            if (ih < 0 || ih >= g.h) continue;
            row[rows] = rings.row(blk, ih);
            row_tap[rows] = i;
            ++rows;
          }
          const RingTaps<T, S> t{row.data(),  row_tap.data(), rows,      g.kw,
                                 g.dil_w,     g.stride_w,     rings.step(blk), wt.data(), c_pad,
                                 bias.data(), a.act,          C,         stream && wide,
                                 a.native_bf16, dot && wide ? dot_wt.data() : nullptr,
                                 dot && wide ? dot_cols : nullptr};
          const auto sweep = [&](auto vectors, auto kernel_width, auto light_epilogue) {
            constexpr int V = decltype(vectors)::value, KW = decltype(kernel_width)::value;
            constexpr bool kLight = decltype(light_epilogue)::value;
            int64_t ow = 0;
            if constexpr (KW > 0) {
              // Stride 1: runs of kPixels * dil_w pixels, each as dil_w sets of kPixels pixels
              // dil_w apart (RingTaps::spread); the rest as below.
              const int64_t run = kPixels * g.dil_w;
              if (g.stride_w == 1) {
                for (; ow + run <= g.ow; ow += run) {
                  for (int64_t r = 0; r < g.dil_w; ++r) {
                    const int64_t at = row_start + (ow + r) * C + c;
                    t.template spread<kPixels, V, KW, kLight>(
                        ow + r, c, count, y + at, pre != nullptr ? pre + at : nullptr);
                  }
                }
              }
            }
            for (; ow + kPixels <= g.ow; ow += kPixels) {
              const int64_t at = row_start + ow * C + c;
              t.template block<kPixels, V, KW, kLight>(ow * g.stride_w, c, count, y + at,
                                                       pre != nullptr ? pre + at : nullptr);
            }
            for (; ow < g.ow; ++ow) {
              const int64_t at = row_start + ow * C + c;
              t.template block<1, V, KW, kLight>(ow * g.stride_w, c, count, y + at,
                                                 pre != nullptr ? pre + at : nullptr);
            }
          };
          const auto with_width = [&](auto vectors, auto light_epilogue) {
            if constexpr (kUnrolledWidths<S>) {
              switch (g.kw) {
                case 3:
                  return sweep(vectors, std::integral_constant<int, 3>{}, light_epilogue);
                case 5:
                  return sweep(vectors, std::integral_constant<int, 5>{}, light_epilogue);
                case 7:
                  return sweep(vectors, std::integral_constant<int, 7>{}, light_epilogue);
                default:
                  break;
              }
            }
            return sweep(vectors, std::integral_constant<int, 0>{}, light_epilogue);
          };
          const auto with_vectors = [&](auto light_epilogue) {
            if (wide) return with_width(std::integral_constant<int, kVectors>{}, light_epilogue);
            return with_width(std::integral_constant<int, 1>{}, light_epilogue);
          };
          if (light) {
            with_vectors(std::true_type{});
          } else {
            with_vectors(std::false_type{});
          }
        }
      }
    }
    if (stream) store_fence();
  });
}

// The sums over one output row of grad_output * input for the KW taps of one kernel row, one
// vector of lanes of one channel block: gy[p] is pixel p's vector (`step` elements apart), x[q]
// the ring's column q (the same), pixel p's tap j at column p * stride + j * dilation. The pixels
// go round P chains of accumulators (P * KW independent sums hide the latency of the fused
// multiply-adds). Adds the sums to acc[j * acc_stride + lane] in double.
template <int KW, int P, class T>
C10_ALWAYS_INLINE void tap_row_sums(const T* gy, const T* x, int64_t pixels, int64_t step,
                                    int64_t stride, int64_t dilation, double* acc,
                                    int64_t acc_stride) {
  constexpr int64_t L = Vec<T>::size();
  const int64_t pixel_step = stride * step, tap_step = dilation * step;
  Vec<T> s[P][KW];
  _Pragma("GCC unroll 8") for (int q = 0; q < P; ++q) {
    _Pragma("GCC unroll 8") for (int j = 0; j < KW; ++j) s[q][j] = Vec<T>(T(0));
  }
  int64_t p = 0;
  for (; p + P <= pixels; p += P) {
    _Pragma("GCC unroll 8") for (int q = 0; q < P; ++q) {
      const Vec<T> gv = Vec<T>::loadu(gy + (p + q) * step);
      const T* xp = x + (p + q) * pixel_step;
      _Pragma("GCC unroll 8") for (int j = 0; j < KW; ++j) {
        s[q][j] = at::vec::fmadd(gv, Vec<T>::loadu(xp + j * tap_step), s[q][j]);
      }
    }
  }
  for (; p < pixels; ++p) {
    const Vec<T> gv = Vec<T>::loadu(gy + p * step);
    const T* xp = x + p * pixel_step;
    _Pragma("GCC unroll 8") for (int j = 0; j < KW; ++j) {
      s[0][j] = at::vec::fmadd(gv, Vec<T>::loadu(xp + j * tap_step), s[0][j]);
    }
  }
  _Pragma("GCC unroll 8") for (int j = 0; j < KW; ++j) {
    Vec<T> total = s[0][j];
    _Pragma("GCC unroll 8") for (int q = 1; q < P; ++q) total = total + s[q][j];
    T lanes[L];
    total.store(lanes);
    for (int64_t l = 0; l < L; ++l) acc[j * acc_stride + l] += lanes[l];
  }
}

// The sum over one output row of grad_output, one vector of lanes of one channel block (pixel p
// at gy + p * step), added to acc[lane] in double: the bias gradient's share of the row.
template <class T>
C10_ALWAYS_INLINE void row_sums(const T* gy, int64_t pixels, int64_t step, double* acc) {
  constexpr int64_t L = Vec<T>::size();
  constexpr int kChains = 4;
  Vec<T> s[kChains];
  for (int q = 0; q < kChains; ++q) s[q] = Vec<T>(T(0));
  int64_t p = 0;
  for (; p + kChains <= pixels; p += kChains) {
    _Pragma("GCC unroll 4") for (int q = 0; q < kChains; ++q) {
      s[q] = s[q] + Vec<T>::loadu(gy + (p + q) * step);
    }
  }
  for (; p < pixels; ++p) s[0] = s[0] + Vec<T>::loadu(gy + p * step);
  const Vec<T> total = (s[0] + s[1]) + (s[2] + s[3]);
  T lanes[L];
  total.store(lanes);
  for (int64_t l = 0; l < L; ++l) acc[l] += lanes[l];
}

// NHWC, multiplier 1: grad_weight[c, tap] = sum over (n, oh, ow) of grad_preact * input, and
// grad_bias[c] = sum of grad_preact (when asked for). The work is cut by the shape alone: (image,
// band of output rows) units, in `parts` consecutive runs, each run with its own double sums
// [tap][c_pad] (then the bias's [c_pad]), then the runs summed in order; so the result does not
// depend on the thread count. A task is (run, group of channel blocks); it holds grad_preact's
// output row and the input rows the kernel spans in rings (NhwcRings, as the forward does), and
// for each block, kernel row and vector of lanes sums the kw taps over the row's pixels in
// registers (float, as the NCHW kernel's per-row dot products), then adds them in double.
template <class S>
void depthwise_backward_weight_nhwc(const DepthwiseBackwardWeightArgs& a) {
  using T = compute_t<S>;
  constexpr int kVectors = 2;
  using Rings = NhwcRings<S, kVectors, T>;
  constexpr int64_t L = Rings::L;
  // Chains of accumulators per tap: at least 8 sums in flight, within the vector registers.
  constexpr bool kWideIsa = Vec<float>::size() >= 16;
  const auto& g = a.g;
  const S* gy = static_cast<const S*>(a.grad_preact);
  const S* x = static_cast<const S*>(a.input);
  T* gw = static_cast<T*>(a.grad_weight);
  T* gb = static_cast<T*>(a.grad_bias);
  const int64_t C = g.c_in, taps = g.kh * g.kw;
  if (C == 0) return;
  const typename Rings::Blocks cb(C);
  const int64_t c_pad = cb.c_pad;
  std::vector<double> sums;
  int64_t parts = 0;
  if (g.n > 0 && g.oh > 0 && g.ow > 0) {
    const KernelWindow win(g);
    const BlockGroups bg(cb.blocks,
                         Rings::block_bytes(win.width, win.slots) + Rings::block_bytes(g.ow, 1),
                         ring_budget());
    // About 64 units, each with whole output rows; at most 64 runs, and at most 8 MiB of sums.
    const int64_t bands = std::clamp<int64_t>((64 + g.n - 1) / g.n, 1, g.oh);
    const int64_t band_rows = (g.oh + bands - 1) / bands;
    const int64_t units_per_image = (g.oh + band_rows - 1) / band_rows;
    const int64_t units = g.n * units_per_image;
    const int64_t sums_size = (taps + 1) * c_pad;  // the weight's, then the bias's
    parts =
        std::clamp<int64_t>(std::min<int64_t>(64, (int64_t{8} << 20) / (8 * sums_size)), 1, units);
    sums.assign(parts * sums_size, 0.0);
    at::parallel_for(0, parts * bg.groups, 1, [&](int64_t begin, int64_t end) {
      Rings xr(cb, g.w, win.width, win.slots, g.pad_left, bg.group_blocks);
      Rings gr(cb, g.ow, g.ow, 1, 0, bg.group_blocks);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t part = task / bg.groups, group = task % bg.groups;
        const int64_t b0 = bg.first(group), b1 = bg.end(group, cb.blocks);
        double* acc = sums.data() + part * sums_size;
        for (int64_t unit = part * units / parts; unit < (part + 1) * units / parts; ++unit) {
          const int64_t n = unit / units_per_image;
          const int64_t oh_begin = unit % units_per_image * band_rows;
          const int64_t oh_end = std::min(g.oh, oh_begin + band_rows);
          xr.start(x + n * g.h * g.w * C, b0, b1);
          gr.start(gy + n * g.oh * g.ow * C, b0, b1);
          for (int64_t oh = oh_begin; oh < oh_end; ++oh) {
            const int64_t top = win.top(oh);
            xr.load(top, win.last(oh));
            gr.load(oh, oh + 1);
            if (oh + 1 < oh_end) {
              xr.prefetch(win.top(oh + 1), win.last(oh + 1));
              gr.prefetch(oh + 1, oh + 2);
            }
            for (int64_t blk = b0; blk < b1; ++blk) {
              const int64_t lanes = cb.lanes(blk), c = cb.channel(blk);
              const T* grow = gr.row(blk, oh);
              if (gb != nullptr) {
                for (int64_t v = 0; v < lanes; v += L) {
                  row_sums(grow + v, g.ow, lanes, acc + taps * c_pad + c + v);
                }
              }
              for (int64_t i = 0; i < g.kh; ++i) {
                const int64_t ih = top + i * g.dil_h;
                if (ih < 0 || ih >= g.h) continue;
                const T* xrow = xr.row(blk, ih);
                for (int64_t v = 0; v < lanes; v += L) {
                  double* out = acc + i * g.kw * c_pad + c + v;
                  const T* gv = grow + v;
                  const T* xv = xrow + v;
                  const int64_t sx = g.stride_w, dx = g.dil_w;
                  const auto one_tap_at_a_time = [&] {  // any other width
                    for (int64_t j = 0; j < g.kw; ++j) {
                      tap_row_sums<1, 8>(gv, xv + j * dx * lanes, g.ow, lanes, sx, dx,
                                         out + j * c_pad, c_pad);
                    }
                  };
                  if constexpr (kUnrolledWidths<S>) {
                    switch (g.kw) {
                      case 3:
                        tap_row_sums<3, kWideIsa ? 4 : 3>(gv, xv, g.ow, lanes, sx, dx, out, c_pad);
                        break;
                      case 5:
                        tap_row_sums<5, 2>(gv, xv, g.ow, lanes, sx, dx, out, c_pad);
                        break;
                      case 7:
                        tap_row_sums<7, kWideIsa ? 2 : 1>(gv, xv, g.ow, lanes, sx, dx, out, c_pad);
                        break;
                      default:
                        one_tap_at_a_time();
                    }
                  } else {
                    one_tap_at_a_time();
                  }
                }
              }
            }
          }
        }
      }
    });
  }
  const auto total = [&](int64_t row, int64_t c) {
    double sum = 0;
    for (int64_t part = 0; part < parts; ++part) sum += sums[(part * (taps + 1) + row) * c_pad + c];
    return static_cast<T>(sum);
  };
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t t = 0; t < taps; ++t) gw[c * taps + t] = total(t, c);
    if (gb != nullptr) gb[c] = total(taps, c);
  }
}

template <class S>
void depthwise_forward(const DepthwiseForwardArgs& a) {
  if (a.channels_last) return depthwise_forward_nhwc<S>(a);
  depthwise_forward_nchw<S>(a);
}

// Stride 1: the input gradient is the correlation of the zero-padded output gradient with the
// flipped taps, summed over the channel's multiplier outputs; a gather, so the same kernel.
template <class T>
void depthwise_backward_input_padded(const DepthwiseBackwardInputArgs& a) {
  const auto& g = a.g;
  const T* gy = static_cast<const T*>(a.grad_preact);
  const T* w = static_cast<const T*>(a.weight);
  T* gx = static_cast<T*>(a.grad_input);
  const int64_t mult = g.c_out / g.c_in;
  const int64_t reach_h = (g.kh - 1) * g.dil_h, reach_w = (g.kw - 1) * g.dil_w;
  const int64_t prows = g.h + reach_h, pcols = g.w + reach_w;
  const int64_t taps = g.kh * g.kw, plane_in = g.h * g.w, plane_out = g.oh * g.ow;
  std::vector<int64_t> offset(taps);
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) {
      offset[i * g.kw + j] = (g.kh - 1 - i) * g.dil_h * pcols + (g.kw - 1 - j) * g.dil_w;
    }
  }
  at::parallel_for(0, g.n * g.c_in, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(prows * pcols);
    std::vector<Vec<T>> wv(taps);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / g.c_in, ci = plane % g.c_in;
      T* gxp = gx + plane * plane_in;
      for (int64_t m = 0; m < mult; ++m) {
        const int64_t co = ci * mult + m;
        // buf row r holds output row r - reach_h + pad_top (zero outside the output).
        pad_plane(gy + (n * g.c_out + co) * plane_out, g.oh, g.ow, buf.data(), prows, pcols,
                  reach_h - g.pad_top, reach_w - g.pad_left);
        for (int64_t t = 0; t < taps; ++t) wv[t] = Vec<T>(w[co * taps + t]);
        for (int64_t ih = 0; ih < g.h; ++ih) {
          tap_rows(buf.data() + ih * pcols, offset.data(), wv.data(), taps, gxp + ih * g.w, g.w,
                   m > 0);
        }
      }
    }
  });
}

template <class T>
void depthwise_backward_input(const DepthwiseBackwardInputArgs& a) {
  if (a.g.stride_h == 1 && a.g.stride_w == 1) return depthwise_backward_input_padded<T>(a);
  const auto& g = a.g;
  const T* gy = static_cast<const T*>(a.grad_preact);
  const T* w = static_cast<const T*>(a.weight);
  T* gx = static_cast<T*>(a.grad_input);
  const int64_t mult = g.c_out / g.c_in;
  const int64_t plane_in = g.h * g.w, plane_out = g.oh * g.ow, taps = g.kh * g.kw;
  at::parallel_for(0, g.n * g.c_in, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / g.c_in, ci = plane % g.c_in;
      T* gxp = gx + plane * plane_in;
      std::fill(gxp, gxp + plane_in, T(0));
      for (int64_t m = 0; m < mult; ++m) {
        const int64_t co = ci * mult + m;
        const T* gyp = gy + (n * g.c_out + co) * plane_out;
        const T* wp = w + co * taps;
        for (int64_t oh = 0; oh < g.oh; ++oh) {
          const T* gr = gyp + oh * g.ow;
          for (int64_t i = 0; i < g.kh; ++i) {
            const int64_t ih = oh * g.stride_h - g.pad_top + i * g.dil_h;
            if (ih < 0 || ih >= g.h) continue;
            T* xr = gxp + ih * g.w;
            for (int64_t j = 0; j < g.kw; ++j) {
              const int64_t off = j * g.dil_w - g.pad_left;
              int64_t lo, hi;
              tap_columns(off, g.stride_w, g.w, g.ow, lo, hi);
              const T wv = wp[i * g.kw + j];
              if (g.stride_w == 1) {
                axpy(xr + lo + off, gr + lo, wv, hi - lo);
              } else {
                for (int64_t ow = lo; ow < hi; ++ow) xr[ow * g.stride_w + off] += wv * gr[ow];
              }
            }
          }
        }
      }
    }
  });
}

// The weight (and bias) gradient sums of one channel's plane at stride 1 along the width, for
// kernels KW wide, kernel rows G at a time: G * KW vector sums per U column vectors over every
// output row (each grad_output vector loaded once per G kernel rows, the input rows' shifted
// vectors against it: U * G * KW independent chains), added to the double sums acc[i * KW + j]
// (and *bias_acc) every kFlushRows rows, lanes and chains in a fixed order. gy: the plane's
// grad_preact [oh, ow]; buf: the zero-padded input plane (pitch pcols). The columns past ow are
// loaded masked (as zero), so nothing past a row enters the sums.
template <int KW, int G>
void plane_weight_sums(const float* gy, const float* buf, int64_t pcols, const ConvGeometry& g,
                       double* acc, double* bias_acc) {
  constexpr int64_t L = Vec<float>::size();
  // Chains within the registers: 16 on AVX2 (U = 1 past 7 sums), 32 on AVX-512.
  constexpr int U = G * KW > (L < 16 ? 7 : 18) ? 1 : 2;
  constexpr int64_t kFlushRows = 8;
  const auto load = [](const float* p, int64_t count) {
    if (count >= L) return Vec<float>::loadu(p);
    return count > 0 ? Vec<float>::loadu(p, count) : Vec<float>(0.f);
  };
  const auto flush = [](Vec<float>* sums, int n, double* to) {
    float lanes[L];
    for (int k = 0; k < n; ++k) {
      sums[k].store(lanes);
      double total = 0;
      for (int64_t l = 0; l < L; ++l) total += lanes[l];
      to[k] += total;
      sums[k] = Vec<float>(0.f);
    }
  };
  const auto rows = [&](int64_t i0, auto group) {
    constexpr int GG = decltype(group)::value;
    const bool with_bias = bias_acc != nullptr && i0 == 0;
    Vec<float> sums[U][GG * KW], bias_sums[U];
    for (int u = 0; u < U; ++u) {
      bias_sums[u] = Vec<float>(0.f);
      for (int t = 0; t < GG * KW; ++t) sums[u][t] = Vec<float>(0.f);
    }
    for (int64_t oh = 0; oh < g.oh; ++oh) {
      const float* gr = gy + oh * g.ow;
      const float* xr = buf + (oh * g.stride_h + i0 * g.dil_h) * pcols;
      for (int64_t c = 0; c < g.ow; c += U * L) {
#pragma GCC unroll 2
        for (int u = 0; u < U; ++u) {
          const int64_t at = c + u * L, count = g.ow - at;
          const auto gv = load(gr + at, count);
          if (with_bias) bias_sums[u] = bias_sums[u] + gv;
#pragma GCC unroll 4
          for (int r = 0; r < GG; ++r) {
            const float* xi = xr + r * g.dil_h * pcols + at;
#pragma GCC unroll 8
            for (int j = 0; j < KW; ++j) {
              sums[u][r * KW + j] =
                  at::vec::fmadd(gv, load(xi + j * g.dil_w, count), sums[u][r * KW + j]);
            }
          }
        }
      }
      if ((oh + 1) % kFlushRows == 0 || oh + 1 == g.oh) {
        for (int u = 0; u < U; ++u) {
          flush(sums[u], GG * KW, acc + i0 * KW);
          if (with_bias) flush(&bias_sums[u], 1, bias_acc);
        }
      }
    }
  };
  int64_t i = 0;
  for (; i + G <= g.kh; i += G) rows(i, std::integral_constant<int, G>{});
  for (; i < g.kh; ++i) rows(i, std::integral_constant<int, 1>{});
}

template <class T>
void depthwise_backward_weight(const DepthwiseBackwardWeightArgs& a) {
  const auto& g = a.g;
  const T* gy = static_cast<const T*>(a.grad_preact);
  const T* x = static_cast<const T*>(a.input);
  T* gw = static_cast<T*>(a.grad_weight);
  T* gb = static_cast<T*>(a.grad_bias);
  const int64_t mult = g.c_out / g.c_in;
  const int64_t prows = padded_rows(g), pcols = padded_cols(g);
  const int64_t plane_in = g.h * g.w, plane_out = g.oh * g.ow, taps = g.kh * g.kw;
  // Float maps, stride 1 along the width, kernels 3, 5 or 7 wide: the sums of a whole plane in
  // vector registers (plane_weight_sums); otherwise a dot product per output row and tap.
  // Stride 2 along the width: dot products on the rows split into even and odd columns.
  const bool by_plane =
      kUnrolledWidths<T> && g.stride_w == 1 && (g.kw == 3 || g.kw == 5 || g.kw == 7);
  const bool split = g.stride_w == 2;
  const int64_t evens = (pcols + 1) / 2;
  at::parallel_for(0, g.c_out, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> acc(taps);
    std::vector<T> buf(prows * pcols), split_row(split ? pcols : 0);
    for (int64_t co = begin; co < end; ++co) {
      std::fill(acc.begin(), acc.end(), 0.0);
      double bias_sum = 0;
      for (int64_t n = 0; n < g.n; ++n) {
        const T* gyp = gy + (n * g.c_out + co) * plane_out;
        pad_plane(x + (n * g.c_in + co / mult) * plane_in, g.h, g.w, buf.data(), prows, pcols,
                  g.pad_top, g.pad_left);
        if constexpr (kUnrolledWidths<T>) {
          if (by_plane) {
            double* bias_at = gb != nullptr ? &bias_sum : nullptr;
            if (g.kw == 3) {
              plane_weight_sums<3, 3>(gyp, buf.data(), pcols, g, acc.data(), bias_at);
            } else if (g.kw == 5) {
              plane_weight_sums<5, 1>(gyp, buf.data(), pcols, g, acc.data(), bias_at);
            } else {
              plane_weight_sums<7, 1>(gyp, buf.data(), pcols, g, acc.data(), bias_at);
            }
            continue;
          }
        }
        if (gb != nullptr) {
          for (int64_t oh = 0; oh < g.oh; ++oh) {
            bias_sum += at::vec::reduce_all<T>([](auto& l, auto& r) { return l + r; },
                                               gyp + oh * g.ow, g.ow);
          }
        }
        if (split) split_even_odd(buf.data(), prows, pcols, split_row.data());
        for (int64_t oh = 0; oh < g.oh; ++oh) {
          const T* gr = gyp + oh * g.ow;
          for (int64_t i = 0; i < g.kh; ++i) {
            const T* xr = buf.data() + (oh * g.stride_h + i * g.dil_h) * pcols;
            for (int64_t j = 0; j < g.kw; ++j) {
              T sum = 0;
              const int64_t col = j * g.dil_w;
              if (g.stride_w == 1) {
                sum = dot(gr, xr + col, g.ow);
              } else if (split) {
                sum = dot(gr, xr + split_column(col, evens), g.ow);
              } else {
                for (int64_t ow = 0; ow < g.ow; ++ow) {
                  sum += gr[ow] * xr[ow * g.stride_w + j * g.dil_w];
                }
              }
              acc[i * g.kw + j] += sum;
            }
          }
        }
      }
      for (int64_t t = 0; t < taps; ++t) gw[co * taps + t] = static_cast<T>(acc[t]);
      if (gb != nullptr) gb[co] = static_cast<T>(bias_sum);
    }
  });
}

// ---------------------------------------------------------------- im2col tiles

// Calls f(dst_offset, oh, ow0, ow1) for the runs of pixels p0 .. p1 - 1 that share an output
// row; dst_offset is the run's first column in the tile.
template <class F>
inline void for_each_row_run(const ConvGeometry& g, int64_t p0, int64_t p1, F&& f) {
  int64_t p = p0;
  while (p < p1) {
    const int64_t oh = p / g.ow, ow0 = p - oh * g.ow;
    const int64_t ow1 = std::min(g.ow, ow0 + (p1 - p));
    f(p - p0, oh, ow0, ow1);
    p += ow1 - ow0;
  }
}

// One run of a tile row: tap row `row` = (ci, i, j) of the im2col matrix over the output pixels
// of one output row, columns [ow0, ow1) at tile offset d (column d of the tile is ow0). Input
// row ih (or -1 when the tap row falls into the padding) is read at ow * stride_w + off for
// ow in [lo, hi); the rest of [ow0, ow1) falls into the padding.
struct TapRun {
  int64_t ci, row, d, ih, off, ow0, lo, hi, ow1;
};

// Calls f(run) for every run of the tile p0 .. p1 - 1, channel by channel; a task owns whole
// channels, so col2im's adds into one channel never race.
template <class F>
void for_each_tap_run(const ConvGeometry& g, int64_t p0, int64_t p1, F&& f) {
  at::parallel_for(0, g.c_in_per_group(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t ci = begin; ci < end; ++ci) {
      for (int64_t i = 0; i < g.kh; ++i) {
        for (int64_t j = 0; j < g.kw; ++j) {
          const int64_t row = (ci * g.kh + i) * g.kw + j, off = j * g.dil_w - g.pad_left;
          int64_t lo_all, hi_all;
          tap_columns(off, g.stride_w, g.w, g.ow, lo_all, hi_all);
          for_each_row_run(g, p0, p1, [&](int64_t d, int64_t oh, int64_t ow0, int64_t ow1) {
            const int64_t ih = oh * g.stride_h - g.pad_top + i * g.dil_h;
            if (ih < 0 || ih >= g.h) return f(TapRun{ci, row, d, -1, off, ow0, ow0, ow0, ow1});
            const int64_t lo = std::clamp(lo_all, ow0, ow1), hi = std::clamp(hi_all, lo, ow1);
            f(TapRun{ci, row, d, ih, off, ow0, lo, hi, ow1});
          });
        }
      }
    }
  });
}

template <class T>
void im2col(const Im2colArgs& a) {
  const auto& g = a.g;
  const T* img = static_cast<const T*>(a.image);
  T* col = static_cast<T*>(a.col);
  const int64_t tile = a.p1 - a.p0;
  for_each_tap_run(g, a.p0, a.p1, [&](const TapRun& r) {
    T* out = col + r.row * tile + r.d - r.ow0;  // out[ow] for ow in [ow0, ow1)
    std::fill(out + r.ow0, out + r.lo, T(0));
    if (r.ih >= 0) {
      const T* xr = img + (r.ci * g.h + r.ih) * g.w;
      if (g.stride_w == 1) {
        std::memcpy(out + r.lo, xr + r.lo + r.off, (r.hi - r.lo) * sizeof(T));
      } else {
        for (int64_t ow = r.lo; ow < r.hi; ++ow) out[ow] = xr[ow * g.stride_w + r.off];
      }
    }
    std::fill(out + r.hi, out + r.ow1, T(0));
  });
}

template <class T>
void col2im(const Col2imArgs& a) {
  const auto& g = a.g;
  const T* col = static_cast<const T*>(a.col);
  T* img = static_cast<T*>(a.image);
  const int64_t tile = a.p1 - a.p0;
  for_each_tap_run(g, a.p0, a.p1, [&](const TapRun& r) {
    if (r.ih < 0) return;
    const T* in = col + r.row * tile + r.d - r.ow0;
    T* xr = img + (r.ci * g.h + r.ih) * g.w;
    if (g.stride_w == 1) {
      add_to(xr + r.lo + r.off, in + r.lo, r.hi - r.lo);
    } else {
      for (int64_t ow = r.lo; ow < r.hi; ++ow) xr[ow * g.stride_w + r.off] += in[ow];
    }
  });
}

template <class T>
void epilogue(const EpilogueArgs& a) {
  T* data = static_cast<T*>(a.data);
  const T* bias = static_cast<const T*>(a.bias);
  T* pre = static_cast<T*>(a.preact);
  at::parallel_for(0, a.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      epilogue_row(data + r * a.ld, a.cols, bias != nullptr ? bias[r] : T(0),
                   pre != nullptr ? pre + r * a.preact_ld : nullptr, a.act);
    }
  });
}

// float and double only: conv_cpu.cpp hands the half types over in float.
template <class F>
void dispatch_float_double(c10::ScalarType dtype, F&& f) {
  if (dtype == c10::ScalarType::Double) return f(double{});
  TORCH_CHECK(dtype == c10::ScalarType::Float,
              "dilated_conv2d CPU kernel: expected float32 or "
              "float64, got ",
              dtype);
  f(float{});
}

#define TORCH_EXT_CONV_ENTRY(name, Args)                                       \
  void name##_entry(const Args& a) {                                           \
    dispatch_float_double(a.dtype, [&](auto tag) { name<decltype(tag)>(a); }); \
  }
// The depthwise forward reads and writes the half types itself.
void depthwise_forward_entry(const DepthwiseForwardArgs& a) {
  dispatch_float_types(a.dtype, "dilated_conv2d CPU kernel",
                       [&](auto tag) { depthwise_forward<decltype(tag)>(a); });
}
TORCH_EXT_CONV_ENTRY(depthwise_backward_input, DepthwiseBackwardInputArgs)
// The NHWC weight gradient reads the half types itself too.
void depthwise_backward_weight_entry(const DepthwiseBackwardWeightArgs& a) {
  if (a.channels_last) {
    return dispatch_float_types(a.dtype, "dilated_conv2d CPU kernel", [&](auto tag) {
      depthwise_backward_weight_nhwc<decltype(tag)>(a);
    });
  }
  dispatch_float_double(a.dtype, [&](auto tag) { depthwise_backward_weight<decltype(tag)>(a); });
}
TORCH_EXT_CONV_ENTRY(im2col, Im2colArgs)
TORCH_EXT_CONV_ENTRY(col2im, Col2imArgs)
TORCH_EXT_CONV_ENTRY(epilogue, EpilogueArgs)
#undef TORCH_EXT_CONV_ENTRY

}  // namespace
}  // namespace CPU_CAPABILITY

const ConvCpuKernels TORCH_EXT_CPU_KERNEL_TABLE(conv_cpu_kernels) = {
    depthwise_forward_entry,
    depthwise_backward_input_entry,
    depthwise_backward_weight_entry,
    im2col_entry,
    col2im_entry,
    epilogue_entry};

}  // namespace torch_ext::conv_impl
