// Spatial pyramid pooling: op schemas, the C++ API, argument checks and Meta kernels.
// Backends: spp_cpu.cpp, spp_cuda.cu; autograd: spp_autograd.cpp.

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <sstream>
#include <vector>

#include "common/checked_size.h"
#include "ops/spp/spp_common.h"
#include "ops/spp/spp_ops.h"
#include "torch_ext/spp.h"

namespace torch_ext {
namespace spp_impl {

PoolMode parse_mode(std::string_view mode) {
  if (mode == "max") return PoolMode::Max;
  if (mode == "avg") return PoolMode::Avg;
  TORCH_CHECK(false, "spp(): mode must be \"max\" or \"avg\", got \"", mode, "\"");
}

namespace {

// `what` names the tensor after the op: "(): input" for the public ops, ": x" for backwards.
void check_float_dtype(const char* op, const char* what, at::ScalarType dtype) {
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      op, what, " must be float32, float64, float16 or bfloat16, got ", dtype);
}

void check_pooling_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.dim() == 4, op, "(): input must be a 4-D tensor [N, C, H, W], got a ",
              input.dim(), "-D tensor of shape ", input.sym_sizes());
  check_float_dtype(op, "(): input", input.scalar_type());
  TORCH_SYM_CHECK(input.sym_size(2).sym_ge(1), op,
                  "(): input's height must be at least 1, got shape ", input.sym_sizes());
  TORCH_SYM_CHECK(input.sym_size(3).sym_ge(1), op,
                  "(): input's width must be at least 1, got shape ", input.sym_sizes());
}

}  // namespace

// Concrete sizes are checked here; symbolic ones (Meta kernels under torch.compile) are checked
// by the backend kernel that later runs with real sizes.
void check_spp_args(const at::Tensor& input, at::IntArrayRef levels, std::string_view mode) {
  check_pooling_input("spp", input);
  TORCH_CHECK(!levels.empty(), "spp(): levels must hold at least one level, got []");
  for (const auto level : levels) {
    TORCH_CHECK(level >= 1, "spp(): every entry of levels must be >= 1, got levels=", levels);
  }
  parse_mode(mode);
  const int64_t bins = total_bins(levels);
  const auto n = input.sym_size(0).maybe_as_int(), c = input.sym_size(1).maybe_as_int();
  if (n && c) {
    const int64_t features = checked_mul("spp", "the output's features C * sum(level^2)", *c, bins);
    check_allocation("spp", "the output", {*n, features}, sizeof(int64_t));
  }
}

void check_sppf_args(const at::Tensor& input, int64_t kernel_size, int64_t repeats) {
  check_pooling_input("sppf", input);
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1,
              "sppf(): kernel_size must be an odd number >= 1 (the pooling keeps the map's "
              "size with padding kernel_size // 2), got ",
              kernel_size);
  // The kernels count stages in 32 bits (and a cascade that long is no use to anyone).
  TORCH_CHECK(repeats >= 1 && repeats <= std::numeric_limits<int32_t>::max(),
              "sppf(): repeats must be in [1, 2^31 - 1], got ", repeats);
  const int64_t stages = checked_add("sppf", "the number of stages repeats + 1", repeats, 1);
  std::vector<int64_t> shape;
  for (const auto& size : input.sym_sizes()) {
    const auto concrete = size.maybe_as_int();
    if (!concrete) return;
    shape.push_back(*concrete);
  }
  shape[1] = checked_mul("sppf", "the output's channels C * (repeats + 1)", shape[1], stages);
  check_allocation("sppf", "the output", shape, input.element_size());
}

void check_spp_backward_args(const at::Tensor& grad_output, const at::Tensor& indices,
                             at::IntArrayRef input_size, at::IntArrayRef levels,
                             std::string_view mode, c10::MemoryFormat memory_format) {
  check_memory_format("spp backward", memory_format);
  TORCH_CHECK(input_size.size() == 4, "spp backward: input_size must have 4 entries, got ",
              input_size);
  for (const auto size : input_size) {
    TORCH_CHECK(size >= 0, "spp backward: input_size must not be negative, got ", input_size);
  }
  TORCH_CHECK(input_size[2] >= 1 && input_size[3] >= 1,
              "spp backward: input_size's height and width must be >= 1, got ", input_size);
  check_allocation("spp backward", "the input gradient", input_size, sizeof(double));
  TORCH_CHECK(!levels.empty(), "spp backward: levels must hold at least one level, got []");
  for (const auto level : levels) {
    TORCH_CHECK(level >= 1, "spp backward: every entry of levels must be >= 1, got levels=",
                levels);
  }
  check_float_dtype("spp backward", ": grad_output", grad_output.scalar_type());
  const int64_t features =
      checked_mul("spp backward", "C * sum(level^2)", input_size[1], total_bins(levels));
  TORCH_CHECK(grad_output.dim() == 2 && grad_output.size(0) == input_size[0] &&
                  grad_output.size(1) == features,
              "spp backward: grad_output must have shape [", input_size[0], ", ", features,
              "], got ", grad_output.sizes());
  if (parse_mode(mode) == PoolMode::Max) {
    TORCH_CHECK(indices.sizes() == grad_output.sizes() && indices.scalar_type() == at::kLong,
                "spp backward: indices must be int64 of grad_output's shape ", grad_output.sizes(),
                ", got ", indices.scalar_type(), " ", indices.sizes());
    TORCH_CHECK(indices.device() == grad_output.device(),
                "spp backward: indices must be on grad_output's device ", grad_output.device(),
                ", got ", indices.device());
  }
}

void check_sppf_backward_args(const at::Tensor& grad_output, const at::Tensor& output,
                              int64_t kernel_size, int64_t repeats) {
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1,
              "sppf backward: kernel_size must be an odd number >= 1, got ", kernel_size);
  TORCH_CHECK(repeats >= 1 && repeats <= std::numeric_limits<int32_t>::max() && output.dim() == 4 &&
                  output.size(1) % (repeats + 1) == 0,
              "sppf backward: output must be sppf's [N, C * (repeats + 1), H, W] output, got ",
              output.sizes(), " with repeats=", repeats);
  TORCH_CHECK(output.size(2) >= 1 && output.size(3) >= 1,
              "sppf backward: output's height and width must be >= 1, got ", output.sizes());
  const auto dtype = output.scalar_type();
  check_float_dtype("sppf backward", ": output", dtype);
  TORCH_CHECK(grad_output.scalar_type() == dtype,
              "sppf backward: grad_output must have the output's dtype ", dtype, ", got ",
              grad_output.scalar_type());
  TORCH_CHECK(grad_output.device() == output.device(),
              "sppf backward: grad_output must be on the output's device ", output.device(),
              ", got ", grad_output.device());
  TORCH_CHECK(grad_output.sizes() == output.sizes(),
              "sppf backward: grad_output must have the output's shape ", output.sizes(), ", got ",
              grad_output.sizes());
}

void check_memory_format(const char* op, c10::MemoryFormat memory_format) {
  TORCH_CHECK(memory_format == c10::MemoryFormat::Contiguous ||
                  memory_format == c10::MemoryFormat::ChannelsLast,
              op, ": memory_format must be torch.contiguous_format or torch.channels_last, got ",
              memory_format);
}

int64_t total_bins(at::IntArrayRef levels) {
  int64_t bins = 0;
  for (const auto level : levels) {
    bins = checked_add("spp", "the number of bins sum(level^2)", bins,
                       checked_mul("spp", "the bins of a level", level, level));
  }
  return bins;
}

int64_t effective_kernel_size(int64_t kernel_size, int64_t height, int64_t width) {
  // A window reaching past the map on both sides covers all of it: clip, so that work and
  // scratch scale with the map, not with the argument.
  return std::min(kernel_size, 2 * std::max(height, width) - 1);
}

c10::MemoryFormat kernel_memory_format(const at::Tensor& input) {
  return input.suggest_memory_format() == c10::MemoryFormat::ChannelsLast
             ? c10::MemoryFormat::ChannelsLast
             : c10::MemoryFormat::Contiguous;
}

namespace {

// ---------------------------------------------------------------- Meta kernels

bool symbolic(const at::Tensor& t) {
  return t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
}

std::tuple<at::Tensor, at::Tensor> spp_forward_meta(const at::Tensor& input, at::IntArrayRef levels,
                                                    std::string_view mode, bool need_indices) {
  check_spp_args(input, levels, mode);
  const auto n = input.sym_size(0);
  const auto features = input.sym_size(1) * total_bins(levels);
  auto output = at::empty_symint({n, features}, input.options());
  const bool with_indices = need_indices && parse_mode(mode) == PoolMode::Max;
  auto indices = with_indices ? at::empty_symint({n, features}, input.options().dtype(at::kLong))
                              : at::empty({0}, input.options().dtype(at::kLong));
  return {output, indices};
}

at::Tensor spp_backward_meta(const at::Tensor& grad_output, const at::Tensor& indices,
                             c10::SymIntArrayRef input_size, at::IntArrayRef levels,
                             std::string_view mode, c10::MemoryFormat memory_format) {
  const auto concrete_size = c10::asIntArrayRefSlowOpt(input_size);
  if (concrete_size && !symbolic(grad_output)) {
    check_spp_backward_args(grad_output, indices, *concrete_size, levels, mode, memory_format);
  }
  check_memory_format("spp backward", memory_format);
  return at::empty_symint(input_size, grad_output.options().memory_format(memory_format));
}

at::Tensor sppf_meta(const at::Tensor& input, int64_t kernel_size, int64_t repeats) {
  check_sppf_args(input, kernel_size, repeats);
  const auto& s = input.sym_sizes();
  return at::empty_symint({s[0], s[1] * (repeats + 1), s[2], s[3]},
                          input.options().memory_format(kernel_memory_format(input)));
}

at::Tensor sppf_backward_meta(const at::Tensor& grad_output, const at::Tensor& output,
                              int64_t kernel_size, int64_t repeats) {
  if (!symbolic(output) && !symbolic(grad_output)) {
    check_sppf_backward_args(grad_output, output, kernel_size, repeats);
  }
  const auto& s = output.sym_sizes();
  return at::empty_symint({s[0], s[1] / (repeats + 1), s[2], s[3]},
                          output.options().memory_format(kernel_memory_format(output)));
}

// spp without autograd: the forward that skips the argmax bookkeeping.
at::Tensor spp_composite(const at::Tensor& input, at::IntArrayRef levels, std::string_view mode) {
  return std::get<0>(call_spp_forward(input, levels, mode, /*need_indices=*/false));
}

}  // namespace
}  // namespace spp_impl

// ---------------------------------------------------------------- C++ API

at::Tensor spp(const at::Tensor& input, at::IntArrayRef levels, std::string_view mode) {
  return spp_impl::call_spp(input, levels, mode);
}

at::Tensor sppf(const at::Tensor& input, int64_t kernel_size, int64_t repeats) {
  return spp_impl::call_sppf(input, kernel_size, repeats);
}

}  // namespace torch_ext

// ---------------------------------------------------------------- schemas

TORCH_LIBRARY_FRAGMENT(torch_ext, m) {
  m.def("spp(Tensor input, int[] levels=[1, 2, 4], str mode=\"max\") -> Tensor");
  // Forward kernel; indices (flat h * W + w of each bin's maximum) are filled only when
  // need_indices and mode == "max", and are empty otherwise.
  m.def(
      "_spp_forward(Tensor input, int[] levels, str mode, bool need_indices) -> "
      "(Tensor output, Tensor indices)");
  m.def(
      "_spp_backward(Tensor grad_output, Tensor indices, SymInt[] input_size, int[] levels, "
      "str mode, MemoryFormat memory_format) -> Tensor");
  m.def("sppf(Tensor input, int kernel_size=5, int repeats=3) -> Tensor");
  m.def(
      "_sppf_backward(Tensor grad_output, Tensor output, int kernel_size, int repeats) -> Tensor");
}

TORCH_LIBRARY_IMPL(torch_ext, Meta, m) {
  m.impl("_spp_forward", torch_ext::spp_impl::spp_forward_meta);
  m.impl("_spp_backward", torch_ext::spp_impl::spp_backward_meta);
  m.impl("sppf", torch_ext::spp_impl::sppf_meta);
  m.impl("_sppf_backward", torch_ext::spp_impl::sppf_backward_meta);
}

TORCH_LIBRARY_IMPL(torch_ext, CompositeExplicitAutograd, m) {
  m.impl("spp", torch_ext::spp_impl::spp_composite);
}
