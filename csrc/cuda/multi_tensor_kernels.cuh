// Torch-free CUDA kernels for the multi-tensor task ops, so nvcc can compile them on machines
// whose torch has no CUDA headers. The torch-facing launcher lives in multi_tensor_cuda.cpp.
//
// All tensors of one call are handled by one launch: a device-side table holds each tensor's
// pointers and sizes, and each block looks up which tensor (and where in it) it works on.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace fastmaml {
namespace cuda {

enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

constexpr int kThreads = 256;
constexpr int kItemsPerThread = 8;
constexpr int64_t kBlockElems = int64_t(kThreads) * kItemsPerThread;  // 2048 elements per block

// Metadata for task_axpby, one int64 array on the device:
//   [x_ptr | y_ptr | alpha_ptr | out_ptr | inner | alpha_numel | numel]  (n_tensors each)
//   [block_tensor | block_start]                                          (n_blocks each)
struct AxpbyLaunch {
  const int64_t* meta;
  int64_t n_tensors;
  int64_t n_blocks;
  const void* x_scale;  // [T] or nullptr
  const void* y_scale;  // [T] or nullptr
  DType dtype;
};

// Metadata for task_dot:
//   [a_ptr | b_ptr | inner]                     (n_tensors each)
//   [block_tensor | block_task | block_begin]   (n_blocks each), blocks ordered task-major
// Each block writes one double partial sum to `partial[block]`.
struct DotLaunch {
  const int64_t* meta;
  int64_t n_tensors;
  int64_t n_blocks;
  double* partial;
  DType dtype;
};

cudaError_t launch_task_axpby(const AxpbyLaunch& args, cudaStream_t stream);
cudaError_t launch_task_dot(const DotLaunch& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmaml
