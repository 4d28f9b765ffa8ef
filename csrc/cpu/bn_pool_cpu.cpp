// The derivatives of batch norm on batch statistics followed by a 2x2 max-pool (stride 2), taken
// as one layer, for the fused conv path (python/fastmaml/meta/fused_conv.py), whose forward runs
// batch_norm_train then max_pool2x2 (their vectorised kernels; a fused forward with a scalar
// window loop measured 4-5x slower than the two):
//
//   batch_norm_pool2x2_backward(g, code, x, w, mean, invstd)
//                                               -> gx [N, C, H, W], gw, gb
//   batch_norm_pool2x2_jvp(dx, code, x, w, dw, db, mean, invstd)
//                                               -> d_out [N, C, H/2, W/2]
//   batch_norm_pool2x2_hvp_backward(g, dg, code, dx, x, w, dw, mean, invstd, want_gx)
//                                               -> dgx [N, C, H, W], gx (or empty), hw, hb
//
// out = max_pool2x2(w x^ + b) with x^ = (x - mean) * invstd; code, mean and invstd are what
// max_pool2x2 and batch_norm_train returned (code: which of the four window entries is the max). g is the gradient at `out`, dg its
// tangent, dx the tangent of x, (dw, db) those of (w, b). hvp_backward returns the tangent of the
// backward (the R-operator): dgx = d/dt gx(x + t dx, w + t dw, g + t dg), with hw, hb the tangents
// of (gw, gb), and the primal gx when asked.
//
// Why one layer: the gradient at the batch norm's output is nonzero only at each window's argmax
// (a quarter of the entries), and the pool's output tangent reads the batch norm's only there.
// Apart, the pool's backward writes a dense scatter that batch norm reads twice, and the
// R-operator needs a dense x^ and two scatters; on conv4's first block (B: [75, 32, 84, 84],
// 68 MB per tensor) each is a 68 MB block per task and pass. Here the sums of the sparse terms
// run over the pooled entries and each dense output is written in one pass. Alone, on warm
// buffers, the backward is as fast as scatter + batch_norm_train_backward (19.1 vs 17.8 ms on
// B's block); the gain is in the blocks not allocated (workload B, K = 5: 2216-2276 ms against
// 2286-2358 without the merge, four alternated calls each).
//
// Formulas (per channel, M = N H W entries, E[.] the channel mean, r = invstd, d = x - mean):
//   gx  = w r P(g_a),  P(u) = u - E[u] - x^ E[u x^],  g_a = g scattered to the argmaxes
//   gw  = sum g_a x^,  gb = sum g_a
//   jvp = (w r P(dx) + dw x^ + db) at the argmaxes
//   with Q = E[dx g_a] - E[dx] E[g_a] - E[dx x^] E[g_a x^],  a = dw - w r E[dx x^],  c = -w r E[g_a x^]:
//   dgx = w r P(dg_a) + r (a P(g_a) + c P(dx)) - w r^2 Q x^,   hw = sum dg_a x^ + r M Q,   hb = sum dg_a
// (the last two lines are batch_norm_train_backward applied to dg_a plus its double backward with
// (ggx, ggw) = (dx, dw): the second derivative of <g_a, y(x, w)> is symmetric).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "bn_centre.h"

namespace fastmaml {
namespace {

struct Planes {
  int64_t n, c, h, w, ho, wo;
  int64_t plane(int64_t i, int64_t ch) const { return (i * c + ch) * h * w; }
  int64_t pooled(int64_t i, int64_t ch) const { return (i * c + ch) * ho * wo; }
  // input offset (within a plane) of the argmax of pooled entry (i, j) with code k
  int64_t at(int64_t i, int64_t j, uint8_t k) const { return (2 * i + (k >> 1)) * w + 2 * j + (k & 1); }
  double count() const { return static_cast<double>(n * h * w); }
};

// sum over the pooled entries of u and of u (x - m) at the argmaxes, and of u dx at the argmaxes
template <typename T>
void sparse_sums(const Planes& p, const T* u, const uint8_t* code, const T* x, const T* dx, const Centre<T>& m,
                 int64_t ch, double& s0, double& s1, double* s_dx) {
  s0 = s1 = 0;
  double sd = 0;
  for (int64_t i = 0; i < p.n; ++i) {
    const T* up = u + p.pooled(i, ch);
    const uint8_t* cp = code + p.pooled(i, ch);
    const T* xp = x + p.plane(i, ch);
    const T* dp = dx ? dx + p.plane(i, ch) : nullptr;
    T a0 = 0, a1 = 0, a2 = 0;
    for (int64_t oi = 0; oi < p.ho; ++oi) {
      for (int64_t oj = 0; oj < p.wo; ++oj) {
        const int64_t q = oi * p.wo + oj, at = p.at(oi, oj, cp[q]);
        a0 += up[q];
        a1 += up[q] * m.of(xp[at]);
        if (dp) a2 += up[q] * dp[at];
      }
    }
    s0 += a0;
    s1 += a1;
    sd += a2;
  }
  if (s_dx) *s_dx = sd;
}

// out = k_x (x - m) + k_0 [+ k_d dx] everywhere, then + k_u u [+ k_v v] at the argmaxes
template <typename T>
void dense_affine(const Planes& p, const T* x, const Centre<T>& m, T k_x, T k_0, const T* dx, T k_d, const T* u,
                  T k_u, const T* v, T k_v, const uint8_t* code, T* out, int64_t ch) {
  const int64_t s = p.h * p.w;
  for (int64_t i = 0; i < p.n; ++i) {
    const T* xp = x + p.plane(i, ch);
    T* o = out + p.plane(i, ch);
    if (dx) {
      const T* dp = dx + p.plane(i, ch);
      #pragma omp simd
      for (int64_t j = 0; j < s; ++j) o[j] = k_x * m.of(xp[j]) + k_0 + k_d * dp[j];
    } else {
      #pragma omp simd
      for (int64_t j = 0; j < s; ++j) o[j] = k_x * m.of(xp[j]) + k_0;
    }
    const uint8_t* cp = code + p.pooled(i, ch);
    const T* up = u + p.pooled(i, ch);
    const T* vp = v ? v + p.pooled(i, ch) : nullptr;
    for (int64_t oi = 0; oi < p.ho; ++oi) {
      for (int64_t oj = 0; oj < p.wo; ++oj) {
        const int64_t q = oi * p.wo + oj;
        o[p.at(oi, oj, cp[q])] += vp ? k_u * up[q] + k_v * vp[q] : k_u * up[q];
      }
    }
  }
}

template <typename T>
void backward_channel(const Planes& p, const T* g, const uint8_t* code, const T* x, T w, double mean, double invstd,
                      T* gx, T* gw, T* gb, int64_t ch) {
  const Centre<T> m(mean);
  double s0, s1;
  sparse_sums(p, g, code, x, static_cast<const T*>(nullptr), m, ch, s0, s1, nullptr);
  const double r = invstd, wr = static_cast<double>(w) * r, M = p.count();
  gb[ch] = static_cast<T>(s0);
  gw[ch] = static_cast<T>(r * s1);
  dense_affine<T>(p, x, m, static_cast<T>(-wr * r * r * s1 / M), static_cast<T>(-wr * s0 / M), nullptr, T(0), g,
                  static_cast<T>(wr), nullptr, T(0), code, gx, ch);
}

// E[dx] and E[dx (x - m)] over the channel (dense)
template <typename T>
void dense_sums(const Planes& p, const T* dx, const T* x, const Centre<T>& m, int64_t ch, double& d0, double& d1) {
  const int64_t s = p.h * p.w;
  d0 = d1 = 0;
  for (int64_t i = 0; i < p.n; ++i) {
    const T* dp = dx + p.plane(i, ch);
    const T* xp = x + p.plane(i, ch);
    T a0 = 0, a1 = 0;
    #pragma omp simd reduction(+ : a0, a1)
    for (int64_t j = 0; j < s; ++j) {
      a0 += dp[j];
      a1 += dp[j] * m.of(xp[j]);
    }
    d0 += a0;
    d1 += a1;
  }
}

template <typename T>
void jvp_channel(const Planes& p, const T* dx, const uint8_t* code, const T* x, T w, T dw, T db, double mean,
                 double invstd, T* out, int64_t ch) {
  const Centre<T> m(mean);
  double d0, d1;
  dense_sums(p, dx, x, m, ch, d0, d1);
  const double r = invstd, M = p.count();
  // (w r (dx - E[dx] - x^ r E[dx d]) + dw x^ + db) at the argmax, with x^ = r d
  const T k_dx = static_cast<T>(w * r), k_d = static_cast<T>(-w * r * r * r * d1 / M + dw * r),
          k_0 = static_cast<T>(-w * r * d0 / M + db);
  for (int64_t i = 0; i < p.n; ++i) {
    const T* xp = x + p.plane(i, ch);
    const T* dp = dx + p.plane(i, ch);
    const uint8_t* cp = code + p.pooled(i, ch);
    T* op = out + p.pooled(i, ch);
    for (int64_t oi = 0; oi < p.ho; ++oi) {
      for (int64_t oj = 0; oj < p.wo; ++oj) {
        const int64_t q = oi * p.wo + oj, at = p.at(oi, oj, cp[q]);
        op[q] = k_dx * dp[at] + k_d * m.of(xp[at]) + k_0;
      }
    }
  }
}

template <typename T>
void hvp_backward_channel(const Planes& p, const T* g, const T* dg, const uint8_t* code, const T* dx, const T* x, T w,
                          T dw, double mean, double invstd, T* dgx, T* gx, T* hw, T* hb, int64_t ch) {
  const Centre<T> m(mean);
  double a0, a1, x_dg, b0, b1, d0, d1;
  sparse_sums(p, g, code, x, dx, m, ch, a0, a1, &x_dg);  // sum g_a, sum g_a d, sum g_a dx
  sparse_sums(p, dg, code, x, static_cast<const T*>(nullptr), m, ch, b0, b1, nullptr);
  dense_sums(p, dx, x, m, ch, d0, d1);
  const double r = invstd, M = p.count(), wd = static_cast<double>(w);
  const double q = x_dg / M - (d0 / M) * (a0 / M) - (r * d1 / M) * (r * a1 / M);
  const double a = static_cast<double>(dw) - wd * r * r * d1 / M, c = -wd * r * r * a1 / M;
  hw[ch] = static_cast<T>(r * b1 + r * M * q);
  hb[ch] = static_cast<T>(b0);
  // dgx = w r P(dg_a) + r a P(g_a) + r c P(dx) - w r^2 Q r d, each P(u) = u - E[u] - r^2 E[u d] d
  const double k_dga = wd * r, k_ga = r * a, k_dx = r * c;
  const double k_d = -k_dga * r * r * b1 / M - k_ga * r * r * a1 / M - k_dx * r * r * d1 / M - wd * r * r * q * r;
  const double k_0 = -k_dga * b0 / M - k_ga * a0 / M - k_dx * d0 / M;
  dense_affine<T>(p, x, m, static_cast<T>(k_d), static_cast<T>(k_0), dx, static_cast<T>(k_dx), dg,
                  static_cast<T>(k_dga), g, static_cast<T>(k_ga), code, dgx, ch);
  if (gx) {
    const double wr = wd * r;
    dense_affine<T>(p, x, m, static_cast<T>(-wr * r * r * a1 / M), static_cast<T>(-wr * a0 / M), nullptr, T(0), g,
                    static_cast<T>(wr), nullptr, T(0), code, gx, ch);
  }
}

// -- checks and entry points --------------------------------------------------------------------
int64_t grain(const Planes& p) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, p.n * p.h * p.w)); }

Planes check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble), op,
              ": x must be a float32 or float64 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.dim() == 4 && x.size(2) >= 2 && x.size(3) >= 2, op, ": x must be [N, C, H, W] with H, W >= 2, got ",
              x.sizes());
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) > 1, op, ": batch statistics need more than one value per channel");
  return {x.size(0), x.size(1), x.size(2), x.size(3), x.size(2) / 2, x.size(3) / 2};
}

void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.sizes() == shape, op, ": ", name, " must be a CPU ",
              dtype, " tensor of shape ", shape, ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

std::vector<int64_t> pooled_shape(const Planes& p) { return {p.n, p.c, p.ho, p.wo}; }

void check_common(const char* op, const Planes& p, const at::Tensor& x, const at::Tensor& code, const at::Tensor& w,
                  const at::Tensor& mean, const at::Tensor& invstd) {
  check_shape(op, "code", code, pooled_shape(p), at::kByte);
  check_shape(op, "weight", w, {p.c}, x.scalar_type());
  check_shape(op, "mean", mean, {p.c}, at::kDouble);
  check_shape(op, "invstd", invstd, {p.c}, at::kDouble);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_pool2x2_backward_cpu(
    const at::Tensor& g_in, const at::Tensor& code_in, const at::Tensor& x_in, const at::Tensor& w_in,
    const at::Tensor& mean_in, const at::Tensor& invstd_in) {
  const char* op = "batch_norm_pool2x2_backward";
  const Planes p = check_x(op, x_in);
  check_shape(op, "g", g_in, pooled_shape(p), x_in.scalar_type());
  check_common(op, p, x_in, code_in, w_in, mean_in, invstd_in);
  const at::Tensor g = g_in.contiguous(), code = code_in.contiguous(), x = x_in.contiguous(), w = w_in.contiguous(),
                   mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  at::Tensor gx = at::empty_like(x), gw = at::empty({p.c}, x.options()), gb = at::empty({p.c}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_pool2x2", [&] {
    const scalar_t *gp = g.data_ptr<scalar_t>(), *xp = x.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    const uint8_t* cp = code.data_ptr<uint8_t>();
    const double *mp = mean.data_ptr<double>(), *rp = invstd.data_ptr<double>();
    scalar_t *gxp = gx.data_ptr<scalar_t>(), *gwp = gw.data_ptr<scalar_t>(), *gbp = gb.data_ptr<scalar_t>();
    at::parallel_for(0, p.c, grain(p), [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch) backward_channel<scalar_t>(p, gp, cp, xp, wp[ch], mp[ch], rp[ch], gxp, gwp, gbp, ch);
    });
  });
  return {gx, gw, gb};
}

at::Tensor batch_norm_pool2x2_jvp_cpu(const at::Tensor& dx_in, const at::Tensor& code_in, const at::Tensor& x_in,
                                      const at::Tensor& w_in, const at::Tensor& dw_in, const at::Tensor& db_in,
                                      const at::Tensor& mean_in, const at::Tensor& invstd_in) {
  const char* op = "batch_norm_pool2x2_jvp";
  const Planes p = check_x(op, x_in);
  check_shape(op, "dx", dx_in, x_in.sizes(), x_in.scalar_type());
  check_common(op, p, x_in, code_in, w_in, mean_in, invstd_in);
  check_shape(op, "dw", dw_in, {p.c}, x_in.scalar_type());
  check_shape(op, "db", db_in, {p.c}, x_in.scalar_type());
  const at::Tensor dx = dx_in.contiguous(), code = code_in.contiguous(), x = x_in.contiguous(), w = w_in.contiguous(),
                   dw = dw_in.contiguous(), db = db_in.contiguous(), mean = mean_in.contiguous(),
                   invstd = invstd_in.contiguous();
  at::Tensor out = at::empty(pooled_shape(p), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_pool2x2", [&] {
    const scalar_t *dxp = dx.data_ptr<scalar_t>(), *xp = x.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>(),
                   *dwp = dw.data_ptr<scalar_t>(), *dbp = db.data_ptr<scalar_t>();
    const uint8_t* cp = code.data_ptr<uint8_t>();
    const double *mp = mean.data_ptr<double>(), *rp = invstd.data_ptr<double>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, p.c, grain(p), [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch) {
        jvp_channel<scalar_t>(p, dxp, cp, xp, wp[ch], dwp[ch], dbp[ch], mp[ch], rp[ch], op_, ch);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_pool2x2_hvp_backward_cpu(
    const at::Tensor& g_in, const at::Tensor& dg_in, const at::Tensor& code_in, const at::Tensor& dx_in,
    const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& dw_in, const at::Tensor& mean_in,
    const at::Tensor& invstd_in, bool want_gx) {
  const char* op = "batch_norm_pool2x2_hvp_backward";
  const Planes p = check_x(op, x_in);
  check_shape(op, "g", g_in, pooled_shape(p), x_in.scalar_type());
  check_shape(op, "dg", dg_in, pooled_shape(p), x_in.scalar_type());
  check_shape(op, "dx", dx_in, x_in.sizes(), x_in.scalar_type());
  check_common(op, p, x_in, code_in, w_in, mean_in, invstd_in);
  check_shape(op, "dw", dw_in, {p.c}, x_in.scalar_type());
  const at::Tensor g = g_in.contiguous(), dg = dg_in.contiguous(), code = code_in.contiguous(), dx = dx_in.contiguous(),
                   x = x_in.contiguous(), w = w_in.contiguous(), dw = dw_in.contiguous(), mean = mean_in.contiguous(),
                   invstd = invstd_in.contiguous();
  at::Tensor dgx = at::empty_like(x), gx = want_gx ? at::empty_like(x) : at::empty({0}, x.options()),
             hw = at::empty({p.c}, x.options()), hb = at::empty({p.c}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_pool2x2", [&] {
    const scalar_t *gp = g.data_ptr<scalar_t>(), *dgp = dg.data_ptr<scalar_t>(), *dxp = dx.data_ptr<scalar_t>(),
                   *xp = x.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>(), *dwp = dw.data_ptr<scalar_t>();
    const uint8_t* cp = code.data_ptr<uint8_t>();
    const double *mp = mean.data_ptr<double>(), *rp = invstd.data_ptr<double>();
    scalar_t *dgxp = dgx.data_ptr<scalar_t>(), *gxp = want_gx ? gx.data_ptr<scalar_t>() : nullptr,
             *hwp = hw.data_ptr<scalar_t>(), *hbp = hb.data_ptr<scalar_t>();
    at::parallel_for(0, p.c, grain(p), [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch) {
        hvp_backward_channel<scalar_t>(p, gp, dgp, cp, dxp, xp, wp[ch], dwp[ch], mp[ch], rp[ch], dgxp, gxp, hwp, hbp,
                                       ch);
      }
    });
  });
  return {dgx, gx, hw, hb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmaml, CPU, m) {
  m.impl("batch_norm_pool2x2_backward", &batch_norm_pool2x2_backward_cpu);
  m.impl("batch_norm_pool2x2_jvp", &batch_norm_pool2x2_jvp_cpu);
  m.impl("batch_norm_pool2x2_hvp_backward", &batch_norm_pool2x2_hvp_backward_cpu);
}

}  // namespace fastmaml
