// The one registration point: op schemas for the dispatcher, and the pybind11 module that
// reports how the extension was built. Device kernels register themselves in csrc/cpu and csrc/cuda.
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include <string>

TORCH_LIBRARY(fastmaml, m) {
  // out_i[t, ...] = x_scale[t] * x_i[t, ...] - alpha_i * y_scale[t] * y_i[t, ...]
  // alpha_i has 1 element or one per row element (shape of x_i without the task dimension).
  m.def("task_axpby(Tensor[] x, Tensor[] y, Tensor[] alpha, Tensor? x_scale, Tensor? y_scale)"
        " -> Tensor[]");
  // The same, written into x (first-order and no-grad inner loops, where phi_k need not be kept).
  m.def("task_axpby_(Tensor(a!)[] x, Tensor[] y, Tensor[] alpha, Tensor? x_scale, Tensor? y_scale) -> ()");
  // out[t] = sum_i <a_i[t], b_i[t]>
  m.def("task_dot(Tensor[] a, Tensor[] b) -> Tensor");
}

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastmaml compiled kernels (ops are registered under torch.ops.fastmaml)";
  m.def("build_info", []() {
    py::dict info;
    info["version"] = std::string(FASTMAML_VERSION);
    info["with_cuda"] = static_cast<bool>(FASTMAML_WITH_CUDA);
    info["compiler"] = std::string(__VERSION__);
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    info["torch_built_against"] = std::string(FASTMAML_TORCH_VERSION);
    return info;
  });
}
