// 2x2 max-pool with stride 2 (the pooling of the conv4 backbone of MAML / ProtoNet / MetaOptNet)
// and the two linear maps its derivatives need:
//   max_pool2x2(x [..., H, W])              -> out [..., H/2, W/2], code (uint8, same shape)
//   max_pool2x2_scatter(g, code, H, W)      -> [..., H, W]: g put where each window's max was, 0 elsewhere
//   max_pool2x2_gather(h [..., H, W], code) -> [..., H/2, W/2]: h read where each window's max was
// scatter is the pool's backward; gather is the adjoint of scatter (and scatter that of gather),
// which is what the double backward of a MAML inner step runs.
//
// Why not torch.max_pool2d: on the CPU build measured here (torch 2.13, one thread) its forward
// was ~20% of a second-order MAML step on conv4, and this kernel runs it 11-14x faster on conv4's
// activations (`python -m fastmaml.bench.meta --workload layers`). Each output row reads its two
// input rows once, with AVX2 (chosen at run time) for float32 and float64. The argmax is a 2-bit
// code (which of the four window entries), one byte per output instead of torch's 8-byte index.
//
// Semantics are torch's, so results and gradients are bit-identical: windows in floor mode (an
// odd last row or column is not pooled), entries scanned (0,0), (0,1), (1,0), (1,1), an entry
// replaces the running max when it is larger or NaN (so the first maximum wins, a NaN always
// propagates and the last NaN is the one recorded).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_features.h"

namespace fastmaml {
namespace {

#if defined(__GNUC__) && defined(__x86_64__)
#define FASTMAML_POOL_X86 1
#define FASTMAML_POOL_AVX2 __attribute__((target("avx2,fma")))
#else
#define FASTMAML_POOL_X86 0
#endif

// Output columns [j0, wo) of one output row: r0, r1 are the two input rows. Branch-free (the
// comparisons of random data would mispredict half the time).
template <typename T>
inline void pool_row_scalar(const T* r0, const T* r1, int64_t j0, int64_t wo, T* out, uint8_t* code) {
  for (int64_t j = j0; j < wo; ++j) {
    const T c[4] = {r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1]};
    T m = c[0];
    uint8_t k = 0;
    for (uint8_t e = 1; e < 4; ++e) {
      const bool take = (c[e] > m) | (c[e] != c[e]);  // larger, or NaN
      m = take ? c[e] : m;
      k = take ? e : k;
    }
    out[j] = m;
    code[j] = k;
  }
}

template <typename T>
void pool_planes_portable(const T* x, int64_t h, int64_t w, T* out, uint8_t* code, int64_t p0, int64_t p1) {
  const int64_t ho = h / 2, wo = w / 2;
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t i = 0; i < ho; ++i) {
      const T* r0 = x + (p * h + 2 * i) * w;
      pool_row_scalar(r0, r0 + w, 0, wo, out + (p * ho + i) * wo, code + (p * ho + i) * wo);
    }
  }
}

#if FASTMAML_POOL_X86
// Even / odd columns of 16 consecutive floats, each as 8 lanes in column order.
FASTMAML_POOL_AVX2 inline void split_even_odd(const float* r, __m256& even, __m256& odd) {
  const __m256 a = _mm256_loadu_ps(r), b = _mm256_loadu_ps(r + 8);
  // shuffle_ps works per 128-bit half: [a0 a2 b0 b2 | a4 a6 b4 b6]; the 64-bit permute restores order
  const __m256 e = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
  const __m256 o = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
  even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), _MM_SHUFFLE(3, 1, 2, 0)));
  odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), _MM_SHUFFLE(3, 1, 2, 0)));
}

// 8 outputs from 16 columns of each of the two rows.
FASTMAML_POOL_AVX2 inline void pool8_avx2(const float* r0, const float* r1, float* o, uint8_t* c) {
  const __m256i one = _mm256_set1_epi32(1), two = _mm256_set1_epi32(2), three = _mm256_set1_epi32(3);
  __m256 v00, v01, v10, v11;
  split_even_odd(r0, v00, v01);
  split_even_odd(r1, v10, v11);
  __m256 m = v00;
  __m256i k = _mm256_setzero_si256();
  // torch's update rule, entry by entry: larger, or NaN
  __m256 take = _mm256_or_ps(_mm256_cmp_ps(v01, m, _CMP_GT_OQ), _mm256_cmp_ps(v01, v01, _CMP_UNORD_Q));
  m = _mm256_blendv_ps(m, v01, take);
  k = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(k), _mm256_castsi256_ps(one), take));
  take = _mm256_or_ps(_mm256_cmp_ps(v10, m, _CMP_GT_OQ), _mm256_cmp_ps(v10, v10, _CMP_UNORD_Q));
  m = _mm256_blendv_ps(m, v10, take);
  k = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(k), _mm256_castsi256_ps(two), take));
  take = _mm256_or_ps(_mm256_cmp_ps(v11, m, _CMP_GT_OQ), _mm256_cmp_ps(v11, v11, _CMP_UNORD_Q));
  m = _mm256_blendv_ps(m, v11, take);
  k = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(k), _mm256_castsi256_ps(three), take));
  _mm256_storeu_ps(o, m);
  // 8 int32 codes -> 8 bytes (the packs work per 128-bit half: bytes 0-3 and 16-19)
  const __m256i k16 = _mm256_packus_epi32(k, k);
  const __m256i k8 = _mm256_packus_epi16(k16, k16);
  const uint32_t lo = static_cast<uint32_t>(_mm256_cvtsi256_si32(k8));
  const uint32_t hi = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm256_extracti128_si256(k8, 1)));
  std::memcpy(c, &lo, 4);
  std::memcpy(c + 4, &hi, 4);
}

// float64: 4 outputs from 8 columns of each of the two rows.
FASTMAML_POOL_AVX2 inline void split_even_odd_pd(const double* r, __m256d& even, __m256d& odd) {
  const __m256d a = _mm256_loadu_pd(r), b = _mm256_loadu_pd(r + 4);
  // unpack works per 128-bit half: [a0 b0 | a2 b2]; the 64-bit permute restores column order
  even = _mm256_permute4x64_pd(_mm256_unpacklo_pd(a, b), _MM_SHUFFLE(3, 1, 2, 0));
  odd = _mm256_permute4x64_pd(_mm256_unpackhi_pd(a, b), _MM_SHUFFLE(3, 1, 2, 0));
}

FASTMAML_POOL_AVX2 inline void take_if_larger_pd(__m256d v, double e, __m256d& m, __m256d& k) {
  const __m256d take = _mm256_or_pd(_mm256_cmp_pd(v, m, _CMP_GT_OQ), _mm256_cmp_pd(v, v, _CMP_UNORD_Q));
  m = _mm256_blendv_pd(m, v, take);
  k = _mm256_blendv_pd(k, _mm256_set1_pd(e), take);
}

FASTMAML_POOL_AVX2 inline void pool4_avx2_pd(const double* r0, const double* r1, double* o, uint8_t* c) {
  __m256d v00, v01, v10, v11;
  split_even_odd_pd(r0, v00, v01);
  split_even_odd_pd(r1, v10, v11);
  __m256d m = v00, k = _mm256_setzero_pd();
  take_if_larger_pd(v01, 1.0, m, k);
  take_if_larger_pd(v10, 2.0, m, k);
  take_if_larger_pd(v11, 3.0, m, k);
  _mm256_storeu_pd(o, m);
  const __m128i k32 = _mm256_cvtpd_epi32(k);
  const __m128i k8 = _mm_packus_epi16(_mm_packus_epi32(k32, k32), _mm_setzero_si128());
  const uint32_t bytes = static_cast<uint32_t>(_mm_cvtsi128_si32(k8));
  std::memcpy(c, &bytes, 4);
}

// All output rows of planes [p0, p1) in blocks of kOut outputs (Block: pool8_avx2 or
// pool4_avx2_pd); the last < kOut outputs of a row (Conv4's 14-, 10-, 7- and 5-wide maps) go
// through zero-padded copies of their input columns.
template <typename T, int kOut, void (*Block)(const T*, const T*, T*, uint8_t*)>
FASTMAML_POOL_AVX2 void pool_planes_avx2(const T* x, int64_t h, int64_t w, T* out, uint8_t* code, int64_t p0,
                                         int64_t p1) {
  const int64_t ho = h / 2, wo = w / 2, wo_main = wo - wo % kOut, tail = wo - wo_main;
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t i = 0; i < ho; ++i) {
      const T* r0 = x + (p * h + 2 * i) * w;
      const T* r1 = r0 + w;
      T* o = out + (p * ho + i) * wo;
      uint8_t* c = code + (p * ho + i) * wo;
      for (int64_t j = 0; j < wo_main; j += kOut) Block(r0 + 2 * j, r1 + 2 * j, o + j, c + j);
      if (tail) {
        T t0[2 * kOut] = {}, t1[2 * kOut] = {}, to[kOut];
        uint8_t tc[kOut];
        std::memcpy(t0, r0 + 2 * wo_main, sizeof(T) * 2 * tail);
        std::memcpy(t1, r1 + 2 * wo_main, sizeof(T) * 2 * tail);
        Block(t0, t1, to, tc);
        std::memcpy(o + wo_main, to, sizeof(T) * tail);
        std::memcpy(c + wo_main, tc, tail);
      }
    }
  }
}
#endif

// Columns [2 j0, w) of one row pair: zeroed, then each gradient written at its window's argmax
// (also zeroes an unpooled odd last column).
template <typename T>
inline void scatter_row_scalar(const T* g, const uint8_t* code, int64_t j0, int64_t wo, int64_t w, T* r0, T* r1) {
  for (int64_t c = 2 * j0; c < w; ++c) r0[c] = r1[c] = T(0);  // a loop: memset calls cost more on short rows
  for (int64_t j = j0; j < wo; ++j) {
    const uint8_t k = code[j];
    r0[(k >> 1) * (r1 - r0) + 2 * j + (k & 1)] = g[j];  // arithmetic address: no data-dependent branch
  }
}

#if FASTMAML_POOL_X86
// v where the code is e, +0 elsewhere (NaN and -0 kept bit for bit).
FASTMAML_POOL_AVX2 inline __m256 pick_code(__m256 v, __m256i k, int e) {
  return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_cmpeq_epi32(k, _mm256_set1_epi32(e))));
}

// 16 consecutive entries of a row from its even and odd columns.
FASTMAML_POOL_AVX2 inline void store_interleaved(float* r, __m256 even, __m256 odd) {
  const __m256 lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd);
  _mm256_storeu_ps(r, _mm256_permute2f128_ps(lo, hi, 0x20));
  _mm256_storeu_ps(r + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
}

// 8 gradients to 16 columns of each of the two rows.
FASTMAML_POOL_AVX2 inline void scatter8_avx2(const float* g, const uint8_t* code, float* r0, float* r1) {
  const __m256 v = _mm256_loadu_ps(g);
  int64_t packed;
  std::memcpy(&packed, code, 8);
  const __m256i k = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(packed));
  store_interleaved(r0, pick_code(v, k, 0), pick_code(v, k, 1));
  store_interleaved(r1, pick_code(v, k, 2), pick_code(v, k, 3));
}

FASTMAML_POOL_AVX2 void scatter_rows_avx2(const float* g, const uint8_t* code, int64_t wo, int64_t w, float* r0,
                                          float* r1) {
  const int64_t wo_main = wo - wo % 8;
  for (int64_t j = 0; j < wo_main; j += 8) scatter8_avx2(g + j, code + j, r0 + 2 * j, r1 + 2 * j);
  scatter_row_scalar(g, code, wo_main, wo, w, r0, r1);
}
#endif

template <typename T>
void scatter_planes(const T* g, const uint8_t* code, int64_t h, int64_t w, T* out, int64_t p0, int64_t p1) {
  const int64_t ho = h / 2, wo = w / 2;
#if FASTMAML_POOL_X86
  const bool avx2 = std::is_same_v<T, float> && use_avx2_fma();
#endif
  for (int64_t p = p0; p < p1; ++p) {
    T* plane = out + p * h * w;
    for (int64_t i = 0; i < ho; ++i) {
      const T* gi = g + (p * ho + i) * wo;
      const uint8_t* ci = code + (p * ho + i) * wo;
      T* r0 = plane + 2 * i * w;
      T* r1 = r0 + w;
#if FASTMAML_POOL_X86
      if constexpr (std::is_same_v<T, float>) {
        if (avx2 && wo >= 8) {
          scatter_rows_avx2(gi, ci, wo, w, r0, r1);
          continue;
        }
      }
#endif
      scatter_row_scalar(gi, ci, 0, wo, w, r0, r1);
    }
    if (h % 2) std::memset(plane + (h - 1) * w, 0, sizeof(T) * w);  // the unpooled last row
  }
}

template <typename T>
void gather_planes(const T* src, const uint8_t* code, int64_t h, int64_t w, T* out, int64_t p0, int64_t p1) {
  const int64_t ho = h / 2, wo = w / 2;
  for (int64_t p = p0; p < p1; ++p) {
    const T* plane = src + p * h * w;
    for (int64_t i = 0; i < ho; ++i) {
      const uint8_t* ci = code + (p * ho + i) * wo;
      const T* r0 = plane + 2 * i * w;
      T* oi = out + (p * ho + i) * wo;
      for (int64_t j = 0; j < wo; ++j) {
        const uint8_t k = ci[j];
        oi[j] = r0[(k >> 1) * w + 2 * j + (k & 1)];
      }
    }
  }
}

void check_float_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "max_pool2x2: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "max_pool2x2: ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 2, "max_pool2x2: ", name, " must be [..., H, W], got ", t.dim(), " dims");
}

void check_code(const at::Tensor& code, at::IntArrayRef pooled_shape) {
  TORCH_CHECK(code.scalar_type() == at::kByte && code.device().is_cpu(),
              "max_pool2x2: code must be a uint8 CPU tensor, got ", code.scalar_type(), " on ", code.device());
  TORCH_CHECK(code.sizes() == pooled_shape, "max_pool2x2: code has shape ", code.sizes(), ", expected ",
              pooled_shape);
}

// `sizes` with its last two dims replaced by h, w.
std::vector<int64_t> with_plane(at::IntArrayRef sizes, int64_t h, int64_t w) {
  std::vector<int64_t> shape(sizes.begin(), sizes.end());
  shape[shape.size() - 2] = h;
  shape[shape.size() - 1] = w;
  return shape;
}

// Grain in planes: a few hundred KB of input per chunk.
int64_t plane_grain(int64_t plane_elems) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, plane_elems)); }

std::tuple<at::Tensor, at::Tensor> max_pool2x2_cpu(const at::Tensor& x_in) {
  check_float_cpu(x_in, "x");
  const at::Tensor x = x_in.contiguous();
  const int64_t h = x.size(-2), w = x.size(-1);
  TORCH_CHECK(h >= 2 && w >= 2, "max_pool2x2: x must be at least 2x2 in its last two dims, got ", h, "x", w);
  const std::vector<int64_t> shape = with_plane(x.sizes(), h / 2, w / 2);
  at::Tensor out = at::empty(shape, x.options());
  at::Tensor code = at::empty(shape, x.options().dtype(at::kByte));
  const int64_t planes = h * w ? x.numel() / (h * w) : 0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "max_pool2x2", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    uint8_t* cp = code.data_ptr<uint8_t>();
    at::parallel_for(0, planes, plane_grain(h * w), [&](int64_t p0, int64_t p1) {
#if FASTMAML_POOL_X86
      if (use_avx2_fma()) {
        if constexpr (std::is_same_v<scalar_t, float>) {
          pool_planes_avx2<float, 8, pool8_avx2>(reinterpret_cast<const float*>(xp), h, w,
                                                 reinterpret_cast<float*>(op), cp, p0, p1);
        } else {  // (the casts are no-ops: this lambda is compiled for both types)
          pool_planes_avx2<double, 4, pool4_avx2_pd>(reinterpret_cast<const double*>(xp), h, w,
                                                     reinterpret_cast<double*>(op), cp, p0, p1);
        }
        return;
      }
#endif
      pool_planes_portable(xp, h, w, op, cp, p0, p1);
    });
  });
  return {out, code};
}

at::Tensor max_pool2x2_scatter_cpu(const at::Tensor& g_in, const at::Tensor& code_in, int64_t height,
                                   int64_t width) {
  check_float_cpu(g_in, "grad");
  TORCH_CHECK(height >= 2 && width >= 2, "max_pool2x2_scatter: height and width must be >= 2, got ", height, "x",
              width);
  TORCH_CHECK(g_in.size(-2) == height / 2 && g_in.size(-1) == width / 2, "max_pool2x2_scatter: grad is ",
              g_in.sizes(), ", expected last dims ", height / 2, "x", width / 2, " for a ", height, "x", width,
              " input");
  check_code(code_in, g_in.sizes());
  const at::Tensor g = g_in.contiguous(), code = code_in.contiguous();
  at::Tensor out = at::empty(with_plane(g.sizes(), height, width), g.options());
  const int64_t planes = out.numel() / (height * width);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "max_pool2x2_scatter", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const uint8_t* cp = code.data_ptr<uint8_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, planes, plane_grain(height * width), [&](int64_t p0, int64_t p1) {
      scatter_planes(gp, cp, height, width, op, p0, p1);
    });
  });
  return out;
}

at::Tensor max_pool2x2_gather_cpu(const at::Tensor& src_in, const at::Tensor& code_in) {
  check_float_cpu(src_in, "src");
  const int64_t h = src_in.size(-2), w = src_in.size(-1);
  const std::vector<int64_t> shape = with_plane(src_in.sizes(), h / 2, w / 2);
  check_code(code_in, shape);
  const at::Tensor src = src_in.contiguous(), code = code_in.contiguous();
  at::Tensor out = at::empty(shape, src.options());
  const int64_t planes = h * w ? src.numel() / (h * w) : 0;
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "max_pool2x2_gather", [&] {
    const scalar_t* sp = src.data_ptr<scalar_t>();
    const uint8_t* cp = code.data_ptr<uint8_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, planes, plane_grain(h * w), [&](int64_t p0, int64_t p1) {
      gather_planes(sp, cp, h, w, op, p0, p1);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmaml, CPU, m) {
  m.impl("max_pool2x2", &max_pool2x2_cpu);
  m.impl("max_pool2x2_scatter", &max_pool2x2_scatter_cpu);
  m.impl("max_pool2x2_gather", &max_pool2x2_gather_cpu);
}

}  // namespace fastmaml
