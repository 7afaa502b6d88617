// Sparse-weight x dense-activation kernels for SparseLinear (FP32).
//
// Computes Y[M, N] = X[M, K] @ W[N, K]^T (+ bias[N]) where W is sparse and packed once.
//
// Formats (built in Python, see sparse_linear.py):
//   CSR     row_ptr int32[N+1], col int32[nnz] (k of each nonzero), val fp32[nnz];
//           nonzeros of output row n are col/val[row_ptr[n] : row_ptr[n+1]], k ascending.
//   BLOCK4  row_ptr int32[N+1] (in blocks), col int32[nblocks] (first k of the block, a
//           multiple of 4), val fp32[nblocks*4] (W[n, k..k+3], zeros where pruned).
//
// Strategy (the XNNPACK / DeepSparse "sparse x NCHW" idea applied to tokens):
//   * Split M into tiles of W8 = 8*R columns (R = 1..8 AVX2 registers; the last tile of
//     a matrix uses the smallest R that covers it so M=1 does not pay for 64 columns).
//   * Transpose the X tile into a thread-local buffer XT[Kpad][W8] (tokens contiguous).
//     It stays in L1/L2 while every output row n streams over its nonzeros:
//         acc[0..R) += w_nk * XT[k, 0..W8)           (broadcast-FMA, R accumulators)
//     so each nonzero costs R FMAs on contiguous aligned vectors, near dense efficiency.
//   * 8 finished output rows are kept in YT[8][W8] and written to Y with 8x8 transposes
//     (bias added there), so neither X^T nor Y^T ever goes to main memory.
//   * Work items are (M tile, N chunk) pairs; N is only split when there are too few
//     M tiles to keep all threads busy (small batches).
//
// ISA: the AVX2/FMA code is compiled through __attribute__((target)) and chosen at run
// time with __builtin_cpu_supports, so one cached build runs on any x86-64 CPU; the
// portable path (plain C++ the compiler may auto-vectorise) is used elsewhere, incl. ARM.

#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define SB_X86 1
#include <immintrin.h>
#define SB_AVX2 __attribute__((target("avx2,fma")))
#else
#define SB_X86 0
#endif

namespace {

constexpr int kMaxR = 8;             // accumulators per output row -> tile width 64
constexpr int kMaxW = 8 * kMaxR;     // widest M tile
constexpr int kGroup = 8;            // output rows per YT transpose group

enum class Format { CSR, BLOCK4 };

bool cpu_has_avx2_fma() {
#if SB_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// Thread-local, 64-byte aligned scratch that only grows: avoids malloc + page faults per
// call (they cost as much as a whole small layer).
struct Scratch {
  float* ptr = nullptr;
  size_t cap = 0;
  float* get(size_t n) {
    if (n > cap) {
      std::free(ptr);
      size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
      ptr = static_cast<float*>(std::aligned_alloc(64, bytes));
      TORCH_CHECK(ptr != nullptr, "sparse_kernels: out of memory for scratch buffer");
      cap = n;
    }
    return ptr;
  }
  ~Scratch() { std::free(ptr); }
};

struct Problem {
  const float* x;        // [M, K] row-major
  float* y;              // [M, N] row-major
  const float* bias;     // [N] or nullptr
  const int32_t* row_ptr;
  const int32_t* col;
  const float* val;
  int64_t M, N, K, Kpad; // Kpad: K rounded up to the block size (XT rows, zero padded)
  int64_t n_kc;          // number of K chunks; row_ptr has n_kc * N + 1 entries
  int64_t nb;            // output rows per n-block (accumulator block kept in L1)
};

// --------------------------------------------------------------------------------------
// Portable path (also the reference for the AVX2 path's structure).
// --------------------------------------------------------------------------------------

// XT[k][j] = X[m0 + j][k] for j < w, zero for w <= j < W8 and for K <= k < Kpad.
void pack_xt_generic(const Problem& p, int64_t m0, int64_t w, int W8, float* xt) {
  for (int64_t k = 0; k < p.Kpad; ++k) {
    float* dst = xt + k * W8;
    for (int j = 0; j < W8; ++j)
      dst[j] = (j < w && k < p.K) ? p.x[(m0 + j) * p.K + k] : 0.0f;
  }
}

// Y[m0 + j][n0 + i] = YT[i][j] (+ bias) for the valid rows/cols.
void store_yt_generic(const Problem& p, const float* yt, int W8, int64_t m0, int64_t w,
                      int64_t n0, int64_t rows) {
  for (int64_t j = 0; j < w; ++j) {
    float* dst = p.y + (m0 + j) * p.N + n0;
    for (int64_t i = 0; i < rows; ++i)
      dst[i] = yt[i * W8 + j] + (p.bias ? p.bias[n0 + i] : 0.0f);
  }
}

// One (output row, K chunk) pair: out[0..W8) (+)= sum over its nonzeros of w * XT[k].
template <Format F>
void row_chunk_generic(const Problem& p, const float* xt, int W8, int64_t b0, int64_t b1,
                       bool accumulate, float* out) {
  float acc[kMaxW];
  for (int j = 0; j < W8; ++j) acc[j] = accumulate ? out[j] : 0.0f;
  for (int64_t b = b0; b < b1; ++b) {
    const float* xr = xt + static_cast<int64_t>(p.col[b]) * W8;
    if (F == Format::CSR) {
      const float w = p.val[b];
      for (int j = 0; j < W8; ++j) acc[j] += w * xr[j];
    } else {
      const float* wv = p.val + 4 * b;
      for (int q = 0; q < 4; ++q)
        for (int j = 0; j < W8; ++j) acc[j] += wv[q] * xr[q * W8 + j];
    }
  }
  for (int j = 0; j < W8; ++j) out[j] = acc[j];
}

template <Format F>
void item_generic(const Problem& p, int64_t m0, int64_t w, int64_t n_begin, int64_t n_end,
                  float* xt, float* yt, bool xt_ready) {
  const int W8 = static_cast<int>((w + 7) / 8) * 8;
  if (!xt_ready) pack_xt_generic(p, m0, w, W8, xt);
  for (int64_t nb0 = n_begin; nb0 < n_end; nb0 += p.nb) {
    const int64_t nb1 = std::min(n_end, nb0 + p.nb);
    for (int64_t c = 0; c < p.n_kc; ++c) {
      const int32_t* rp = p.row_ptr + c * p.N;
      for (int64_t n = nb0; n < nb1; ++n)
        row_chunk_generic<F>(p, xt, W8, rp[n], rp[n + 1], c > 0, yt + (n - nb0) * W8);
    }
    for (int64_t g = nb0; g < nb1; g += kGroup)
      store_yt_generic(p, yt + (g - nb0) * W8, W8, m0, w, g, std::min<int64_t>(kGroup, nb1 - g));
  }
}

// --------------------------------------------------------------------------------------
// AVX2 + FMA path.
// --------------------------------------------------------------------------------------
#if SB_X86

SB_AVX2 inline void transpose8x8(__m256& r0, __m256& r1, __m256& r2, __m256& r3, __m256& r4,
                                 __m256& r5, __m256& r6, __m256& r7) {
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r0 = _mm256_permute2f128_ps(s0, s4, 0x20); r1 = _mm256_permute2f128_ps(s1, s5, 0x20);
  r2 = _mm256_permute2f128_ps(s2, s6, 0x20); r3 = _mm256_permute2f128_ps(s3, s7, 0x20);
  r4 = _mm256_permute2f128_ps(s0, s4, 0x31); r5 = _mm256_permute2f128_ps(s1, s5, 0x31);
  r6 = _mm256_permute2f128_ps(s2, s6, 0x31); r7 = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// XT tile from X rows m0..m0+w: full 8x8 blocks through registers, edges scalar.
SB_AVX2 void pack_xt_avx2(const Problem& p, int64_t m0, int64_t w, int W8, float* xt) {
  const int64_t K = p.K;
  const int64_t kfull = (K / 8) * 8;
  for (int64_t j0 = 0; j0 < W8; j0 += 8) {
    if (j0 + 8 <= w) {
      const float* src = p.x + (m0 + j0) * K;
      for (int64_t k = 0; k < kfull; k += 8) {
        __m256 r0 = _mm256_loadu_ps(src + 0 * K + k), r1 = _mm256_loadu_ps(src + 1 * K + k);
        __m256 r2 = _mm256_loadu_ps(src + 2 * K + k), r3 = _mm256_loadu_ps(src + 3 * K + k);
        __m256 r4 = _mm256_loadu_ps(src + 4 * K + k), r5 = _mm256_loadu_ps(src + 5 * K + k);
        __m256 r6 = _mm256_loadu_ps(src + 6 * K + k), r7 = _mm256_loadu_ps(src + 7 * K + k);
        transpose8x8(r0, r1, r2, r3, r4, r5, r6, r7);
        float* dst = xt + k * W8 + j0;
        _mm256_store_ps(dst + 0 * W8, r0); _mm256_store_ps(dst + 1 * W8, r1);
        _mm256_store_ps(dst + 2 * W8, r2); _mm256_store_ps(dst + 3 * W8, r3);
        _mm256_store_ps(dst + 4 * W8, r4); _mm256_store_ps(dst + 5 * W8, r5);
        _mm256_store_ps(dst + 6 * W8, r6); _mm256_store_ps(dst + 7 * W8, r7);
      }
      for (int64_t k = kfull; k < p.Kpad; ++k)
        for (int j = 0; j < 8; ++j)
          xt[k * W8 + j0 + j] = k < K ? src[j * K + k] : 0.0f;
    } else {  // ragged last 8 columns of the matrix: zero-fill the missing tokens
      for (int64_t k = 0; k < p.Kpad; ++k)
        for (int j = 0; j < 8; ++j)
          xt[k * W8 + j0 + j] = (j0 + j < w && k < K) ? p.x[(m0 + j0 + j) * K + k] : 0.0f;
    }
  }
}

// Writes YT[0..rows)[0..w) transposed into Y[m0.., n0..] adding bias.
SB_AVX2 void store_yt_avx2(const Problem& p, const float* yt, int W8, int64_t m0, int64_t w,
                           int64_t n0, int64_t rows) {
  if (rows != kGroup) {
    store_yt_generic(p, yt, W8, m0, w, n0, rows);
    return;
  }
  const __m256 b = p.bias ? _mm256_loadu_ps(p.bias + n0) : _mm256_setzero_ps();
  for (int64_t j0 = 0; j0 < w; j0 += 8) {
    __m256 r0 = _mm256_load_ps(yt + 0 * W8 + j0), r1 = _mm256_load_ps(yt + 1 * W8 + j0);
    __m256 r2 = _mm256_load_ps(yt + 2 * W8 + j0), r3 = _mm256_load_ps(yt + 3 * W8 + j0);
    __m256 r4 = _mm256_load_ps(yt + 4 * W8 + j0), r5 = _mm256_load_ps(yt + 5 * W8 + j0);
    __m256 r6 = _mm256_load_ps(yt + 6 * W8 + j0), r7 = _mm256_load_ps(yt + 7 * W8 + j0);
    transpose8x8(r0, r1, r2, r3, r4, r5, r6, r7);
    __m256 out[8] = {r0, r1, r2, r3, r4, r5, r6, r7};
    const int64_t valid = std::min<int64_t>(8, w - j0);
    float* dst = p.y + (m0 + j0) * p.N + n0;
    for (int64_t j = 0; j < valid; ++j) _mm256_storeu_ps(dst + j * p.N, _mm256_add_ps(out[j], b));
  }
}

// THE HOT LOOP: one (output row n, K chunk) pair against the XT tile, R accumulators of
// 8 tokens each: out[0..8R) (+)= sum_b w_b * XT[col_b, 0..8R).
// Per CSR nonzero: 1 broadcast, R aligned loads from XT row k (L1: the chunk fits), R FMAs.
// Per BLOCK4 block: 1 index for 4 weights and 4 consecutive XT rows.
template <Format F, int R>
SB_AVX2 inline void sparse_row_fma_avx2(const Problem& p, const float* xt, int64_t b0,
                                        int64_t b1, bool accumulate, float* out) {
  constexpr int W8 = 8 * R;
  if (b0 == b1) {
    if (!accumulate) std::memset(out, 0, sizeof(float) * W8);
    return;
  }
  __m256 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    acc[r] = accumulate ? _mm256_load_ps(out + 8 * r) : _mm256_setzero_ps();
  const int32_t* col = p.col;
  if (F == Format::CSR) {
    const float* val = p.val;
    int64_t b = b0;
    // Unrolled by 4: measured ~1.45 vs ~1.15 FMA/cycle (more index/broadcast loads in flight).
    for (; b + 4 <= b1; b += 4) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        const __m256 w = _mm256_broadcast_ss(val + b + u);
        const float* xr = xt + static_cast<int64_t>(col[b + u]) * W8;
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
          acc[r] = _mm256_fmadd_ps(w, _mm256_load_ps(xr + 8 * r), acc[r]);
      }
    }
    for (; b < b1; ++b) {
      const __m256 w = _mm256_broadcast_ss(val + b);
      const float* xr = xt + static_cast<int64_t>(col[b]) * W8;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(w, _mm256_load_ps(xr + 8 * r), acc[r]);
    }
  } else {
    for (int64_t b = b0; b < b1; ++b) {
      const float* wv = p.val + 4 * b;
      const float* xr = xt + static_cast<int64_t>(col[b]) * W8;
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        const __m256 w = _mm256_broadcast_ss(wv + q);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
          acc[r] = _mm256_fmadd_ps(w, _mm256_load_ps(xr + q * W8 + 8 * r), acc[r]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) _mm256_store_ps(out + 8 * r, acc[r]);
}

// Output rows [n_begin, n_end) of one M tile, in blocks of p.nb rows: the block's
// accumulators (YT, nb x 8R floats) and one K chunk of XT stay in L1 while the chunk's
// nonzeros of every row in the block are applied; then the block is written out.
template <Format F, int R>
SB_AVX2 void rows_avx2(const Problem& p, const float* xt, int64_t m0, int64_t w,
                       int64_t n_begin, int64_t n_end, float* yt) {
  constexpr int W8 = 8 * R;
  for (int64_t nb0 = n_begin; nb0 < n_end; nb0 += p.nb) {
    const int64_t nb1 = std::min(n_end, nb0 + p.nb);
    for (int64_t c = 0; c < p.n_kc; ++c) {
      const int32_t* rp = p.row_ptr + c * p.N;
      for (int64_t n = nb0; n < nb1; ++n)
        sparse_row_fma_avx2<F, R>(p, xt, rp[n], rp[n + 1], c > 0, yt + (n - nb0) * W8);
    }
    for (int64_t g = nb0; g < nb1; g += kGroup)
      store_yt_avx2(p, yt + (g - nb0) * W8, W8, m0, w, g, std::min<int64_t>(kGroup, nb1 - g));
  }
}

template <Format F>
SB_AVX2 void item_avx2(const Problem& p, int64_t m0, int64_t w, int64_t n_begin,
                       int64_t n_end, float* xt, float* yt, bool xt_ready) {
  const int R = static_cast<int>((w + 7) / 8);
  if (!xt_ready) pack_xt_avx2(p, m0, w, 8 * R, xt);
  switch (R) {
    case 1: rows_avx2<F, 1>(p, xt, m0, w, n_begin, n_end, yt); break;
    case 2: rows_avx2<F, 2>(p, xt, m0, w, n_begin, n_end, yt); break;
    case 3: rows_avx2<F, 3>(p, xt, m0, w, n_begin, n_end, yt); break;
    case 4: rows_avx2<F, 4>(p, xt, m0, w, n_begin, n_end, yt); break;
    case 5: rows_avx2<F, 5>(p, xt, m0, w, n_begin, n_end, yt); break;
    case 6: rows_avx2<F, 6>(p, xt, m0, w, n_begin, n_end, yt); break;
    case 7: rows_avx2<F, 7>(p, xt, m0, w, n_begin, n_end, yt); break;
    default: rows_avx2<F, 8>(p, xt, m0, w, n_begin, n_end, yt); break;
  }
}

#endif  // SB_X86

// --------------------------------------------------------------------------------------
// Driver: work split and threading.
// --------------------------------------------------------------------------------------

template <Format F>
void run(const Problem& p, int num_threads, int tile_w, bool use_avx2) {
  const int64_t M = p.M, N = p.N;
  const int64_t n_mtiles = (M + tile_w - 1) / tile_w;
  // Split N only when M tiles alone cannot feed the threads evenly (small batches).
  int64_t n_chunks = 1;
  if (num_threads > 1 && n_mtiles < 8 * num_threads && n_mtiles % num_threads != 0) {
    n_chunks = num_threads * 2;
  }
  const int64_t n_groups = (N + kGroup - 1) / kGroup;
  n_chunks = std::max<int64_t>(1, std::min(n_chunks, n_groups));
  const int64_t groups_per_chunk = (n_groups + n_chunks - 1) / n_chunks;
  const int64_t n_items = n_mtiles * n_chunks;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n_items)));

#pragma omp parallel num_threads(nt)
  {
    static thread_local Scratch xt_buf, yt_buf;
    float* xt = xt_buf.get(static_cast<size_t>(p.Kpad) * kMaxW);
    float* yt = yt_buf.get(static_cast<size_t>(p.nb) * kMaxW);
    int64_t cached_tile = -1;  // items are tile-major: consecutive ones reuse the XT tile
#pragma omp for schedule(static)
    for (int64_t it = 0; it < n_items; ++it) {
      const int64_t t = it / n_chunks, c = it % n_chunks;
      const int64_t m0 = t * tile_w;
      const int64_t w = std::min<int64_t>(tile_w, M - m0);
      const int64_t n_begin = std::min(N, c * groups_per_chunk * kGroup);
      const int64_t n_end = std::min(N, (c + 1) * groups_per_chunk * kGroup);
      if (n_begin >= n_end) continue;
      const bool ready = (t == cached_tile);
#if SB_X86
      if (use_avx2) {
        item_avx2<F>(p, m0, w, n_begin, n_end, xt, yt, ready);
      } else {
        item_generic<F>(p, m0, w, n_begin, n_end, xt, yt, ready);
      }
#else
      (void)use_avx2;
      item_generic<F>(p, m0, w, n_begin, n_end, xt, yt, ready);
#endif
      cached_tile = t;
    }
  }
}

// Raw entry point: minimal checks (the checked API lives in sparse_linear.py).
torch::Tensor spmm(const torch::Tensor& x, const torch::Tensor& row_ptr,
                   const torch::Tensor& col, const torch::Tensor& val,
                   const c10::optional<torch::Tensor>& bias, int64_t N, int64_t fmt,
                   int64_t k_chunk, int64_t num_threads, int64_t tile_w, int64_t n_block,
                   bool force_generic) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "spmm: x must be a contiguous float32 [M, K] tensor");
  TORCH_CHECK(fmt == 0 || fmt == 1, "spmm: fmt must be 0 (csr) or 1 (block4)");
  TORCH_CHECK(tile_w >= 8 && tile_w <= kMaxW && tile_w % 8 == 0,
              "spmm: tile_w must be a multiple of 8 in [8, 64]");
  TORCH_CHECK(n_block >= kGroup && n_block % kGroup == 0, "spmm: n_block must be a multiple of 8");
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t n_kc = k_chunk > 0 ? (K + k_chunk - 1) / k_chunk : 1;
  TORCH_CHECK(N >= 0 && row_ptr.numel() == n_kc * N + 1,
              "spmm: row_ptr must have ceil(K / k_chunk) * N + 1 entries");
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  Problem p;
  p.x = x.data_ptr<float>();
  p.y = y.data_ptr<float>();
  p.bias = (bias.has_value() && bias->defined()) ? bias->data_ptr<float>() : nullptr;
  p.row_ptr = row_ptr.data_ptr<int32_t>();
  p.col = col.data_ptr<int32_t>();
  p.val = val.data_ptr<float>();
  p.M = M; p.N = N; p.K = K;
  p.Kpad = fmt == 1 ? (K + 3) / 4 * 4 : K;
  p.n_kc = n_kc;
  p.nb = n_block;
  const bool avx2 = cpu_has_avx2_fma() && !force_generic;
  const int threads = static_cast<int>(std::max<int64_t>(1, num_threads));
  if (fmt == 0) run<Format::CSR>(p, threads, static_cast<int>(tile_w), avx2);
  else run<Format::BLOCK4>(p, threads, static_cast<int>(tile_w), avx2);
  return y;
}

std::string isa() { return cpu_has_avx2_fma() ? "avx2_fma" : "generic"; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsebert sparse x dense kernels (unchecked; use sparsebert.engine.SparseLinear)";
  m.def("spmm", &spmm, "Y = X @ W^T (+ bias) with W packed as CSR (fmt=0) or BLOCK4 (fmt=1)",
        py::arg("x"), py::arg("row_ptr"), py::arg("col"), py::arg("val"), py::arg("bias"),
        py::arg("n"), py::arg("fmt"), py::arg("k_chunk"), py::arg("num_threads"),
        py::arg("tile_w") = 64, py::arg("n_block") = 32, py::arg("force_generic") = false, py::call_guard<py::gil_scoped_release>());
  m.def("isa", &isa, "instruction set the kernels dispatch to on this CPU");
}
