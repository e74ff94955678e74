// CPU kernels of the varlen family: the unpad plan, row gathers and scatters (one memcpy per
// row, rows spread over the threads; every output row written once), position ids to
// cu_seqlens, and sequence-packing plans.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <numeric>
#include <string_view>
#include <vector>

#include "common/dispatch.h"
#include "ops/varlen/varlen_common.h"

namespace torch_ext::varlen_impl {
namespace {

std::tuple<at::Tensor, at::Tensor, c10::SymInt, at::Tensor> unpad_plan_cpu(
    const at::Tensor& mask_, std::optional<c10::SymInt> total_tokens,
    std::optional<c10::SymInt> max_seqlen) {
  check_unpad_plan_args(mask_, total_tokens, max_seqlen);
  const auto mask = mask_.contiguous();
  const int64_t batch = mask.size(0), seqlen = mask.size(1);
  auto int_options = mask.options().dtype(at::kInt);
  auto cu_seqlens = at::empty({batch + 1}, int_options);
  auto seqused = at::empty({batch}, int_options);
  int32_t* cu = cu_seqlens.mutable_data_ptr<int32_t>();
  int32_t* used = seqused.mutable_data_ptr<int32_t>();
  std::vector<int64_t> counts(batch);
  dispatch_mask_types(mask.scalar_type(), [&](auto tag) {
    using M = decltype(tag);
    const M* m = mask.const_data_ptr<M>();
    at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        int64_t count = 0;
        for (int64_t s = 0; s < seqlen; ++s) count += m[b * seqlen + s] != M(0);
        counts[b] = count;
      }
    });
  });
  int64_t total = 0, longest = 0;
  cu[0] = 0;
  for (int64_t b = 0; b < batch; ++b) {
    total += counts[b];
    longest = std::max(longest, counts[b]);
    TORCH_CHECK(total <= std::numeric_limits<int32_t>::max(),
                "unpad_input(): more than 2^31 - 1 real tokens do not fit int32 cu_seqlens");
    cu[b + 1] = static_cast<int32_t>(total);
    used[b] = static_cast<int32_t>(counts[b]);
  }
  if (total_tokens.has_value()) {
    TORCH_CHECK(total_tokens->expect_int() == total,
                "unpad_input(): total_tokens=", total_tokens->expect_int(),
                " but attention_mask holds ", total, " real tokens");
  }
  auto indices = at::empty({total}, mask.options().dtype(at::kLong));
  int64_t* idx = indices.mutable_data_ptr<int64_t>();
  dispatch_mask_types(mask.scalar_type(), [&](auto tag) {
    using M = decltype(tag);
    const M* m = mask.const_data_ptr<M>();
    at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        int64_t out = cu[b];
        for (int64_t s = 0; s < seqlen; ++s) {
          if (m[b * seqlen + s] != M(0)) idx[out++] = b * seqlen + s;
        }
      }
    });
  });
  if (max_seqlen.has_value()) {
    TORCH_CHECK(max_seqlen->expect_int() >= longest, "unpad_input(): max_seqlen=",
                max_seqlen->expect_int(), " is below the longest row of attention_mask (", longest,
                " real tokens)");
  }
  // Without total_tokens the longest row is known exactly; with it, the caller's bound (or S).
  const int64_t reported = total_tokens.has_value()
                               ? (max_seqlen.has_value() ? max_seqlen->expect_int() : seqlen)
                               : (max_seqlen.has_value() ? max_seqlen->expect_int() : longest);
  return {indices, cu_seqlens, c10::SymInt(reported), seqused};
}

// Checks every index against [0, limit) before any row moves.
void check_index_range(const char* op, const at::Tensor& indices, int64_t limit) {
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < indices.numel(); ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < limit, op, "(): indices[", i, "] = ", idx[i],
                " is out of range for a first axis of size ", limit);
  }
}

at::Tensor index_first_axis_cpu(const at::Tensor& input_, const at::Tensor& indices_) {
  check_indices("index_first_axis", input_, indices_);
  // Rows are read at the input's own row stride when each row is contiguous in itself (an
  // expanded or sliced first axis): only the gathered rows are read, nothing is copied first.
  const bool rows_contiguous = input_.size(0) == 0 || input_.select(0, 0).is_contiguous();
  const auto input = rows_contiguous ? input_ : input_.contiguous();
  const auto indices = indices_.contiguous();
  check_index_range("index_first_axis", indices, input.size(0));
  auto shape = input.sizes().vec();
  shape[0] = indices.size(0);
  auto output = at::empty(shape, input.options());
  const int64_t row_bytes = row_size(input) * input.element_size();
  const int64_t src_row_bytes = input.stride(0) * input.element_size();
  const auto* src = static_cast<const char*>(input.const_data_ptr());
  auto* dst = static_cast<char*>(output.mutable_data_ptr());
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, indices.size(0), grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(dst + i * row_bytes, src + idx[i] * src_row_bytes, row_bytes);
    }
  });
  return output;
}

at::Tensor index_put_first_axis_cpu(const at::Tensor& values_, const at::Tensor& indices_,
                                    c10::SymInt first_axis_dim_) {
  check_scatter_args(values_, indices_, first_axis_dim_);
  const int64_t first_axis_dim = first_axis_dim_.expect_int();
  const auto values = values_.contiguous();
  const auto indices = indices_.contiguous();
  check_index_range("index_put_first_axis", indices, first_axis_dim);
  auto shape = values.sizes().vec();
  shape[0] = first_axis_dim;
  auto output = at::empty(shape, values.options());
  const int64_t row_bytes = row_size(values) * values.element_size();
  const auto* src = static_cast<const char*>(values.const_data_ptr());
  auto* dst = static_cast<char*>(output.mutable_data_ptr());
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  // Which rows receive a value; the others are zeroed, so every row is written once.
  std::vector<uint8_t> covered(first_axis_dim, 0);
  for (int64_t i = 0; i < indices.size(0); ++i) covered[idx[i]] = 1;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, indices.size(0), grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(dst + idx[i] * row_bytes, src + i * row_bytes, row_bytes);
    }
  });
  at::parallel_for(0, first_axis_dim, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (!covered[r]) std::memset(dst + r * row_bytes, 0, row_bytes);
    }
  });
  return output;
}

std::tuple<at::Tensor, c10::SymInt> cu_seqlens_from_position_ids_cpu(
    const at::Tensor& position_ids_) {
  check_position_ids(position_ids_);
  const auto position_ids = position_ids_.to(at::kLong).contiguous();
  const int64_t rows = position_ids.size(0), seqlen = position_ids.size(1);
  const int64_t* pos = position_ids.const_data_ptr<int64_t>();
  std::vector<int32_t> starts;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t s = 0; s < seqlen; ++s) {
      if (s == 0 || pos[r * seqlen + s] == 0) {
        starts.push_back(static_cast<int32_t>(r * seqlen + s));
      }
    }
  }
  const int64_t total = rows * seqlen;
  TORCH_CHECK(total <= std::numeric_limits<int32_t>::max(),
              "cu_seqlens_from_position_ids(): more than 2^31 - 1 tokens do not fit int32");
  starts.push_back(static_cast<int32_t>(total));
  if (total == 0) starts.assign(1, 0);
  int64_t longest = 0;
  for (size_t i = 1; i < starts.size(); ++i) {
    longest = std::max<int64_t>(longest, starts[i] - starts[i - 1]);
  }
  auto cu =
      at::empty({static_cast<int64_t>(starts.size())}, position_ids_.options().dtype(at::kInt));
  std::copy(starts.begin(), starts.end(), cu.mutable_data_ptr<int32_t>());
  return {cu, c10::SymInt(longest)};
}

// ---------------------------------------------------------------- packing

// First fit over bins 0, 1, ...: a max-tree of the bins' free room finds the lowest-numbered
// bin with room for a length in O(log n). Unopened bins have the full capacity, so the first
// of them is where a new bin opens.
std::vector<int64_t> first_fit(const std::vector<int64_t>& order, const std::vector<int64_t>& len,
                               int64_t capacity) {
  const int64_t n = static_cast<int64_t>(order.size());
  int64_t leaves = 1;
  while (leaves < std::max<int64_t>(n, 1)) leaves *= 2;
  std::vector<int64_t> tree(2 * leaves, capacity);
  std::vector<int64_t> pack(len.size(), -1);
  for (const int64_t seq : order) {
    int64_t node = 1;
    while (node < leaves) node = tree[2 * node] >= len[seq] ? 2 * node : 2 * node + 1;
    pack[seq] = node - leaves;
    tree[node] -= len[seq];
    for (node /= 2; node >= 1; node /= 2) tree[node] = std::max(tree[2 * node], tree[2 * node + 1]);
  }
  return pack;
}

// Best fit: the open bin with the least room that still fits (ties: the lowest-numbered), else
// a new bin.
std::vector<int64_t> best_fit(const std::vector<int64_t>& order, const std::vector<int64_t>& len,
                              int64_t capacity) {
  std::map<std::pair<int64_t, int64_t>, bool> open;  // (free room, bin)
  std::vector<int64_t> pack(len.size(), -1);
  int64_t bins = 0;
  for (const int64_t seq : order) {
    auto it = open.lower_bound({len[seq], -1});
    int64_t bin, room;
    if (it == open.end()) {
      bin = bins++;
      room = capacity;
    } else {
      bin = it->first.second;
      room = it->first.first;
      open.erase(it);
    }
    pack[seq] = bin;
    open.emplace(std::make_pair(room - len[seq], bin), true);
  }
  return pack;
}

at::Tensor plan_packing_cpu(const at::Tensor& lengths_, int64_t capacity, std::string_view strategy,
                            bool truncate) {
  TORCH_CHECK(capacity >= 1, "plan_packing(): capacity must be >= 1, got ", capacity);
  TORCH_CHECK(strategy == "ffd" || strategy == "bfd",
              "plan_packing(): strategy must be \"ffd\" (first-fit-decreasing) or \"bfd\" "
              "(best-fit-decreasing), got \"",
              strategy, "\"");
  TORCH_CHECK(
      lengths_.dim() == 1 && at::isIntegralType(lengths_.scalar_type(), /*includeBool=*/false),
      "plan_packing(): lengths must be a 1-D integer tensor, got ", lengths_.scalar_type(),
      " of shape ", lengths_.sizes());
  const auto lengths = lengths_.to(at::kLong).contiguous();
  const int64_t n = lengths.numel();
  const int64_t* raw = lengths.const_data_ptr<int64_t>();
  std::vector<int64_t> len(raw, raw + n);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(len[i] >= 0, "plan_packing(): lengths[", i, "] = ", len[i], " is negative");
    if (len[i] > capacity) {
      TORCH_CHECK(truncate, "plan_packing(): lengths[", i, "] = ", len[i],
                  " is longer than capacity=", capacity, " (pass truncate=True to cut it)");
      len[i] = capacity;
    }
  }
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return len[a] > len[b]; });
  const auto pack =
      strategy == "ffd" ? first_fit(order, len, capacity) : best_fit(order, len, capacity);
  auto result = at::empty({n}, lengths.options());
  std::copy(pack.begin(), pack.end(), result.mutable_data_ptr<int64_t>());
  return result;
}

}  // namespace
}  // namespace torch_ext::varlen_impl

TORCH_LIBRARY_IMPL(torch_ext, CPU, m) {
  m.impl("_unpad_plan", torch_ext::varlen_impl::unpad_plan_cpu);
  m.impl("index_first_axis", torch_ext::varlen_impl::index_first_axis_cpu);
  m.impl("index_put_first_axis", torch_ext::varlen_impl::index_put_first_axis_cpu);
  m.impl("cu_seqlens_from_position_ids", torch_ext::varlen_impl::cu_seqlens_from_position_ids_cpu);
  m.impl("plan_packing", torch_ext::varlen_impl::plan_packing_cpu);
}
