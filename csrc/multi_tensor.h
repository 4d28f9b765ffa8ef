// Shared shape bookkeeping for the multi-tensor ops. Every tensor in a list has a leading task
// dimension T; the rest of each tensor is its "row" (inner) of `inner` elements per task.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace fastmaml {

// A contiguous piece of one task's row of one tensor: the unit of parallel work. Keeping each
// piece inside one row means the per-task scales are constants inside the innermost loop.
struct RowChunk {
  int64_t tensor;  // index into the tensor list
  int64_t task;    // t in [0, T)
  int64_t begin;   // element offset inside the row, in [0, inner)
  int64_t length;  // elements in this chunk
};

// Elements per chunk: large enough to amortise scheduling, small enough that two cores split
// a 112k-parameter x 1-task update evenly (about 7 chunks each).
constexpr int64_t kRowChunk = 16384;

// Chunks ordered tensor-major, then task, then offset: a fixed order independent of the thread
// count, so reductions over chunks are deterministic.
inline std::vector<RowChunk> make_row_chunks(at::TensorList tensors, int64_t num_tasks) {
  std::vector<RowChunk> chunks;
  for (int64_t i = 0; i < static_cast<int64_t>(tensors.size()); ++i) {
    const int64_t inner = num_tasks == 0 ? 0 : tensors[i].numel() / num_tasks;
    for (int64_t t = 0; t < num_tasks; ++t) {
      for (int64_t b = 0; b < inner; b += kRowChunk) {
        chunks.push_back({i, t, b, std::min(kRowChunk, inner - b)});
      }
    }
  }
  return chunks;
}

// Below this many elements in all, waking a second thread costs more than it saves (the same
// threshold as ATen's elementwise kernels).
constexpr int64_t kSerialElements = 32768;

// parallel_for grain: everything in one piece for small calls, one chunk per piece otherwise.
inline int64_t parallel_grain(const std::vector<RowChunk>& chunks) {
  int64_t total = 0;
  for (const auto& c : chunks) total += c.length;
  return total < kSerialElements ? static_cast<int64_t>(chunks.size()) + 1 : 1;
}

// Checks that the native kernels rely on. The Python front end gives friendlier messages for the
// same conditions; these guard direct calls of torch.ops.fastmaml.*.
inline void check_task_list(at::TensorList tensors, const char* name, int64_t num_tasks,
                            at::ScalarType dtype, at::Device device) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK(t.dim() >= 1 && t.size(0) == num_tasks, name, "[", i,
                "] must have leading task dimension ", num_tasks, ", got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == dtype, name, "[", i, "] has dtype ", t.scalar_type(),
                ", expected ", dtype);
    TORCH_CHECK(t.device() == device, name, "[", i, "] is on ", t.device(), ", expected ", device);
    TORCH_CHECK(t.is_contiguous(), name, "[", i, "] must be contiguous");
  }
}

inline void check_task_axpby_inputs(at::TensorList x, at::TensorList y, at::TensorList alpha,
                                    const std::optional<at::Tensor>& x_scale,
                                    const std::optional<at::Tensor>& y_scale) {
  TORCH_CHECK(!x.empty(), "x must hold at least one tensor");
  TORCH_CHECK(x.size() == y.size() && x.size() == alpha.size(),
              "x, y and alpha must have the same length, got ", x.size(), ", ", y.size(), ", ",
              alpha.size());
  const int64_t T = x[0].dim() >= 1 ? x[0].size(0) : -1;
  const auto dtype = x[0].scalar_type();
  const auto device = x[0].device();
  TORCH_CHECK(at::isFloatingType(dtype), "x must be floating point, got ", dtype);
  check_task_list(x, "x", T, dtype, device);
  check_task_list(y, "y", T, dtype, device);
  for (size_t i = 0; i < x.size(); ++i) {
    TORCH_CHECK(y[i].sizes() == x[i].sizes(), "y[", i, "] has shape ", y[i].sizes(),
                ", expected ", x[i].sizes());
    const int64_t inner = T == 0 ? 0 : x[i].numel() / T;
    TORCH_CHECK(alpha[i].numel() == 1 || alpha[i].numel() == inner, "alpha[", i, "] has ",
                alpha[i].numel(), " elements, expected 1 or ", inner);
    TORCH_CHECK(alpha[i].scalar_type() == dtype && alpha[i].device() == device &&
                    alpha[i].is_contiguous(),
                "alpha[", i, "] must be a contiguous ", dtype, " tensor on ", device);
  }
  for (const auto* s : {&x_scale, &y_scale}) {
    if (s->has_value()) {
      const auto& v = s->value();
      TORCH_CHECK(v.dim() == 1 && v.size(0) == T && v.scalar_type() == dtype &&
                      v.device() == device && v.is_contiguous(),
                  "task scales must be contiguous [", T, "] ", dtype, " tensors on ", device,
                  ", got ", v.sizes(), " ", v.scalar_type());
    }
  }
}

inline void check_task_dot_inputs(at::TensorList a, at::TensorList b) {
  TORCH_CHECK(!a.empty(), "a must hold at least one tensor");
  TORCH_CHECK(a.size() == b.size(), "a and b must have the same length, got ", a.size(), " and ",
              b.size());
  const int64_t T = a[0].dim() >= 1 ? a[0].size(0) : -1;
  TORCH_CHECK(at::isFloatingType(a[0].scalar_type()), "a must be floating point");
  check_task_list(a, "a", T, a[0].scalar_type(), a[0].device());
  check_task_list(b, "b", T, a[0].scalar_type(), a[0].device());
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].sizes() == b[i].sizes(), "b[", i, "] has shape ", b[i].sizes(),
                ", expected ", a[i].sizes());
  }
}

}  // namespace fastmaml
