// Per-task products with a thin side, the feature products of the few-shot heads:
//   task_matmul_nt(a [T, m, d], b [T, c, d]) = a @ b^T  -> [T, m, c]   (logits of query features)
//   task_matmul_tn(g [T, m, c], a [T, m, d]) = g^T @ a  -> [T, c, d]   (gradient of the weights)
// with c small (classes: 5 in the benchmarks) and d long (1600 to 16000 features).
//
// Why not bmm: for c = 5 both products read a [T, m, d] tensor once and do 2 c flops per element
// of it, so they are memory-bound, yet the BLAS batched GEMM runs them at ~13 GFLOP/s, ~5x below
// the rate at which the CPU streams `a` (T = 256, m = 75, d = 1600, one AMD EPYC thread: 23 ms
// each, while a.sum() takes 4.4 ms). Here every element of `a` is loaded once and used for all c
// outputs: the nt kernel runs two rows of `a` against each load of b with c vector accumulators
// per row, the tn kernel builds a column block of the [c, d] output in registers while the rows
// of `a` stream past. AVX2 + FMA where the CPU has it (chosen at run time, as torch's kernels;
// ATEN_CPU_CAPABILITY=default forces the portable copy), float32 and float64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>

#include "cpu_features.h"

namespace fastmaml {
namespace {

constexpr int64_t kMaxThin = 16;  // c above this: the callers use bmm

#if defined(__GNUC__) && defined(__x86_64__)
#define FASTMAML_MM_X86 1
#define FASTMAML_MM_AVX2 __attribute__((target("avx2,fma")))
#else
#define FASTMAML_MM_X86 0
#endif
#define FASTMAML_MM_DEFAULT __attribute__((flatten))

// out[i, j] = <a_i, b_j> for rows i in [i0, i1) of one task; b is [C, d]. kLanes independent
// partial sums per output (one or two vector registers) make the k loop vectorize and hide the
// add latency; they are summed at the end of the row.
template <typename T, int C>
inline void nt_rows(const T* a, const T* b, int64_t d, int64_t i0, int64_t i1, T* out) {
  constexpr int kLanes = 32 / sizeof(T) * 2;
  const int64_t d_main = d - d % kLanes;
  for (int64_t i = i0; i < i1; ++i) {
    const T* ai = a + i * d;
    T acc[C][kLanes] = {};
    for (int64_t k = 0; k < d_main; k += kLanes) {
      for (int j = 0; j < C; ++j) {
        const T* bj = b + j * d + k;
        for (int l = 0; l < kLanes; ++l) acc[j][l] += ai[k + l] * bj[l];
      }
    }
    for (int j = 0; j < C; ++j) {
      T s = 0;
      for (int l = 0; l < kLanes; ++l) s += acc[j][l];
      for (int64_t k = d_main; k < d; ++k) s += ai[k] * b[j * d + k];
      out[i * C + j] = s;
    }
  }
}

// out[j, k0:k1] = sum_i g[i, j] a[i, k0:k1] for one task: the [C, k1 - k0] block stays in cache.
template <typename T, int C>
inline void tn_block(const T* g, const T* a, int64_t m, int64_t d, int64_t k0, int64_t k1, T* out) {
  for (int j = 0; j < C; ++j) std::fill(out + j * d + k0, out + j * d + k1, T(0));
  for (int64_t i = 0; i < m; ++i) {
    const T* ai = a + i * d;
    for (int j = 0; j < C; ++j) {
      const T gij = g[i * C + j];
      T* oj = out + j * d;
      for (int64_t k = k0; k < k1; ++k) oj[k] += gij * ai[k];
    }
  }
}

// AVX2 versions with explicit vectors: two registers per output (16 floats / 8 doubles, a cache
// line of `a`), C accumulators per row for nt, C x 2 accumulators per column chunk for tn.
#if FASTMAML_MM_X86
template <typename T>
struct Avx2;

template <>
struct Avx2<float> {
  using V = __m256;
  static constexpr int kWidth = 8;
  FASTMAML_MM_AVX2 static V zero() { return _mm256_setzero_ps(); }
  FASTMAML_MM_AVX2 static V load(const float* p) { return _mm256_loadu_ps(p); }
  FASTMAML_MM_AVX2 static V set1(float x) { return _mm256_set1_ps(x); }
  FASTMAML_MM_AVX2 static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  FASTMAML_MM_AVX2 static V add(V a, V b) { return _mm256_add_ps(a, b); }
  FASTMAML_MM_AVX2 static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  FASTMAML_MM_AVX2 static float sum(V v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
  }
};

template <>
struct Avx2<double> {
  using V = __m256d;
  static constexpr int kWidth = 4;
  FASTMAML_MM_AVX2 static V zero() { return _mm256_setzero_pd(); }
  FASTMAML_MM_AVX2 static V load(const double* p) { return _mm256_loadu_pd(p); }
  FASTMAML_MM_AVX2 static V set1(double x) { return _mm256_set1_pd(x); }
  FASTMAML_MM_AVX2 static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  FASTMAML_MM_AVX2 static V add(V a, V b) { return _mm256_add_pd(a, b); }
  FASTMAML_MM_AVX2 static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  FASTMAML_MM_AVX2 static double sum(V v) {
    __m128d x = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(x, _mm_unpackhi_pd(x, x)));
  }
};

// nt: two rows of `a` at a time share each load of b (b's C rows, 32 KB at C = 5 and d = 1600,
// live in L2 more than L1), and the two row streams are prefetched 1 KB ahead. Measured in
// isolation (T = 256, m = 75, d = 1600, C = 5, one thread): one row at a time 17.5 ms, two rows
// 15.3 ms, two rows with the prefetch 12.9 ms; bmm 21 ms; blocking d so that b stays in L1 did
// not help (13.6 ms: shorter streams).
constexpr int64_t kPrefetchBytes = 1024;

template <typename T, int C>
FASTMAML_MM_AVX2 void avx2_nt(const T* a, const T* b, int64_t d, int64_t i0, int64_t i1, T* out) {
  using A = Avx2<T>;
  using V = typename A::V;
  constexpr int W = A::kWidth;
  constexpr int64_t kAhead = kPrefetchBytes / sizeof(T), kLine = 64 / sizeof(T);
  const int64_t d_main = d - d % W;
  int64_t i = i0;
  for (; i + 2 <= i1; i += 2) {
    const T* a0 = a + i * d;
    const T* a1 = a0 + d;
    V acc0[C], acc1[C];
    for (int j = 0; j < C; ++j) acc0[j] = acc1[j] = A::zero();
    for (int64_t k = 0; k < d_main; k += W) {
      if (k % kLine == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(a0 + k + kAhead), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(a1 + k + kAhead), _MM_HINT_T0);
      }
      const V x0 = A::load(a0 + k), x1 = A::load(a1 + k);
      for (int j = 0; j < C; ++j) {
        const V bj = A::load(b + j * d + k);
        acc0[j] = A::fma(x0, bj, acc0[j]);
        acc1[j] = A::fma(x1, bj, acc1[j]);
      }
    }
    for (int j = 0; j < C; ++j) {
      T s0 = A::sum(acc0[j]), s1 = A::sum(acc1[j]);
      for (int64_t k = d_main; k < d; ++k) {
        s0 += a0[k] * b[j * d + k];
        s1 += a1[k] * b[j * d + k];
      }
      out[i * C + j] = s0;
      out[(i + 1) * C + j] = s1;
    }
  }
  if (i < i1) nt_rows<T, C>(a, b, d, i, i1, out);
}

// tn: one column block of out is built in registers, kRows rows of `a` at a time (each row read
// along its segment, which the prefetcher follows), then added into out.
template <typename T, int C>
FASTMAML_MM_AVX2 void avx2_tn(const T* g, const T* a, int64_t m, int64_t d, int64_t k0, int64_t k1, T* out) {
  using A = Avx2<T>;
  using V = typename A::V;
  constexpr int W = A::kWidth;
  constexpr int64_t kRows = 4;
  const int64_t k_main = k0 + (k1 - k0) / (2 * W) * (2 * W);
  for (int j = 0; j < C; ++j) std::fill(out + j * d + k0, out + j * d + k1, T(0));
  for (int64_t i0 = 0; i0 < m; i0 += kRows) {
    const int64_t rows = std::min(kRows, m - i0);
    for (int64_t k = k0; k < k_main; k += 2 * W) {
      V acc0[C], acc1[C];
      for (int j = 0; j < C; ++j) {
        acc0[j] = A::load(out + j * d + k);
        acc1[j] = A::load(out + j * d + k + W);
      }
      for (int64_t i = i0; i < i0 + rows; ++i) {
        const V x0 = A::load(a + i * d + k), x1 = A::load(a + i * d + k + W);
        for (int j = 0; j < C; ++j) {
          const V gij = A::set1(g[i * C + j]);
          acc0[j] = A::fma(gij, x0, acc0[j]);
          acc1[j] = A::fma(gij, x1, acc1[j]);
        }
      }
      for (int j = 0; j < C; ++j) {
        A::store(out + j * d + k, acc0[j]);
        A::store(out + j * d + k + W, acc1[j]);
      }
    }
    for (int64_t i = i0; i < i0 + rows; ++i)
      for (int j = 0; j < C; ++j)
        for (int64_t k = k_main; k < k1; ++k) out[j * d + k] += g[i * C + j] * a[i * d + k];
  }
}
#endif

// Portable versions: the loops above, compiled for the baseline instruction set.
template <typename T, int C>
FASTMAML_MM_DEFAULT void default_nt(const T* a, const T* b, int64_t d, int64_t i0, int64_t i1, T* out) {
  nt_rows<T, C>(a, b, d, i0, i1, out);
}
template <typename T, int C>
FASTMAML_MM_DEFAULT void default_tn(const T* g, const T* a, int64_t m, int64_t d, int64_t k0, int64_t k1, T* out) {
  tn_block<T, C>(g, a, m, d, k0, k1, out);
}

template <typename T>
struct Kernels {
  using Nt = void (*)(const T*, const T*, int64_t, int64_t, int64_t, T*);
  using Tn = void (*)(const T*, const T*, int64_t, int64_t, int64_t, int64_t, T*);
};

// Instances for C = 1..kMaxThin, picked at run time.
#define FASTMAML_MM_TABLE(FN, T)                                                                     \
  {FN<T, 1>,  FN<T, 2>,  FN<T, 3>,  FN<T, 4>,  FN<T, 5>,  FN<T, 6>,  FN<T, 7>,  FN<T, 8>,            \
   FN<T, 9>,  FN<T, 10>, FN<T, 11>, FN<T, 12>, FN<T, 13>, FN<T, 14>, FN<T, 15>, FN<T, 16>}

template <typename T>
typename Kernels<T>::Nt pick_nt(int64_t c) {
  static const typename Kernels<T>::Nt base[] = FASTMAML_MM_TABLE(default_nt, T);
#if FASTMAML_MM_X86
  static const typename Kernels<T>::Nt fast[] = FASTMAML_MM_TABLE(avx2_nt, T);
  if (use_avx2_fma()) return fast[c - 1];
#endif
  return base[c - 1];
}

template <typename T>
typename Kernels<T>::Tn pick_tn(int64_t c) {
  static const typename Kernels<T>::Tn base[] = FASTMAML_MM_TABLE(default_tn, T);
#if FASTMAML_MM_X86
  static const typename Kernels<T>::Tn fast[] = FASTMAML_MM_TABLE(avx2_tn, T);
  if (use_avx2_fma()) return fast[c - 1];
#endif
  return base[c - 1];
}

void check_operand(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must have rank 3, got ", t.dim());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

// Rows of a task per parallel chunk: ~256 KB of `a`, so small problems stay on one thread.
int64_t row_grain(int64_t d) { return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(d, 1)); }

at::Tensor task_matmul_nt_cpu(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_operand(a_in, "task_matmul_nt", "a");
  check_operand(b_in, "task_matmul_nt", "b");
  TORCH_CHECK(a_in.scalar_type() == b_in.scalar_type(), "task_matmul_nt: a and b must have the same dtype");
  const int64_t T_ = a_in.size(0), m = a_in.size(1), d = a_in.size(2), c = b_in.size(1);
  TORCH_CHECK(b_in.size(0) == T_ && b_in.size(2) == d, "task_matmul_nt: b must have shape [", T_, ", c, ", d,
              "], got ", b_in.sizes());
  TORCH_CHECK(c >= 1 && c <= kMaxThin, "task_matmul_nt: b must have 1 to ", kMaxThin, " rows, got ", c);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  at::Tensor out = at::empty({T_, m, c}, a.options());
  if (T_ * m == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "task_matmul_nt", [&] {
    const auto kernel = pick_nt<scalar_t>(c);
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    // Work items are (task, row) pairs, flattened so that T = 1 still splits across threads.
    at::parallel_for(0, T_ * m, row_grain(d), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end;) {
        const int64_t t = r / m, i0 = r % m, i1 = std::min(m, i0 + (end - r));
        kernel(pa + t * m * d, pb + t * c * d, d, i0, i1, po + t * m * c);
        r += i1 - i0;
      }
    });
  });
  return out;
}

at::Tensor task_matmul_tn_cpu(const at::Tensor& g_in, const at::Tensor& a_in) {
  check_operand(g_in, "task_matmul_tn", "g");
  check_operand(a_in, "task_matmul_tn", "a");
  TORCH_CHECK(g_in.scalar_type() == a_in.scalar_type(), "task_matmul_tn: g and a must have the same dtype");
  const int64_t T_ = a_in.size(0), m = a_in.size(1), d = a_in.size(2), c = g_in.size(2);
  TORCH_CHECK(g_in.size(0) == T_ && g_in.size(1) == m, "task_matmul_tn: g must have shape [", T_, ", ", m,
              ", c], got ", g_in.sizes());
  TORCH_CHECK(c >= 1 && c <= kMaxThin, "task_matmul_tn: g must have 1 to ", kMaxThin, " columns, got ", c);
  const at::Tensor g = g_in.contiguous(), a = a_in.contiguous();
  at::Tensor out = at::empty({T_, c, d}, a.options());
  if (T_ * d == 0) return out;
  // Column blocks of 512: the [c, 512] output block (20 KB for c = 5 in float64) stays in L1
  // while the m rows of the block stream past.
  constexpr int64_t kBlock = 512;
  const int64_t blocks = (d + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "task_matmul_tn", [&] {
    const auto kernel = pick_tn<scalar_t>(c);
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(m * kBlock, 1));
    at::parallel_for(0, T_ * blocks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const int64_t t = w / blocks, k0 = (w % blocks) * kBlock, k1 = std::min(d, k0 + kBlock);
        kernel(pg + t * m * c, pa + t * m * d, m, d, k0, k1, po + t * c * d);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmaml, CPU, m) {
  m.impl("task_matmul_nt", &task_matmul_nt_cpu);
  m.impl("task_matmul_tn", &task_matmul_tn_cpu);
}

}  // namespace fastmaml
