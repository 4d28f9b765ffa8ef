// relu that keeps one bit per element for its backward instead of its float output:
//   relu_bitmask(x)          -> y = relu(x), bits (uint8 [ceil(numel / 8)], bit i % 8 of byte i / 8 = !(y_i <= 0))
//   bitmask_select(g, bits)  -> where(bit, g, 0): relu's backward, and (being linear in g with the
//                               same bits) also its own derivative, which a MAML double backward runs
// torch's relu saves its output (4 or 8 bytes per element) for threshold_backward; in a conv4
// MAML step the largest of these is the first block's [75, C, 84, 84] activation, alive for the
// whole query pass. The bit is torch's own test (threshold_backward passes g where the output is
// not <= 0, NaN included), so values and gradients are bit-identical.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include <cstdint>

#include "cpu_features.h"

namespace fastmaml {
namespace {

#if defined(__GNUC__) && defined(__x86_64__)
#define FASTMAML_RELU_X86 1
#define FASTMAML_RELU_AVX2 __attribute__((target("avx2,fma")))
#else
#define FASTMAML_RELU_X86 0
#endif

// Elements [8 b0, 8 b1) (whole bytes), clipped to n.
template <typename T>
void relu_bytes_portable(const T* x, T* y, uint8_t* bits, int64_t n, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    uint8_t byte = 0;
    const int64_t e1 = std::min<int64_t>(8 * b + 8, n);
    for (int64_t e = 8 * b; e < e1; ++e) {
      const T v = x[e];
      const T out = v < T(0) ? T(0) : v;  // relu(NaN) = NaN, as clamp_min
      y[e] = out;
      byte |= static_cast<uint8_t>(!(out <= T(0))) << (e - 8 * b);
    }
    bits[b] = byte;
  }
}

template <typename T>
void select_bytes_portable(const T* g, const uint8_t* bits, T* out, int64_t n, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t byte = bits[b];
    const int64_t e1 = std::min<int64_t>(8 * b + 8, n);
    for (int64_t e = 8 * b; e < e1; ++e) out[e] = (byte >> (e - 8 * b)) & 1 ? g[e] : T(0);
  }
}

#if FASTMAML_RELU_X86
FASTMAML_RELU_AVX2 void relu_bytes_avx2(const float* x, float* y, uint8_t* bits, int64_t n, int64_t b0, int64_t b1) {
  const int64_t full = std::min(b1, n / 8);
  const __m256 zero = _mm256_setzero_ps();
  int64_t b = b0;
  for (; b < full; ++b) {
    const __m256 v = _mm256_loadu_ps(x + 8 * b);
    // max(v, 0) with v second would turn NaN into 0; blend keeps NaN as clamp_min does
    const __m256 out = _mm256_blendv_ps(v, zero, _mm256_cmp_ps(v, zero, _CMP_LT_OQ));
    _mm256_storeu_ps(y + 8 * b, out);
    bits[b] = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(out, zero, _CMP_NLE_UQ)));
  }
  relu_bytes_portable(x, y, bits, n, b, b1);
}

FASTMAML_RELU_AVX2 void select_bytes_avx2(const float* g, const uint8_t* bits, float* out, int64_t n, int64_t b0,
                                          int64_t b1) {
  const int64_t full = std::min(b1, n / 8);
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  int64_t b = b0;
  for (; b < full; ++b) {
    const __m256i m = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits[b]), lane_bit), lane_bit);
    _mm256_storeu_ps(out + 8 * b, _mm256_and_ps(_mm256_loadu_ps(g + 8 * b), _mm256_castsi256_ps(m)));
  }
  select_bytes_portable(g, bits, out, n, b, b1);
}
#endif

constexpr int64_t kGrainBytes = 4096;  // 32768 elements per chunk

std::tuple<at::Tensor, at::Tensor> relu_bitmask_cpu(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.device().is_cpu(), "relu_bitmask: x must be a CPU tensor, got ", x_in.device());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "relu_bitmask: x must be float32 or float64, got ", x_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel(), nbytes = (n + 7) / 8;
  at::Tensor y = at::empty_like(x);
  at::Tensor bits = at::empty({nbytes}, x.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "relu_bitmask", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    uint8_t* bp = bits.data_ptr<uint8_t>();
    at::parallel_for(0, nbytes, kGrainBytes, [&](int64_t b0, int64_t b1) {
#if FASTMAML_RELU_X86
      if (std::is_same_v<scalar_t, float> && use_avx2_fma()) {
        relu_bytes_avx2(reinterpret_cast<const float*>(xp), reinterpret_cast<float*>(yp), bp, n, b0, b1);
        return;
      }
#endif
      relu_bytes_portable(xp, yp, bp, n, b0, b1);
    });
  });
  return {y, bits};
}

at::Tensor bitmask_select_cpu(const at::Tensor& g_in, const at::Tensor& bits) {
  TORCH_CHECK(g_in.device().is_cpu(), "bitmask_select: g must be a CPU tensor, got ", g_in.device());
  TORCH_CHECK(g_in.scalar_type() == at::kFloat || g_in.scalar_type() == at::kDouble,
              "bitmask_select: g must be float32 or float64, got ", g_in.scalar_type());
  TORCH_CHECK(bits.scalar_type() == at::kByte && bits.device().is_cpu() && bits.dim() == 1 && bits.is_contiguous(),
              "bitmask_select: bits must be a contiguous 1-d uint8 CPU tensor, got ", bits.scalar_type(), " ",
              bits.sizes());
  const at::Tensor g = g_in.contiguous();
  const int64_t n = g.numel(), nbytes = (n + 7) / 8;
  TORCH_CHECK(bits.numel() == nbytes, "bitmask_select: bits has ", bits.numel(), " bytes, expected ", nbytes,
              " for ", n, " elements");
  at::Tensor out = at::empty_like(g);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "bitmask_select", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const uint8_t* bp = bits.data_ptr<uint8_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, nbytes, kGrainBytes, [&](int64_t b0, int64_t b1) {
#if FASTMAML_RELU_X86
      if (std::is_same_v<scalar_t, float> && use_avx2_fma()) {
        select_bytes_avx2(reinterpret_cast<const float*>(gp), bp, reinterpret_cast<float*>(op), n, b0, b1);
        return;
      }
#endif
      select_bytes_portable(gp, bp, op, n, b0, b1);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmaml, CPU, m) {
  m.impl("relu_bitmask", &relu_bitmask_cpu);
  m.impl("bitmask_select", &bitmask_select_cpu);
}

}  // namespace fastmaml
