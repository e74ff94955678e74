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

// Dynamic shared memory every block may have without opting in to more.
constexpr int64_t kDefaultSharedBytes = 48 * 1024;

// The dynamic shared memory a block may have on `device` once its kernel opts in (at least
// kDefaultSharedBytes).
inline int64_t shared_bytes_opt_in(int device) {
  int bytes = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return std::max<int64_t>(bytes, kDefaultSharedBytes);
}

// The dynamic shared memory per block with which `blocks` blocks fit on one SM together (the
// SM's shared memory, less what the driver reserves per block), at most the opt-in maximum.
inline int64_t shared_bytes_for_blocks(int device, int blocks) {
  int per_sm = 0, reserved = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device));
  return std::min<int64_t>(shared_bytes_opt_in(device), per_sm / blocks - reserved);
}

// Launches kernel<<<blocks, threads, smem, stream>>>(args...), first opting the kernel in to the
// device's maximum dynamic shared memory when smem exceeds the default (the same value on every
// call, so that concurrent callers never lower it under each other's launch).
template <class Kernel, class... Args>
void launch_with_shared(Kernel kernel, unsigned int blocks, int threads, int64_t smem, int device,
                        cudaStream_t stream, Args... args) {
  if (smem > kDefaultSharedBytes) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes_opt_in(device))));
  }
  kernel<<<blocks, threads, static_cast<size_t>(smem), stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace torch_ext::launch
