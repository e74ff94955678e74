// Links the installed torch_ext through find_package(TorchExt) and checks one op of each
// family against ATen, with no Python in the process. Exit code 0 on success.

#include <ATen/ATen.h>
#include <torch_ext/torch_ext.h>

#include <iostream>

int main() {
  const auto x = at::randn({2, 3, 7, 5}, at::kDouble);
  const auto expected = at::cat({std::get<0>(at::adaptive_max_pool2d(x, {1, 1})).flatten(1),
                                 std::get<0>(at::adaptive_max_pool2d(x, {2, 2})).flatten(1)},
                                1);
  const bool spp_ok = at::allclose(torch_ext::spp(x, {1, 2}, "max"), expected);

  const auto target = at::randint(0, 4, {100}, at::kLong);
  const auto pred = at::randint(0, 4, {100}, at::kLong);
  const auto counts = torch_ext::confusion_matrix(pred, target, 4);
  const auto expected_counts = at::bincount(target * 4 + pred, {}, 16).reshape({4, 4});
  const bool metrics_ok = at::equal(counts, expected_counts);

  std::cout << "torch_ext " << torch_ext::version() << " (built against torch "
            << torch_ext::torch_version() << "): spp " << (spp_ok ? "ok" : "WRONG")
            << ", confusion_matrix " << (metrics_ok ? "ok" : "WRONG") << std::endl;
  return spp_ok && metrics_ok ? 0 : 1;
}
