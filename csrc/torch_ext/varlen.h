#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>

#include "torch_ext/macros.h"

namespace torch_ext {

// What unpad_input returns (flash-attention 2.7's bert_padding.unpad_input contract).
struct UnpadResult {
  at::Tensor hidden;      // [nnz, ...]: the real tokens, row-major order
  at::Tensor indices;     // int64 [nnz]: flat positions b * S + s of the real tokens
  at::Tensor cu_seqlens;  // int32 [B + 1]: 0, then the running token count per row
  int64_t max_seqlen;     // the longest row (S when total_tokens is given without max_seqlen)
  at::Tensor seqused;     // int32 [B]: tokens per row
};

// Removes padding: hidden [B, S, ...] and attention_mask [B, S] (bool or 0/1 integers; nonzero
// marks a real token). Left padding, right padding and holes all work. On CUDA it makes one
// device-to-host transfer (token count and longest row together), none when total_tokens (the
// number of real tokens, which the caller then guarantees) is given.
TORCH_EXT_API UnpadResult unpad_input(const at::Tensor& hidden, const at::Tensor& attention_mask,
                                      std::optional<int64_t> total_tokens = std::nullopt,
                                      std::optional<int64_t> max_seqlen = std::nullopt);

// Puts tokens back: [nnz, ...] -> [batch, seqlen, ...] with zeros at padded slots.
TORCH_EXT_API at::Tensor pad_input(const at::Tensor& hidden_unpad, const at::Tensor& indices,
                                   int64_t batch, int64_t seqlen);

// input[indices] along the first axis (indices int64, unique for a correct backward).
TORCH_EXT_API at::Tensor index_first_axis(const at::Tensor& input, const at::Tensor& indices);

// zeros([first_axis_dim, ...]) with rows `indices` set to values (indices unique).
TORCH_EXT_API at::Tensor index_put_first_axis(const at::Tensor& values, const at::Tensor& indices,
                                              int64_t first_axis_dim);

// Packed rows whose position ids restart at 0 for every sequence: int32 cu_seqlens over the
// flattened tokens (a sequence also starts at every row) and the longest sequence.
TORCH_EXT_API std::tuple<at::Tensor, int64_t> cu_seqlens_from_position_ids(
    const at::Tensor& position_ids);

// Assigns sequences of `lengths` to packs of at most `capacity` tokens: "ffd"
// (first-fit-decreasing) or "bfd" (best-fit-decreasing). Returns int64 pack indices, packs
// numbered in the order they are opened. A sequence longer than capacity is an error unless
// truncate (then it counts as capacity tokens).
TORCH_EXT_API at::Tensor plan_packing(const at::Tensor& lengths, int64_t capacity,
                                      std::string_view strategy = "ffd", bool truncate = false);

}  // namespace torch_ext
