// The Crammer-Singer SVM dual (MetaOptNet's SVM head) by Mehrotra's interior-point method, for a
// group of W tasks solved in lockstep. Torch-free: svm_cs_cpu.cpp runs the groups in parallel.
//
// Why lockstep: one task's matrices are small (n = 5 to 75 rows), so a per-task factorization is
// all short loops, divisions and dependency chains (measured: 1.7 G multiply-adds/s, 5 ms for 8
// tasks of 125 variables). Storing every quantity lane-interleaved, [..., W] with the W tasks of
// a group innermost, turns each scalar operation into one SIMD operation over W tasks, with no
// horizontal reductions and the same code for every size.
//
// The algorithm is the one of the pure-PyTorch reference (python/fastmaml/heads/svm.py with the
// loop of heads/qp.py): class-major block elimination of the Newton system, predictor-corrector,
// the best iterate kept, the same stopping and status rules. Tasks that stop early are frozen
// (their step is masked), as in the batched reference.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace fastmaml {
namespace svm_cs {

// Same codes as fastmaml.heads.qp.QPStatus.
enum Status : int64_t { SOLVED = 0, MAX_ITER = 1, NUMERICAL_ERROR = 4, INACCURATE = 5 };

#define FASTMAML_LANES for (int l = 0; l < W; ++l)

// W lanes of T as one value: GCC/Clang vector extensions, so that every operation below is one
// SIMD operation on whatever the target has (two SSE2 or one AVX2 instruction for 4 doubles).
// Every lane-interleaved buffer must be aligned to W * sizeof(T) bytes.
template <typename T, int W>
struct LaneVec {
  typedef T type __attribute__((vector_size(W * sizeof(T))));
};

// Zero-initialised storage aligned to 64 bytes (std::vector of an over-aligned type does not
// guarantee it on every compiler).
template <typename V>
class AlignedArray {
 public:
  explicit AlignedArray(int64_t count) : raw_(count * sizeof(V) + 64, 0) {
    const auto addr = reinterpret_cast<std::uintptr_t>(raw_.data());
    ptr_ = reinterpret_cast<V*>((addr + 63) & ~std::uintptr_t(63));
  }
  V* data() { return ptr_; }
  const V* data() const { return ptr_; }

 private:
  std::vector<unsigned char> raw_;
  V* ptr_;
};

// Lane-wise dense kernels on lane-interleaved matrices: A[i * n + j] is entry (i, j) of the W
// tasks. Lower triangles only; the reciprocal of each pivot is kept in `inv_diag` [n].
template <typename T, int W>
struct LaneLinalg {
  using V = typename LaneVec<T, W>::type;

  // acc -= sum_k a[k] b[k] over k < len, in four independent chains: one chain waits on the
  // multiply-add latency at every step (measured: 29% of the time at n = 75 in one line).
  // (acc is passed by reference: a vector by value would cross a function-call ABI that depends
  // on the target, which the compiler warns about even though everything here is inlined.)
  static inline void dot_sub(V& acc, const V* a, const V* b, int64_t len) {
    V s0 = acc, s1 = V{}, s2 = V{}, s3 = V{};
    int64_t k = 0;
    for (; k + 4 <= len; k += 4) {
      s0 -= a[k] * b[k];
      s1 -= a[k + 1] * b[k + 1];
      s2 -= a[k + 2] * b[k + 2];
      s3 -= a[k + 3] * b[k + 3];
    }
    for (; k < len; ++k) s0 -= a[k] * b[k];
    acc = (s0 + s1) + (s2 + s3);
  }

  // In-place lower Cholesky; ok[l] is cleared for a task whose matrix is not positive definite.
  static void cholesky(V* A, V* inv_diag, int64_t n, bool* ok) {
    for (int64_t i = 0; i < n; ++i) {
      V* Ai = A + i * n;
      for (int64_t j = 0; j <= i; ++j) {
        const V* Aj = A + j * n;
        V acc = Ai[j];
        dot_sub(acc, Ai, Aj, j);
        if (j < i) {
          Ai[j] = acc * inv_diag[j];
        } else {
          V r = V{};
          FASTMAML_LANES {
            ok[l] = ok[l] && acc[l] > T(0) && acc[l] < std::numeric_limits<T>::infinity();
            r[l] = T(1) / std::sqrt(acc[l]);
          }
          inv_diag[i] = r;  // the pivot itself is never read again
        }
      }
    }
  }

  // x <- (L L^T)^-1 x, x [n].
  static void solve(const V* L, const V* inv_diag, int64_t n, V* x) {
    for (int64_t i = 0; i < n; ++i) {
      const V* Li = L + i * n;
      V acc = x[i];
      dot_sub(acc, Li, x, i);
      x[i] = acc * inv_diag[i];
    }
    for (int64_t i = n - 1; i >= 0; --i) {
      const V* Li = L + i * n;
      const V xi = x[i] * inv_diag[i];
      x[i] = xi;
      for (int64_t k = 0; k < i; ++k) x[k] -= Li[k] * xi;
    }
  }

  // Lower triangle of S += (L L^T)^-1 = M^T M, M = L^-1 formed row by row in work [n, n].
  // Both loops combine four rows per pass (rows of M are zero above the diagonal, so the four
  // need no separate bounds): each load and store of the updated row then carries four
  // multiply-adds instead of one. At n = 75 the group's factors (c n^2 W values) live in L2, where
  // the one-row form was bound by those loads and stores.
  static void add_inverse(const V* L, const V* inv_diag, int64_t n, V* work, V* S) {
    const V zero = V{}, one = zero + T(1);
    for (int64_t i = 0; i < n; ++i) {
      V* Mi = work + i * n;
      const V* Li = L + i * n;
      for (int64_t j = 0; j < n; ++j) Mi[j] = zero;
      Mi[i] = one;
      int64_t k = 0;
      for (; k + 4 <= i; k += 4) {
        const V *M0 = work + k * n, *M1 = M0 + n, *M2 = M1 + n, *M3 = M2 + n;
        const V l0 = Li[k], l1 = Li[k + 1], l2 = Li[k + 2], l3 = Li[k + 3];
        for (int64_t j = 0; j <= k + 3; ++j) Mi[j] -= (l0 * M0[j] + l1 * M1[j]) + (l2 * M2[j] + l3 * M3[j]);
      }
      for (; k < i; ++k) {
        const V* Mk = work + k * n;
        const V lik = Li[k];
        for (int64_t j = 0; j <= k; ++j) Mi[j] -= lik * Mk[j];
      }
      const V d = inv_diag[i];
      for (int64_t j = 0; j <= i; ++j) Mi[j] *= d;
    }
    int64_t r = 0;
    for (; r + 4 <= n; r += 4) {
      const V *M0 = work + r * n, *M1 = M0 + n, *M2 = M1 + n, *M3 = M2 + n;
      for (int64_t i = 0; i <= r + 3; ++i) {
        V* Si = S + i * n;
        const V a0 = M0[i], a1 = M1[i], a2 = M2[i], a3 = M3[i];
        for (int64_t j = 0; j <= i; ++j) Si[j] += (a0 * M0[j] + a1 * M1[j]) + (a2 * M2[j] + a3 * M3[j]);
      }
    }
    for (; r < n; ++r) {
      const V* Mr = work + r * n;
      for (int64_t i = 0; i <= r; ++i) {
        V* Si = S + i * n;
        const V mri = Mr[i];
        for (int64_t j = 0; j <= i; ++j) Si[j] += mri * Mr[j];
      }
    }
  }

  // out = A x for a symmetric A stored in full [n, n].
  static void matvec(const V* A, int64_t n, const V* x, V* out) {
    for (int64_t i = 0; i < n; ++i) {
      const V* Ai = A + i * n;
      V acc = V{};
      dot_sub(acc, Ai, x, n);
      out[i] = -acc;
    }
  }
};

// Newton matrix blockdiag_k(Kr + W_k) with the n equality rows sum_k dz_k = ry, factored as the
// c block Cholesky factors and the factor of the Schur complement S = sum_k H_k^-1.
template <typename T, int W>
struct NewtonSystem {
  using LA = LaneLinalg<T, W>;
  using V = typename LaneVec<T, W>::type;
  int64_t n, c;
  const V* Kr;  // [n, n]
  const V* w;   // [c, n] = lam / s
  AlignedArray<V> L, L_inv_diag, S, S_inv_diag, work, scratch;

  NewtonSystem(int64_t n_, int64_t c_, const T* Kr_, const T* w_)
      : n(n_), c(c_), Kr(reinterpret_cast<const V*>(Kr_)), w(reinterpret_cast<const V*>(w_)), L(c_ * n_ * n_),
        L_inv_diag(c_ * n_), S(n_ * n_), S_inv_diag(n_), work(n_ * n_), scratch(n_) {}

  // ok[l] is cleared for tasks whose system is not positive definite.
  void factor(bool* ok) {
    std::fill(S.data(), S.data() + n * n, V{});
    const int64_t nn = n * n;
    for (int64_t k = 0; k < c; ++k) {
      V* Lk = L.data() + k * nn;
      std::copy(Kr, Kr + nn, Lk);
      for (int64_t i = 0; i < n; ++i) Lk[i * n + i] += w[k * n + i];
      V* dk = L_inv_diag.data() + k * n;
      LA::cholesky(Lk, dk, n, ok);
      LA::add_inverse(Lk, dk, n, work.data(), S.data());
    }
    LA::cholesky(S.data(), S_inv_diag.data(), n, ok);
  }

  // [H E^T; E 0] [dz; dy] = [rz; ry] (ry may be null: zero), all [.., W] lane-interleaved. With u
  // non-null, also u = W dz, taken from the block rows where the weight is large
  // (u = rz - dy - Kr dz): multiplying a huge w by a rounding-level dz would lose it.
  void solve(const T* rz_, const T* ry_, T* dz_, T* dy_, T* u_) {
    const V* rz = reinterpret_cast<const V*>(rz_);
    const V* ry = reinterpret_cast<const V*>(ry_);
    V* dz = reinterpret_cast<V*>(dz_);
    V* dy = reinterpret_cast<V*>(dy_);
    const int64_t nn = n * n;
    for (int64_t i = 0; i < n; ++i) dy[i] = V{};
    for (int64_t k = 0; k < c; ++k) {
      V* dzk = dz + k * n;
      std::copy(rz + k * n, rz + (k + 1) * n, dzk);
      LA::solve(L.data() + k * nn, L_inv_diag.data() + k * n, n, dzk);
      for (int64_t i = 0; i < n; ++i) dy[i] += dzk[i];
    }
    if (ry != nullptr) {
      for (int64_t i = 0; i < n; ++i) dy[i] -= ry[i];
    }
    LA::solve(S.data(), S_inv_diag.data(), n, dy);
    V* t = scratch.data();
    for (int64_t k = 0; k < c; ++k) {
      std::copy(dy, dy + n, t);
      LA::solve(L.data() + k * nn, L_inv_diag.data() + k * n, n, t);
      V* dzk = dz + k * n;
      for (int64_t i = 0; i < n; ++i) dzk[i] -= t[i];
    }
    if (u_ == nullptr) return;
    V* u = reinterpret_cast<V*>(u_);
    for (int64_t k = 0; k < c; ++k) {
      LA::matvec(Kr, n, dz + k * n, t);
      for (int64_t i = 0; i < n; ++i) {
        const V wi = w[k * n + i], rows = rz[k * n + i] - dy[i] - t[i], direct = wi * dz[k * n + i];
        V ui;
        FASTMAML_LANES ui[l] = wi[l] > T(1) ? rows[l] : direct[l];
        u[k * n + i] = ui;
      }
    }
  }
};

// Per-task outcome, lane-indexed.
template <typename T, int W>
struct GroupResult {
  int64_t status[W], iterations[W];
  T pres[W], dres[W], gap[W];
};

// Largest a <= bound[l] with v + a dv >= 0, per lane, over m entries [m, W].
template <typename T, int W>
inline void max_step(const T* v, const T* dv, int64_t m, T* bound) {
  for (int64_t q = 0; q < m; ++q) {
    FASTMAML_LANES {
      const T d = dv[q * W + l];
      if (d < T(0)) bound[l] = std::min(bound[l], -v[q * W + l] / d);
    }
  }
}

// Solve the W tasks of a group. Kr [n, n, W] = K + r I; labels [n, W]; writes z [c, n, W]
// (class-major) and the barrier weights w = lam / s at the returned iterate [c, n, W] (what the
// backward pass factors again). Kr, z_out and w_out aligned to W * sizeof(T) bytes.
template <typename T, int W>
GroupResult<T, W> solve_group(const T* Kr, const int64_t* labels, int64_t n, int64_t c, T C, int64_t max_iter, T tol,
                              T* z_out, T* w_out) {
  using V = typename LaneVec<T, W>::type;
  const int64_t N = n * c, NW = N * W, nW = n * W;
  const T tiny = std::numeric_limits<T>::min();
  const T inf = std::numeric_limits<T>::infinity();
  AlignedArray<V> buf(N * 17 + n * 4);
  T* next = reinterpret_cast<T*>(buf.data());
  auto take = [&next](int64_t size) { T* q = next; next += size; return q; };
  T *z = take(NW), *lam = take(NW), *s = take(NW), *w = take(NW), *h = take(NW), *pv = take(NW), *Qz = take(NW),
    *r_d = take(NW), *r_in = take(NW), *rz = take(NW), *dz = take(NW), *dlam = take(NW), *ds = take(NW),
    *u = take(NW), *rc = take(NW), *best_lam = take(NW), *best_s = take(NW);
  T *y = take(nW), *dy = take(nW), *r_eq = take(nW), *ry = take(nW);
  T* best_z = z_out;
  NewtonSystem<T, W> newton(n, c, Kr, w);
  GroupResult<T, W> res;

  // min 1/2 sum_k a_k^T Kr a_k + p^T a  s.t.  a <= h,  sum_k a_k = 0;  p = -y_onehot, h = C y_onehot.
  for (int64_t k = 0; k < c; ++k) {
    for (int64_t i = 0; i < n; ++i) {
      FASTMAML_LANES {
        const T yk = labels[i * W + l] == k ? T(1) : T(0);
        pv[(k * n + i) * W + l] = -yk;
        h[(k * n + i) * W + l] = C * yk;
      }
    }
  }
  T h_scale[W], p_scale[W];
  FASTMAML_LANES h_scale[l] = p_scale[l] = T(0);
  for (int64_t q = 0; q < N; ++q) {
    FASTMAML_LANES {
      h_scale[l] = std::max(h_scale[l], std::abs(h[q * W + l]));
      p_scale[l] = std::max(p_scale[l], std::abs(pv[q * W + l]));
    }
  }
  FASTMAML_LANES {
    h_scale[l] += T(1);
    p_scale[l] += T(1);
  }
  const T m = static_cast<T>(N);

  // Start (as the reference): z minimises 1/2 z^T Q z + p^T z + 1/2 ||z - h||^2 s.t. A z = 0,
  // s = h - z, lam = -s, then Mehrotra's shift into the interior and balancing.
  bool ok[W];
  FASTMAML_LANES ok[l] = true;
  std::fill(w, w + NW, T(1));
  newton.factor(ok);
  for (int64_t q = 0; q < NW; ++q) rz[q] = -pv[q] + h[q];
  newton.solve(rz, nullptr, z, y, nullptr);  // b = 0
  for (int64_t q = 0; q < NW; ++q) {
    s[q] = h[q] - z[q];
    lam[q] = -s[q];
  }
  {
    T smin[W], lmin[W], smax[W], lmax[W];
    FASTMAML_LANES smin[l] = lmin[l] = inf;
    for (int64_t q = 0; q < N; ++q) {
      FASTMAML_LANES {
        smin[l] = std::min(smin[l], s[q * W + l]);
        lmin[l] = std::min(lmin[l], lam[q * W + l]);
      }
    }
    FASTMAML_LANES {
      smin[l] = std::max(T(-1.5) * smin[l], T(0));
      lmin[l] = std::max(T(-1.5) * lmin[l], T(0));
      smax[l] = lmax[l] = T(0);
    }
    for (int64_t q = 0; q < N; ++q) {
      FASTMAML_LANES {
        s[q * W + l] += smin[l];
        lam[q * W + l] += lmin[l];
        smax[l] = std::max(smax[l], std::abs(s[q * W + l]));
        lmax[l] = std::max(lmax[l], std::abs(lam[q * W + l]));
      }
    }
    T sl[W] = {}, ssum[W] = {}, lsum[W] = {};
    for (int64_t q = 0; q < N; ++q) {
      FASTMAML_LANES {
        s[q * W + l] += std::max(smax[l] * T(1e-8), tiny);
        lam[q * W + l] += std::max(lmax[l] * T(1e-8), tiny);
        sl[l] += s[q * W + l] * lam[q * W + l];
        ssum[l] += s[q * W + l];
        lsum[l] += lam[q * W + l];
      }
    }
    for (int64_t q = 0; q < N; ++q) {
      FASTMAML_LANES {
        s[q * W + l] += T(0.5) * sl[l] / lsum[l];
        lam[q * W + l] += T(0.5) * sl[l] / ssum[l];
      }
    }
  }
  T best_merit[W];
  int64_t stall[W];
  bool running[W];
  FASTMAML_LANES {
    res.status[l] = ok[l] ? MAX_ITER : NUMERICAL_ERROR;
    res.iterations[l] = 0;
    best_merit[l] = inf;
    stall[l] = 0;
  }

  for (int64_t it = 0; it <= max_iter; ++it) {
    // Residuals of the KKT conditions at the current iterate.
    for (int64_t k = 0; k < c; ++k) {
      LaneLinalg<T, W>::matvec(reinterpret_cast<const V*>(Kr), n, reinterpret_cast<const V*>(z + k * nW),
                               reinterpret_cast<V*>(Qz + k * nW));
    }
    std::fill(r_eq, r_eq + nW, T(0));
    T sl[W] = {}, zQz[W] = {}, pz[W] = {}, rin_max[W] = {}, rd_max[W] = {}, req_max[W] = {};
    for (int64_t k = 0; k < c; ++k) {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t q0 = (k * n + i) * W;
        FASTMAML_LANES {
          const int64_t q = q0 + l;
          r_d[q] = Qz[q] + pv[q] + lam[q] + y[i * W + l];
          r_in[q] = z[q] + s[q] - h[q];
          r_eq[i * W + l] += z[q];
          sl[l] += s[q] * lam[q];
          zQz[l] += z[q] * Qz[q];
          pz[l] += pv[q] * z[q];
          // NaN-propagating maxima: a NaN residual must not be skipped by std::max
          const T a = std::abs(r_in[q]), b = std::abs(r_d[q]);
          rin_max[l] = (a > rin_max[l] || a != a) ? a : rin_max[l];
          rd_max[l] = (b > rd_max[l] || b != b) ? b : rd_max[l];
        }
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      FASTMAML_LANES {
        const T a = std::abs(r_eq[i * W + l]);
        req_max[l] = (a > req_max[l] || a != a) ? a : req_max[l];
      }
    }
    T mu[W];
    bool any_running = false;
    FASTMAML_LANES {
      mu[l] = sl[l] / m;
      const T pres = std::max(rin_max[l], req_max[l]) / h_scale[l];
      const T dres = rd_max[l] / p_scale[l];
      const T obj = T(0.5) * zQz[l] + pz[l];
      const T gap = sl[l] / std::max(std::abs(obj), T(1e-8));
      const T merit = std::max(std::max(pres, dres), gap);
      const bool finite = std::isfinite(pres) && std::isfinite(dres) && std::isfinite(gap);
      bool run = res.status[l] == MAX_ITER;
      if (run && !finite) res.status[l] = NUMERICAL_ERROR;
      run = res.status[l] == MAX_ITER;
      const bool better = run && merit < best_merit[l];
      stall[l] = (run && merit < T(0.9) * best_merit[l]) ? 0 : stall[l] + 1;
      if (it == 0 || better) {
        for (int64_t q = 0; q < N; ++q) {
          best_z[q * W + l] = z[q * W + l];
          best_lam[q * W + l] = lam[q * W + l];
          best_s[q * W + l] = s[q * W + l];
        }
        res.pres[l] = pres;
        res.dres[l] = dres;
        res.gap[l] = gap;
      }
      if (better) best_merit[l] = merit;
      if (tol > T(0) && run && merit <= tol) res.status[l] = SOLVED;
      // Near the solution, no 10% progress in 5 iterations: the attainable accuracy is reached.
      if (tol > T(0) && res.status[l] == MAX_ITER && stall[l] >= 5 && best_merit[l] <= T(1e-6)) {
        res.status[l] = best_merit[l] <= tol ? SOLVED : INACCURATE;
      }
      running[l] = res.status[l] == MAX_ITER;
      any_running = any_running || running[l];
    }
    if (it == max_iter || !any_running) break;

    for (int64_t q = 0; q < NW; ++q) w[q] = lam[q] / s[q];
    FASTMAML_LANES ok[l] = true;
    newton.factor(ok);
    any_running = false;
    FASTMAML_LANES {
      if (running[l] && !ok[l]) {
        res.status[l] = NUMERICAL_ERROR;
        running[l] = false;
      }
      any_running = any_running || running[l];
    }
    if (!any_running) break;
    for (int64_t q = 0; q < nW; ++q) ry[q] = -r_eq[q];
    // Newton direction for the complementarity target rc (s o lam = rc after the step).
    auto direction = [&]() {
      for (int64_t q = 0; q < NW; ++q) rz[q] = -r_d[q] - (w[q] * r_in[q] - rc[q] / s[q]);
      newton.solve(rz, ry, dz, dy, u);
      for (int64_t q = 0; q < NW; ++q) {
        dlam[q] = u[q] + w[q] * r_in[q] - rc[q] / s[q];
        ds[q] = -r_in[q] - dz[q];
      }
    };
    for (int64_t q = 0; q < NW; ++q) rc[q] = s[q] * lam[q];
    direction();  // predictor (affine scaling)
    T a_aff[W], mu_aff[W] = {}, sigma[W], alpha[W];
    FASTMAML_LANES a_aff[l] = inf;
    max_step<T, W>(s, ds, N, a_aff);
    max_step<T, W>(lam, dlam, N, a_aff);
    FASTMAML_LANES a_aff[l] = std::min(a_aff[l], T(1));
    for (int64_t q = 0; q < N; ++q) {
      FASTMAML_LANES {
        const int64_t j = q * W + l;
        mu_aff[l] += (s[j] + a_aff[l] * ds[j]) * (lam[j] + a_aff[l] * dlam[j]);
      }
    }
    FASTMAML_LANES {
      const T ratio = std::min(std::max(mu_aff[l] / m / std::max(mu[l], tiny), T(0)), T(1));
      sigma[l] = ratio * ratio * ratio;
    }
    for (int64_t q = 0; q < N; ++q) {
      FASTMAML_LANES {
        const int64_t j = q * W + l;
        rc[j] = s[j] * lam[j] + ds[j] * dlam[j] - sigma[l] * mu[l];
      }
    }
    direction();  // Mehrotra's corrector, same factorization
    FASTMAML_LANES alpha[l] = inf;
    max_step<T, W>(s, ds, N, alpha);
    max_step<T, W>(lam, dlam, N, alpha);
    FASTMAML_LANES {
      alpha[l] = running[l] ? std::min(T(0.99) * alpha[l], T(1)) : T(0);
      res.iterations[l] += running[l] ? 1 : 0;
    }
    // Stopped tasks keep their iterate (a select, not a zero step: their direction may be NaN).
    for (int64_t q = 0; q < N; ++q) {
      FASTMAML_LANES {
        const int64_t j = q * W + l;
        if (running[l]) {
          z[j] += alpha[l] * dz[j];
          lam[j] += alpha[l] * dlam[j];
          s[j] += alpha[l] * ds[j];
        }
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      FASTMAML_LANES {
        if (running[l]) y[i * W + l] += alpha[l] * dy[i * W + l];
      }
    }
  }

  // The barrier weights at the returned iterate, checked to give a factorizable system (the
  // backward pass needs it): a failure is reported, not left to produce garbage gradients.
  for (int64_t q = 0; q < NW; ++q) w[q] = std::max(best_lam[q], tiny) / std::max(best_s[q], tiny);
  std::copy(w, w + NW, w_out);
  FASTMAML_LANES ok[l] = true;
  newton.factor(ok);
  FASTMAML_LANES {
    if (!ok[l]) res.status[l] = NUMERICAL_ERROR;
  }
  return res;
}

// The backward pass's adjoint system at the weights w of the returned iterate: rhs, out [c, n, W].
template <typename T, int W>
void kkt_solve_group(const T* Kr, const T* w, int64_t n, int64_t c, const T* rhs, T* out, bool* ok) {
  NewtonSystem<T, W> newton(n, c, Kr, w);
  newton.factor(ok);
  AlignedArray<typename LaneVec<T, W>::type> dy(n);
  newton.solve(rhs, nullptr, out, reinterpret_cast<T*>(dy.data()), nullptr);
}

#undef FASTMAML_LANES

}  // namespace svm_cs
}  // namespace fastmaml
