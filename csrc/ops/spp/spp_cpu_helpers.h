#pragma once

// Loops shared by the spp and sppf CPU kernel files (compiled once per CPU capability).

#include <ATen/cpu/vec/vec.h>

#include <cstring>
#include <type_traits>

#include "common/cpu_kernel_utils.h"
#include "ops/spp/spp_cpu_kernel.h"

namespace torch_ext::spp_impl {
inline namespace CPU_CAPABILITY {

// Adaptive pooling bins, shared with the CUDA kernels (common/numerics.h).
using numerics::bin_end;
using numerics::bin_start;

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
}  // namespace CPU_CAPABILITY
}  // namespace torch_ext::spp_impl
