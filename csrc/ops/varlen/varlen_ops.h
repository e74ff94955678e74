#pragma once

// The varlen family's ops through the dispatcher: one typed handle per op, looked up once. The
// C++ API, the composites and the autograd Functions all call the ops through these.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/SymInt.h>

#include <optional>
#include <string_view>
#include <tuple>
#include <utility>

namespace torch_ext::varlen_impl {

// unpad_input(Tensor hidden, Tensor attention_mask, SymInt? total_tokens, SymInt? max_seqlen)
//   -> (Tensor hidden_unpad, Tensor indices, Tensor cu_seqlens, SymInt max_seqlen, Tensor seqused)
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::SymInt, at::Tensor> call_unpad_input(
    const at::Tensor& hidden, const at::Tensor& attention_mask,
    std::optional<c10::SymInt> total_tokens, std::optional<c10::SymInt> max_seqlen) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torch_ext::unpad_input", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::SymInt, at::Tensor>(
              const at::Tensor&, const at::Tensor&, std::optional<c10::SymInt>,
              std::optional<c10::SymInt>)>();
  return op.call(hidden, attention_mask, std::move(total_tokens), std::move(max_seqlen));
}

// pad_input(Tensor hidden_unpad, Tensor indices, SymInt batch, SymInt seqlen) -> Tensor
inline at::Tensor call_pad_input(const at::Tensor& hidden_unpad, const at::Tensor& indices,
                                 c10::SymInt batch, c10::SymInt seqlen) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torch_ext::pad_input", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, c10::SymInt)>();
  return op.call(hidden_unpad, indices, std::move(batch), std::move(seqlen));
}

// _unpad_plan(Tensor attention_mask, SymInt? total_tokens, SymInt? max_seqlen)
//   -> (Tensor indices, Tensor cu_seqlens, SymInt max_seqlen, Tensor seqused)
inline std::tuple<at::Tensor, at::Tensor, c10::SymInt, at::Tensor> call_unpad_plan(
    const at::Tensor& mask, std::optional<c10::SymInt> total_tokens,
    std::optional<c10::SymInt> max_seqlen) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torch_ext::_unpad_plan", "")
          .typed<std::tuple<at::Tensor, at::Tensor, c10::SymInt, at::Tensor>(
              const at::Tensor&, std::optional<c10::SymInt>, std::optional<c10::SymInt>)>();
  return op.call(mask, std::move(total_tokens), std::move(max_seqlen));
}

// index_first_axis(Tensor input, Tensor indices) -> Tensor
inline at::Tensor call_index_first_axis(const at::Tensor& input, const at::Tensor& indices) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_ext::index_first_axis", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(input, indices);
}

// index_put_first_axis(Tensor values, Tensor indices, SymInt first_axis_dim) -> Tensor
inline at::Tensor call_index_put_first_axis(const at::Tensor& values, const at::Tensor& indices,
                                            c10::SymInt first_axis_dim) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_ext::index_put_first_axis", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt)>();
  return op.call(values, indices, std::move(first_axis_dim));
}

// cu_seqlens_from_position_ids(Tensor position_ids) -> (Tensor cu_seqlens, SymInt max_seqlen)
inline std::tuple<at::Tensor, c10::SymInt> call_cu_seqlens_from_position_ids(
    const at::Tensor& position_ids) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_ext::cu_seqlens_from_position_ids", "")
                       .typed<std::tuple<at::Tensor, c10::SymInt>(const at::Tensor&)>();
  return op.call(position_ids);
}

// plan_packing(Tensor lengths, int capacity, str strategy, bool truncate) -> Tensor
inline at::Tensor call_plan_packing(const at::Tensor& lengths, int64_t capacity,
                                    std::string_view strategy, bool truncate) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_ext::plan_packing", "")
                       .typed<at::Tensor(const at::Tensor&, int64_t, std::string_view, bool)>();
  return op.call(lengths, capacity, strategy, truncate);
}

}  // namespace torch_ext::varlen_impl
