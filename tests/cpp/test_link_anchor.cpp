// A program that reaches torch_ext's ops only by name through the dispatcher, as a model
// runner does, linked with --as-needed: without the anchor in torch_ext.h the linker would drop
// libtorch_ext.so and the ops would be unknown ("Could not find schema for torch_ext::spp").

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include "torch_ext/torch_ext.h"

TEST(LinkAnchor, OpsAreRegisteredWithoutReferencingTheirSymbols) {
  const auto handle = c10::Dispatcher::singleton().findSchema({"torch_ext::spp", ""});
  ASSERT_TRUE(handle.has_value()) << "torch_ext::spp is not registered: library dropped?";
  const auto op = handle->typed<at::Tensor(const at::Tensor&, at::IntArrayRef, std::string_view)>();
  const auto x = at::randn({2, 3, 5, 4}, at::kDouble);
  const auto out = op.call(x, {1, 2}, "max");
  const auto expected = at::cat({std::get<0>(at::adaptive_max_pool2d(x, {1, 1})).flatten(1),
                                 std::get<0>(at::adaptive_max_pool2d(x, {2, 2})).flatten(1)},
                                1);
  EXPECT_TRUE(at::allclose(out, expected));
}
