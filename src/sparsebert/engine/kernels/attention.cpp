// Fused multi-head self-attention on feature-major ("transposed") activations, FP32.
//
//   qkv_t [3*H*D, M]  rows 0..HD-1 = Q^T, HD..2HD-1 = K^T, 2HD..3HD-1 = V^T; M = B*S tokens
//                     (batch b owns columns b*S .. b*S+S-1); what the QKV SparseLinear writes
//                     with y_t=True, so no transpose or head split is ever materialised.
//   mask      [B, S]  optional additive key mask (0 = attend, a large negative value = padding)
//   ctx_t     [H*D, M] the attention output, feature-major: the attention-output SparseLinear
//                     reads it with x_t=True.
//
// For one head, one sequence and a block of up to 64 queries i (4 AVX-512 registers of 16):
//   1. S^T[j, i] = scale * sum_d K^T[d, j] * Q^T[d, i] + mask[j]    (4 keys x 64 queries per step:
//      16 FMAs per 4 vector loads of Q^T and 4 broadcasts of K^T), kept in a [S, 64] scratch
//   2. P^T[j, i] = exp(S^T[j, i] - max_j S^T[., i]),  l[i] = sum_j P^T[j, i]   (softmax over j is
//      lane-wise here: each lane is one query)
//   3. ctx^T[d, i] = sum_j V^T[d, j] * P^T[j, i] / l[i]              (4 features x 64 queries a step)
// Same arithmetic as softmax(Q K^T / sqrt(D) + mask) V (Vaswani et al. 2017), no approximation
// beyond a float32 exp polynomial (relative error < 2e-7).
//
// Work items (head, sequence, query block) are spread over OpenMP threads. Only the AVX-512 path is
// fast; the portable path (plain loops) is the reference and runs anywhere.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define SB_ATT_X86 1
#include <immintrin.h>
#include "simd_math.h"
#define SB_ATT_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma")))
#else
#define SB_ATT_X86 0
#endif

namespace sparsebert {

namespace {

constexpr int kQueries = 64;  // queries per work item: 4 registers of 16
constexpr int kRows = 4;      // keys (phase 1) / features (phase 3) per register-blocked step

struct Att {
  const float* qkv;   // [3HD, M]
  const float* mask;  // [B, S] or nullptr
  float* out;         // [HD, M]
  int64_t M, S, H, D;
  float scale;
};

// Thread-local scratch for S^T / P^T: [S, 64] floats, 64-byte aligned, grows only.
float* scratch(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n + 16) buf.resize(n + 16);
  auto p = reinterpret_cast<std::uintptr_t>(buf.data());
  return reinterpret_cast<float*>((p + 63) & ~std::uintptr_t(63));
}

void item_generic(const Att& a, int64_t b, int64_t h, int64_t i0, int64_t ni) {
  const int64_t S = a.S, D = a.D, M = a.M, HD = a.H * a.D, c0 = b * S;
  float* p = scratch(static_cast<size_t>(S) * kQueries);
  for (int64_t i = 0; i < ni; ++i) {
    float mx = -INFINITY;
    for (int64_t j = 0; j < S; ++j) {
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d)
        s += a.qkv[(h * D + d) * M + c0 + i0 + i] * a.qkv[(HD + h * D + d) * M + c0 + j];
      s = s * a.scale + (a.mask ? a.mask[b * S + j] : 0.f);
      p[j * kQueries + i] = s;
      mx = std::max(mx, s);
    }
    float l = 0.f;
    for (int64_t j = 0; j < S; ++j) {
      const float e = std::exp(p[j * kQueries + i] - mx);
      p[j * kQueries + i] = e;
      l += e;
    }
    for (int64_t d = 0; d < D; ++d) {
      float o = 0.f;
      for (int64_t j = 0; j < S; ++j) o += a.qkv[(2 * HD + h * D + d) * M + c0 + j] * p[j * kQueries + i];
      a.out[(h * D + d) * M + c0 + i0 + i] = o / l;
    }
  }
}

#if SB_ATT_X86
// Phase 1 for keys j0 .. j0+JB-1: NI registers of queries (the last one masked by `last`).
// qs: this block's Q^T [D][kQueries] and ks: the sequence's K^T [D][S], both packed by item512.
template <int NI, int JB>
SB_ATT_AVX512 inline void scores512(const Att& a, const float* qs, const float* ks, const float* mask, int64_t j0,
                                    float* p, __m512* mx) {
  __m512 acc[JB][NI];
  for (int r = 0; r < JB; ++r)
    for (int n = 0; n < NI; ++n) acc[r][n] = _mm512_setzero_ps();
  for (int64_t d = 0; d < a.D; ++d) {
    const float* qd = qs + d * kQueries;
    const float* kd = ks + d * a.S + j0;
    __m512 q[NI];
    for (int n = 0; n < NI; ++n) q[n] = _mm512_load_ps(qd + 16 * n);
    for (int r = 0; r < JB; ++r) {
      const __m512 k = _mm512_set1_ps(kd[r]);
      for (int n = 0; n < NI; ++n) acc[r][n] = _mm512_fmadd_ps(k, q[n], acc[r][n]);
    }
  }
  const __m512 sc = _mm512_set1_ps(a.scale);
  for (int r = 0; r < JB; ++r) {
    const __m512 m = _mm512_set1_ps(mask ? mask[j0 + r] : 0.f);
    for (int n = 0; n < NI; ++n) {
      const __m512 s = _mm512_fmadd_ps(acc[r][n], sc, m);
      _mm512_store_ps(p + (j0 + r) * kQueries + 16 * n, s);
      mx[n] = _mm512_max_ps(mx[n], s);
    }
  }
}

// Phase 3 for features d0 .. d0+DB-1.
template <int NI, int DB>
SB_ATT_AVX512 inline void context512(const Att& a, const float* vt, const float* p, const __m512* inv_l, int64_t d0,
                                     __mmask16 last, float* out) {
  __m512 acc[DB][NI];
  for (int r = 0; r < DB; ++r)
    for (int n = 0; n < NI; ++n) acc[r][n] = _mm512_setzero_ps();
  const float* v0 = vt + d0 * a.M;
  for (int64_t j = 0; j < a.S; ++j) {
    __m512 pj[NI];
    for (int n = 0; n < NI; ++n) pj[n] = _mm512_load_ps(p + j * kQueries + 16 * n);
    for (int r = 0; r < DB; ++r) {
      const __m512 v = _mm512_set1_ps(v0[r * a.M + j]);
      for (int n = 0; n < NI; ++n) acc[r][n] = _mm512_fmadd_ps(v, pj[n], acc[r][n]);
    }
  }
  for (int r = 0; r < DB; ++r)
    for (int n = 0; n < NI; ++n)
      _mm512_mask_storeu_ps(out + (d0 + r) * a.M + 16 * n, n == NI - 1 ? last : __mmask16(0xFFFF),
                            _mm512_mul_ps(acc[r][n], inv_l[n]));
}

template <int NI>
SB_ATT_AVX512 void item512(const Att& a, int64_t b, int64_t h, int64_t i0, int64_t ni) {
  const int64_t S = a.S, D = a.D, M = a.M, HD = a.H * a.D, c0 = b * S;
  const __mmask16 last = static_cast<__mmask16>((1u << (ni - 16 * (NI - 1))) - 1u);
  const float* qt = a.qkv + (h * D) * M + c0 + i0;
  const float* kt = a.qkv + (HD + h * D) * M + c0;
  const float* vt = a.qkv + (2 * HD + h * D) * M + c0;
  const float* mask = a.mask ? a.mask + b * S : nullptr;
  // Scratch: P^T [S][64], then this block's Q^T [D][64] and the sequence's K^T [D][S], copied to contiguous rows.
  // In qkv_t the rows of one head are M floats apart: at batch 32 (M = 4096) that is 16 KiB, a multiple of
  // 4 KiB, so the D rows phase 1 sweeps all fall into one L1 set and evict each other (measured ~1.5x slower).
  const int64_t s16 = (S + 15) / 16 * 16;
  float* p = scratch(static_cast<size_t>(S) * kQueries + static_cast<size_t>(D) * (kQueries + s16));
  float* qs = p + S * kQueries;
  float* ks = qs + D * kQueries;
  const __mmask16 s_last = static_cast<__mmask16>((1u << (S - (s16 - 16))) - 1u);
  for (int64_t d = 0; d < D; ++d) {
    for (int n = 0; n < NI; ++n)
      _mm512_store_ps(qs + d * kQueries + 16 * n,
                      _mm512_maskz_loadu_ps(n == NI - 1 ? last : __mmask16(0xFFFF), qt + d * M + 16 * n));
    for (int64_t c = 0; c < s16; c += 16)
      _mm512_storeu_ps(ks + d * S + c, _mm512_maskz_loadu_ps(c + 16 < s16 ? __mmask16(0xFFFF) : s_last, kt + d * M + c));
  }
  __m512 mx[NI];
  for (int n = 0; n < NI; ++n) mx[n] = _mm512_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + kRows <= S; j += kRows) scores512<NI, kRows>(a, qs, ks, mask, j, p, mx);
  for (; j < S; ++j) scores512<NI, 1>(a, qs, ks, mask, j, p, mx);
  __m512 l[NI];
  for (int n = 0; n < NI; ++n) l[n] = _mm512_setzero_ps();
  for (j = 0; j < S; ++j) {
    for (int n = 0; n < NI; ++n) {
      float* pj = p + j * kQueries + 16 * n;
      const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_load_ps(pj), mx[n]));
      _mm512_store_ps(pj, e);
      l[n] = _mm512_add_ps(l[n], e);
    }
  }
  __m512 inv_l[NI];
  for (int n = 0; n < NI; ++n) inv_l[n] = _mm512_div_ps(_mm512_set1_ps(1.0f), l[n]);
  float* out = a.out + (h * D) * M + c0 + i0;
  int64_t d = 0;
  for (; d + kRows <= D; d += kRows) context512<NI, kRows>(a, vt, p, inv_l, d, last, out);
  for (; d < D; ++d) context512<NI, 1>(a, vt, p, inv_l, d, last, out);
}

SB_ATT_AVX512 void item_avx512(const Att& a, int64_t b, int64_t h, int64_t i0, int64_t ni) {
  switch ((ni + 15) / 16) {
    case 1: item512<1>(a, b, h, i0, ni); break;
    case 2: item512<2>(a, b, h, i0, ni); break;
    case 3: item512<3>(a, b, h, i0, ni); break;
    default: item512<4>(a, b, h, i0, ni); break;
  }
}
#endif

// One work item on the chosen path (the AVX-512 one only where compiled and asked for).
void item(const Att& a, int64_t b, int64_t h, int64_t i0, int64_t ni, bool avx512) {
#if SB_ATT_X86
  if (avx512) return item_avx512(a, b, h, i0, ni);
#endif
  (void)avx512;
  item_generic(a, b, h, i0, ni);
}

}  // namespace

// One sequence, all heads, on the calling thread (the fused attention block of sparse_kernels.cpp):
// qkv [3HD, S] and out [HD, S] feature-major with row stride S, mask [S] or nullptr.
void attention_sequence(const float* qkv, const float* mask, float* out, int64_t S, int64_t heads, int64_t head_dim,
                        bool avx512) {
  const Att a{qkv, mask, out, S, S, heads, head_dim, 1.0f / std::sqrt(static_cast<float>(head_dim))};
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i0 = 0; i0 < S; i0 += kQueries) item(a, 0, h, i0, std::min<int64_t>(kQueries, S - i0), avx512);
}

at::Tensor attention_t(const at::Tensor& qkv_t, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim,
                       const c10::optional<at::Tensor>& mask, int64_t num_threads, bool avx512,
                       const c10::optional<at::Tensor>& out_opt) {
  TORCH_CHECK(qkv_t.scalar_type() == at::kFloat && qkv_t.dim() == 2 && qkv_t.is_contiguous(),
              "attention_t: qkv_t must be a contiguous float32 [3*heads*head_dim, batch*seq] tensor");
  TORCH_CHECK(batch >= 0 && seq >= 0 && heads > 0 && head_dim > 0, "attention_t: bad sizes");
  TORCH_CHECK(qkv_t.size(0) == 3 * heads * head_dim && qkv_t.size(1) == batch * seq,
              "attention_t: qkv_t is [", qkv_t.size(0), ", ", qkv_t.size(1), "], expected [",
              3 * heads * head_dim, ", ", batch * seq, "]");
  const float* mk = nullptr;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kFloat && mask->is_contiguous() && mask->numel() == batch * seq,
                "attention_t: mask must be a contiguous float32 [batch, seq] tensor");
    mk = mask->data_ptr<float>();
  }
  at::Tensor out;
  if (out_opt.has_value() && out_opt->defined()) {  // a caller's reused buffer: no fresh pages to fault in
    out = *out_opt;
    TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 &&
                    out.size(0) == heads * head_dim && out.size(1) == batch * seq,
                "attention_t: out must be a contiguous float32 [", heads * head_dim, ", ", batch * seq, "] tensor");
  } else {
    out = at::empty({heads * head_dim, batch * seq}, qkv_t.options());
  }
  if (batch == 0 || seq == 0) return out;
  Att a{qkv_t.data_ptr<float>(), mk, out.data_ptr<float>(), batch * seq, seq, heads, head_dim,
        1.0f / std::sqrt(static_cast<float>(head_dim))};
  const int64_t blocks = (seq + kQueries - 1) / kQueries;
  const int64_t items = batch * heads * blocks;
#pragma omp parallel for num_threads(static_cast<int>(std::max<int64_t>(1, num_threads))) schedule(static)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t blk = it % blocks, h = (it / blocks) % heads, b = it / (blocks * heads);
    const int64_t i0 = blk * kQueries;
    item(a, b, h, i0, std::min<int64_t>(kQueries, seq - i0), avx512);
  }
  return out;
}

}  // namespace sparsebert
