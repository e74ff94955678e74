// Gradient checkpointing benchmark (C++ API): a deep MLP trained one step (zero grads in place,
// forward, backward) on the CPU, plain vs checkpointing every block, through
// torch_ext::checkpoint (options.parameters = the block's parameters) and through
// torch_ext::nn::Checkpoint.
//
// Memory: a counting CPU allocator (installed with c10::SetCPUAllocator, as in
// tests/cpp/test_checkpoint.cpp) tracks the bytes currently allocated and their peak. The peak
// of a step is taken relative to the level just before its forward, after the grads were zeroed
// in place: parameters and their (preallocated, by a warm-up step) gradients are not counted;
// activations, the saved tensors, the recomputation and the transient gradient buffers are.
//
// Time: the modes are interleaved (order rotated every round) after warm-up steps; reported is
// the median (and p10/p90) of the per-step wall time.
//
//   checkpoint_mlp [--blocks 32] [--width 1024] [--batch 64] [--steps 30] [--warmup 3]
//                  [--threads 2] [--json PATH]
// A benchmark, not a test: nothing is asserted.

#include <torch/torch.h>

#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "torch_ext/checkpoint.h"

namespace {

using torch::Tensor;
using Tensors = std::vector<Tensor>;

// ---------------------------------------------------------------- counting allocator

// The context of every DataPtr it returns is its data pointer (as raw_allocate, used by some
// kernels for scratch buffers, requires); the inner allocation and its size are found in a map.
class CountingAllocator final : public c10::Allocator {
 public:
  explicit CountingAllocator(c10::Allocator* inner) : inner_(inner) { instance_ = this; }

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr inner = inner_->allocate(n);
    void* data = inner.get();
    if (data == nullptr) return inner;  // zero-byte allocation: nothing to count
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_.emplace(data, Entry{std::move(inner), n});
    }
    const int64_t now = current_.fetch_add(static_cast<int64_t>(n)) + static_cast<int64_t>(n);
    int64_t peak = peak_.load();
    while (now > peak && !peak_.compare_exchange_weak(peak, now)) {
    }
    return {data, data, &CountingAllocator::free, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &CountingAllocator::free; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t current() const { return current_.load(); }
  int64_t peak() const { return peak_.load(); }
  void reset_peak() { peak_.store(current_.load()); }

 private:
  struct Entry {
    c10::DataPtr inner;
    size_t bytes;
  };
  static void free(void* data) {
    CountingAllocator* self = instance_;
    c10::DataPtr inner;  // freed (the inner allocation released) outside the lock
    {
      std::lock_guard<std::mutex> lock(self->mutex_);
      auto it = self->live_.find(data);
      if (it == self->live_.end()) return;
      inner = std::move(it->second.inner);
      self->current_.fetch_sub(static_cast<int64_t>(it->second.bytes));
      self->live_.erase(it);
    }
  }

  static inline CountingAllocator* instance_ = nullptr;
  c10::Allocator* inner_;
  std::mutex mutex_;
  std::unordered_map<void*, Entry> live_;
  std::atomic<int64_t> current_{0};
  std::atomic<int64_t> peak_{0};
};

// ---------------------------------------------------------------- model

// One residual block: x + tanh(g) * sigmoid(g), g = GELU(Linear(width, width)(x)). The plain run
// keeps four activations per block for backward (the Linear's input, the GELU's input, the tanh
// and the sigmoid outputs); a checkpointed block keeps only its input. The residual keeps the
// activations at unit scale: without it they shrink layer after layer into float32 denormals,
// which makes every step several times slower and the timings meaningless.
struct BlockImpl : torch::nn::Module {
  explicit BlockImpl(int64_t width)
      : linear(register_module("linear", torch::nn::Linear(width, width))) {}
  Tensor forward(const Tensor& x) {
    auto g = torch::gelu(linear->forward(x));
    return x + torch::tanh(g) * torch::sigmoid(g);
  }
  torch::nn::Linear linear;
};
TORCH_MODULE(Block);

enum class Mode { kPlain, kCheckpoint, kCheckpointModule };
const char* mode_name(Mode m) {
  switch (m) {
    case Mode::kPlain:
      return "plain";
    case Mode::kCheckpoint:
      return "cpp_checkpoint";
    case Mode::kCheckpointModule:
      return "cpp_nn_checkpoint";
  }
  return "?";
}

struct Options {
  int64_t blocks = 32, width = 1024, batch = 64;
  int steps = 30, warmup = 3, threads = 2;
  std::string json;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    auto next = [&](const char* name) -> const char* {
      if (i + 1 >= argc) {
        std::cerr << "checkpoint_mlp: " << name << " needs a value\n";
        std::exit(2);
      }
      return argv[++i];
    };
    const std::string a = argv[i];
    if (a == "--blocks")
      o.blocks = std::atoll(next("--blocks"));
    else if (a == "--width")
      o.width = std::atoll(next("--width"));
    else if (a == "--batch")
      o.batch = std::atoll(next("--batch"));
    else if (a == "--steps")
      o.steps = std::atoi(next("--steps"));
    else if (a == "--warmup")
      o.warmup = std::atoi(next("--warmup"));
    else if (a == "--threads")
      o.threads = std::atoi(next("--threads"));
    else if (a == "--json")
      o.json = next("--json");
    else {
      std::cerr << "checkpoint_mlp: unknown argument " << a << "\n";
      std::exit(2);
    }
  }
  return o;
}

double quantile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const double pos = q * static_cast<double>(v.size() - 1);
  const auto lo = static_cast<size_t>(pos);
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (pos - static_cast<double>(lo)) * (v[hi] - v[lo]);
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse(argc, argv);
  torch::manual_seed(0);
  if (opt.threads > 0) torch::set_num_threads(opt.threads);

  // Installed before anything is allocated; never deleted (tensors may outlive main's scope).
  auto* counter = new CountingAllocator(c10::GetCPUAllocator());
  c10::SetCPUAllocator(counter, /*priority=*/200);
  const bool counting = c10::GetCPUAllocator() == counter;
  if (!counting) std::cerr << "checkpoint_mlp: the counting allocator was not installed\n";

  std::vector<Block> blocks;
  std::vector<torch_ext::nn::Checkpoint> wrapped;
  std::vector<std::vector<Tensor>> block_params;
  std::vector<Tensor> params;
  for (int64_t i = 0; i < opt.blocks; ++i) {
    blocks.emplace_back(opt.width);
    wrapped.emplace_back(torch::nn::AnyModule(blocks.back()));
    block_params.push_back(blocks.back()->parameters());
    for (auto& p : block_params.back()) params.push_back(p);
  }
  const Tensor data = torch::randn({opt.batch, opt.width});
  const Tensor target = torch::randn({opt.batch, opt.width});

  auto forward = [&](Mode mode) {
    Tensor h = data;
    for (int64_t i = 0; i < opt.blocks; ++i) {
      switch (mode) {
        case Mode::kPlain:
          h = blocks[i]->forward(h);
          break;
        case Mode::kCheckpoint: {
          torch_ext::CheckpointOptions options;
          options.parameters = block_params[i];
          Block block = blocks[i];
          h = torch_ext::checkpoint(
              [block](const Tensors& in) mutable { return Tensors{block->forward(in[0])}; }, {h},
              options)[0];
          break;
        }
        case Mode::kCheckpointModule:
          h = wrapped[i]->forward(h);
          break;
      }
    }
    return torch::mse_loss(h, target);
  };

  struct Sample {
    double ms;
    int64_t peak;
  };
  // One training step: zero the grads in place (they stay allocated), forward, backward.
  auto step = [&](Mode mode) {
    for (auto& p : params) {
      if (p.grad().defined()) p.mutable_grad().zero_();
    }
    counter->reset_peak();
    const int64_t base = counter->current();
    const auto t0 = std::chrono::steady_clock::now();
    {
      Tensor loss = forward(mode);
      loss.backward();
    }
    const auto t1 = std::chrono::steady_clock::now();
    return Sample{std::chrono::duration<double, std::milli>(t1 - t0).count(),
                  counter->peak() - base};
  };

  const std::vector<Mode> modes = {Mode::kPlain, Mode::kCheckpoint, Mode::kCheckpointModule};
  // Warm-up: allocates the grads (the first step creates them) and warms caches/thread pools.
  for (int w = 0; w < std::max(1, opt.warmup); ++w)
    for (Mode m : modes) step(m);

  // Gradients agree between the modes (same weights, same data): a sanity figure, not a check.
  std::vector<double> grad_diff(modes.size(), 0.0);
  {
    std::vector<std::vector<Tensor>> grads;
    for (Mode m : modes) {
      step(m);
      std::vector<Tensor> g;
      for (auto& p : params) g.push_back(p.grad().clone());
      grads.push_back(std::move(g));
    }
    for (size_t k = 0; k < modes.size(); ++k)
      for (size_t j = 0; j < params.size(); ++j)
        grad_diff[k] =
            std::max(grad_diff[k], (grads[k][j] - grads[0][j]).abs().max().item<double>());
  }

  std::vector<std::vector<Sample>> samples(modes.size());
  for (int s = 0; s < opt.steps; ++s) {
    for (size_t k = 0; k < modes.size(); ++k) {
      const size_t idx = (k + static_cast<size_t>(s)) % modes.size();  // rotate the order
      samples[idx].push_back(step(modes[idx]));
    }
  }

  const int64_t activation_bytes = opt.batch * opt.width * static_cast<int64_t>(sizeof(float));
  std::ostringstream js;
  js << "{\"threads\": " << torch::get_num_threads() << ", \"blocks\": " << opt.blocks
     << ", \"width\": " << opt.width << ", \"batch\": " << opt.batch << ", \"steps\": " << opt.steps
     << ", \"warmup\": " << opt.warmup
     << ", \"counting_allocator\": " << (counting ? "true" : "false")
     << ", \"activation_bytes\": " << activation_bytes << ", \"modes\": {";
  std::printf(
      "checkpoint_mlp: %lld blocks of x + tanh*sigmoid(GELU(Linear(%lld, %lld)(x))), batch %lld, "
      "float32, CPU, %d threads, %d interleaved steps per mode\n",
      static_cast<long long>(opt.blocks), static_cast<long long>(opt.width),
      static_cast<long long>(opt.width), static_cast<long long>(opt.batch),
      torch::get_num_threads(), opt.steps);
  for (size_t k = 0; k < modes.size(); ++k) {
    std::vector<double> ms, peak;
    for (auto& s : samples[k]) {
      ms.push_back(s.ms);
      peak.push_back(static_cast<double>(s.peak));
    }
    const double peak_max = *std::max_element(peak.begin(), peak.end());
    const double peak_min = *std::min_element(peak.begin(), peak.end());
    const double med = quantile(ms, 0.5), p10 = quantile(ms, 0.1), p90 = quantile(ms, 0.9);
    std::printf(
        "  %-18s peak %8.2f MB (min %8.2f)  step %8.2f ms [p10 %.2f, p90 %.2f]  "
        "max |grad - plain| %.3g\n",
        mode_name(modes[k]), peak_max / 1e6, peak_min / 1e6, med, p10, p90, grad_diff[k]);
    js << (k ? ", " : "") << "\"" << mode_name(modes[k])
       << "\": {\"peak_bytes\": " << static_cast<int64_t>(peak_max)
       << ", \"peak_bytes_min\": " << static_cast<int64_t>(peak_min)
       << ", \"step_ms_median\": " << med << ", \"step_ms_p10\": " << p10
       << ", \"step_ms_p90\": " << p90 << ", \"max_abs_grad_diff_vs_plain\": " << grad_diff[k]
       << ", \"step_ms\": [";
    for (size_t i = 0; i < ms.size(); ++i) js << (i ? ", " : "") << ms[i];
    js << "]}";
  }
  js << "}}";
  if (!opt.json.empty()) {
    std::ofstream f(opt.json);
    f << js.str() << "\n";
  } else {
    std::printf("%s\n", js.str().c_str());
  }
  return 0;
}
