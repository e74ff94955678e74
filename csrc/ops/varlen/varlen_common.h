#pragma once

// Argument checks shared by the varlen kernels of every backend.

#include <ATen/core/Tensor.h>

#include <c10/core/SymInt.h>

#include <cstdint>
#include <optional>
#include <utility>

#include "common/dispatch.h"

namespace torch_ext::varlen_impl {

// attention_mask: 2-D [B, S], bool or an integer type.
void check_mask(const char* op, const at::Tensor& mask);

// _unpad_plan's arguments: the mask as above; total_tokens in [0, min(B * S, 2^31 - 1)] and
// max_seqlen in [0, S] when given (what a backend can check without reading the mask).
void check_unpad_plan_args(const at::Tensor& mask, const std::optional<c10::SymInt>& total_tokens,
                           const std::optional<c10::SymInt>& max_seqlen);

// indices: 1-D int64 on input's device; input at least 1-D.
void check_indices(const char* op, const at::Tensor& input, const at::Tensor& indices,
                   const char* input_name = "input");

// index_put_first_axis's arguments (indices as above, one per row of values, a first axis
// size >= 0 whose output's bytes fit 64 bits); symbolic sizes allowed (Meta).
void check_scatter_args(const at::Tensor& values, const at::Tensor& indices,
                        const c10::SymInt& first_axis_dim);

// position_ids: 2-D integer, at most 2^31 - 1 tokens (checked before anything is copied).
void check_position_ids(const at::Tensor& position_ids);

// Rows of [rows, ...]: the product of the trailing dimensions (1 for a 1-D tensor).
int64_t row_size(const at::Tensor& t);

// Calls f(tag) with a value of the attention mask's C++ type (bool or an integer type).
template <class F>
void dispatch_mask_types(c10::ScalarType dtype, F&& f) {
  if (dtype == c10::ScalarType::Bool) return f(bool{});
  if (dtype == c10::ScalarType::Char) return f(int8_t{});
  dispatch_label_types(dtype, "attention_mask", std::forward<F>(f));
}

}  // namespace torch_ext::varlen_impl
