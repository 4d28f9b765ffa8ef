// Batch norm on batch statistics (what MAML's inner loop runs: every task normalises with its own
// batch's statistics) and the two derivatives a second-order MAML step needs:
//   batch_norm_train(x, w, b, eps)                  -> y, mean, invstd
//   batch_norm_train_backward(gy, x, w, mean, invstd) -> gx, gw, gb
//   batch_norm_train_double_backward(ggx, ggw, ggb, gy, x, w, mean, invstd) -> gx, gw, ggy
// over x [N, C, S] (S = the trailing dims), per channel over the M = N * S entries. mean and
// invstd = 1 / sqrt(biased var + eps) are float64 [C] for any x (see Centre).
//
// Why not torch's: on the CPU build measured here (torch 2.13, one thread) the double backward of
// torch's batch norm is a chain of ~30 broadcasting ops that took 7.8 ms on a [5, 64, 28, 28]
// activation (a conv4 support batch), 12x its forward and backward together, and it runs once per
// task and inner step in the backward of second-order MAML. Every output here is an affine
// function of its inputs' entries with per-channel coefficients: one pass collects the channel
// sums, one writes the outputs.
//
// With x^ = (x - mean) * invstd, E[.] the channel mean, r = invstd:
//   y   = w x^ + b
//   gx  = w r P(gy),  P(g) = g - E[g] - x^ E[g x^],   gw = sum gy x^,   gb = sum gy
// and for L = <ggx, gx> + ggw . gw + ggb . gb (P is self-adjoint, r depends on x through the
// variance: dr/dx = -r^2 x^ / M):
//   Q    = E[ggx gy] - E[ggx] E[gy] - E[ggx x^] E[gy x^]
//   dL/dw  = r M Q
//   dL/dgy = ggb + ggw x^ + w r P(ggx)
//   dL/dx  = r (a P(gy) + c P(ggx)) - w r^2 Q x^,   a = ggw - w r E[ggx x^],  c = -w r E[gy x^]
// Channel sums are accumulated in the input type within a row of S entries and in double across
// rows; the per-channel coefficients are computed in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "bn_centre.h"

#include "cpu_features.h"

namespace fastmaml {
namespace {

#if defined(__GNUC__) && defined(__x86_64__)
#define FASTMAML_BN_X86 1
#define FASTMAML_BN_AVX2 __attribute__((target("avx2,fma")))
#define FASTMAML_BN_INLINE inline __attribute__((always_inline))
#else
#define FASTMAML_BN_X86 0
#define FASTMAML_BN_INLINE inline
#endif

// Channel sums: each row's (S entries) in the input type, by `omp simd` reductions (which let the
// compiler keep vector partial sums; -fopenmp-simd is on for this target), rows added in double.

struct Shape {
  int64_t n, c, s;  // x viewed as [n, c, s]
  int64_t row(int64_t i, int64_t ch) const { return (i * c + ch) * s; }
  double count() const { return static_cast<double>(n * s); }
};

template <typename T>
FASTMAML_BN_INLINE void forward_channels(const Shape& sh, const T* x, const T* w, const T* b, double eps, T* y,
                                         double* mean, double* invstd, int64_t c0, int64_t c1) {
  for (int64_t ch = c0; ch < c1; ++ch) {
    double total = 0;
    for (int64_t i = 0; i < sh.n; ++i) {
      const T* xr = x + sh.row(i, ch);
      T s0 = 0;
      #pragma omp simd reduction(+ : s0)
      for (int64_t j = 0; j < sh.s; ++j) s0 += xr[j];
      total += s0;
    }
    const Centre<T> m(total / sh.count());
    double sq = 0;  // second pass about the mean: no cancellation
    for (int64_t i = 0; i < sh.n; ++i) {
      const T* xr = x + sh.row(i, ch);
      T s0 = 0;
      #pragma omp simd reduction(+ : s0)
      for (int64_t j = 0; j < sh.s; ++j) {
        const T d = m.of(xr[j]);
        s0 += d * d;
      }
      sq += s0;
    }
    const double r = 1.0 / std::sqrt(sq / sh.count() + eps);
    mean[ch] = m.value;
    invstd[ch] = r;
    // centred first: x alpha + (b - m alpha) would lose the digits of x - m when |m| >> std
    const T alpha = static_cast<T>(r * w[ch]), beta = b[ch];
    for (int64_t i = 0; i < sh.n; ++i) {
      const T* xr = x + sh.row(i, ch);
      T* yr = y + sh.row(i, ch);
      for (int64_t j = 0; j < sh.s; ++j) yr[j] = m.of(xr[j]) * alpha + beta;
    }
  }
}

template <typename T>
FASTMAML_BN_INLINE void backward_channels(const Shape& sh, const T* gy, const T* x, const T* w, const double* mean,
                                          const double* invstd, T* gx, T* gw, T* gb, int64_t c0, int64_t c1) {
  for (int64_t ch = c0; ch < c1; ++ch) {
    const Centre<T> m(mean[ch]);
    double sums[2] = {0, 0};  // sum gy, sum gy (x - m)
    for (int64_t i = 0; i < sh.n; ++i) {
      const T* gr = gy + sh.row(i, ch);
      const T* xr = x + sh.row(i, ch);
      T s0 = 0, s1 = 0;
      #pragma omp simd reduction(+ : s0, s1)
      for (int64_t j = 0; j < sh.s; ++j) {
        s0 += gr[j];
        s1 += gr[j] * m.of(xr[j]);
      }
      sums[0] += s0;
      sums[1] += s1;
    }
    const double r = invstd[ch], wr = static_cast<double>(w[ch]) * r, M = sh.count();
    gb[ch] = static_cast<T>(sums[0]);
    gw[ch] = static_cast<T>(r * sums[1]);
    // gx = wr gy - wr E[gy] - wr r^2 E[gy (x - m)] (x - m)
    const T k_gy = static_cast<T>(wr), k_0 = static_cast<T>(-wr * sums[0] / M),
            k_x = static_cast<T>(-wr * r * r * sums[1] / M);
    for (int64_t i = 0; i < sh.n; ++i) {
      const T* gr = gy + sh.row(i, ch);
      const T* xr = x + sh.row(i, ch);
      T* out = gx + sh.row(i, ch);
      for (int64_t j = 0; j < sh.s; ++j) out[j] = k_gy * gr[j] + (k_x * m.of(xr[j]) + k_0);
    }
  }
}

template <typename T>
FASTMAML_BN_INLINE void double_backward_channels(const Shape& sh, const T* ggx, const T* ggw, const T* ggb,
                                                 const T* gy, const T* x, const T* w, const double* mean,
                                                 const double* invstd, T* gx, T* gw, T* ggy, int64_t c0,
                                                 int64_t c1) {
  for (int64_t ch = c0; ch < c1; ++ch) {
    const Centre<T> m(mean[ch]);
    // sum gy, sum gy (x - m), sum ggx, sum ggx (x - m), sum ggx gy
    double sums[5] = {0, 0, 0, 0, 0};
    for (int64_t i = 0; i < sh.n; ++i) {
      const T* gr = gy + sh.row(i, ch);
      const T* hr = ggx + sh.row(i, ch);
      const T* xr = x + sh.row(i, ch);
      T s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0;
      #pragma omp simd reduction(+ : s0, s1, s2, s3, s4)
      for (int64_t j = 0; j < sh.s; ++j) {
        const T d = m.of(xr[j]);
        s0 += gr[j];
        s1 += gr[j] * d;
        s2 += hr[j];
        s3 += hr[j] * d;
        s4 += hr[j] * gr[j];
      }
      const T row[5] = {s0, s1, s2, s3, s4};
      for (int k = 0; k < 5; ++k) sums[k] += row[k];
    }
    const double M = sh.count(), r = invstd[ch], wv = w[ch], wr = wv * r;
    const double e_gy = sums[0] / M, e_gy_xh = r * sums[1] / M, e_gg = sums[2] / M, e_gg_xh = r * sums[3] / M,
                 e_gg_gy = sums[4] / M;
    const double q = e_gg_gy - e_gg * e_gy - e_gg_xh * e_gy_xh;
    gw[ch] = static_cast<T>(r * M * q);
    const double a = static_cast<double>(ggw[ch]) - wr * e_gg_xh, c = -wr * e_gy_xh;
    // gx  = r a gy + r c ggx + (x - m) r (-r a E[gy x^] - r c E[ggx x^] - w r^2 Q) - r (a E[gy] + c E[ggx])
    // ggy = wr ggx + (x - m) r (ggw - wr E[ggx x^]) + ggb - wr E[ggx]
    const T gx_gy = static_cast<T>(r * a), gx_gg = static_cast<T>(r * c),
            gx_x = static_cast<T>(r * (-r * a * e_gy_xh - r * c * e_gg_xh - wv * r * r * q)),
            gx_0 = static_cast<T>(-r * (a * e_gy + c * e_gg));
    const T gy_gg = static_cast<T>(wr), gy_x = static_cast<T>(r * a),
            gy_0 = static_cast<T>(static_cast<double>(ggb[ch]) - wr * e_gg);
    for (int64_t i = 0; i < sh.n; ++i) {
      const T* gr = gy + sh.row(i, ch);
      const T* hr = ggx + sh.row(i, ch);
      const T* xr = x + sh.row(i, ch);
      T* gx_r = gx + sh.row(i, ch);
      T* ggy_r = ggy + sh.row(i, ch);
      for (int64_t j = 0; j < sh.s; ++j) {
        const T d = m.of(xr[j]);
        gx_r[j] = gx_gy * gr[j] + gx_gg * hr[j] + (gx_x * d + gx_0);
        ggy_r[j] = gy_gg * hr[j] + (gy_x * d + gy_0);
      }
    }
  }
}

// Each entry point is compiled twice: as is, and for AVX2 + FMA (chosen at run time like the
// other kernels); the helpers above are inlined into both.
#define FASTMAML_BN_VARIANTS(name, impl)                                              \
  template <typename T, typename... A>                                                \
  void name##_portable(A... args) { impl<T>(args...); }                               \
  template <typename T, typename... A>                                                \
  FASTMAML_BN_AVX2 void name##_avx2(A... args) { impl<T>(args...); }                  \
  template <typename T, typename... A>                                                \
  void name(A... args) {                                                              \
    if (use_avx2_fma()) name##_avx2<T>(args...); else name##_portable<T>(args...);    \
  }

#if FASTMAML_BN_X86
FASTMAML_BN_VARIANTS(run_forward, forward_channels)
FASTMAML_BN_VARIANTS(run_backward, backward_channels)
FASTMAML_BN_VARIANTS(run_double_backward, double_backward_channels)
#else
template <typename T, typename... A> void run_forward(A... args) { forward_channels<T>(args...); }
template <typename T, typename... A> void run_backward(A... args) { backward_channels<T>(args...); }
template <typename T, typename... A> void run_double_backward(A... args) { double_backward_channels<T>(args...); }
#endif

// Channels per task of the parallel loop: at least ~32k entries of work each.
int64_t channel_grain(const Shape& sh) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, sh.n * sh.s)); }

Shape check_input(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, op, ": x must be [N, C, ...], got ", x.sizes());
  Shape sh{x.size(0), x.size(1), 1};
  for (int64_t d = 2; d < x.dim(); ++d) sh.s *= x.size(d);
  TORCH_CHECK(sh.n * sh.s > 1, op, ": batch statistics need more than one value per channel, got ", x.sizes());
  return sh;
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == x.scalar_type() && t.sizes() == x.sizes(), op, ": ", name,
              " must be a CPU ", x.scalar_type(), " tensor of shape ", x.sizes(), ", got ", t.scalar_type(), " ",
              t.sizes(), " on ", t.device());
}

void check_channel(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                   at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 1 && t.size(0) == x.size(1), op, ": ",
              name, " must be a CPU ", dtype, " tensor of shape [", x.size(1), "], got ", t.scalar_type(), " ",
              t.sizes(), " on ", t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                                   const at::Tensor& bias_in, double eps) {
  const char* op = "batch_norm_train";
  const Shape sh = check_input(op, x_in);
  check_channel(op, "weight", weight_in, x_in, x_in.scalar_type());
  check_channel(op, "bias", bias_in, x_in, x_in.scalar_type());
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const at::Tensor x = x_in.contiguous(), w = weight_in.contiguous(), b = bias_in.contiguous();
  at::Tensor y = at::empty_like(x), mean = at::empty({sh.c}, x.options().dtype(at::kDouble)),
             invstd = at::empty({sh.c}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_train", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>(), *bp = b.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    double *mp = mean.data_ptr<double>(), *rp = invstd.data_ptr<double>();
    at::parallel_for(0, sh.c, channel_grain(sh), [&](int64_t c0, int64_t c1) {
      run_forward<scalar_t>(sh, xp, wp, bp, eps, yp, mp, rp, c0, c1);
    });
  });
  return {y, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_backward_cpu(const at::Tensor& gy_in,
                                                                            const at::Tensor& x_in,
                                                                            const at::Tensor& weight_in,
                                                                            const at::Tensor& mean_in,
                                                                            const at::Tensor& invstd_in) {
  const char* op = "batch_norm_train_backward";
  const Shape sh = check_input(op, x_in);
  check_like(op, "gy", gy_in, x_in);
  check_channel(op, "weight", weight_in, x_in, x_in.scalar_type());
  check_channel(op, "mean", mean_in, x_in, at::kDouble);
  check_channel(op, "invstd", invstd_in, x_in, at::kDouble);
  const at::Tensor gy = gy_in.contiguous(), x = x_in.contiguous(), w = weight_in.contiguous(),
                   mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  at::Tensor gx = at::empty_like(x), gw = at::empty({sh.c}, x.options()), gb = at::empty({sh.c}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_train", [&] {
    const scalar_t *gyp = gy.data_ptr<scalar_t>(), *xp = x.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    const double *mp = mean.data_ptr<double>(), *rp = invstd.data_ptr<double>();
    scalar_t *gxp = gx.data_ptr<scalar_t>(), *gwp = gw.data_ptr<scalar_t>(), *gbp = gb.data_ptr<scalar_t>();
    at::parallel_for(0, sh.c, channel_grain(sh), [&](int64_t c0, int64_t c1) {
      run_backward<scalar_t>(sh, gyp, xp, wp, mp, rp, gxp, gwp, gbp, c0, c1);
    });
  });
  return {gx, gw, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_double_backward_cpu(
    const at::Tensor& ggx_in, const at::Tensor& ggw_in, const at::Tensor& ggb_in, const at::Tensor& gy_in,
    const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& mean_in, const at::Tensor& invstd_in) {
  const char* op = "batch_norm_train_double_backward";
  const Shape sh = check_input(op, x_in);
  check_like(op, "ggx", ggx_in, x_in);
  check_like(op, "gy", gy_in, x_in);
  check_channel(op, "ggw", ggw_in, x_in, x_in.scalar_type());
  check_channel(op, "ggb", ggb_in, x_in, x_in.scalar_type());
  check_channel(op, "weight", weight_in, x_in, x_in.scalar_type());
  check_channel(op, "mean", mean_in, x_in, at::kDouble);
  check_channel(op, "invstd", invstd_in, x_in, at::kDouble);
  const at::Tensor ggx = ggx_in.contiguous(), ggw = ggw_in.contiguous(), ggb = ggb_in.contiguous(),
                   gy = gy_in.contiguous(), x = x_in.contiguous(), w = weight_in.contiguous(),
                   mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  at::Tensor gx = at::empty_like(x), gw = at::empty({sh.c}, x.options()), ggy = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_train", [&] {
    const scalar_t *ggxp = ggx.data_ptr<scalar_t>(), *ggwp = ggw.data_ptr<scalar_t>(),
                   *ggbp = ggb.data_ptr<scalar_t>(), *gyp = gy.data_ptr<scalar_t>(), *xp = x.data_ptr<scalar_t>(),
                   *wp = w.data_ptr<scalar_t>();
    const double *mp = mean.data_ptr<double>(), *rp = invstd.data_ptr<double>();
    scalar_t *gxp = gx.data_ptr<scalar_t>(), *gwp = gw.data_ptr<scalar_t>(), *ggyp = ggy.data_ptr<scalar_t>();
    at::parallel_for(0, sh.c, channel_grain(sh), [&](int64_t c0, int64_t c1) {
      run_double_backward<scalar_t>(sh, ggxp, ggwp, ggbp, gyp, xp, wp, mp, rp, gxp, gwp, ggyp, c0, c1);
    });
  });
  return {gx, gw, ggy};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmaml, CPU, m) {
  m.impl("batch_norm_train", &batch_norm_train_cpu);
  m.impl("batch_norm_train_backward", &batch_norm_train_backward_cpu);
  m.impl("batch_norm_train_double_backward", &batch_norm_train_double_backward_cpu);
}

}  // namespace fastmaml
