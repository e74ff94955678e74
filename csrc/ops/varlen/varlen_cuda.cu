// CUDA kernels of the varlen family.
//
// unpad plan: one block per row counts its real tokens; one thread turns the counts into
// cu_seqlens and (total, longest); one block per row then writes the row's token positions (a
// block-wide exclusive scan over per-thread chunks keeps the row-major order). The only
// device-to-host transfer is (total, longest) together, and it is skipped when the caller gives
// total_tokens. Row gathers/scatters copy whole rows in the widest unit (up to 16 bytes) the
// row size and alignment allow. The scatter (index_put_first_axis, pad_input's) writes every
// output row once: the inverse of its index (for each output row, the source row or -1) is
// built first, a pass over a few bytes per row, then each output row is either a copied source
// row or zeros (no separate zero fill of the output; indices are unique: no atomics).
// An out-of-range index trips a device-side assert, as in PyTorch's own index ops.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string_view>

#include "common/cuda_launch.cuh"
#include "common/dispatch.h"
#include "ops/varlen/varlen_common.h"
#include "ops/varlen/varlen_ops.h"

namespace torch_ext::varlen_impl {
namespace {

constexpr int kThreads = launch::kBlockThreads;

template <class M>
__global__ void count_rows(const M* __restrict__ mask, int64_t seqlen,
                           int32_t* __restrict__ seqused) {
  __shared__ int32_t partial[kThreads];
  const M* row = mask + blockIdx.x * seqlen;
  int32_t count = 0;
  for (int64_t s = threadIdx.x; s < seqlen; s += kThreads) count += row[s] != M(0);
  partial[threadIdx.x] = count;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) seqused[blockIdx.x] = partial[0];
}

// cu_seqlens from the counts, and stats = (total, longest).
// expected: the caller's total_tokens (or -1): a wrong one trips a device-side assert instead of
// leaving indices unwritten or cut short.
__global__ void prefix_rows(const int32_t* __restrict__ seqused, int64_t batch,
                            int32_t* __restrict__ cu, int64_t* __restrict__ stats,
                            int64_t expected) {
  int64_t total = 0, longest = 0;
  cu[0] = 0;
  for (int64_t b = 0; b < batch; ++b) {
    total += seqused[b];
    longest = seqused[b] > longest ? seqused[b] : longest;
    cu[b + 1] = static_cast<int32_t>(total);
  }
  stats[0] = total;
  stats[1] = longest;
  CUDA_KERNEL_ASSERT(total <= 2147483647 && "more than 2^31 - 1 real tokens do not fit int32");
  CUDA_KERNEL_ASSERT((expected < 0 || total == expected) && "total_tokens != real tokens");
}

// Positions of the real tokens of row blockIdx.x, from cu[b] on; never past `limit` entries.
template <class M>
__global__ void row_positions(const M* __restrict__ mask, int64_t seqlen,
                              const int32_t* __restrict__ cu, int64_t limit,
                              int64_t* __restrict__ indices) {
  __shared__ int64_t offsets[kThreads];
  const int64_t b = blockIdx.x;
  const M* row = mask + b * seqlen;
  const int64_t chunk = (seqlen + kThreads - 1) / kThreads;
  const int64_t first = static_cast<int64_t>(threadIdx.x) * chunk;
  const int64_t begin = first < seqlen ? first : seqlen;
  const int64_t end = begin + chunk < seqlen ? begin + chunk : seqlen;
  int64_t count = 0;
  for (int64_t s = begin; s < end; ++s) count += row[s] != M(0);
  offsets[threadIdx.x] = count;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t running = 0;
    for (int t = 0; t < kThreads; ++t) {
      const int64_t c = offsets[t];
      offsets[t] = running;
      running += c;
    }
  }
  __syncthreads();
  int64_t out = cu[b] + offsets[threadIdx.x];
  for (int64_t s = begin; s < end; ++s) {
    if (row[s] != M(0)) {
      if (out >= 0 && out < limit) indices[out] = b * seqlen + s;
      ++out;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, c10::SymInt, at::Tensor> unpad_plan_cuda(
    const at::Tensor& mask_, std::optional<c10::SymInt> total_tokens,
    std::optional<c10::SymInt> max_seqlen) {
  check_unpad_plan_args(mask_, total_tokens, max_seqlen);
  const c10::cuda::CUDAGuard guard(mask_.device());
  const auto mask = mask_.contiguous();
  const int64_t batch = mask.size(0), seqlen = mask.size(1);
  auto int_options = mask.options().dtype(at::kInt);
  auto cu_seqlens = at::empty({batch + 1}, int_options);
  auto seqused = at::empty({batch}, int_options);
  auto stats = at::empty({2}, mask.options().dtype(at::kLong));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_mask_types(mask.scalar_type(), [&](auto tag) {
    using M = decltype(tag);
    if (batch > 0) {
      count_rows<M><<<batch, kThreads, 0, stream>>>(mask.const_data_ptr<M>(), seqlen,
                                                    seqused.mutable_data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    prefix_rows<<<1, 1, 0, stream>>>(seqused.const_data_ptr<int32_t>(), batch,
                                     cu_seqlens.mutable_data_ptr<int32_t>(),
                                     stats.mutable_data_ptr<int64_t>(),
                                     total_tokens.has_value() ? total_tokens->expect_int() : -1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  int64_t total, longest = seqlen;
  if (total_tokens.has_value()) {
    total = total_tokens->expect_int();  // the caller's word: no transfer
    TORCH_CHECK(total >= 0 && total <= std::numeric_limits<int32_t>::max(),
                "unpad_input(): total_tokens must be in [0, 2^31 - 1], got ", total);
  } else {
    const auto host = stats.cpu();  // the one device-to-host transfer: (total, longest)
    total = host.const_data_ptr<int64_t>()[0];
    longest = host.const_data_ptr<int64_t>()[1];
    TORCH_CHECK(total <= std::numeric_limits<int32_t>::max(),
                "unpad_input(): more than 2^31 - 1 real tokens do not fit int32 cu_seqlens");
  }
  auto indices = at::empty({total}, mask.options().dtype(at::kLong));
  if (batch > 0 && total > 0) {
    dispatch_mask_types(mask.scalar_type(), [&](auto tag) {
      using M = decltype(tag);
      row_positions<M><<<batch, kThreads, 0, stream>>>(mask.const_data_ptr<M>(), seqlen,
                                                       cu_seqlens.const_data_ptr<int32_t>(), total,
                                                       indices.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const int64_t reported = max_seqlen.has_value() ? max_seqlen->expect_int() : longest;
  return {indices, cu_seqlens, c10::SymInt(reported), seqused};
}

// ---------------------------------------------------------------- row copies

// The source row of each destination row of a gather: idx[r], checked (out of range: a
// device-side assert; where asserts are compiled out, no row: zeros).
struct GatherSource {
  const int64_t* idx;
  int64_t limit;
  __device__ __forceinline__ int64_t operator()(int64_t r) const {
    const int64_t target = idx[r];
    CUDA_KERNEL_ASSERT(target >= 0 && target < limit);
    return target >= 0 && target < limit ? target : -1;
  }
};

// ... of a scatter written as a gather: the inverted index (-1: a row of zeros).
struct InverseSource {
  const int64_t* src_of;
  __device__ __forceinline__ int64_t operator()(int64_t r) const { return src_of[r]; }
};

// Rows of at least this many units take a block per row (no division per element).
constexpr int64_t kWideRowUnits = 128;
constexpr int kRowThreads = 128;

// dst row r <- src row source(r) (zeros where it is -1), in units U; source rows are read
// src_row_units apart (the input's row stride: rows that are each contiguous, of an expanded or
// sliced first axis, are read in place). Wide rows: blocks stride over rows, threads over a
// row's units; narrow ones: threads stride over all units.
template <class U, class Source>
__global__ void copy_rows(const U* __restrict__ src, U* __restrict__ dst, Source source,
                          int64_t rows, int64_t units, int64_t src_row_units) {
  if (units >= kWideRowUnits) {
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
      const int64_t from = source(r);
      const U* s = src + (from >= 0 ? from : 0) * src_row_units;
      U* d = dst + r * units;
      for (int64_t u = threadIdx.x; u < units; u += blockDim.x) d[u] = from >= 0 ? s[u] : U{};
    }
    return;
  }
  const int64_t total = rows * units;
  for (int64_t e = launch::grid_stride_first(); e < total;
       e += launch::grid_stride_step()) {
    const int64_t r = e / units, u = e % units;
    const int64_t from = source(r);
    dst[e] = from >= 0 ? src[from * src_row_units + u] : U{};
  }
}

template <class U, class Source>
void launch_rows(const void* src, void* dst, Source source, int64_t rows, int64_t units,
                 int64_t src_row_units, cudaStream_t stream) {
  if (units >= kWideRowUnits) {
    copy_rows<U><<<launch::grid_stride_blocks(rows, 1), kRowThreads, 0, stream>>>(
        static_cast<const U*>(src), static_cast<U*>(dst), source, rows, units, src_row_units);
  } else {
    copy_rows<U><<<launch::grid_stride_blocks(rows * units, kThreads), kThreads, 0, stream>>>(
        static_cast<const U*>(src), static_cast<U*>(dst), source, rows, units, src_row_units);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// src_of[idx[r]] = r for the rows r of a scatter (src_of holds -1 before): its index inverted.
__global__ void invert_rows(const int64_t* __restrict__ idx, int64_t rows,
                            int64_t* __restrict__ src_of, int64_t limit) {
  for (int64_t r = launch::grid_stride_first(); r < rows; r += launch::grid_stride_step()) {
    const int64_t target = idx[r];
    CUDA_KERNEL_ASSERT(target >= 0 && target < limit);
    if (target >= 0 && target < limit) src_of[target] = r;  // else: no row (asserts compiled out)
  }
}

// fn(U{}) with the widest copy unit (16, 8, 4, 2 or 1 bytes) that divides the row sizes and to
// which both pointers are aligned.
template <class F>
void with_row_unit(const void* src, const void* dst, int64_t row_bytes, int64_t src_row_bytes,
                   F&& fn) {
  const auto aligned = [&](int64_t unit) {
    return row_bytes % unit == 0 && src_row_bytes % unit == 0 &&
           reinterpret_cast<uintptr_t>(src) % unit == 0 &&
           reinterpret_cast<uintptr_t>(dst) % unit == 0;
  };
  if (aligned(16)) return fn(uint4{});
  if (aligned(8)) return fn(uint2{});
  if (aligned(4)) return fn(uint32_t{});
  if (aligned(2)) return fn(uint16_t{});
  fn(uint8_t{});
}

void launch_copy_rows(const void* src, void* dst, const int64_t* idx, int64_t rows,
                      int64_t row_bytes, int64_t limit, int64_t src_row_bytes = -1) {
  if (rows == 0 || row_bytes == 0) return;
  if (src_row_bytes < 0) src_row_bytes = row_bytes;
  auto stream = c10::cuda::getCurrentCUDAStream();
  with_row_unit(src, dst, row_bytes, src_row_bytes, [&](auto tag) {
    using U = decltype(tag);
    launch_rows<U>(src, dst, GatherSource{idx, limit}, rows,
                   row_bytes / static_cast<int64_t>(sizeof(U)),
                   src_row_bytes / static_cast<int64_t>(sizeof(U)), stream);
  });
}

at::Tensor index_first_axis_cuda(const at::Tensor& input_, const at::Tensor& indices_) {
  check_indices("index_first_axis", input_, indices_);
  const c10::cuda::CUDAGuard guard(input_.device());
  // Rows are read at the input's own row stride when each row is contiguous in itself (an
  // expanded or sliced first axis): only the gathered rows are read, nothing is copied first.
  const bool rows_contiguous = input_.size(0) == 0 || input_.select(0, 0).is_contiguous();
  const auto input = rows_contiguous ? input_ : input_.contiguous();
  const auto indices = indices_.contiguous();
  auto shape = input.sizes().vec();
  shape[0] = indices.size(0);
  auto output = at::empty(shape, input.options());
  launch_copy_rows(input.const_data_ptr(), output.mutable_data_ptr(),
                          indices.const_data_ptr<int64_t>(), indices.size(0),
                          row_size(input) * input.element_size(), input.size(0),
                          input.stride(0) * input.element_size());
  return output;
}

at::Tensor index_put_first_axis_cuda(const at::Tensor& values_, const at::Tensor& indices_,
                                     c10::SymInt first_axis_dim_) {
  check_scatter_args(values_, indices_, first_axis_dim_);
  const int64_t first_axis_dim = first_axis_dim_.expect_int();
  const c10::cuda::CUDAGuard guard(values_.device());
  const auto values = values_.contiguous();
  const auto indices = indices_.contiguous();
  auto shape = values.sizes().vec();
  shape[0] = first_axis_dim;
  auto output = at::empty(shape, values.options());
  const int64_t row_bytes = row_size(values) * values.element_size();
  if (row_bytes == 0) return output;
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto src_of = at::full({first_axis_dim}, -1, indices.options());
  const int64_t rows = indices.size(0);
  if (rows > 0) {
    invert_rows<<<launch::grid_stride_blocks(rows, kThreads), kThreads, 0, stream>>>(
        indices.const_data_ptr<int64_t>(), rows, src_of.mutable_data_ptr<int64_t>(),
        first_axis_dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  with_row_unit(values.const_data_ptr(), output.const_data_ptr(), row_bytes, row_bytes,
                [&](auto tag) {
                  using U = decltype(tag);
                  const int64_t units = row_bytes / static_cast<int64_t>(sizeof(U));
                  launch_rows<U>(values.const_data_ptr(), output.mutable_data_ptr(),
                                 InverseSource{src_of.const_data_ptr<int64_t>()}, first_axis_dim,
                                 units, units, stream);
                });
  return output;
}

// Position ids come from the data loader; one transfer to the host, the CPU kernel, and the
// (small) result back.
std::tuple<at::Tensor, c10::SymInt> cu_seqlens_from_position_ids_cuda(
    const at::Tensor& position_ids) {
  check_position_ids(position_ids);
  auto [cu, longest] = call_cu_seqlens_from_position_ids(position_ids.cpu());
  return {cu.to(position_ids.device(), /*non_blocking=*/true), longest};
}

// Packing is a sequential host algorithm over one length per sequence: the lengths go to the
// host, the CPU kernel plans, and the pack indices come back to the lengths' device.
at::Tensor plan_packing_cuda(const at::Tensor& lengths, int64_t capacity,
                             std::string_view strategy, bool truncate) {
  const auto plan = call_plan_packing(lengths.cpu(), capacity, strategy, truncate);
  return plan.to(lengths.device(), /*non_blocking=*/true);
}

}  // namespace
}  // namespace torch_ext::varlen_impl

TORCH_LIBRARY_IMPL(torch_ext, CUDA, m) {
  m.impl("_unpad_plan", torch_ext::varlen_impl::unpad_plan_cuda);
  m.impl("index_first_axis", torch_ext::varlen_impl::index_first_axis_cuda);
  m.impl("index_put_first_axis", torch_ext::varlen_impl::index_put_first_axis_cuda);
  m.impl("cu_seqlens_from_position_ids", torch_ext::varlen_impl::cu_seqlens_from_position_ids_cuda);
  m.impl("plan_packing", torch_ext::varlen_impl::plan_packing_cuda);
}
