// Variable-length sequences: op schemas, argument checks, Meta kernels, the composite ops
// (unpad_input, pad_input) and the C++ API. Backends: varlen_cpu.cpp, varlen_cuda.cu;
// autograd (all of it): varlen_autograd.cpp. The fake (Meta) kernels of the ops whose
// output size depends on the data (_unpad_plan, cu_seqlens_from_position_ids) are registered
// in Python (torch_ext/varlen.py).

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common/checked_size.h"
#include "ops/varlen/varlen_common.h"
#include "ops/varlen/varlen_ops.h"
#include "torch_ext/varlen.h"

namespace torch_ext {
namespace varlen_impl {

void check_mask(const char* op, const at::Tensor& mask) {
  TORCH_CHECK(mask.dim() == 2, op, "(): attention_mask must be 2-D [batch, seqlen], got shape ",
              mask.sym_sizes());
  const auto dtype = mask.scalar_type();
  TORCH_CHECK(dtype == at::kBool || at::isIntegralType(dtype, /*includeBool=*/false), op,
              "(): attention_mask must be bool or an integer type (1 = real token, 0 = padding), "
              "got ",
              dtype);
}

void check_unpad_plan_args(const at::Tensor& mask, const std::optional<c10::SymInt>& total_tokens,
                           const std::optional<c10::SymInt>& max_seqlen) {
  check_mask("unpad_input", mask);
  const int64_t batch = mask.size(0), seqlen = mask.size(1);
  const int64_t slots = checked_mul("unpad_input", "batch * seqlen", batch, seqlen);
  if (total_tokens.has_value()) {
    const int64_t total = total_tokens->expect_int();
    TORCH_CHECK(total >= 0 && total <= std::min<int64_t>(slots, std::numeric_limits<int32_t>::max()),
                "unpad_input(): total_tokens must be in [0, min(batch * seqlen = ", slots,
                ", 2^31 - 1)], got ", total);
  }
  if (max_seqlen.has_value()) {
    const int64_t bound = max_seqlen->expect_int();
    TORCH_CHECK(bound >= 0 && bound <= seqlen,
                "unpad_input(): max_seqlen must be in [0, seqlen = ", seqlen, "], got ", bound);
  }
}

void check_indices(const char* op, const at::Tensor& input, const at::Tensor& indices,
                   const char* input_name) {
  TORCH_CHECK(input.dim() >= 1, op, "(): ", input_name,
              " must have at least one dimension, got a 0-D tensor");
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong, op,
              "(): indices must be a 1-D int64 tensor, got ", indices.scalar_type(), " of shape ",
              indices.sym_sizes());
  TORCH_CHECK(indices.device() == input.device(), op, "(): indices must be on ", input.device(),
              " like the input, got ", indices.device());
}

void check_scatter_args(const at::Tensor& values, const at::Tensor& indices,
                        const c10::SymInt& first_axis_dim) {
  check_indices("index_put_first_axis", values, indices, "values");
  TORCH_SYM_CHECK(first_axis_dim.sym_ge(0),
                  "index_put_first_axis(): first_axis_dim must be >= 0, got ", first_axis_dim);
  if (const auto rows = first_axis_dim.maybe_as_int()) {
    std::vector<int64_t> shape{*rows};
    for (int64_t d = 1; d < values.dim(); ++d) {
      const auto size = values.sym_size(d).maybe_as_int();
      if (!size) return;
      shape.push_back(*size);
    }
    check_allocation("index_put_first_axis", "the output ([first_axis_dim, ...])", shape,
                     values.element_size());
  }
  TORCH_SYM_CHECK(indices.sym_size(0).sym_eq(values.sym_size(0)),
                  "index_put_first_axis(): indices (", indices.sym_size(0),
                  " entries) must have one entry per row of values (", values.sym_size(0), ")");
}

void check_position_ids(const at::Tensor& position_ids) {
  TORCH_CHECK(position_ids.dim() == 2 &&
                  at::isIntegralType(position_ids.scalar_type(), /*includeBool=*/false),
              "cu_seqlens_from_position_ids(): position_ids must be a 2-D integer tensor "
              "[rows, seqlen], got ",
              position_ids.scalar_type(), " of shape ", position_ids.sym_sizes());
  const auto rows = position_ids.sym_size(0).maybe_as_int();
  const auto seqlen = position_ids.sym_size(1).maybe_as_int();
  if (rows && seqlen) {
    const int64_t tokens =
        checked_mul("cu_seqlens_from_position_ids", "rows * seqlen", *rows, *seqlen);
    TORCH_CHECK(tokens <= std::numeric_limits<int32_t>::max(),
                "cu_seqlens_from_position_ids(): position_ids holds ", tokens,
                " tokens, more than int32 cu_seqlens can index (2^31 - 1)");
  }
}

int64_t row_size(const at::Tensor& t) {
  int64_t size = 1;
  for (int64_t d = 1; d < t.dim(); ++d) size *= t.size(d);
  return size;
}

namespace {

std::vector<c10::SymInt> with_first(c10::SymInt first, const at::Tensor& t) {
  std::vector<c10::SymInt> shape{std::move(first)};
  for (int64_t d = 1; d < t.dim(); ++d) shape.push_back(t.sym_size(d));
  return shape;
}

// ---------------------------------------------------------------- Meta kernels

at::Tensor index_first_axis_meta(const at::Tensor& input, const at::Tensor& indices) {
  check_indices("index_first_axis", input, indices);
  return at::empty_symint(with_first(indices.sym_size(0), input), input.options());
}

at::Tensor index_put_first_axis_meta(const at::Tensor& values, const at::Tensor& indices,
                                     c10::SymInt first_axis_dim) {
  check_scatter_args(values, indices, first_axis_dim);
  return at::empty_symint(with_first(std::move(first_axis_dim), values), values.options());
}

// One pack index per sequence; the checks that need the lengths' values run in the kernel.
at::Tensor plan_packing_meta(const at::Tensor& lengths, int64_t capacity, std::string_view strategy,
                             bool truncate) {
  TORCH_CHECK(capacity >= 1, "plan_packing(): capacity must be >= 1, got ", capacity);
  TORCH_CHECK(lengths.dim() == 1, "plan_packing(): lengths must be 1-D, got shape ",
              lengths.sym_sizes());
  return at::empty_symint(lengths.sym_sizes(), lengths.options().dtype(at::kLong));
}

// ---------------------------------------------------------------- composites

std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::SymInt, at::Tensor> unpad_input_composite(
    const at::Tensor& hidden, const at::Tensor& mask, std::optional<c10::SymInt> total_tokens,
    std::optional<c10::SymInt> max_seqlen) {
  check_mask("unpad_input", mask);
  TORCH_CHECK(hidden.dim() >= 2, "unpad_input(): hidden must be [batch, seqlen, ...], got shape ",
              hidden.sym_sizes());
  TORCH_SYM_CHECK(hidden.sym_size(0).sym_eq(mask.sym_size(0)), "unpad_input(): attention_mask ",
                  mask.sym_sizes(), " must match hidden's first two dimensions, got hidden ",
                  hidden.sym_sizes());
  TORCH_SYM_CHECK(hidden.sym_size(1).sym_eq(mask.sym_size(1)), "unpad_input(): attention_mask ",
                  mask.sym_sizes(), " must match hidden's first two dimensions, got hidden ",
                  hidden.sym_sizes());
  auto [indices, cu_seqlens, longest, seqused] =
      call_unpad_plan(mask, std::move(total_tokens), std::move(max_seqlen));
  auto tokens = call_index_first_axis(hidden.flatten(0, 1), indices);
  return {tokens, indices, cu_seqlens, longest, seqused};
}

at::Tensor pad_input_composite(const at::Tensor& hidden_unpad, const at::Tensor& indices,
                               c10::SymInt batch, c10::SymInt seqlen) {
  TORCH_CHECK(hidden_unpad.dim() >= 1,
              "pad_input(): hidden_unpad must be [nnz, ...], got a 0-D tensor");
  TORCH_SYM_CHECK(batch.sym_ge(0), "pad_input(): batch must be >= 0, got ", batch);
  TORCH_SYM_CHECK(seqlen.sym_ge(0), "pad_input(): seqlen must be >= 0, got ", seqlen);
  if (batch.maybe_as_int() && seqlen.maybe_as_int()) {
    checked_mul("pad_input", "batch * seqlen", *batch.maybe_as_int(), *seqlen.maybe_as_int());
  }
  auto flat = call_index_put_first_axis(hidden_unpad, indices, batch * seqlen);
  auto shape = with_first(batch, hidden_unpad);
  shape.insert(shape.begin() + 1, seqlen);
  return flat.view_symint(shape);
}

}  // namespace
}  // namespace varlen_impl

// ---------------------------------------------------------------- C++ API

UnpadResult unpad_input(const at::Tensor& hidden, const at::Tensor& attention_mask,
                        std::optional<int64_t> total_tokens, std::optional<int64_t> max_seqlen) {
  auto to_sym = [](std::optional<int64_t> v) {
    return v ? std::optional<c10::SymInt>(c10::SymInt(*v)) : std::nullopt;
  };
  auto [tokens, indices, cu_seqlens, longest, seqused] = varlen_impl::call_unpad_input(
      hidden, attention_mask, to_sym(total_tokens), to_sym(max_seqlen));
  return {tokens, indices, cu_seqlens, longest.expect_int(), seqused};
}

at::Tensor pad_input(const at::Tensor& hidden_unpad, const at::Tensor& indices, int64_t batch,
                     int64_t seqlen) {
  return varlen_impl::call_pad_input(hidden_unpad, indices, batch, seqlen);
}

at::Tensor index_first_axis(const at::Tensor& input, const at::Tensor& indices) {
  return varlen_impl::call_index_first_axis(input, indices);
}

at::Tensor index_put_first_axis(const at::Tensor& values, const at::Tensor& indices,
                                int64_t first_axis_dim) {
  return varlen_impl::call_index_put_first_axis(values, indices, first_axis_dim);
}

std::tuple<at::Tensor, int64_t> cu_seqlens_from_position_ids(const at::Tensor& position_ids) {
  auto [cu_seqlens, longest] = varlen_impl::call_cu_seqlens_from_position_ids(position_ids);
  return {cu_seqlens, longest.expect_int()};
}

at::Tensor plan_packing(const at::Tensor& lengths, int64_t capacity, std::string_view strategy,
                        bool truncate) {
  return varlen_impl::call_plan_packing(lengths, capacity, strategy, truncate);
}

}  // namespace torch_ext

// ---------------------------------------------------------------- schemas

TORCH_LIBRARY_FRAGMENT(torch_ext, m) {
  m.def(
      "unpad_input(Tensor hidden, Tensor attention_mask, SymInt? total_tokens=None, "
      "SymInt? max_seqlen=None) -> (Tensor hidden_unpad, Tensor indices, Tensor cu_seqlens, "
      "SymInt max_seqlen, Tensor seqused)");
  m.def("pad_input(Tensor hidden_unpad, Tensor indices, SymInt batch, SymInt seqlen) -> Tensor");
  // The index part of unpad_input: which tokens are real, and where each row starts.
  m.def(
      "_unpad_plan(Tensor attention_mask, SymInt? total_tokens=None, SymInt? max_seqlen=None) "
      "-> (Tensor indices, Tensor cu_seqlens, SymInt max_seqlen, Tensor seqused)");
  m.def("index_first_axis(Tensor input, Tensor indices) -> Tensor");
  m.def("index_put_first_axis(Tensor values, Tensor indices, SymInt first_axis_dim) -> Tensor");
  m.def(
      "cu_seqlens_from_position_ids(Tensor position_ids) -> (Tensor cu_seqlens, SymInt "
      "max_seqlen)");
  m.def(
      "plan_packing(Tensor lengths, int capacity, str strategy=\"ffd\", bool truncate=False) -> "
      "Tensor");
}

TORCH_LIBRARY_IMPL(torch_ext, Meta, m) {
  m.impl("index_first_axis", torch_ext::varlen_impl::index_first_axis_meta);
  m.impl("index_put_first_axis", torch_ext::varlen_impl::index_put_first_axis_meta);
  m.impl("plan_packing", torch_ext::varlen_impl::plan_packing_meta);
}

TORCH_LIBRARY_IMPL(torch_ext, CompositeImplicitAutograd, m) {
  m.impl("unpad_input", torch_ext::varlen_impl::unpad_input_composite);
  m.impl("pad_input", torch_ext::varlen_impl::pad_input_composite);
}
