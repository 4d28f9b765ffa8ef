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
  // Crammer-Singer SVM dual (MetaOptNet) by the interior-point method, per task:
  //   min 1/2 sum_k a_k^T Kr a_k - sum_k y_k^T a_k  s.t.  a_k <= C y_k,  sum_k a_k = 0,
  // Kr = K + r I with r = max(diag_reg, n * floor_eps * max_i |K[i, i]|) per task.
  // kernel [T, n, n], labels [T, n] int64. Returns alpha [T, c, n] (class-major), the barrier
  // weights lam / s at the returned iterate [T, c, n] (for the backward pass), status and
  // iterations [T] int64 (QPStatus codes), the residuals and the gap [T].
  m.def("svm_cs_ipm(Tensor kernel, Tensor labels, int n_way, float C, float diag_reg, float floor_eps, "
        "int max_iter, float tol) -> (Tensor alpha, Tensor weights, Tensor status, Tensor iterations, "
        "Tensor primal_residual, Tensor dual_residual, Tensor gap)");
  // Solve blockdiag_k(Kr + diag(weights_k)) dz + E^T dy = rhs, E dz = 0 (E = [I ... I]): the
  // adjoint system of the backward pass. weights, rhs, result [T, c, n]; NaN rows for tasks whose
  // system is not positive definite.
  m.def("svm_cs_kkt_solve(Tensor kernel, float diag_reg, float floor_eps, Tensor weights, Tensor rhs) -> Tensor");
  // Per-task products with a thin side (c <= 16 rows of b / columns of g), the heads' feature
  // products: a [T, m, d], b [T, c, d] -> a @ b^T [T, m, c]; g [T, m, c] -> g^T @ a [T, c, d].
  m.def("task_matmul_nt(Tensor a, Tensor b) -> Tensor");
  m.def("task_matmul_tn(Tensor g, Tensor a) -> Tensor");
  // 2x2 / stride-2 max-pool (floor mode) with a uint8 argmax code per output (which of the four
  // window entries: 2 * row + column), and the two linear maps of its derivatives: scatter (the
  // backward: values put at the argmax, zeros elsewhere) and gather (its adjoint).
  m.def("max_pool2x2(Tensor x) -> (Tensor out, Tensor code)");
  m.def("max_pool2x2_scatter(Tensor grad, Tensor code, int height, int width) -> Tensor");
  m.def("max_pool2x2_gather(Tensor src, Tensor code) -> Tensor");
  // relu keeping one bit per element (!(y <= 0), torch's threshold_backward test) for its backward:
  // bits uint8 [ceil(numel / 8)]; bitmask_select(g, bits) = where(bit, g, 0).
  m.def("relu_bitmask(Tensor x) -> (Tensor y, Tensor bits)");
  m.def("bitmask_select(Tensor g, Tensor bits) -> Tensor");
  // Batch norm on batch statistics (training mode, what MAML's inner loop runs) over x [N, C, *],
  // per channel over N and the trailing dims, and the two derivatives a second-order MAML step
  // needs. mean and invstd = 1 / sqrt(biased var + eps) are float64 [C] whatever x's dtype.
  //   backward:        gy -> (gx, gw, gb), the gradient through the batch statistics
  //   double_backward: the gradient of <ggx, gx> + <ggw, gw> + <ggb, gb> w.r.t. (x, w, gy)
  m.def("batch_norm_train(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor y, Tensor mean, Tensor invstd)");
  m.def("batch_norm_train_backward(Tensor gy, Tensor x, Tensor weight, Tensor mean, Tensor invstd)"
        " -> (Tensor gx, Tensor gw, Tensor gb)");
  m.def("batch_norm_train_double_backward(Tensor ggx, Tensor ggw, Tensor ggb, Tensor gy, Tensor x, Tensor weight, "
        "Tensor mean, Tensor invstd) -> (Tensor gx, Tensor gw, Tensor ggy)");
  // The derivatives of batch norm followed by a 2x2 max-pool, as one layer (csrc/cpu/bn_pool_cpu.cpp):
  // backward, the pooled output's tangent and the tangent of the backward (the R-operator of the
  // fused conv path), with the pool's gradients and tangents read only at the windows' argmaxes.
  m.def("batch_norm_pool2x2_backward(Tensor g, Tensor code, Tensor x, Tensor weight, Tensor mean, Tensor invstd)"
        " -> (Tensor gx, Tensor gw, Tensor gb)");
  m.def("batch_norm_pool2x2_jvp(Tensor dx, Tensor code, Tensor x, Tensor weight, Tensor dw, Tensor db, Tensor mean, "
        "Tensor invstd) -> Tensor");
  m.def("batch_norm_pool2x2_hvp_backward(Tensor g, Tensor dg, Tensor code, Tensor dx, Tensor x, Tensor weight, "
        "Tensor dw, Tensor mean, Tensor invstd, bool want_gx) -> (Tensor dgx, Tensor gx, Tensor hw, Tensor hb)");
}

namespace py = pybind11;

namespace fastmaml {
void register_python_checks(py::module_& m);  // python_checks.cpp
void register_buffer_cache(py::module_& m);    // cpu/buffer_cache.cpp
void register_block_reuse(py::module_& m);     // cpu/block_reuse.cpp
}

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
  fastmaml::register_python_checks(m);
  fastmaml::register_buffer_cache(m);
  fastmaml::register_block_reuse(m);
}
