// x - mean for the batch-norm kernels (batch_norm_cpu.cpp, bn_pool_cpu.cpp).
#pragma once

namespace fastmaml {

// x - mean with the mean (a double) split in two of T: x - hi is exact for x near the mean, and
// subtracting lo keeps the digits a mean rounded to float32 would lose when |mean| >> std.
template <typename T>
struct Centre {
  double value;
  T hi, lo;
  explicit Centre(double m) : value(m), hi(static_cast<T>(m)), lo(static_cast<T>(m - static_cast<double>(hi))) {}
  T of(T x) const { return (x - hi) - lo; }
};

}  // namespace fastmaml
