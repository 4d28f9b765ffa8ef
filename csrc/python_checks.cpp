// Argument checks of the multi-tensor ops that the Python front end runs on every inner step,
// done in one C++ pass: Python attribute reads cost ~0.15 us each, ~40 us per call for conv4's
// 18 tensors. These return the first offending index and never throw; the Python caller then
// runs its own checks, which name the argument and say what was expected.
#include <torch/python.h>

#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

namespace fastmaml {
namespace {

// -1 when every y[i] has x[0]'s dtype and device and x[i]'s shape, and every x[i] has x[0]'s
// dtype, device and leading (task) dimension; else the first index where that fails.
int64_t first_mismatched_pair(const std::vector<at::Tensor>& x, const std::vector<at::Tensor>& y) {
  if (x.empty() || x.size() != y.size() || x[0].dim() < 1) return 0;
  const auto dtype = x[0].scalar_type();
  const auto device = x[0].device();
  const int64_t num_tasks = x[0].size(0);
  for (size_t i = 0; i < x.size(); ++i) {
    const auto& a = x[i];
    const auto& b = y[i];
    if (a.scalar_type() != dtype || a.device() != device || a.dim() < 1 || a.size(0) != num_tasks ||
        b.scalar_type() != dtype || b.device() != device || b.sizes() != a.sizes()) {
      return static_cast<int64_t>(i);
    }
  }
  return -1;
}

// -1 when every x[i] is contiguous and every contiguous y[i] either is x[i]'s memory or does not
// overlap it (what the in-place update needs); else the first index where that fails.
int64_t first_unsafe_inplace_pair(const std::vector<at::Tensor>& x, const std::vector<at::Tensor>& y) {
  for (size_t i = 0; i < x.size() && i < y.size(); ++i) {
    if (!x[i].is_contiguous()) return static_cast<int64_t>(i);
    const auto xs = reinterpret_cast<std::uintptr_t>(x[i].data_ptr());
    const auto ys = reinterpret_cast<std::uintptr_t>(y[i].data_ptr());
    const auto size = static_cast<std::uintptr_t>(x[i].numel() * x[i].element_size());
    if (xs != ys && y[i].is_contiguous() && xs < ys + size && ys < xs + size) return static_cast<int64_t>(i);
  }
  return -1;
}

}  // namespace

void register_python_checks(pybind11::module_& m) {
  m.def("first_mismatched_pair", &first_mismatched_pair, pybind11::arg("x"), pybind11::arg("y"));
  m.def("first_unsafe_inplace_pair", &first_unsafe_inplace_pair, pybind11::arg("x"), pybind11::arg("y"));
}

}  // namespace fastmaml
