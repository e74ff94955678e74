// Runs a model exported from Python that contains torch_ext ops, with no Python in the process:
// an AOTInductor package (.pt2, from torch._inductor.aoti_compile_and_package) or a TorchScript
// file (.ts/.pt, from torch.jit.trace). The input is a tensor saved with torch.save; the output
// is written with torch::pickle_save, which torch.load reads.
//
//   run_exported MODEL INPUT OUTPUT [--repeat N]
//
// --repeat N also runs the model N more times and prints the median latency. Exit status: 0 ok,
// 2 usage or a missing/unreadable file, 3 the model needs an operator no loaded library
// provides, 4 any other failure.

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>
#include <torch/serialize.h>
#include <torch/torch.h>
#include <torch_ext/torch_ext.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <vector>

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

bool missing_operator(const std::string& message) {
  for (const char* marker : {"Unknown builtin op", "Could not find schema",
                             "Could not find any "
                             "similar ops",
                             "findSchemaOrThrow", "not registered"}) {
    if (message.find(marker) != std::string::npos) return true;
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s MODEL INPUT OUTPUT [--repeat N]\n", argv[0]);
    return 2;
  }
  const std::string model_path = argv[1], input_path = argv[2], output_path = argv[3];
  const int repeat = argc >= 6 && std::string(argv[4]) == "--repeat" ? std::atoi(argv[5]) : 0;
  for (const auto& path : {model_path, input_path}) {
    if (!std::ifstream(path).good()) {
      std::fprintf(stderr, "error: file not found or unreadable: %s\n", path.c_str());
      return 2;
    }
  }
  try {
    const auto input = torch::pickle_load(read_file(input_path)).toTensor();
    std::function<at::Tensor()> run;
    std::unique_ptr<torch::inductor::AOTIModelPackageLoader> package;
    torch::jit::Module script;
    if (ends_with(model_path, ".pt2")) {
      package = std::make_unique<torch::inductor::AOTIModelPackageLoader>(model_path);
      run = [&] { return package->run({input})[0]; };
    } else {
      script = torch::jit::load(model_path);
      script.eval();
      run = [&] { return script.forward({input}).toTensor(); };
    }
    torch::NoGradGuard no_grad;
    const auto output = run();
    if (repeat > 0) {
      std::vector<double> ms;
      for (int i = 0; i < repeat; ++i) {
        const auto begin = std::chrono::steady_clock::now();
        run();
        ms.push_back(
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - begin)
                .count());
      }
      std::sort(ms.begin(), ms.end());
      std::printf("latency_ms %.3f (median of %d, %d threads)\n", ms[ms.size() / 2], repeat,
                  at::get_num_threads());
    }
    const auto bytes = torch::pickle_save(output);
    std::ofstream(output_path, std::ios::binary).write(bytes.data(), bytes.size());
    std::printf("ok: %s -> output %s\n", model_path.c_str(), c10::str(output.sizes()).c_str());
    return 0;
  } catch (const std::exception& e) {
    const std::string message = e.what();
    if (missing_operator(message)) {
      std::fprintf(stderr,
                   "error: the model needs an operator that no loaded library provides "
                   "(torch_ext %s has: spp, sppf, dilated_conv2d, confusion_matrix, varlen ops, "
                   "...): %s\n",
                   torch_ext::version().c_str(), message.substr(0, 400).c_str());
      return 3;
    }
    std::fprintf(stderr, "error: %s\n", message.substr(0, 2000).c_str());
    return 4;
  }
}
