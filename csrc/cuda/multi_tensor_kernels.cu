// CUDA kernels for task_axpby and task_dot (see multi_tensor_kernels.cuh for the table layout).
#include "multi_tensor_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastmaml {
namespace cuda {
namespace {

template <typename T> __device__ __forceinline__ float to_acc(T v) { return static_cast<float>(v); }
__device__ __forceinline__ double to_acc(double v) { return v; }
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ __forceinline__ T from_acc(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
__device__ __forceinline__ double from_acc_d(double v) { return v; }

template <typename T>
__global__ void __launch_bounds__(kThreads) task_axpby_kernel(AxpbyLaunch args) {
  using acc_t = typename Acc<T>::type;
  const int64_t n = args.n_tensors;
  const int64_t* meta = args.meta;
  const int64_t block = blockIdx.x;
  const int64_t i = meta[7 * n + block];           // tensor index
  const int64_t start = meta[7 * n + args.n_blocks + block];
  const T* x = reinterpret_cast<const T*>(meta[i]);
  const T* y = reinterpret_cast<const T*>(meta[n + i]);
  const T* alpha = reinterpret_cast<const T*>(meta[2 * n + i]);
  T* out = reinterpret_cast<T*>(meta[3 * n + i]);
  const int64_t inner = meta[4 * n + i];
  const bool alpha_is_scalar = meta[5 * n + i] == 1;
  const int64_t numel = meta[6 * n + i];
  const T* xs = static_cast<const T*>(args.x_scale);
  const T* ys = static_cast<const T*>(args.y_scale);
  const acc_t a0 = to_acc(alpha[0]);
  const bool per_task = xs != nullptr || ys != nullptr;

  // Row position of this thread's first element; later elements advance it by kThreads with
  // subtractions instead of one 64-bit division per element.
  int64_t e = start + threadIdx.x;
  int64_t t = e / inner;
  int64_t j = e - t * inner;
#pragma unroll
  for (int k = 0; k < kItemsPerThread; ++k) {
    // Consecutive threads touch consecutive elements: coalesced loads and stores.
    if (e < numel) {
      acc_t cx = acc_t(1), cy = acc_t(1);
      if (per_task) {
        cx = xs ? to_acc(xs[t]) : acc_t(1);
        cy = ys ? to_acc(ys[t]) : acc_t(1);
      }
      const acc_t a = alpha_is_scalar ? a0 : to_acc(alpha[j]);
      const acc_t r = cx * to_acc(x[e]) - a * cy * to_acc(y[e]);
      if constexpr (sizeof(T) == 8) {
        out[e] = from_acc_d(r);
      } else {
        out[e] = from_acc<T>(r);
      }
    }
    e += kThreads;
    j += kThreads;
    while (j >= inner) {
      j -= inner;
      ++t;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) task_dot_kernel(DotLaunch args) {
  __shared__ double warp_sums[kThreads / 32];
  const int64_t n = args.n_tensors;
  const int64_t* meta = args.meta;
  const int64_t block = blockIdx.x;
  const int64_t i = meta[3 * n + block];
  const int64_t task = meta[3 * n + args.n_blocks + block];
  const int64_t begin = meta[3 * n + 2 * args.n_blocks + block];
  const int64_t inner = meta[2 * n + i];
  const T* a = reinterpret_cast<const T*>(meta[i]) + task * inner;
  const T* b = reinterpret_cast<const T*>(meta[n + i]) + task * inner;

  double s = 0.0;
#pragma unroll
  for (int k = 0; k < kItemsPerThread; ++k) {
    const int64_t e = begin + int64_t(k) * kThreads + threadIdx.x;
    if (e < inner) s += static_cast<double>(to_acc(a[e])) * static_cast<double>(to_acc(b[e]));
  }
  for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_down_sync(0xffffffffu, s, offset);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
    args.partial[block] = total;  // fixed-order sums: deterministic
  }
}

template <template <typename> class Kernel, typename Args>
cudaError_t launch_typed(const Args& args, cudaStream_t stream) {
  if (args.n_blocks == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(args.n_blocks));
  switch (args.dtype) {
    case DType::Float32: Kernel<float>::launch(grid, args, stream); break;
    case DType::Float64: Kernel<double>::launch(grid, args, stream); break;
    case DType::Float16: Kernel<__half>::launch(grid, args, stream); break;
    case DType::BFloat16: Kernel<__nv_bfloat16>::launch(grid, args, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename T> struct AxpbyKernel {
  static void launch(dim3 grid, const AxpbyLaunch& a, cudaStream_t s) {
    task_axpby_kernel<T><<<grid, kThreads, 0, s>>>(a);
  }
};
template <typename T> struct DotKernel {
  static void launch(dim3 grid, const DotLaunch& a, cudaStream_t s) {
    task_dot_kernel<T><<<grid, kThreads, 0, s>>>(a);
  }
};

}  // namespace

cudaError_t launch_task_axpby(const AxpbyLaunch& args, cudaStream_t stream) {
  return launch_typed<AxpbyKernel>(args, stream);
}
cudaError_t launch_task_dot(const DotLaunch& args, cudaStream_t stream) {
  return launch_typed<DotKernel>(args, stream);
}

}  // namespace cuda
}  // namespace fastmaml
