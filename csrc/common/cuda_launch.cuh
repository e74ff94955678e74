#pragma once

// Launch helpers shared by the CUDA kernels of every family: grid sizes of grid-stride loops,
// the loop's indices, and the GPU's multiprocessor count. Include only from .cu files.

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace torch_ext::launch {

// Threads per block of the elementwise (grid-stride) kernels.
constexpr int kBlockThreads = 256;

// Blocks of a grid-stride launch over `work` items with `threads` per block: enough for one
// item per thread, at most 2^20 (the loop covers the rest), and at least one (a launch of zero
// blocks is an error; the loop then simply does nothing).
inline unsigned int grid_stride_blocks(int64_t work, int threads = kBlockThreads) {
  const int64_t wanted = work / threads + (work % threads != 0);
  return static_cast<unsigned int>(std::clamp<int64_t>(wanted, 1, int64_t{1} << 20));
}

// The first item of this thread in a grid-stride loop over a 1-D grid, and the step.
__device__ __forceinline__ int64_t grid_stride_first() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride_step() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// Streaming multiprocessors of a device (a driver attribute query: cheap, no synchronization).
inline int multiprocessor_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

}  // namespace torch_ext::launch
