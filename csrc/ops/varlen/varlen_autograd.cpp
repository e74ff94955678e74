// Autograd of the varlen ops. The integer-valued ops (the unpad plan, cu_seqlens, packing
// plans) are declared non-differentiable. The gather's backward adds each gradient row into the
// row it came from (repeated indices sum, as for input[indices]; ATen's index_add_, exact for
// unique indices since each row then receives one term); the scatter's backward is the gather
// (its forward requires unique indices).

#include <ATen/ops/index_add.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "common/non_differentiable.h"
#include "ops/varlen/varlen_common.h"
#include "ops/varlen/varlen_ops.h"

namespace torch_ext::varlen_impl {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class IndexFirstAxis : public torch::autograd::Function<IndexFirstAxis> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& indices) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({indices});
    ctx->saved_data["rows"] = input.sym_size(0);
    return call_index_first_axis(input, indices);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor()};
    const auto indices = ctx->get_saved_variables()[0];
    const auto& grad = grads[0];
    std::vector<c10::SymInt> shape{ctx->saved_data["rows"].toSymInt()};
    for (int64_t d = 1; d < grad.dim(); ++d) shape.push_back(grad.sym_size(d));
    return {at::zeros_symint(shape, grad.options()).index_add_(0, indices, grad), at::Tensor()};
  }
};

class IndexPutFirstAxis : public torch::autograd::Function<IndexPutFirstAxis> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& values,
                            const at::Tensor& indices, c10::SymInt first_axis_dim) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({indices});
    return call_index_put_first_axis(values, indices, std::move(first_axis_dim));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto indices = ctx->get_saved_variables()[0];
    return {call_index_first_axis(grads[0], indices), at::Tensor(), at::Tensor()};
  }
};

at::Tensor index_first_axis_autograd(const at::Tensor& input, const at::Tensor& indices) {
  check_indices("index_first_axis", input, indices);  // before the Function reads input's sizes
  return IndexFirstAxis::apply(input, indices);
}

at::Tensor index_put_first_axis_autograd(const at::Tensor& values, const at::Tensor& indices,
                                         c10::SymInt first_axis_dim) {
  check_scatter_args(values, indices, first_axis_dim);
  return IndexPutFirstAxis::apply(values, indices, std::move(first_axis_dim));
}

}  // namespace
}  // namespace torch_ext::varlen_impl

TORCH_LIBRARY_IMPL(torch_ext, Autograd, m) {
  m.impl("index_first_axis", torch_ext::varlen_impl::index_first_axis_autograd);
  m.impl("index_put_first_axis", torch_ext::varlen_impl::index_put_first_axis_autograd);
  // Integer results: no derivative.
  m.impl("_unpad_plan", torch_ext::non_differentiable());
  m.impl("cu_seqlens_from_position_ids", torch_ext::non_differentiable());
  m.impl("plan_packing", torch_ext::non_differentiable());
}
