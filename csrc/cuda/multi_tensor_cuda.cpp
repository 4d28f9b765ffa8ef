// Torch-facing CUDA launchers: build the per-call metadata table, copy it to the device on the
// current stream, and launch the torch-free kernels from multi_tensor_kernels.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/multi_tensor_kernels.cuh"
#include "multi_tensor.h"

namespace fastmaml {
namespace {

cuda::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::Float32;
    case at::kDouble: return cuda::DType::Float64;
    case at::kHalf: return cuda::DType::Float16;
    case at::kBFloat16: return cuda::DType::BFloat16;
    default: TORCH_CHECK(false, "fastmaml CUDA kernels support float16/bfloat16/float32/float64, got ", t);
  }
}

int64_t as_int(const at::Tensor& t) { return reinterpret_cast<int64_t>(t.data_ptr()); }

// The table is small (a few ints per tensor and per block); one pinned host buffer and one
// asynchronous copy on the current stream keep the launch free of host synchronisation.
at::Tensor upload(const std::vector<int64_t>& host, const at::Device& device) {
  auto pinned = at::empty({static_cast<int64_t>(host.size())},
                          at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(host.begin(), host.end(), pinned.data_ptr<int64_t>());
  return pinned.to(device, /*non_blocking=*/true);
}

// `out` is new memory or x itself (in place): each element is read and written by one thread.
void task_axpby_into_cuda(at::TensorList x, at::TensorList y, at::TensorList alpha,
                          const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& y_scale,
                          at::TensorList out) {
  const c10::cuda::CUDAGuard guard(x[0].device());
  const int64_t n = static_cast<int64_t>(x.size());
  const int64_t T = x[0].size(0);

  std::vector<int64_t> meta(7 * n);
  std::vector<int64_t> block_tensor, block_start;
  for (int64_t i = 0; i < n; ++i) {
    meta[i] = as_int(x[i]);
    meta[n + i] = as_int(y[i]);
    meta[2 * n + i] = as_int(alpha[i]);
    meta[3 * n + i] = as_int(out[i]);
    meta[4 * n + i] = T == 0 ? 1 : std::max<int64_t>(1, x[i].numel() / T);
    meta[5 * n + i] = alpha[i].numel();
    meta[6 * n + i] = x[i].numel();
    for (int64_t s = 0; s < x[i].numel(); s += cuda::kBlockElems) {
      block_tensor.push_back(i);
      block_start.push_back(s);
    }
  }
  meta.insert(meta.end(), block_tensor.begin(), block_tensor.end());
  meta.insert(meta.end(), block_start.begin(), block_start.end());
  const at::Tensor meta_dev = upload(meta, x[0].device());

  cuda::AxpbyLaunch args{meta_dev.data_ptr<int64_t>(), n, static_cast<int64_t>(block_tensor.size()),
                         x_scale ? x_scale->data_ptr() : nullptr,
                         y_scale ? y_scale->data_ptr() : nullptr, to_kernel_dtype(x[0].scalar_type())};
  const cudaError_t err = cuda::launch_task_axpby(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "task_axpby CUDA launch failed: ", cudaGetErrorString(err));
}

std::vector<at::Tensor> task_axpby_cuda(at::TensorList x, at::TensorList y, at::TensorList alpha,
                                        const std::optional<at::Tensor>& x_scale,
                                        const std::optional<at::Tensor>& y_scale) {
  check_task_axpby_inputs(x, y, alpha, x_scale, y_scale);
  std::vector<at::Tensor> out;
  for (const auto& xi : x) out.push_back(at::empty_like(xi));
  task_axpby_into_cuda(x, y, alpha, x_scale, y_scale, out);
  return out;
}

void task_axpby_inplace_cuda(at::TensorList x, at::TensorList y, at::TensorList alpha,
                             const std::optional<at::Tensor>& x_scale,
                             const std::optional<at::Tensor>& y_scale) {
  check_task_axpby_inputs(x, y, alpha, x_scale, y_scale);
  task_axpby_into_cuda(x, y, alpha, x_scale, y_scale, x);
}

at::Tensor task_dot_cuda(at::TensorList a, at::TensorList b) {
  check_task_dot_inputs(a, b);
  const c10::cuda::CUDAGuard guard(a[0].device());
  const int64_t n = static_cast<int64_t>(a.size());
  const int64_t T = a[0].size(0);
  std::vector<int64_t> meta(3 * n);
  std::vector<int64_t> block_tensor, block_task, block_begin;
  for (int64_t i = 0; i < n; ++i) {
    meta[i] = as_int(a[i]);
    meta[n + i] = as_int(b[i]);
    meta[2 * n + i] = T == 0 ? 0 : a[i].numel() / T;
  }
  // Task-major block order: every task has the same number of blocks, so the partial sums
  // reshape to [T, blocks_per_task] and reduce in a fixed order.
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t s = 0; s < meta[2 * n + i]; s += cuda::kBlockElems) {
        block_tensor.push_back(i);
        block_task.push_back(t);
        block_begin.push_back(s);
      }
    }
  }
  const int64_t n_blocks = static_cast<int64_t>(block_tensor.size());
  meta.insert(meta.end(), block_tensor.begin(), block_tensor.end());
  meta.insert(meta.end(), block_task.begin(), block_task.end());
  meta.insert(meta.end(), block_begin.begin(), block_begin.end());
  const at::Tensor meta_dev = upload(meta, a[0].device());
  at::Tensor partial = at::empty({n_blocks}, a[0].options().dtype(at::kDouble));
  if (n_blocks == 0) return at::zeros({T}, a[0].options());

  cuda::DotLaunch args{meta_dev.data_ptr<int64_t>(), n, n_blocks, partial.data_ptr<double>(),
                       to_kernel_dtype(a[0].scalar_type())};
  const cudaError_t err = cuda::launch_task_dot(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "task_dot CUDA launch failed: ", cudaGetErrorString(err));
  return partial.view({T, n_blocks / T}).sum(1).to(a[0].scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmaml, CUDA, m) {
  m.impl("task_axpby", &task_axpby_cuda);
  m.impl("task_axpby_", &task_axpby_inplace_cuda);
  m.impl("task_dot", &task_dot_cuda);
}

}  // namespace fastmaml
