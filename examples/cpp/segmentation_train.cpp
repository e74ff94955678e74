// A small segmentation-style network built with torch::nn and torch_ext's ops, trained for a few
// steps in C++ with gradient checkpointing, then evaluated with the confusion-matrix metrics.
//
// Synthetic task: 32x32 noise images holding a bright square that is red (class 1) or green
// (class 2); predict the class of every pixel, and (SPP head) whether the image holds a green
// square. The program exits with status 1 if training does not reduce the loss or the pixel
// accuracy stays low, so the test that runs it checks that everything trains end to end.
//
//   segmentation_train [steps]

#include <torch/torch.h>
#include <torch_ext/torch_ext.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

constexpr int64_t kClasses = 3;
constexpr int64_t kSize = 32;

// nn.Conv2d's parameters, computed by torch_ext::dilated_conv2d with a fused activation.
struct DilatedConvImpl : torch::nn::Module {
  DilatedConvImpl(int64_t in, int64_t out, int64_t k, int64_t dilation, int64_t groups,
                  std::string activation)
      : padding(dilation * (k - 1) / 2),
        dilation(dilation),
        groups(groups),
        activation(std::move(activation)) {
    weight = register_parameter("weight", torch::empty({out, in / groups, k, k}));
    bias = register_parameter("bias", torch::zeros({out}));
    torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return torch_ext::dilated_conv2d(x, weight, bias, 1, padding, dilation, groups, activation);
  }
  torch::Tensor weight, bias;
  int64_t padding, dilation, groups;
  std::string activation;
};
TORCH_MODULE(DilatedConv);

struct NetImpl : torch::nn::Module {
  NetImpl()
      : stem(register_module("stem", DilatedConv(3, 16, 3, 1, 1, "relu"))),
        depthwise(register_module("depthwise", DilatedConv(16, 16, 3, 2, 16, "relu"))),
        branch1(register_module("branch1", DilatedConv(16, 16, 1, 1, 1, "relu"))),
        branch2(register_module("branch2", DilatedConv(16, 16, 3, 2, 1, "relu"))),
        branch4(register_module("branch4", DilatedConv(16, 16, 3, 4, 1, "relu"))),
        project(register_module("project", DilatedConv(48, 16, 1, 1, 1, "relu"))),
        classifier(register_module("classifier", DilatedConv(16, kClasses, 1, 1, 1, "none"))),
        image_head(register_module("image_head", torch::nn::Linear(16 * 21, 2))) {}

  // (per-pixel class scores [N, K, H, W], image logits [N, 2])
  std::pair<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x) {
    auto features = depthwise(stem(x));
    // The ASPP-like head runs under gradient checkpointing: its activations are recomputed in
    // backward instead of being kept.
    torch_ext::CheckpointOptions options;
    for (auto* m :
         {branch1.ptr().get(), branch2.ptr().get(), branch4.ptr().get(), project.ptr().get()}) {
      for (const auto& p : m->parameters()) options.parameters.push_back(p);
    }
    auto head = torch_ext::checkpoint(
        [this](const std::vector<torch::Tensor>& in) {
          auto merged = torch::cat({branch1(in[0]), branch2(in[0]), branch4(in[0])}, 1);
          return std::vector<torch::Tensor>{project(merged)};
        },
        {features}, options)[0];
    auto image = image_head(torch_ext::spp(features, {1, 2, 4}, "max"));
    return {classifier(head), image};
  }

  DilatedConv stem, depthwise, branch1, branch2, branch4, project, classifier;
  torch::nn::Linear image_head;
};
TORCH_MODULE(Net);

struct Batch {
  torch::Tensor images, masks, has_green;
};

Batch make_batch(int64_t n, torch::Generator& gen) {
  auto images = 0.3 * torch::randn({n, 3, kSize, kSize}, gen);
  auto masks = torch::zeros({n, kSize, kSize}, torch::kLong);
  auto has_green = torch::zeros({n}, torch::kLong);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t cls = 1 + torch::randint(2, {1}, gen).item<int64_t>();
    const int64_t side = 6 + torch::randint(10, {1}, gen).item<int64_t>();
    const int64_t top = torch::randint(kSize - side, {1}, gen).item<int64_t>();
    const int64_t left = torch::randint(kSize - side, {1}, gen).item<int64_t>();
    using torch::indexing::Slice;
    images.index({i, cls - 1, Slice(top, top + side), Slice(left, left + side)}) += 2.0;
    masks.index_put_({i, Slice(top, top + side), Slice(left, left + side)}, cls);
    has_green[i] = cls == 2 ? 1 : 0;
  }
  return {images, masks, has_green};
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t steps = argc > 1 ? std::atoll(argv[1]) : 60;
  torch::manual_seed(0);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1234);
  std::printf("torch_ext %s (built against torch %s)\n", torch_ext::version().c_str(),
              torch_ext::torch_version().c_str());

  Net net;
  torch::optim::Adam optimizer(net->parameters(), torch::optim::AdamOptions(1e-2));
  double first_loss = 0, last_loss = 0;
  for (int64_t step = 0; step < steps; ++step) {
    auto batch = make_batch(8, gen);
    auto [scores, image_logits] = net->forward(batch.images);
    auto loss = torch::nn::functional::cross_entropy(scores, batch.masks) +
                torch::nn::functional::cross_entropy(image_logits, batch.has_green);
    optimizer.zero_grad();
    loss.backward();
    optimizer.step();
    const double value = loss.item<double>();
    if (step == 0) first_loss = value;
    last_loss = value;
    if (step % 10 == 0 || step == steps - 1) {
      std::printf("step %3lld  loss %.4f\n", static_cast<long long>(step), value);
    }
  }

  torch::NoGradGuard no_grad;
  net->eval();
  torch_ext::SegmentationMetricsAccumulator meter(kClasses, std::nullopt, torch::kCPU);
  int64_t image_correct = 0, images = 0;
  for (int i = 0; i < 4; ++i) {
    auto batch = make_batch(16, gen);
    auto [scores, image_logits] = net->forward(batch.images);
    meter.update(scores, batch.masks);  // float scores: argmax inside the kernel
    image_correct += (image_logits.argmax(1) == batch.has_green).sum().item<int64_t>();
    images += 16;
  }
  const auto m = meter.compute();
  const double pa = m.pixel_accuracy.item<double>(), miou = m.mean_iou.item<double>();
  std::printf("eval: pixel accuracy %.3f, mean IoU %.3f, IoU per class", pa, miou);
  for (int64_t k = 0; k < kClasses; ++k) std::printf(" %.3f", m.iou[k].item<double>());
  std::printf(", image accuracy %.3f\n", static_cast<double>(image_correct) / images);
  if (!(last_loss < 0.7 * first_loss && pa > 0.85)) {
    std::fprintf(stderr, "FAILED: loss %.4f -> %.4f, pixel accuracy %.3f\n", first_loss, last_loss,
                 pa);
    return 1;
  }
  std::printf("OK: loss %.4f -> %.4f\n", first_loss, last_loss);
  return 0;
}
