// A consumer that includes none of torch_ext's headers and references none of its symbols: it
// reaches the ops only by name through the dispatcher, as a runner of exported models does. Its
// project links torch before TorchExt::torch_ext and asks for --as-needed, the setting under
// which a linker drops a library nothing references. Exit code 0 when the ops are there.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>

int main() {
  const auto handle = c10::Dispatcher::singleton().findSchema({"torch_ext::spp", ""});
  if (!handle.has_value()) {
    std::cout << "torch_ext::spp is not registered: the linker dropped libtorch_ext.so"
              << std::endl;
    return 1;
  }
  const auto op = handle->typed<at::Tensor(const at::Tensor&, at::IntArrayRef, std::string_view)>();
  const auto x = at::randn({2, 3, 7, 5}, at::kDouble);
  const auto expected = std::get<0>(at::adaptive_max_pool2d(x, {2, 2})).flatten(1);
  const bool ok = at::allclose(op.call(x, {2}, "max"), expected);
  std::cout << "torch_ext::spp found by name: " << (ok ? "ok" : "WRONG") << std::endl;
  return ok ? 0 : 1;
}
