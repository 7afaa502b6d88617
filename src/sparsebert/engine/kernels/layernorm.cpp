// Residual add + LayerNorm in one pass over each row (FP32):
//   y[m, :] = LayerNorm(a[m, :] + r[m, :]) * gamma + beta      (Ba et al. 2016; BERT's "Add & Norm")
// written into `a` in place. Torch runs this as two kernels (add_, then layer_norm), each a full
// pass over [M, H] in memory; here a row (H <= a few thousand floats) is summed, normalised and
// written while it sits in L1. Mean and variance are two-pass over the row (no cancellation).
// With `minmax`, the pass that writes y also returns min(y), max(y): the range the next INT8 layer
// quantizes with, without another pass over [M, H].
// The row loop is plain C++ with `omp simd` reductions; the AVX-512 wrapper compiles the same
// body for 8- and 16-float registers (AVX2, AVX-512), chosen at run time like the other kernels.

#include <ATen/core/Tensor.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#define SB_LN_X86 1
#define SB_LN_AVX2 __attribute__((target("avx2,fma")))
#define SB_LN_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma")))
#else
#define SB_LN_X86 0
#endif

namespace sparsebert {

namespace {

template <bool kRange>
__attribute__((always_inline)) inline void add_ln_row(float* __restrict a, const float* __restrict r,
                                                      const float* __restrict gamma, const float* __restrict beta,
                                                      int64_t H, float eps, float& lo, float& hi) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < H; ++i) {
    const float v = a[i] + r[i];
    a[i] = v;
    sum += v;
  }
  const float mean = sum / static_cast<float>(H);
  float sq = 0.f;
#pragma omp simd reduction(+ : sq)
  for (int64_t i = 0; i < H; ++i) {
    const float c = a[i] - mean;
    sq += c * c;
  }
  const float rstd = 1.0f / std::sqrt(sq / static_cast<float>(H) + eps);
  if constexpr (kRange) {
    float l = lo, h = hi;
#pragma omp simd reduction(min : l) reduction(max : h)
    for (int64_t i = 0; i < H; ++i) {
      const float y = (a[i] - mean) * rstd * gamma[i] + beta[i];
      a[i] = y;
      l = std::min(l, y);
      h = std::max(h, y);
    }
    lo = l, hi = h;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) a[i] = (a[i] - mean) * rstd * gamma[i] + beta[i];
  }
}

// Rows m0 .. m1; with `range`, their output range goes to lo / hi.
#define SB_LN_ROWS(ATTR, NAME)                                                                                 \
  ATTR void NAME(float* a, const float* r, const float* g, const float* b, int64_t m0, int64_t m1, int64_t H, \
                 float eps, bool range, float& lo, float& hi) {                                                \
    for (int64_t m = m0; m < m1; ++m) {                                                                       \
      if (range)                                                                                              \
        add_ln_row<true>(a + m * H, r + m * H, g, b, H, eps, lo, hi);                                         \
      else                                                                                                    \
        add_ln_row<false>(a + m * H, r + m * H, g, b, H, eps, lo, hi);                                        \
    }                                                                                                         \
  }

SB_LN_ROWS(, rows_generic)
#if SB_LN_X86
SB_LN_ROWS(SB_LN_AVX2, rows_avx2)
SB_LN_ROWS(SB_LN_AVX512, rows_avx512)
#endif

}  // namespace

void add_layernorm_rows(float* a, const float* r, const float* gamma, const float* beta, int64_t m0, int64_t m1,
                        int64_t H, float eps, int isa, bool range, float& lo, float& hi) {
#if SB_LN_X86
  if (isa == 2) return rows_avx512(a, r, gamma, beta, m0, m1, H, eps, range, lo, hi);
  if (isa == 1) return rows_avx2(a, r, gamma, beta, m0, m1, H, eps, range, lo, hi);
#endif
  (void)isa;
  rows_generic(a, r, gamma, beta, m0, m1, H, eps, range, lo, hi);
}

void add_layernorm_(at::Tensor& a, const at::Tensor& residual, const at::Tensor& gamma, const at::Tensor& beta, double eps,
                    int64_t num_threads, int isa, float* minmax) {
  TORCH_CHECK(a.scalar_type() == at::kFloat && a.dim() == 2 && a.is_contiguous(),
              "add_layernorm_: a must be a contiguous float32 [M, H] tensor");
  TORCH_CHECK(residual.scalar_type() == at::kFloat && residual.is_contiguous() && residual.sizes() == a.sizes(),
              "add_layernorm_: residual must be a contiguous float32 tensor shaped like a");
  const int64_t M = a.size(0), H = a.size(1);
  TORCH_CHECK(gamma.scalar_type() == at::kFloat && gamma.is_contiguous() && gamma.numel() == H &&
                  beta.scalar_type() == at::kFloat && beta.is_contiguous() && beta.numel() == H,
              "add_layernorm_: gamma and beta must be contiguous float32 [H] tensors");
  if (minmax != nullptr) minmax[0] = INFINITY, minmax[1] = -INFINITY;
  if (M == 0 || H == 0) return;
  float* pa = a.data_ptr<float>();
  const float *pr = residual.data_ptr<float>(), *pg = gamma.data_ptr<float>(), *pb = beta.data_ptr<float>();
  const float e = static_cast<float>(eps);
  // ~H*12 bytes a row: below ~64 rows a second thread costs more than it saves.
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, (M + 63) / 64)));
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    const int64_t m0 = M * t / n, m1 = M * (t + 1) / n;
    const bool range = minmax != nullptr;
    float lo = INFINITY, hi = -INFINITY;
    add_layernorm_rows(pa, pr, pg, pb, m0, m1, H, e, isa, range, lo, hi);
    if (range) {
#pragma omp critical(sparsebert_ln_range)
      {
        minmax[0] = std::min(minmax[0], lo);
        minmax[1] = std::max(minmax[1], hi);
      }
    }
  }
}

}  // namespace sparsebert
