// Sparse-weight x dense-activation kernels for SparseLinear (FP32).
//
// Computes Y[M, N] = X[M, K] @ W[N, K]^T (+ bias[N]) where W is sparse and packed once
// (by sparse_linear.py; the layout is described there and summarised here).
//
// Packed weight ("chunked, count-sorted CSR"):
//   K is cut into n_kc chunks of kc inputs, N into blocks of nb output rows.
//   For chunk c, slot i (0 <= i < N; slots of block j are j*nb .. j*nb+nb-1):
//     order[c*N + i]                 output row n processed at that slot (a row of block j)
//     row_ptr[c*N + i .. c*N + i+1]  its entries in col/val (the chunk-c nonzeros of row n)
//   Inside a (chunk, block) the rows are sorted by entry count, so the inner loop's trip
//   count repeats from row to row and its exit branch is predicted (measured +25-35%).
//   CSR    : col[e] = k,                         val[e]           = W[n, k]
//   BLOCK4 : col[e] = k (multiple of 4),         val[4e .. 4e+3]  = W[n, k .. k+3]
//   Q8     : as BLOCK4 with int8 values (per-output-channel symmetric weights, scale wscale[n])
//   Q8P    : pairs of any two nonzeros of a row chunk: col[2e], col[2e+1] = k_a, k_b (k_a < k_b, or
//            k_b = k_a with weight 0 for an odd count), wpair[e] = int16 w_a | int16 w_b << 16
//
// Strategy (the XNNPACK / DeepSparse "sparse x NCHW" idea applied to tokens):
//   * Split M into tiles of W8 = 8*R tokens (R <= 8 AVX2 registers; a ragged last tile
//     uses the smallest R that covers it, so M=1 does not pay for 64 tokens).
//   * Transpose the X tile into a thread-local buffer XT[Kpad][W8] (tokens contiguous).
//   * For each block of nb output rows keep the accumulators YT[nb][W8] in L1 and apply
//     the chunks one by one: the kc rows of XT a chunk touches also fit in L1, so every
//     nonzero is one broadcast + R FMAs on L1-resident aligned vectors:
//         YT[n, 0..W8) += w_nk * XT[k, 0..W8)
//   * Write the block to Y with 8x8 register transposes (bias added there), so neither
//     X^T nor Y^T goes through main memory.
//   * Work items are (M tile, N range) pairs; N is only split when there are too few M
//     tiles to keep all threads busy (small batches).
//
// INT8 (Q8, spmm_q8): X is quantized per tensor on the fly while its tile is packed, to 7-bit
// unsigned values (q = clamp(round(x / sx) + zp, 0, 127), "reduce_range" as in FBGEMM / ONNX
// Runtime on CPUs without VNNI) laid out XQ[k/4][W8][4] (the 4 inputs of a quad next to each
// other per token). Per stored quad and 8 tokens: _mm256_maddubs_epi16 (u8 x s8 -> pairs summed to
// int16; 7-bit activations keep 2 * 127 * 127 below the int16 saturation point) then
// _mm256_madd_epi16 with ones (-> int32) and an int32 add. The int32 tile is turned back to
// float once per block:  y = float(acc - zp * wsum[n]) * (sx * wscale[n]) + bias[n].
//
// Epilogue: with an activation (GELU, ReLU) or a requested output range, the finished float
// block (bias added) goes through one more pass while it is in L1, so the activation costs no
// extra pass over memory and the next INT8 layer needs no min/max pass over its input.
// The vector GELU uses Eigen's rational approximation of erf on [-4, 4] (|error| < 5e-7; erf is
// +-1 in float32 beyond), the tanh form a Cephes-style exp (relative error < 2e-7).
//
// INT8 pairs (Q8P): unstructured sparsity leaves most quads with one nonzero, so quads waste 3/4
// of the work. Pairs of *any* two nonzeros of a row use all of it: the activations are kept as
// int16 XP[K][W16] (tokens contiguous, permuted within each 16 so that the lane-wise unpack below
// yields tokens in order); per pair and 16 tokens: _mm256_unpacklo/hi_epi16(x_a, x_b) interleave the
// two input rows, _mm256_madd_epi16 with the broadcast (w_a, w_b) gives 8 + 8 int32 sums. No
// saturation is possible (int16 x int16 products, int32 sums).
//
// Fused kernels (one parallel region each, intermediates in per-thread scratch that stays in L2):
//   spmm_ffn / spmm_ffn_q8  FFN1 -> activation -> FFN2 a 64-token tile at a time (INT8: the hidden tile is
//                           quantized per token, from its own range, before FFN2 packs it);
//   attention_block         QKV -> attention (attention.cpp) -> output layer a sequence at a time (INT8:
//                           the context quantized per token);
// both optionally finish with BERT's residual add + LayerNorm on their output rows (AddNorm).
//
// ISA: the AVX2/FMA code is compiled through __attribute__((target)) and chosen at run
// time with __builtin_cpu_supports, so one cached build runs on any x86-64 CPU; the
// portable path (plain C++ the compiler may auto-vectorise) is used elsewhere, incl. ARM.
// Where the CPU has AVX-512, only the hot loops change (same packed layouts, same sums):
// FP32 on 16-float registers, INT8 quads with vpdpbusd, INT8 pairs with vpdpwssd (VNNI);
// tiles of an odd number of 8-token registers keep the AVX2 loop. SPARSEBERT_NO_AVX512=1
// keeps the AVX2 loops everywhere.

// Narrow includes instead of <torch/extension.h>: the JIT build takes ~7 s of CPU
// instead of ~33 s.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define SB_X86 1
#include <immintrin.h>
#include "simd_math.h"
#define SB_AVX2 __attribute__((target("avx2,fma")))
#define SB_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma")))
#define SB_VNNI __attribute__((target("avx512f,avx512vl,avx512bw,avx512vnni,avx2,fma")))
#else
#define SB_X86 0
#endif

namespace sparsebert {
// attention.cpp: one sequence, all heads, on the calling thread (feature-major, row stride S).
void attention_sequence(const float* qkv, const float* mask, float* out, int64_t S, int64_t heads, int64_t head_dim,
                        bool avx512);
// layernorm.cpp: rows m0 .. m1 of a = LayerNorm(a + r) in place (isa 0 portable, 1 AVX2, 2 AVX-512); with
// `range`, lo / hi take in the outputs' min / max.
void add_layernorm_rows(float* a, const float* r, const float* gamma, const float* beta, int64_t m0, int64_t m1,
                        int64_t H, float eps, int isa, bool range, float& lo, float& hi);
}  // namespace sparsebert

namespace {

constexpr int kMaxR = 8;          // accumulators per output row -> widest tile: 64 tokens
constexpr int kMaxW = 8 * kMaxR;  // widest M tile
constexpr int kGroup = 8;         // output rows per 8x8 output transpose

enum class Format { CSR, BLOCK4, Q8, Q8P };

// What this CPU runs, read once from cpuid. AVX-512F: the FP32 hot loop on 16-token registers
// (half the loads and FMAs per nonzero); VNNI: the INT8 hot loops with one vpdpbusd / vpdpwssd per
// 16 tokens (same results). SPARSEBERT_NO_AVX512=1 keeps the AVX2 loops (A/B runs, tests of both paths).
struct CpuFeatures {
  bool avx2_fma = false, avx512 = false, vnni = false;
};

const CpuFeatures& cpu() {
  static const CpuFeatures f = [] {
    CpuFeatures c;
#if SB_X86
    c.avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    c.avx512 = c.avx2_fma && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               !std::getenv("SPARSEBERT_NO_AVX512");
    c.vnni = c.avx512 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
#endif
    return c;
  }();
  return f;
}

// Thread-local, 64-byte aligned scratch that only grows: avoids malloc + page faults per
// call (they cost as much as a whole small layer).
struct Scratch {
  float* ptr = nullptr;
  size_t cap = 0;
  float* get(size_t n) {
    if (n > cap) {
      std::free(ptr);
      const size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
      ptr = static_cast<float*>(std::aligned_alloc(64, bytes));
      TORCH_CHECK(ptr != nullptr, "sparse_kernels: out of memory for scratch buffer");
      cap = n;
    }
    return ptr;
  }
  ~Scratch() { std::free(ptr); }
};

struct Problem {
  const float* x;           // [M, K] row-major, or [K, M] if x_t
  float* y;                 // [M, N] row-major, or [N, M] if y_t
  const float* bias;        // [N] or nullptr
  const int32_t* order;     // [n_kc * N]
  const int32_t* row_ptr;   // [n_kc * N + 1]
  const int32_t* col;       // [entries]
  const float* val;         // [entries] (CSR) or [4 * entries] (BLOCK4)
  int64_t M, N, K;
  int64_t Kpad;             // K rounded up to the block size (XT rows, zero padded)
  int64_t n_kc;             // number of K chunks
  int64_t nb;               // output rows per block
  bool x_t = false, y_t = false;  // feature-major ("transposed") activations: no transposes needed
  // Q8 only
  const int8_t* qval = nullptr;    // [4 * entries] int8 weights, a quad per entry
  const float* wscale = nullptr;   // [N] weight scale per output row
  const int32_t* wsum = nullptr;   // [N] sum of the row's int8 weights (zero-point correction)
  float x_scale = 1.0f, x_inv_scale = 1.0f;
  int32_t x_zp = 0;
  // INT8 per-token activation quantization (set: replaces x_scale / x_inv_scale / x_zp): entry i is
  // token tok_m0 + i's (scale, 1 / scale, zero point). Readable up to the last token's 64-token tile.
  const float* x_scale_tok = nullptr;
  const float* x_inv_tok = nullptr;
  const int32_t* x_zp_tok = nullptr;
  int64_t tok_m0 = 0;
  // Epilogue (all formats): activation applied to y (after bias), and the range of y.
  int act = 0;                // 0 none, 1 GELU (erf), 2 GELU (tanh approximation), 3 ReLU
  float* minmax = nullptr;    // if set: receives min(y), max(y)
  bool avx512 = false;        // FP32: run the hot loop on 512-bit registers (tiles of 16k tokens)
  float* h_out = nullptr;     // fused FFN (spmm_ffn): finished blocks stay here, XT layout [N][W8], not stored to y
  bool vnni = false;          // INT8: run the hot loops with AVX-512 VNNI (tiles of 16k / 32k tokens)
};

// Residual add + LayerNorm applied by a fused kernel to the output rows it has just finished, while they
// are in cache (BERT's "Add & Norm" after the attention block and after the FFN): y = LN(y + residual).
// With minmax, its range (the next INT8 layer's per-tensor quantization range) is measured there too.
struct AddNorm {
  const float* residual = nullptr;  // [M, H] token-major, as y; nullptr: no epilogue
  const float* gamma = nullptr;
  const float* beta = nullptr;
  float eps = 0.0f;
  float* minmax = nullptr;          // [2] or nullptr
  int isa = 0;                      // 0 portable, 1 AVX2, 2 AVX-512
};

// Applies `ln` to rows m0 .. m1 of y [M, H] (a no-op without a residual); lo / hi take in the range.
inline void add_norm_rows(const AddNorm& ln, float* y, int64_t H, int64_t m0, int64_t m1, float& lo, float& hi) {
  if (ln.residual != nullptr)
    sparsebert::add_layernorm_rows(y, ln.residual, ln.gamma, ln.beta, m0, m1, H, ln.eps, ln.isa, ln.minmax != nullptr, lo,
                                   hi);
}

// Folds a thread's range into ln.minmax (inside the parallel region, after the thread's last rows).
inline void add_norm_reduce(const AddNorm& ln, float lo, float hi) {
  if (ln.residual == nullptr || ln.minmax == nullptr) return;
#pragma omp critical(sparsebert_addnorm_range)
  {
    ln.minmax[0] = std::min(ln.minmax[0], lo);
    ln.minmax[1] = std::max(ln.minmax[1], hi);
  }
}

// Activation quantization parameters of token m: its own (per-token mode) or the tensor's.
inline float inv_of(const Problem& p, int64_t m) { return p.x_inv_tok ? p.x_inv_tok[m - p.tok_m0] : p.x_inv_scale; }
inline int32_t zp_of(const Problem& p, int64_t m) { return p.x_zp_tok ? p.x_zp_tok[m - p.tok_m0] : p.x_zp; }

// Range of the outputs a thread stored (reduced over threads at the end of run()).
thread_local float tl_min, tl_max;

// Threads of the last parallel region (reported to Python for checks).
std::atomic<int> g_last_threads{0};

// Feature-major I/O: XT tile rows are plain copies, Y^T rows plain stores (+ bias).
// Compiled twice (portable / AVX2) so the copy loops vectorise to the target.
#define SB_TRANSPOSED_IO(ATTR, SUFFIX)                                                      \
  ATTR void pack_xt_t_##SUFFIX(const Problem& p, int64_t m0, int64_t w, int W8, float* xt) { \
    for (int64_t k = 0; k < p.Kpad; ++k) {                                                  \
      float* dst = xt + k * W8;                                                             \
      const float* src = p.x + k * p.M + m0;                                                \
      const int64_t valid = k < p.K ? w : 0;                                                \
      for (int64_t j = 0; j < valid; ++j) dst[j] = src[j];                                  \
      for (int64_t j = valid; j < W8; ++j) dst[j] = 0.0f;                                   \
    }                                                                                       \
  }                                                                                         \
  ATTR void store_yt_t_##SUFFIX(const Problem& p, const float* yt, int W8, int64_t m0,      \
                                int64_t w, int64_t n0, int64_t rows) {                      \
    for (int64_t i = 0; i < rows; ++i) {                                                    \
      const float b = p.bias ? p.bias[n0 + i] : 0.0f;                                       \
      const float* src = yt + i * W8;                                                       \
      float* dst = p.y + (n0 + i) * p.M + m0;                                               \
      for (int64_t j = 0; j < w; ++j) dst[j] = src[j] + b;                                  \
    }                                                                                       \
  }

// ---- epilogue (portable) ----

inline float act_generic(float v, int act) {
  switch (act) {
    case 1: return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
    case 2: return 0.5f * v * (1.0f + std::tanh(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case 3: return v > 0.0f ? v : 0.0f;
    default: return v;
  }
}

// Rows n0 .. n0+rows of a finished float block: (+ bias), activation, range over tokens j < w.
void finish_generic(const Problem& p, float* yt, int W, int64_t w, int64_t n0, int64_t rows, bool add_bias) {
  for (int64_t i = 0; i < rows; ++i) {
    const float b = (add_bias && p.bias) ? p.bias[n0 + i] : 0.0f;
    float* r = yt + i * W;
    for (int64_t j = 0; j < w; ++j) {
      const float v = act_generic(r[j] + b, p.act);
      r[j] = v;
      tl_min = std::min(tl_min, v);
      tl_max = std::max(tl_max, v);
    }
  }
}

// --------------------------------------------------------------------------------------
// Portable path (same structure as the AVX2 path, scalar loops).
// --------------------------------------------------------------------------------------

SB_TRANSPOSED_IO(, generic)

// XT[k][j] = X[m0 + j][k] for j < w; zero for w <= j < W8 and for K <= k < Kpad.
void pack_xt_generic(const Problem& p, int64_t m0, int64_t w, int W8, float* xt) {
  if (p.x_t) return pack_xt_t_generic(p, m0, w, W8, xt);
  for (int64_t k = 0; k < p.Kpad; ++k) {
    float* dst = xt + k * W8;
    for (int j = 0; j < W8; ++j) dst[j] = (j < w && k < p.K) ? p.x[(m0 + j) * p.K + k] : 0.0f;
  }
}

// Y[m0 + j][n0 + i] = YT[i][j] (+ bias[n0 + i]) for i < rows, j < w.
void store_yt_generic(const Problem& p, const float* yt, int W8, int64_t m0, int64_t w,
                      int64_t n0, int64_t rows) {
  if (p.y_t) return store_yt_t_generic(p, yt, W8, m0, w, n0, rows);
  for (int64_t j = 0; j < w; ++j) {
    float* dst = p.y + (m0 + j) * p.N + n0;
    for (int64_t i = 0; i < rows; ++i) dst[i] = yt[i * W8 + j] + (p.bias ? p.bias[n0 + i] : 0.0f);
  }
}

template <Format F>
void row_chunk_generic(const Problem& p, const float* xt, int W8, int64_t e0, int64_t e1,
                       float* out) {
  float acc[kMaxW];
  for (int j = 0; j < W8; ++j) acc[j] = out[j];
  for (int64_t e = e0; e < e1; ++e) {
    const float* xr = xt + static_cast<int64_t>(p.col[e]) * W8;
    if (F == Format::CSR) {
      const float w = p.val[e];
      for (int j = 0; j < W8; ++j) acc[j] += w * xr[j];
    } else {
      const float* wv = p.val + 4 * e;
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
    float* yb = p.h_out ? p.h_out + nb0 * W8 : yt;
    std::memset(yb, 0, sizeof(float) * (nb1 - nb0) * W8);
    for (int64_t c = 0; c < p.n_kc; ++c) {
      const int32_t* rp = p.row_ptr + c * p.N;
      const int32_t* ord = p.order + c * p.N;
      for (int64_t i = nb0; i < nb1; ++i)
        row_chunk_generic<F>(p, xt, W8, rp[i], rp[i + 1], yb + (ord[i] - nb0) * W8);
    }
    if (p.h_out) {  // fused FFN: bias + activation in place, the block is the next layer's XT rows
      finish_generic(p, yb, W8, w, nb0, nb1 - nb0, true);
      continue;
    }
    const bool fin = p.act != 0 || p.minmax != nullptr;
    if (fin) finish_generic(p, yt, W8, w, nb0, nb1 - nb0, true);
    Problem pf = p;
    if (fin) pf.bias = nullptr;  // added by the epilogue
    for (int64_t g = nb0; g < nb1; g += kGroup)
      store_yt_generic(pf, yt + (g - nb0) * W8, W8, m0, w, g, std::min<int64_t>(kGroup, nb1 - g));
  }
}

// ---- Q8 (portable) ----

inline uint8_t quantize_generic(float x, float inv, int32_t zp) {
  const int32_t q = static_cast<int32_t>(std::nearbyint(x * inv)) + zp;
  return static_cast<uint8_t>(q < 0 ? 0 : (q > 127 ? 127 : q));
}

// XQ byte (k, j) at ((k / 4) * W8 + j) * 4 + k % 4 = k * W8 + 4 j for k a multiple of 4;
// zero for w <= j < W8 and K <= k < Kpad (their weights or outputs are never used).
void pack_xq_generic(const Problem& p, int64_t m0, int64_t w, int W8, uint8_t* xq) {
  for (int64_t k = 0; k < p.Kpad; ++k)
    for (int j = 0; j < W8; ++j) {
      uint8_t q = 0;
      if (j < w && k < p.K) {
        const float v = p.x_t ? p.x[k * p.M + m0 + j] : p.x[(m0 + j) * p.K + k];
        q = quantize_generic(v, inv_of(p, m0 + j), zp_of(p, m0 + j));
      }
      xq[((k >> 2) * W8 + j) * 4 + (k & 3)] = q;
    }
}

void q8_row_generic(const uint8_t* xq, int W8, const int32_t* col, const int8_t* qval,
                    int64_t e0, int64_t e1, int32_t* out) {
  int32_t acc[kMaxW];
  for (int j = 0; j < W8; ++j) acc[j] = out[j];
  for (int64_t e = e0; e < e1; ++e) {
    const uint8_t* xr = xq + static_cast<int64_t>(col[e]) * W8;
    const int8_t* wv = qval + 4 * e;
    for (int j = 0; j < W8; ++j)
      acc[j] += xr[4 * j] * wv[0] + xr[4 * j + 1] * wv[1] + xr[4 * j + 2] * wv[2] + xr[4 * j + 3] * wv[3];
  }
  for (int j = 0; j < W8; ++j) out[j] = acc[j];
}

// int32 accumulators of output rows n0 .. n0+rows (YT rows, tokens m0 ..) -> float, in place:
// y = float(acc - zp * wsum[n]) * (sx * wscale[n]) + bias[n], (sx, zp) the tensor's or each token's.
void q8_dequant_generic(const Problem& p, int32_t* yt, int W8, int64_t m0, int64_t n0, int64_t rows) {
  const float* sx = p.x_scale_tok ? p.x_scale_tok + (m0 - p.tok_m0) : nullptr;
  const int32_t* zp = p.x_zp_tok ? p.x_zp_tok + (m0 - p.tok_m0) : nullptr;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t n = n0 + i;
    const int32_t c = p.x_zp * p.wsum[n];
    const float s = p.x_scale * p.wscale[n], b = p.bias ? p.bias[n] : 0.0f;
    int32_t* a = yt + i * W8;
    float* f = reinterpret_cast<float*>(a);
    if (sx != nullptr) {
      for (int j = 0; j < W8; ++j) f[j] = static_cast<float>(a[j] - zp[j] * p.wsum[n]) * (sx[j] * p.wscale[n]) + b;
      continue;
    }
    for (int j = 0; j < W8; ++j) f[j] = static_cast<float>(a[j] - c) * s + b;
  }
}

// The block loop of an INT8 work item, both formats (portable): per block of nb output rows, sum
// every K chunk's rows into the int32 tile yt[rows][W] with row(e0, e1, out), dequantize (bias
// added there), run the epilogue, store. int8_blocks_avx2 is its AVX2 twin.
template <typename RowFn>
void int8_blocks_generic(const Problem& p, int64_t m0, int64_t w, int W, int64_t n_begin, int64_t n_end,
                         int32_t* yt, RowFn row) {
  Problem pf = p;
  pf.bias = nullptr;  // added by the dequantization
  for (int64_t nb0 = n_begin; nb0 < n_end; nb0 += p.nb) {
    const int64_t nb1 = std::min(n_end, nb0 + p.nb);
    std::memset(yt, 0, sizeof(int32_t) * (nb1 - nb0) * W);
    for (int64_t c = 0; c < p.n_kc; ++c) {
      const int32_t* rp = p.row_ptr + c * p.N;
      const int32_t* ord = p.order + c * p.N;
      for (int64_t i = nb0; i < nb1; ++i) row(rp[i], rp[i + 1], yt + (ord[i] - nb0) * W);
    }
    q8_dequant_generic(p, yt, W, m0, nb0, nb1 - nb0);
    if (p.act != 0 || p.minmax != nullptr)
      finish_generic(p, reinterpret_cast<float*>(yt), W, w, nb0, nb1 - nb0, false);
    if (p.h_out != nullptr) {  // fused FFN: the finished rows go to the hidden tile [N][W]
      std::memcpy(p.h_out + nb0 * W, yt, sizeof(float) * (nb1 - nb0) * W);
      continue;
    }
    const float* ytf = reinterpret_cast<const float*>(yt);
    for (int64_t g = nb0; g < nb1; g += kGroup)
      store_yt_generic(pf, ytf + (g - nb0) * W, W, m0, w, g, std::min<int64_t>(kGroup, nb1 - g));
  }
}

void item_q8_generic(const Problem& p, int64_t m0, int64_t w, int64_t n_begin, int64_t n_end,
                     uint8_t* xq, int32_t* yt, bool xq_ready) {
  const int W8 = static_cast<int>((w + 7) / 8) * 8;
  if (!xq_ready) pack_xq_generic(p, m0, w, W8, xq);
  int8_blocks_generic(p, m0, w, W8, n_begin, n_end, yt, [&](int64_t e0, int64_t e1, int32_t* out) {
    q8_row_generic(xq, W8, p.col, p.qval, e0, e1, out);
  });
}

// ---- Q8P (portable) ----

// Position of token j (of 16) inside its 16-token group of XP: [0-3, 8-11, 4-7, 12-15], the order
// _mm256_packs_epi32 produces from tokens 0-7 and 8-15 and _mm256_unpack{lo,hi}_epi16 undoes.
inline int xp_pos(int j) {
  const int g = j & ~15, t = j & 15;
  return g + (t & 3) + ((t & 4) << 1) + ((t & 8) >> 1);
}

void pack_xp_generic(const Problem& p, int64_t m0, int64_t w, int W16, int16_t* xp) {
  for (int64_t k = 0; k < p.K; ++k)
    for (int j = 0; j < W16; ++j) {
      int16_t q = 0;
      if (j < w) {
        const float v = p.x_t ? p.x[k * p.M + m0 + j] : p.x[(m0 + j) * p.K + k];
        q = quantize_generic(v, inv_of(p, m0 + j), zp_of(p, m0 + j));
      }
      xp[k * W16 + xp_pos(j)] = q;
    }
}

void q8p_row_generic(const int16_t* xp, int W16, const int32_t* col, const int32_t* wpair,
                     int64_t e0, int64_t e1, int32_t* out) {
  int32_t acc[kMaxW];
  for (int j = 0; j < W16; ++j) acc[j] = out[j];
  for (int64_t e = e0; e < e1; ++e) {
    const int16_t* xa = xp + static_cast<int64_t>(col[2 * e]) * W16;
    const int16_t* xb = xp + static_cast<int64_t>(col[2 * e + 1]) * W16;
    const int32_t wa = static_cast<int16_t>(wpair[e] & 0xFFFF), wb = static_cast<int16_t>(wpair[e] >> 16);
    for (int j = 0; j < W16; ++j) {
      const int q = xp_pos(j);
      acc[j] += xa[q] * wa + xb[q] * wb;
    }
  }
  for (int j = 0; j < W16; ++j) out[j] = acc[j];
}

void item_q8p_generic(const Problem& p, int64_t m0, int64_t w, int64_t n_begin, int64_t n_end,
                      int16_t* xp, int32_t* yt, bool xp_ready) {
  const int W16 = static_cast<int>((w + 15) / 16) * 16;
  if (!xp_ready) pack_xp_generic(p, m0, w, W16, xp);
  const int32_t* wpair = reinterpret_cast<const int32_t*>(p.qval);
  int8_blocks_generic(p, m0, w, W16, n_begin, n_end, yt, [&](int64_t e0, int64_t e1, int32_t* out) {
    q8p_row_generic(xp, W16, p.col, wpair, e0, e1, out);
  });
}

// --------------------------------------------------------------------------------------
// AVX2 + FMA path.
// --------------------------------------------------------------------------------------
#if SB_X86

SB_AVX2 inline void transpose8x8(__m256& r0, __m256& r1, __m256& r2, __m256& r3, __m256& r4,
                                 __m256& r5, __m256& r6, __m256& r7) {
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r0 = _mm256_permute2f128_ps(s0, s4, 0x20); r1 = _mm256_permute2f128_ps(s1, s5, 0x20);
  r2 = _mm256_permute2f128_ps(s2, s6, 0x20); r3 = _mm256_permute2f128_ps(s3, s7, 0x20);
  r4 = _mm256_permute2f128_ps(s0, s4, 0x31); r5 = _mm256_permute2f128_ps(s1, s5, 0x31);
  r6 = _mm256_permute2f128_ps(s2, s6, 0x31); r7 = _mm256_permute2f128_ps(s3, s7, 0x31);
}

SB_TRANSPOSED_IO(SB_AVX2, avx2)

// XT tile from X rows m0 .. m0+w: full 8x8 blocks through registers, edges scalar.
SB_AVX2 void pack_xt_avx2(const Problem& p, int64_t m0, int64_t w, int W8, float* xt) {
  if (p.x_t) return pack_xt_t_avx2(p, m0, w, W8, xt);
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
        for (int j = 0; j < 8; ++j) xt[k * W8 + j0 + j] = k < K ? src[j * K + k] : 0.0f;
    } else {  // ragged last tokens of the matrix: zero-fill the missing ones
      for (int64_t k = 0; k < p.Kpad; ++k)
        for (int j = 0; j < 8; ++j)
          xt[k * W8 + j0 + j] = (j0 + j < w && k < K) ? p.x[(m0 + j0 + j) * K + k] : 0.0f;
    }
  }
}

// Y[m0 + j][n0 .. n0+8) = YT[0..8)[j] + bias for j < w, through 8x8 transposes.
SB_AVX2 void store_yt_avx2(const Problem& p, const float* yt, int W8, int64_t m0, int64_t w,
                           int64_t n0, int64_t rows) {
  if (p.y_t) return store_yt_t_avx2(p, yt, W8, m0, w, n0, rows);
  if (rows != kGroup) {
    store_yt_generic(p, yt, W8, m0, w, n0, rows);
    return;
  }
  const __m256 b = p.bias ? _mm256_loadu_ps(p.bias + n0) : _mm256_setzero_ps();
  for (int64_t j0 = 0; j0 < w; j0 += 8) {
    __m256 r[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_load_ps(yt + i * W8 + j0);
    transpose8x8(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]);
    const int64_t valid = std::min<int64_t>(8, w - j0);
    float* dst = p.y + (m0 + j0) * p.N + n0;
    for (int64_t j = 0; j < valid; ++j) _mm256_storeu_ps(dst + j * p.N, _mm256_add_ps(r[j], b));
  }
}

// THE HOT LOOP: one (output row, K chunk) pair against the XT tile, R accumulators of
// 8 tokens each:   out[0 .. 8R) += sum_e w_e * XT[col_e, 0 .. 8R)
// CSR: per nonzero 1 broadcast + R aligned loads + R FMAs, unrolled by 4 (measured
// ~1.45 vs ~1.15 FMA/cycle: more independent index/broadcast loads in flight).
// BLOCK4: one index per 4 weights, the 4 XT rows are consecutive.
template <Format F, int R>
SB_AVX2 inline void sparse_row_fma_avx2(const float* __restrict xt,
                                        const int32_t* __restrict col,
                                        const float* __restrict val, int64_t e0, int64_t e1,
                                        float* __restrict out) {
  constexpr int W8 = 8 * R;
  if (e0 == e1) return;
  __m256 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = _mm256_load_ps(out + 8 * r);
  int64_t e = e0;
  if (F == Format::CSR) {
    for (; e + 4 <= e1; e += 4) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        const __m256 w = _mm256_broadcast_ss(val + e + u);
        const float* xr = xt + static_cast<int64_t>(col[e + u]) * W8;
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(w, _mm256_load_ps(xr + 8 * r), acc[r]);
      }
    }
    for (; e < e1; ++e) {
      const __m256 w = _mm256_broadcast_ss(val + e);
      const float* xr = xt + static_cast<int64_t>(col[e]) * W8;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(w, _mm256_load_ps(xr + 8 * r), acc[r]);
    }
  } else {
    for (; e < e1; ++e) {
      const float* wv = val + 4 * e;
      const float* xr = xt + static_cast<int64_t>(col[e]) * W8;
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

// ---- epilogue (AVX2) ----

// 1 / d (12-bit estimate + one Newton step: relative error ~1e-7, cheaper than a division).
SB_AVX2 inline __m256 rcp_avx2(__m256 d) {
  const __m256 r = _mm256_rcp_ps(d);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
}

template <int ACT>
SB_AVX2 inline __m256 act_avx2(__m256 v) {
  const __m256 half_v = _mm256_mul_ps(_mm256_set1_ps(0.5f), v);
  if constexpr (ACT == 1) {  // 0.5 v (1 + erf(v / sqrt 2)), erf as Eigen's float rational approximation (kErfNum)
    const __m256 z = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v, _mm256_set1_ps(0.70710678118654752f)),
                                                 _mm256_set1_ps(-4.0f)), _mm256_set1_ps(4.0f));
    const __m256 z2 = _mm256_mul_ps(z, z);
    __m256 num = _mm256_set1_ps(sparsebert::kErfNum[0]), den = _mm256_set1_ps(sparsebert::kErfDen[0]);
    for (int i = 1; i < 7; ++i) num = _mm256_fmadd_ps(z2, num, _mm256_set1_ps(sparsebert::kErfNum[i]));
    for (int i = 1; i < 5; ++i) den = _mm256_fmadd_ps(z2, den, _mm256_set1_ps(sparsebert::kErfDen[i]));
    num = _mm256_mul_ps(z, num);
    return _mm256_fmadd_ps(half_v, _mm256_mul_ps(num, rcp_avx2(den)), half_v);
  }
  if constexpr (ACT == 2) {  // 0.5 v (1 + tanh(u)), tanh(u) = 1 - 2 / (1 + exp(2u))
    const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.79788456080286536f),
                                   _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v), _mm256_mul_ps(v, v), v));
    const __m256 e = sparsebert::exp_avx2(_mm256_add_ps(u, u));
    const __m256 r = rcp_avx2(_mm256_add_ps(e, _mm256_set1_ps(1.0f)));
    const __m256 th = _mm256_fnmadd_ps(_mm256_set1_ps(2.0f), r, _mm256_set1_ps(1.0f));
    return _mm256_fmadd_ps(half_v, th, half_v);
  }
  if constexpr (ACT == 3) return _mm256_max_ps(v, _mm256_setzero_ps());
  return v;
}

template <int ACT>
SB_AVX2 void finish_act_avx2(const Problem& p, float* yt, int W, int64_t w, int64_t n0, int64_t rows, bool add_bias) {
  __m256 mn = _mm256_set1_ps(tl_min), mx = _mm256_set1_ps(tl_max);
  const int64_t wfull = w / 8 * 8;
  for (int64_t i = 0; i < rows; ++i) {
    const __m256 b = _mm256_set1_ps((add_bias && p.bias) ? p.bias[n0 + i] : 0.0f);
    float* r = yt + i * W;
    int64_t j = 0;
    for (; j < wfull; j += 8) {
      const __m256 v = act_avx2<ACT>(_mm256_add_ps(_mm256_load_ps(r + j), b));
      _mm256_store_ps(r + j, v);
      mn = _mm256_min_ps(mn, v);
      mx = _mm256_max_ps(mx, v);
    }
    if (j < w) {  // ragged tokens: the whole vector is computed, only valid ones count
      const __m256 v = act_avx2<ACT>(_mm256_add_ps(_mm256_load_ps(r + j), b));
      _mm256_store_ps(r + j, v);
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, v);
      for (int64_t q = 0; q < w - j; ++q) {
        tl_min = std::min(tl_min, tmp[q]);
        tl_max = std::max(tl_max, tmp[q]);
      }
    }
  }
  alignas(32) float a[8], c[8];
  _mm256_store_ps(a, mn);
  _mm256_store_ps(c, mx);
  for (int q = 0; q < 8; ++q) {
    tl_min = std::min(tl_min, a[q]);
    tl_max = std::max(tl_max, c[q]);
  }
}

SB_AVX2 void finish_avx2(const Problem& p, float* yt, int W, int64_t w, int64_t n0, int64_t rows, bool add_bias) {
  switch (p.act) {
    case 1: finish_act_avx2<1>(p, yt, W, w, n0, rows, add_bias); break;
    case 2: finish_act_avx2<2>(p, yt, W, w, n0, rows, add_bias); break;
    case 3: finish_act_avx2<3>(p, yt, W, w, n0, rows, add_bias); break;
    default: finish_act_avx2<0>(p, yt, W, w, n0, rows, add_bias); break;
  }
}

// AVX-512 epilogue: the AVX2 one on 16-float registers (same polynomials), for the AVX-512 rows, whose
// W is a multiple of 16 (the FFN1 GELU runs over every one of the [M, 4H] outputs).
SB_AVX512 inline __m512 rcp_avx512(__m512 d) {  // 14-bit estimate + one Newton step
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

template <int ACT>
SB_AVX512 inline __m512 act_avx512(__m512 v) {
  const __m512 half_v = _mm512_mul_ps(_mm512_set1_ps(0.5f), v);
  if constexpr (ACT == 1) {  // as act_avx2<1>: Eigen's rational erf
    const __m512 z = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f)),
                                                 _mm512_set1_ps(-4.0f)), _mm512_set1_ps(4.0f));
    const __m512 z2 = _mm512_mul_ps(z, z);
    __m512 num = _mm512_set1_ps(sparsebert::kErfNum[0]), den = _mm512_set1_ps(sparsebert::kErfDen[0]);
    for (int i = 1; i < 7; ++i) num = _mm512_fmadd_ps(z2, num, _mm512_set1_ps(sparsebert::kErfNum[i]));
    for (int i = 1; i < 5; ++i) den = _mm512_fmadd_ps(z2, den, _mm512_set1_ps(sparsebert::kErfDen[i]));
    num = _mm512_mul_ps(z, num);
    return _mm512_fmadd_ps(half_v, _mm512_mul_ps(num, rcp_avx512(den)), half_v);
  }
  if constexpr (ACT == 2) {  // as act_avx2<2>
    const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.79788456080286536f),
                                   _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), v), _mm512_mul_ps(v, v), v));
    const __m512 e = sparsebert::exp_avx512(_mm512_add_ps(u, u));
    const __m512 r = rcp_avx512(_mm512_add_ps(e, _mm512_set1_ps(1.0f)));
    const __m512 th = _mm512_fnmadd_ps(_mm512_set1_ps(2.0f), r, _mm512_set1_ps(1.0f));
    return _mm512_fmadd_ps(half_v, th, half_v);
  }
  if constexpr (ACT == 3) return _mm512_max_ps(v, _mm512_setzero_ps());
  return v;
}

template <int ACT>
SB_AVX512 void finish_act_avx512(const Problem& p, float* yt, int W, int64_t w, int64_t n0, int64_t rows,
                                 bool add_bias) {
  __m512 mn = _mm512_set1_ps(tl_min), mx = _mm512_set1_ps(tl_max);
  const int64_t wfull = w / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (w - wfull)) - 1u);  // valid tokens of the ragged vector
  for (int64_t i = 0; i < rows; ++i) {
    const __m512 b = _mm512_set1_ps((add_bias && p.bias) ? p.bias[n0 + i] : 0.0f);
    float* r = yt + i * W;
    int64_t j = 0;
    for (; j < wfull; j += 16) {
      const __m512 v = act_avx512<ACT>(_mm512_add_ps(_mm512_load_ps(r + j), b));
      _mm512_store_ps(r + j, v);
      mn = _mm512_min_ps(mn, v);
      mx = _mm512_max_ps(mx, v);
    }
    if (j < w) {  // the whole vector is computed, only valid tokens count for the range
      const __m512 v = act_avx512<ACT>(_mm512_add_ps(_mm512_load_ps(r + j), b));
      _mm512_store_ps(r + j, v);
      mn = _mm512_mask_min_ps(mn, tail, mn, v);
      mx = _mm512_mask_max_ps(mx, tail, mx, v);
    }
  }
  tl_min = std::min(tl_min, _mm512_reduce_min_ps(mn));
  tl_max = std::max(tl_max, _mm512_reduce_max_ps(mx));
}

SB_AVX512 void finish_avx512(const Problem& p, float* yt, int W, int64_t w, int64_t n0, int64_t rows, bool add_bias) {
  switch (p.act) {
    case 1: finish_act_avx512<1>(p, yt, W, w, n0, rows, add_bias); break;
    case 2: finish_act_avx512<2>(p, yt, W, w, n0, rows, add_bias); break;
    case 3: finish_act_avx512<3>(p, yt, W, w, n0, rows, add_bias); break;
    default: finish_act_avx512<0>(p, yt, W, w, n0, rows, add_bias); break;
  }
}

// AVX-512 version of the hot loop: the same XT/YT layout, 16 tokens a register. BLOCK4 adds its 4
// weights of an entry into the same R16 registers back to back (a chain of 4-cycle FMAs), so it keeps
// NS = 2 sets of accumulators (weights 0, 2 / 1, 3), summed at the end: +5-8% measured, where the
// same split of CSR's nonzeros measured 1-2% slower (its chains already overlap across entries).
template <Format F, int R16>
SB_AVX512 inline void sparse_row_fma_avx512(const float* __restrict xt,
                                            const int32_t* __restrict col,
                                            const float* __restrict val, int64_t e0, int64_t e1,
                                            float* __restrict out) {
  constexpr int W8 = 16 * R16;
  constexpr int NS = F == Format::BLOCK4 ? 2 : 1;  // accumulator sets
  if (e0 == e1) return;
  __m512 acc[NS][R16];
#pragma GCC unroll 4
  for (int r = 0; r < R16; ++r) {
    acc[0][r] = _mm512_load_ps(out + 16 * r);
#pragma GCC unroll 4
    for (int s = 1; s < NS; ++s) acc[s][r] = _mm512_setzero_ps();
  }
  int64_t e = e0;
  if (F == Format::CSR) {
    for (; e + NS <= e1; e += NS) {
#pragma GCC unroll 4
      for (int s = 0; s < NS; ++s) {
        const __m512 w = _mm512_set1_ps(val[e + s]);
        const float* xr = xt + static_cast<int64_t>(col[e + s]) * W8;
#pragma GCC unroll 4
        for (int r = 0; r < R16; ++r) acc[s][r] = _mm512_fmadd_ps(w, _mm512_load_ps(xr + 16 * r), acc[s][r]);
      }
    }
    for (; e < e1; ++e) {
      const __m512 w = _mm512_set1_ps(val[e]);
      const float* xr = xt + static_cast<int64_t>(col[e]) * W8;
#pragma GCC unroll 4
      for (int r = 0; r < R16; ++r) acc[0][r] = _mm512_fmadd_ps(w, _mm512_load_ps(xr + 16 * r), acc[0][r]);
    }
  } else {
    for (; e < e1; ++e) {
      const float* wv = val + 4 * e;
      const float* xr = xt + static_cast<int64_t>(col[e]) * W8;
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        const __m512 w = _mm512_set1_ps(wv[q]);
#pragma GCC unroll 4
        for (int r = 0; r < R16; ++r)
          acc[q % NS][r] = _mm512_fmadd_ps(w, _mm512_load_ps(xr + q * W8 + 16 * r), acc[q % NS][r]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R16; ++r) {
#pragma GCC unroll 4
    for (int s = 1; s < NS; ++s) acc[0][r] = _mm512_add_ps(acc[0][r], acc[s][r]);
    _mm512_store_ps(out + 16 * r, acc[0][r]);
  }
}

// Output rows [n_begin, n_end) of one M tile, block by block (see the header comment). Defined
// once per hot loop (AVX2: R registers of 8 tokens; AVX-512: R/2 of 16), so the loop inlines.
#define SB_ROWS(ATTR, SUFFIX, ROW_FMA, FINISH)                                                           \
  template <Format F, int R>                                                                    \
  ATTR void rows_##SUFFIX(const Problem& p, const float* xt, int64_t m0, int64_t w,             \
                          int64_t n_begin, int64_t n_end, float* yt) {                          \
    constexpr int W8 = 8 * R;                                                                   \
    for (int64_t nb0 = n_begin; nb0 < n_end; nb0 += p.nb) {                                     \
      const int64_t nb1 = std::min(n_end, nb0 + p.nb);                                          \
      float* yb = p.h_out ? p.h_out + nb0 * W8 : yt;                                            \
      std::memset(yb, 0, sizeof(float) * (nb1 - nb0) * W8);                                    \
      for (int64_t c = 0; c < p.n_kc; ++c) {                                                    \
        const int32_t* rp = p.row_ptr + c * p.N;                                                \
        const int32_t* ord = p.order + c * p.N;                                                 \
        for (int64_t i = nb0; i < nb1; ++i)                                                     \
          ROW_FMA(xt, p.col, p.val, rp[i], rp[i + 1], yb + (ord[i] - nb0) * W8);                \
      }                                                                                         \
      if (p.h_out) { /* fused FFN: finished in place, read as the next layer's XT rows */        \
        FINISH(p, yb, W8, w, nb0, nb1 - nb0, true);                                             \
        continue;                                                                               \
      }                                                                                         \
      const bool fin = p.act != 0 || p.minmax != nullptr;                                       \
      if (fin) FINISH(p, yt, W8, w, nb0, nb1 - nb0, true);                                      \
      Problem pf = p;                                                                           \
      if (fin) pf.bias = nullptr; /* added by the epilogue */                                   \
      for (int64_t g = nb0; g < nb1; g += kGroup)                                               \
        store_yt_avx2(pf, yt + (g - nb0) * W8, W8, m0, w, g, std::min<int64_t>(kGroup, nb1 - g)); \
    }                                                                                           \
  }

#define SB_FMA_AVX2 sparse_row_fma_avx2<F, R>
#define SB_FMA_AVX512 sparse_row_fma_avx512<F, R / 2>
SB_ROWS(SB_AVX2, avx2, SB_FMA_AVX2, finish_avx2)
SB_ROWS(SB_AVX512, avx512, SB_FMA_AVX512, finish_avx512)

template <Format F>
SB_AVX2 void item_avx2(const Problem& p, int64_t m0, int64_t w, int64_t n_begin,
                       int64_t n_end, float* xt, float* yt, bool xt_ready) {
  const int R = static_cast<int>((w + 7) / 8);
  if (!xt_ready) pack_xt_avx2(p, m0, w, 8 * R, xt);
  if (p.avx512 && R % 2 == 0) {  // even R: the tile is whole 16-token registers
    switch (R) {
      case 2: return rows_avx512<F, 2>(p, xt, m0, w, n_begin, n_end, yt);
      case 4: return rows_avx512<F, 4>(p, xt, m0, w, n_begin, n_end, yt);
      case 6: return rows_avx512<F, 6>(p, xt, m0, w, n_begin, n_end, yt);
      default: return rows_avx512<F, 8>(p, xt, m0, w, n_begin, n_end, yt);
    }
  }
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

// ---- Q8 (AVX2) ----

// 8 floats -> 8 int32 in [0, 127]: clamp(round_half_even(x * inv) + zp, 0, 127).
SB_AVX2 inline __m256i quantize8_avx2(__m256 x, __m256 inv, __m256i zp) {
  const __m256i q = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(x, inv)), zp);
  return _mm256_min_epi32(_mm256_max_epi32(q, _mm256_setzero_si256()), _mm256_set1_epi32(127));
}

// The quantization parameters of tokens m .. m+7 (per-token mode) or the tensor's, broadcast.
SB_AVX2 inline __m256 inv8_avx2(const Problem& p, int64_t m) {
  return p.x_inv_tok ? _mm256_loadu_ps(p.x_inv_tok + (m - p.tok_m0)) : _mm256_set1_ps(p.x_inv_scale);
}
SB_AVX2 inline __m256i zp8_avx2(const Problem& p, int64_t m) {
  return p.x_zp_tok ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.x_zp_tok + (m - p.tok_m0)))
                    : _mm256_set1_epi32(p.x_zp);
}

// Four vectors of 8 tokens (inputs k .. k+3, each value in [0, 127]) -> one vector of 8 quads.
SB_AVX2 inline __m256i quad_avx2(__m256i q0, __m256i q1, __m256i q2, __m256i q3) {
  return _mm256_or_si256(_mm256_or_si256(q0, _mm256_slli_epi32(q1, 8)),
                         _mm256_or_si256(_mm256_slli_epi32(q2, 16), _mm256_slli_epi32(q3, 24)));
}

SB_AVX2 void pack_xq_avx2(const Problem& p, int64_t m0, int64_t w, int W8, uint8_t* xq) {
  const int64_t K = p.K;
  for (int64_t j0 = 0; j0 < W8; j0 += 8) {
    if (j0 + 8 > w) {  // ragged last tokens: portable code for this 8-token column
      for (int64_t k = 0; k < p.Kpad; ++k)
        for (int j = 0; j < 8; ++j) {
          uint8_t q = 0;
          if (j0 + j < w && k < K) {
            const int64_t m = m0 + j0 + j;
            q = quantize_generic(p.x_t ? p.x[k * p.M + m] : p.x[m * K + k], inv_of(p, m), zp_of(p, m));
          }
          xq[((k >> 2) * W8 + j0 + j) * 4 + (k & 3)] = q;
        }
      continue;
    }
    const __m256 inv = inv8_avx2(p, m0 + j0);
    const __m256i zp = zp8_avx2(p, m0 + j0);
    int64_t k = 0;
    if (p.x_t) {  // rows of X^T are 8 tokens already
      for (; k + 4 <= K; k += 4) {
        const float* src = p.x + k * p.M + m0 + j0;
        const __m256i v = quad_avx2(quantize8_avx2(_mm256_loadu_ps(src), inv, zp),
                                    quantize8_avx2(_mm256_loadu_ps(src + p.M), inv, zp),
                                    quantize8_avx2(_mm256_loadu_ps(src + 2 * p.M), inv, zp),
                                    quantize8_avx2(_mm256_loadu_ps(src + 3 * p.M), inv, zp));
        _mm256_store_si256(reinterpret_cast<__m256i*>(xq + k * W8 + 4 * j0), v);
      }
    } else {  // 8 tokens x 8 inputs through an 8x8 transpose
      const float* src = p.x + (m0 + j0) * K;
      for (; k + 8 <= K; k += 8) {
        __m256 r0 = _mm256_loadu_ps(src + 0 * K + k), r1 = _mm256_loadu_ps(src + 1 * K + k);
        __m256 r2 = _mm256_loadu_ps(src + 2 * K + k), r3 = _mm256_loadu_ps(src + 3 * K + k);
        __m256 r4 = _mm256_loadu_ps(src + 4 * K + k), r5 = _mm256_loadu_ps(src + 5 * K + k);
        __m256 r6 = _mm256_loadu_ps(src + 6 * K + k), r7 = _mm256_loadu_ps(src + 7 * K + k);
        transpose8x8(r0, r1, r2, r3, r4, r5, r6, r7);
        const __m256i a = quad_avx2(quantize8_avx2(r0, inv, zp), quantize8_avx2(r1, inv, zp),
                                    quantize8_avx2(r2, inv, zp), quantize8_avx2(r3, inv, zp));
        const __m256i b = quad_avx2(quantize8_avx2(r4, inv, zp), quantize8_avx2(r5, inv, zp),
                                    quantize8_avx2(r6, inv, zp), quantize8_avx2(r7, inv, zp));
        _mm256_store_si256(reinterpret_cast<__m256i*>(xq + k * W8 + 4 * j0), a);
        _mm256_store_si256(reinterpret_cast<__m256i*>(xq + (k + 4) * W8 + 4 * j0), b);
      }
    }
    for (; k < p.Kpad; ++k)  // K tail (and padding to a multiple of 4)
      for (int j = 0; j < 8; ++j) {
        const int64_t m = m0 + j0 + j;
        xq[((k >> 2) * W8 + j0 + j) * 4 + (k & 3)] =
            k < K ? quantize_generic(p.x_t ? p.x[k * p.M + m] : p.x[m * K + k], inv_of(p, m), zp_of(p, m)) : 0;
      }
  }
}

// THE INT8 HOT LOOP: out[0 .. 8R) (int32) += sum_e  XQ[quad col_e, token] . w_e (4 products).
template <int R>
SB_AVX2 inline void q8_row_avx2(const uint8_t* __restrict xq, const int32_t* __restrict col,
                                const int32_t* __restrict wq, int64_t e0, int64_t e1,
                                int32_t* __restrict out) {
  constexpr int W8 = 8 * R;
  if (e0 == e1) return;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = _mm256_load_si256(reinterpret_cast<const __m256i*>(out + 8 * r));
#pragma GCC unroll 2
  for (int64_t e = e0; e < e1; ++e) {
    const __m256i w = _mm256_set1_epi32(wq[e]);
    const uint8_t* xr = xq + static_cast<int64_t>(col[e]) * W8;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(xr + 32 * r));
      acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_maddubs_epi16(x, w), ones));
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) _mm256_store_si256(reinterpret_cast<__m256i*>(out + 8 * r), acc[r]);
}

SB_AVX2 void q8_dequant_avx2(const Problem& p, int32_t* yt, int W8, int64_t m0, int64_t n0, int64_t rows) {
  const float* sx = p.x_scale_tok ? p.x_scale_tok + (m0 - p.tok_m0) : nullptr;  // per token, else per tensor
  const int32_t* zp = p.x_zp_tok ? p.x_zp_tok + (m0 - p.tok_m0) : nullptr;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t n = n0 + i;
    const __m256i ws = _mm256_set1_epi32(p.wsum[n]), c_row = _mm256_set1_epi32(p.x_zp * p.wsum[n]);
    const __m256 sw = _mm256_set1_ps(p.wscale[n]), s_row = _mm256_set1_ps(p.x_scale * p.wscale[n]);
    const __m256 b = _mm256_set1_ps(p.bias ? p.bias[n] : 0.0f);
    int32_t* a = yt + i * W8;
    for (int j = 0; j < W8; j += 8) {
      const __m256i c = sx ? _mm256_mullo_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(zp + j)), ws) : c_row;
      const __m256 s = sx ? _mm256_mul_ps(_mm256_loadu_ps(sx + j), sw) : s_row;
      const __m256i v = _mm256_sub_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(a + j)), c);
      _mm256_store_ps(reinterpret_cast<float*>(a + j), _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), s, b));
    }
  }
}

// AVX-512 dequantization (W a multiple of 16: the VNNI rows).
SB_AVX512 void q8_dequant_avx512(const Problem& p, int32_t* yt, int W, int64_t m0, int64_t n0, int64_t rows) {
  const float* sx = p.x_scale_tok ? p.x_scale_tok + (m0 - p.tok_m0) : nullptr;  // per token, else per tensor
  const int32_t* zp = p.x_zp_tok ? p.x_zp_tok + (m0 - p.tok_m0) : nullptr;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t n = n0 + i;
    const __m512i ws = _mm512_set1_epi32(p.wsum[n]), c_row = _mm512_set1_epi32(p.x_zp * p.wsum[n]);
    const __m512 sw = _mm512_set1_ps(p.wscale[n]), s_row = _mm512_set1_ps(p.x_scale * p.wscale[n]);
    const __m512 b = _mm512_set1_ps(p.bias ? p.bias[n] : 0.0f);
    int32_t* a = yt + i * W;
    for (int j = 0; j < W; j += 16) {
      const __m512i c = sx ? _mm512_mullo_epi32(_mm512_loadu_si512(zp + j), ws) : c_row;
      const __m512 s = sx ? _mm512_mul_ps(_mm512_loadu_ps(sx + j), sw) : s_row;
      const __m512i v = _mm512_sub_epi32(_mm512_load_si512(a + j), c);
      _mm512_store_ps(reinterpret_cast<float*>(a + j), _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), s, b));
    }
  }
}

// The block loop of an INT8 work item, both formats (AVX2 twin of int8_blocks_generic): X is the
// packed activation type (uint8 quads / int16 pairs), W the tile width in tokens, Row the hot loop
// (q8_row_avx2<R> / q8p_row_avx2<R2>), a template argument so that it is inlined; DEQUANT / FINISH the
// epilogue of the ISA.
#define SB_INT8_BLOCKS(ATTR, SUFFIX, DEQUANT, FINISH, TO_H, UNPERMUTE)                                                       \
  template <typename X, int W, void (*Row)(const X*, const int32_t*, const int32_t*, int64_t, int64_t, int32_t*)> \
  ATTR void int8_blocks_##SUFFIX(const Problem& p, const X* xa, int64_t m0, int64_t w,                    \
                                 int64_t n_begin, int64_t n_end, int32_t* yt) {                           \
    Problem pf = p;                                                                                       \
    pf.bias = nullptr; /* added by the dequantization */                                                  \
    const int32_t* wq = reinterpret_cast<const int32_t*>(p.qval);                                         \
    for (int64_t nb0 = n_begin; nb0 < n_end; nb0 += p.nb) {                                               \
      const int64_t nb1 = std::min(n_end, nb0 + p.nb);                                                    \
      std::memset(yt, 0, sizeof(int32_t) * (nb1 - nb0) * W);                                             \
      for (int64_t c = 0; c < p.n_kc; ++c) {                                                              \
        const int32_t* rp = p.row_ptr + c * p.N;                                                          \
        const int32_t* ord = p.order + c * p.N;                                                           \
        for (int64_t i = nb0; i < nb1; ++i) Row(xa, p.col, wq, rp[i], rp[i + 1], yt + (ord[i] - nb0) * W); \
      }                                                                                                   \
      UNPERMUTE(X, yt, W, nb1 - nb0);                                                                     \
      if (p.h_out != nullptr) { /* fused FFN: the finished rows go to the hidden tile [N][W] */           \
        TO_H(p, yt, W, w, m0, nb0, nb1 - nb0);                                                            \
        continue;                                                                                         \
      }                                                                                                   \
      DEQUANT(p, yt, W, m0, nb0, nb1 - nb0);                                                              \
      if (p.act != 0 || p.minmax != nullptr)                                                              \
        FINISH(p, reinterpret_cast<float*>(yt), W, w, nb0, nb1 - nb0, false);                             \
      const float* ytf = reinterpret_cast<const float*>(yt);                                              \
      for (int64_t g = nb0; g < nb1; g += kGroup)                                                         \
        store_yt_avx2(pf, ytf + (g - nb0) * W, W, m0, w, g, std::min<int64_t>(kGroup, nb1 - g));          \
    }                                                                                                     \
  }

// The block loop of an INT8 work item, both formats (AVX2 twin of int8_blocks_generic): X is the
// packed activation type (uint8 quads / int16 pairs), W the tile width in tokens, Row the hot loop
// (q8_row_*<R> / q8p_row_*<R2>), a template argument so that it is inlined; defined once per ISA.
// Fused FFN1 rows into the hidden tile: dequantize, bias, activation, store to h_out, in three passes over
// the block (AVX2) or one (AVX-512: the tile's range is measured later, per token, so none is kept here).
SB_AVX2 void to_h_avx2(const Problem& p, int32_t* yt, int W, int64_t w, int64_t m0, int64_t n0, int64_t rows) {
  q8_dequant_avx2(p, yt, W, m0, n0, rows);
  if (p.act != 0) finish_avx2(p, reinterpret_cast<float*>(yt), W, w, n0, rows, false);
  std::memcpy(p.h_out + n0 * W, yt, sizeof(float) * rows * W);
}

template <int ACT>
SB_AVX512 void to_h_act_avx512(const Problem& p, const int32_t* yt, int W, int64_t n0, int64_t rows) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t n = n0 + i;
    const __m512i c = _mm512_set1_epi32(p.x_zp * p.wsum[n]);
    const __m512 s = _mm512_set1_ps(p.x_scale * p.wscale[n]);
    const __m512 b = _mm512_set1_ps(p.bias ? p.bias[n] : 0.0f);
    const int32_t* a = yt + i * W;
    float* h = p.h_out + n * W;
    for (int j = 0; j < W; j += 16) {
      const __m512i v = _mm512_sub_epi32(_mm512_load_si512(a + j), c);
      _mm512_store_ps(h + j, act_avx512<ACT>(_mm512_fmadd_ps(_mm512_cvtepi32_ps(v), s, b)));
    }
  }
}

SB_AVX512 void to_h_avx512(const Problem& p, int32_t* yt, int W, int64_t w, int64_t m0, int64_t n0, int64_t rows) {
  if (p.x_scale_tok != nullptr) return to_h_avx2(p, yt, W, w, m0, n0, rows);  // not FFN1's case: per-tensor input
  switch (p.act) {
    case 1: return to_h_act_avx512<1>(p, yt, W, n0, rows);
    case 2: return to_h_act_avx512<2>(p, yt, W, n0, rows);
    case 3: return to_h_act_avx512<3>(p, yt, W, n0, rows);
    default: return to_h_act_avx512<0>(p, yt, W, n0, rows);
  }
}

SB_VNNI void unpermute_pairs_vnni(int32_t* yt, int W, int64_t rows);  // defined with the VNNI pairs loop

// The VNNI pairs loop leaves its tile in unpack order (int16 activations); the other loops in token order.
#define SB_NO_UNPERMUTE(X, yt, W, rows)
#define SB_UNPERMUTE_PAIRS(X, yt, W, rows) \
  if constexpr (std::is_same<X, int16_t>::value) unpermute_pairs_vnni(yt, W, rows);
SB_INT8_BLOCKS(SB_AVX2, avx2, q8_dequant_avx2, finish_avx2, to_h_avx2, SB_NO_UNPERMUTE)
SB_INT8_BLOCKS(SB_VNNI, vnni, q8_dequant_avx512, finish_avx512, to_h_avx512, SB_UNPERMUTE_PAIRS)

// VNNI quads: 16 tokens' quads are 64 contiguous bytes; vpdpbusd = maddubs + madd + add, without the
// int16 intermediate (7-bit activations never saturated it, so the sums are the same).
template <int R16>
SB_VNNI inline void q8_row_vnni(const uint8_t* __restrict xq, const int32_t* __restrict col,
                                const int32_t* __restrict wq, int64_t e0, int64_t e1, int32_t* __restrict out) {
  constexpr int W = 16 * R16;
  constexpr int NS = 2;  // accumulator sets taking the entries in turn (+1-6% measured on quads)
  if (e0 == e1) return;
  __m512i acc[NS][R16];
#pragma GCC unroll 4
  for (int r = 0; r < R16; ++r) {
    acc[0][r] = _mm512_load_si512(out + 16 * r);
#pragma GCC unroll 4
    for (int s = 1; s < NS; ++s) acc[s][r] = _mm512_setzero_si512();
  }
  int64_t e = e0;
  for (; e + NS <= e1; e += NS) {
#pragma GCC unroll 4
    for (int s = 0; s < NS; ++s) {
      const __m512i w = _mm512_set1_epi32(wq[e + s]);
      const uint8_t* xr = xq + static_cast<int64_t>(col[e + s]) * W;
#pragma GCC unroll 4
      for (int r = 0; r < R16; ++r) acc[s][r] = _mm512_dpbusd_epi32(acc[s][r], _mm512_load_si512(xr + 64 * r), w);
    }
  }
  for (; e < e1; ++e) {
    const __m512i w = _mm512_set1_epi32(wq[e]);
    const uint8_t* xr = xq + static_cast<int64_t>(col[e]) * W;
#pragma GCC unroll 4
    for (int r = 0; r < R16; ++r) acc[0][r] = _mm512_dpbusd_epi32(acc[0][r], _mm512_load_si512(xr + 64 * r), w);
  }
#pragma GCC unroll 4
  for (int r = 0; r < R16; ++r) {
#pragma GCC unroll 4
    for (int s = 1; s < NS; ++s) acc[0][r] = _mm512_add_epi32(acc[0][r], acc[s][r]);
    _mm512_store_si512(out + 16 * r, acc[0][r]);
  }
}

template <int R>
SB_VNNI void q8_rows_vnni(const Problem& p, const uint8_t* xq, int64_t m0, int64_t w,
                          int64_t n_begin, int64_t n_end, int32_t* yt) {
  int8_blocks_vnni<uint8_t, 8 * R, q8_row_vnni<R / 2>>(p, xq, m0, w, n_begin, n_end, yt);
}

template <int R>
SB_AVX2 void q8_rows_avx2(const Problem& p, const uint8_t* xq, int64_t m0, int64_t w,
                          int64_t n_begin, int64_t n_end, int32_t* yt) {
  int8_blocks_avx2<uint8_t, 8 * R, q8_row_avx2<R>>(p, xq, m0, w, n_begin, n_end, yt);
}

SB_AVX2 void item_q8_avx2(const Problem& p, int64_t m0, int64_t w, int64_t n_begin,
                          int64_t n_end, uint8_t* xq, int32_t* yt, bool xq_ready) {
  const int R = static_cast<int>((w + 7) / 8);
  if (!xq_ready) pack_xq_avx2(p, m0, w, 8 * R, xq);
  if (p.vnni && R % 2 == 0) {
    switch (R) {
      case 2: return q8_rows_vnni<2>(p, xq, m0, w, n_begin, n_end, yt);
      case 4: return q8_rows_vnni<4>(p, xq, m0, w, n_begin, n_end, yt);
      case 6: return q8_rows_vnni<6>(p, xq, m0, w, n_begin, n_end, yt);
      default: return q8_rows_vnni<8>(p, xq, m0, w, n_begin, n_end, yt);
    }
  }
  switch (R) {
    case 1: q8_rows_avx2<1>(p, xq, m0, w, n_begin, n_end, yt); break;
    case 2: q8_rows_avx2<2>(p, xq, m0, w, n_begin, n_end, yt); break;
    case 3: q8_rows_avx2<3>(p, xq, m0, w, n_begin, n_end, yt); break;
    case 4: q8_rows_avx2<4>(p, xq, m0, w, n_begin, n_end, yt); break;
    case 5: q8_rows_avx2<5>(p, xq, m0, w, n_begin, n_end, yt); break;
    case 6: q8_rows_avx2<6>(p, xq, m0, w, n_begin, n_end, yt); break;
    case 7: q8_rows_avx2<7>(p, xq, m0, w, n_begin, n_end, yt); break;
    default: q8_rows_avx2<8>(p, xq, m0, w, n_begin, n_end, yt); break;
  }
}

// ---- Q8P (AVX2) ----

SB_AVX2 void pack_xp_avx2(const Problem& p, int64_t m0, int64_t w, int W16, int16_t* xp) {
  const int64_t K = p.K;
  for (int64_t g0 = 0; g0 < W16; g0 += 16) {
    if (g0 + 16 > w) {  // ragged last tokens: portable code for this 16-token group
      for (int64_t k = 0; k < K; ++k)
        for (int j = 0; j < 16; ++j) {
          int16_t q = 0;
          if (g0 + j < w) {
            const int64_t m = m0 + g0 + j;
            q = quantize_generic(p.x_t ? p.x[k * p.M + m] : p.x[m * K + k], inv_of(p, m), zp_of(p, m));
          }
          xp[k * W16 + xp_pos(static_cast<int>(g0) + j)] = q;
        }
      continue;
    }
    const __m256 inv_lo = inv8_avx2(p, m0 + g0), inv_hi = inv8_avx2(p, m0 + g0 + 8);  // tokens 0-7, 8-15
    const __m256i zp_lo = zp8_avx2(p, m0 + g0), zp_hi = zp8_avx2(p, m0 + g0 + 8);
    int64_t k = 0;
    if (p.x_t) {
      for (; k < K; ++k) {
        const float* src = p.x + k * p.M + m0 + g0;
        const __m256i v = _mm256_packs_epi32(quantize8_avx2(_mm256_loadu_ps(src), inv_lo, zp_lo),
                                             quantize8_avx2(_mm256_loadu_ps(src + 8), inv_hi, zp_hi));
        _mm256_store_si256(reinterpret_cast<__m256i*>(xp + k * W16 + g0), v);
      }
    } else {
      const float* lo = p.x + (m0 + g0) * K;  // tokens 0-7 of the group
      const float* hi = lo + 8 * K;           // tokens 8-15
      for (; k + 8 <= K; k += 8) {
        __m256 a[8], b[8];
        for (int r = 0; r < 8; ++r) {
          a[r] = _mm256_loadu_ps(lo + r * K + k);
          b[r] = _mm256_loadu_ps(hi + r * K + k);
        }
        transpose8x8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
        transpose8x8(b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]);
        for (int r = 0; r < 8; ++r) {
          const __m256i v = _mm256_packs_epi32(quantize8_avx2(a[r], inv_lo, zp_lo), quantize8_avx2(b[r], inv_hi, zp_hi));
          _mm256_store_si256(reinterpret_cast<__m256i*>(xp + (k + r) * W16 + g0), v);
        }
      }
      for (; k < K; ++k)
        for (int j = 0; j < 16; ++j)
          xp[k * W16 + xp_pos(static_cast<int>(g0) + j)] =
              quantize_generic(p.x[(m0 + g0 + j) * K + k], inv_of(p, m0 + g0 + j), zp_of(p, m0 + g0 + j));
    }
  }
}

// THE INT8 PAIRS HOT LOOP: out[0 .. 16 R2) (int32) += sum_e x[k_a] * w_a + x[k_b] * w_b.
template <int R2>
SB_AVX2 inline void q8p_row_avx2(const int16_t* __restrict xp, const int32_t* __restrict col,
                                 const int32_t* __restrict wpair, int64_t e0, int64_t e1,
                                 int32_t* __restrict out) {
  constexpr int W16 = 16 * R2;
  if (e0 == e1) return;
  __m256i acc[2 * R2];
#pragma GCC unroll 8
  for (int r = 0; r < 2 * R2; ++r) acc[r] = _mm256_load_si256(reinterpret_cast<const __m256i*>(out + 8 * r));
#pragma GCC unroll 2
  for (int64_t e = e0; e < e1; ++e) {
    const __m256i w = _mm256_set1_epi32(wpair[e]);
    const int16_t* xa = xp + static_cast<int64_t>(col[2 * e]) * W16;
    const int16_t* xb = xp + static_cast<int64_t>(col[2 * e + 1]) * W16;
#pragma GCC unroll 4
    for (int g = 0; g < R2; ++g) {
      const __m256i a = _mm256_load_si256(reinterpret_cast<const __m256i*>(xa + 16 * g));
      const __m256i b = _mm256_load_si256(reinterpret_cast<const __m256i*>(xb + 16 * g));
      acc[2 * g] = _mm256_add_epi32(acc[2 * g], _mm256_madd_epi16(_mm256_unpacklo_epi16(a, b), w));
      acc[2 * g + 1] = _mm256_add_epi32(acc[2 * g + 1], _mm256_madd_epi16(_mm256_unpackhi_epi16(a, b), w));
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < 2 * R2; ++r) _mm256_store_si256(reinterpret_cast<__m256i*>(out + 8 * r), acc[r]);
}

// VNNI pairs: one zmm holds two 16-token groups, and the lane-wise unpacks give the AVX2 loop's
// accumulators of both side by side (acc[2g] | acc[2g+2] and acc[2g+1] | acc[2g+3]); vpdpwssd fuses
// its madd + add. The int32 tile keeps them in that order (per 32 tokens: 0-7, 16-23, 8-15, 24-31), so
// each (row, K chunk) loads and stores whole registers; unpermute_pairs_vnni restores token order once
// per block, after the last chunk.

template <int R2>
SB_VNNI inline void q8p_row_vnni(const int16_t* __restrict xp, const int32_t* __restrict col,
                                 const int32_t* __restrict wpair, int64_t e0, int64_t e1,
                                 int32_t* __restrict out) {
  constexpr int W16 = 16 * R2, Z = R2 / 2;
  if (e0 == e1) return;
  __m512i lo[Z], hi[Z];
#pragma GCC unroll 2
  for (int z = 0; z < Z; ++z) {
    lo[z] = _mm512_load_si512(out + 32 * z);
    hi[z] = _mm512_load_si512(out + 32 * z + 16);
  }
#pragma GCC unroll 2
  for (int64_t e = e0; e < e1; ++e) {
    const __m512i w = _mm512_set1_epi32(wpair[e]);
    const int16_t* xa = xp + static_cast<int64_t>(col[2 * e]) * W16;
    const int16_t* xb = xp + static_cast<int64_t>(col[2 * e + 1]) * W16;
#pragma GCC unroll 2
    for (int z = 0; z < Z; ++z) {
      const __m512i a = _mm512_load_si512(xa + 32 * z), b = _mm512_load_si512(xb + 32 * z);
      lo[z] = _mm512_dpwssd_epi32(lo[z], _mm512_unpacklo_epi16(a, b), w);
      hi[z] = _mm512_dpwssd_epi32(hi[z], _mm512_unpackhi_epi16(a, b), w);
    }
  }
#pragma GCC unroll 2
  for (int z = 0; z < Z; ++z) {
    _mm512_store_si512(out + 32 * z, lo[z]);
    _mm512_store_si512(out + 32 * z + 16, hi[z]);
  }
}

// Token order back in rows of a q8p_row_vnni tile: per 32 tokens, 8-token groups 0, 2, 1, 3 -> 0, 1, 2, 3.
SB_VNNI void unpermute_pairs_vnni(int32_t* yt, int W, int64_t rows) {
  for (int64_t i = 0; i < rows; ++i)
    for (int j = 0; j < W; j += 32) {
      int32_t* a = yt + i * W + j;  // groups 0 and 3 are in place; swap 2 and 1
      const __m256i g2 = _mm256_load_si256(reinterpret_cast<const __m256i*>(a + 8));
      const __m256i g1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(a + 16));
      _mm256_store_si256(reinterpret_cast<__m256i*>(a + 8), g1);
      _mm256_store_si256(reinterpret_cast<__m256i*>(a + 16), g2);
    }
}

template <int R2>
SB_VNNI void q8p_rows_vnni(const Problem& p, const int16_t* xp, int64_t m0, int64_t w,
                           int64_t n_begin, int64_t n_end, int32_t* yt) {
  int8_blocks_vnni<int16_t, 16 * R2, q8p_row_vnni<R2>>(p, xp, m0, w, n_begin, n_end, yt);
}

template <int R2>
SB_AVX2 void q8p_rows_avx2(const Problem& p, const int16_t* xp, int64_t m0, int64_t w,
                           int64_t n_begin, int64_t n_end, int32_t* yt) {
  int8_blocks_avx2<int16_t, 16 * R2, q8p_row_avx2<R2>>(p, xp, m0, w, n_begin, n_end, yt);
}

SB_AVX2 void item_q8p_avx2(const Problem& p, int64_t m0, int64_t w, int64_t n_begin,
                           int64_t n_end, int16_t* xp, int32_t* yt, bool xp_ready) {
  const int R2 = static_cast<int>((w + 15) / 16);
  if (!xp_ready) pack_xp_avx2(p, m0, w, 16 * R2, xp);
  if (p.vnni && R2 % 2 == 0) return R2 == 2 ? q8p_rows_vnni<2>(p, xp, m0, w, n_begin, n_end, yt)
                                            : q8p_rows_vnni<4>(p, xp, m0, w, n_begin, n_end, yt);
  switch (R2) {
    case 1: q8p_rows_avx2<1>(p, xp, m0, w, n_begin, n_end, yt); break;
    case 2: q8p_rows_avx2<2>(p, xp, m0, w, n_begin, n_end, yt); break;
    case 3: q8p_rows_avx2<3>(p, xp, m0, w, n_begin, n_end, yt); break;
    default: q8p_rows_avx2<4>(p, xp, m0, w, n_begin, n_end, yt); break;
  }
}

#endif  // SB_X86

// --------------------------------------------------------------------------------------
// Driver: work split and threading.
// --------------------------------------------------------------------------------------

// An FP32 work item (output rows [n_begin, n_end) of one M tile) on the chosen code path.
template <Format F>
void item_fp32(const Problem& p, int64_t m0, int64_t w, int64_t n_begin, int64_t n_end, float* xt, float* yt,
               bool xt_ready, bool use_avx2) {
#if SB_X86
  if (use_avx2) return item_avx2<F>(p, m0, w, n_begin, n_end, xt, yt, xt_ready);
#endif
  (void)use_avx2;
  item_generic<F>(p, m0, w, n_begin, n_end, xt, yt, xt_ready);
}

template <Format F>
void run(const Problem& p, int num_threads, int tile_w, bool use_avx2) {
  const int64_t M = p.M, N = p.N;
  const int64_t n_mtiles = (M + tile_w - 1) / tile_w;
  const int64_t n_blocks = (N + p.nb - 1) / p.nb;
  // Split N (in whole row blocks) only when the M tiles alone cannot keep the threads
  // evenly busy (small batches); otherwise each item is a full tile, XT packed once.
  int64_t n_split = 1;
  if (num_threads > 1 && n_mtiles < 8 * num_threads && n_mtiles % num_threads != 0)
    n_split = std::min<int64_t>(n_blocks, 2 * num_threads);
  const int64_t blocks_per_item = (n_blocks + n_split - 1) / n_split;
  const int64_t n_items = n_mtiles * n_split;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n_items)));

  float range_min = INFINITY, range_max = -INFINITY;
#pragma omp parallel num_threads(nt)
  {
    static thread_local Scratch xt_buf, yt_buf;
    tl_min = INFINITY;
    tl_max = -INFINITY;
    float* xt = xt_buf.get(static_cast<size_t>(p.Kpad) * kMaxW);
    float* yt = yt_buf.get(static_cast<size_t>(p.nb) * kMaxW);
    int64_t cached_tile = -1;  // items are tile-major: consecutive ones reuse the XT tile
#pragma omp single nowait
    g_last_threads.store(omp_get_num_threads(), std::memory_order_relaxed);
#pragma omp for schedule(static)
    for (int64_t it = 0; it < n_items; ++it) {
      const int64_t t = it / n_split, s = it % n_split;
      const int64_t m0 = t * tile_w;
      const int64_t w = std::min<int64_t>(tile_w, M - m0);
      const int64_t n_begin = std::min(N, s * blocks_per_item * p.nb);
      const int64_t n_end = std::min(N, (s + 1) * blocks_per_item * p.nb);
      if (n_begin >= n_end) continue;
      const bool ready = (t == cached_tile);
      if constexpr (F == Format::Q8P) {
        int16_t* xp = reinterpret_cast<int16_t*>(xt);
        int32_t* acc = reinterpret_cast<int32_t*>(yt);
#if SB_X86
        if (use_avx2)
          item_q8p_avx2(p, m0, w, n_begin, n_end, xp, acc, ready);
        else
          item_q8p_generic(p, m0, w, n_begin, n_end, xp, acc, ready);
#else
        item_q8p_generic(p, m0, w, n_begin, n_end, xp, acc, ready);
#endif
      } else if constexpr (F == Format::Q8) {
        uint8_t* xq = reinterpret_cast<uint8_t*>(xt);
        int32_t* acc = reinterpret_cast<int32_t*>(yt);
#if SB_X86
        if (use_avx2)
          item_q8_avx2(p, m0, w, n_begin, n_end, xq, acc, ready);
        else
          item_q8_generic(p, m0, w, n_begin, n_end, xq, acc, ready);
#else
        item_q8_generic(p, m0, w, n_begin, n_end, xq, acc, ready);
#endif
      } else {
        item_fp32<F>(p, m0, w, n_begin, n_end, xt, yt, ready, use_avx2);
      }
      cached_tile = t;
    }
    if (p.minmax != nullptr) {
#pragma omp critical(sparsebert_range)
      {
        range_min = std::min(range_min, tl_min);
        range_max = std::max(range_max, tl_max);
      }
    }
  }
  if (p.minmax != nullptr) {
    p.minmax[0] = range_min;
    p.minmax[1] = range_max;
  }
}

// Fused FFN: Y = act(X W1^T + b1) W2^T + b2 one 64-token tile at a time. The tile's hidden activations
// H^T [N1][64] are accumulated, biased and activated in a thread-local buffer in the XT layout that the
// second layer reads, so H never goes through memory: no [M, N1] output written, transposed and read
// back (at M = 4096, N1 = 3072 that is 50 MB each way a layer). Same sums as two spmm calls.
template <Format F1, Format F2>
void run_ffn(const Problem& p1, const Problem& p2, int num_threads, bool use_avx2, const AddNorm& ln) {
  const int64_t M = p1.M;
  const int64_t n_tiles = (M + kMaxW - 1) / kMaxW;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n_tiles)));
#pragma omp parallel num_threads(nt)
  {
    static thread_local Scratch xt_buf, yt_buf, h_buf;
    float* xt = xt_buf.get(static_cast<size_t>(p1.Kpad) * kMaxW);
    float* yt = yt_buf.get(static_cast<size_t>(std::max(p1.nb, p2.nb)) * kMaxW);
    float* h = h_buf.get(static_cast<size_t>(p2.Kpad) * kMaxW);
    float lo = INFINITY, hi = -INFINITY;
#pragma omp single nowait
    g_last_threads.store(omp_get_num_threads(), std::memory_order_relaxed);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t m0 = t * kMaxW, w = std::min<int64_t>(kMaxW, M - m0);
      const int W8 = static_cast<int>((w + 7) / 8) * 8;
      Problem a = p1;
      a.h_out = h;
      if (p2.Kpad > p1.N) std::memset(h + p1.N * W8, 0, sizeof(float) * (p2.Kpad - p1.N) * W8);  // BLOCK4 padding
      item_fp32<F1>(a, m0, w, 0, p1.N, xt, yt, false, use_avx2);
      item_fp32<F2>(p2, m0, w, 0, p2.N, h, yt, true, use_avx2);
      add_norm_rows(ln, p2.y, p2.N, m0, m0 + w, lo, hi);
    }
    add_norm_reduce(ln, lo, hi);
  }
}

#if SB_X86
// Per-token min / max / sum of a full 64-token tile (rows of stride ld), in 3 x 4 registers.
SB_AVX512 void token_range_avx512(const float* h, int64_t ld, int64_t rows, float* mn, float* mx, float* sum) {
  __m512 lo[4], hi[4], sm[4];
  for (int q = 0; q < 4; ++q) lo[q] = _mm512_set1_ps(INFINITY), hi[q] = _mm512_set1_ps(-INFINITY), sm[q] = _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r)
    for (int q = 0; q < 4; ++q) {
      const __m512 v = _mm512_loadu_ps(h + r * ld + 16 * q);
      lo[q] = _mm512_min_ps(lo[q], v);
      hi[q] = _mm512_max_ps(hi[q], v);
      sm[q] = _mm512_add_ps(sm[q], v);
    }
  for (int q = 0; q < 4; ++q) {
    _mm512_storeu_ps(mn + 16 * q, lo[q]);
    _mm512_storeu_ps(mx + 16 * q, hi[q]);
    _mm512_storeu_ps(sum + 16 * q, sm[q]);
  }
}
#endif

// 7-bit asymmetric (scale, 1 / scale, zero point) of a range [mn, mx]: activation_qparams(mn, mx, bits=7) of
// modifiers/quantization.py, in double as there. `sum` (of the values) only tells whether one was NaN / inf.
inline bool qparams_7bit(float mn, float mx, float sum, float& scale, float& inv, int32_t& zp) {
  const double lo = std::min(0.0, static_cast<double>(mn)), hi = std::max(0.0, static_cast<double>(mx));
  const double sc = std::max((hi - lo) / 127.0, 1e-8);  // _EPS there
  const double z = std::nearbyint(-lo / sc);            // round half to even, as Python's round()
  scale = static_cast<float>(sc);
  inv = 1.0f / scale;
  zp = static_cast<int32_t>(std::min(127.0, std::max(0.0, z)));
  return std::isfinite(sum) && std::isfinite(mn) && std::isfinite(mx);
}

// Per-token 7-bit parameters of tokens j < w (<= 64) of a feature-major tile h (rows of stride ld): what
// activation_qparams(min(h[:, j]), max(h[:, j]), bits=7) returns, in double as there; scale / inv / zp
// get kMaxW entries (tokens j >= w: 1, 1, 0). Returns false if a value of a valid token is not finite.
bool token_qparams(const float* h, int64_t ld, int64_t rows, int64_t w, float* scale, float* inv, int32_t* zp) {
  float mn[kMaxW], mx[kMaxW], sum[kMaxW];  // per token; the sum turns NaN / inf into a non-finite total
#if SB_X86
  if (w == kMaxW && cpu().avx512) {
    token_range_avx512(h, ld, rows, mn, mx, sum);
  } else
#endif
  {
    for (int j = 0; j < kMaxW; ++j) mn[j] = INFINITY, mx[j] = -INFINITY, sum[j] = 0.0f;
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = h + r * ld;
      for (int j = 0; j < w; ++j) {
        mn[j] = row[j] < mn[j] ? row[j] : mn[j];
        mx[j] = row[j] > mx[j] ? row[j] : mx[j];
        sum[j] += row[j];
      }
    }
  }
  bool finite = true;
  for (int j = 0; j < kMaxW; ++j) {
    if (j >= w) {
      scale[j] = inv[j] = 1.0f;
      zp[j] = 0;
      continue;
    }
    finite = qparams_7bit(mn[j], mx[j], sum[j], scale[j], inv[j], zp[j]) && finite;
  }
  return finite;
}

// Per-token parameters of every token of x (token-major [M, K] rows, or feature-major [K, M] when x_t) into
// arrays of M + kMaxW entries (the padding as token_qparams leaves it). False if a value is not finite.
bool all_token_qparams(const float* x, int64_t M, int64_t K, bool x_t, int num_threads, float* scale, float* inv,
                       int32_t* zp) {
  const int64_t tiles = (M + kMaxW - 1) / kMaxW;
  std::atomic<bool> finite{true};
#pragma omp parallel for num_threads(static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, tiles))))
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t m0 = t * kMaxW, w = std::min<int64_t>(kMaxW, M - m0);
    bool ok = true;
    if (x_t) {
      ok = token_qparams(x + m0, M, K, w, scale + m0, inv + m0, zp + m0);
    } else {
      for (int64_t j = 0; j < w; ++j) {  // a token's row is contiguous: reduce it directly
        const float* row = x + (m0 + j) * K;
        float mn = INFINITY, mx = -INFINITY, sum = 0.0f;
        for (int64_t k = 0; k < K; ++k) {
          mn = row[k] < mn ? row[k] : mn;
          mx = row[k] > mx ? row[k] : mx;
          sum += row[k];
        }
        ok = qparams_7bit(mn, mx, sum, scale[m0 + j], inv[m0 + j], zp[m0 + j]) && ok;
      }
    }
    if (!ok) finite.store(false, std::memory_order_relaxed);
  }
  return finite.load();
}

// One INT8 work item (output rows [n_begin, n_end) of tokens m0 .. m0+w) in either layout, packing X
// unless `ready`. `xa` is the packed X tile, `acc` the int32 accumulator block.
void item_int8(const Problem& p, bool pairs, int64_t m0, int64_t w, int64_t n_begin, int64_t n_end, void* xa,
               int32_t* acc, bool ready, bool use_avx2) {
#if SB_X86
  if (use_avx2) {
    if (pairs) return item_q8p_avx2(p, m0, w, n_begin, n_end, static_cast<int16_t*>(xa), acc, ready);
    return item_q8_avx2(p, m0, w, n_begin, n_end, static_cast<uint8_t*>(xa), acc, ready);
  }
#endif
  (void)use_avx2;
  if (pairs) return item_q8p_generic(p, m0, w, n_begin, n_end, static_cast<int16_t*>(xa), acc, ready);
  item_q8_generic(p, m0, w, n_begin, n_end, static_cast<uint8_t*>(xa), acc, ready);
}

// Packs X tokens m0 .. m0+w into the layout of `pairs` (int16 XP) or quads (uint8 XQ).
void pack_int8(const Problem& p, bool pairs, int64_t m0, int64_t w, void* xa, bool use_avx2) {
  const int Wp = pairs ? static_cast<int>((w + 15) / 16) * 16 : static_cast<int>((w + 7) / 8) * 8;
#if SB_X86
  if (use_avx2) {
    if (pairs) return pack_xp_avx2(p, m0, w, Wp, static_cast<int16_t*>(xa));
    return pack_xq_avx2(p, m0, w, Wp, static_cast<uint8_t*>(xa));
  }
#endif
  (void)use_avx2;
  if (pairs) return pack_xp_generic(p, m0, w, Wp, static_cast<int16_t*>(xa));
  pack_xq_generic(p, m0, w, Wp, static_cast<uint8_t*>(xa));
}

// Fused INT8 FFN: Y = act(X W1^T + b1) W2^T + b2 one 64-token tile at a time, X quantized per tensor
// (p1's x_scale / x_zp), the hidden activations per token. FFN1's finished float rows (bias, activation)
// go to the thread's hidden tile H [N1][W] (in L2, never to memory); then each token's (scale, zp) comes
// from its own range over the tile, H is quantized into FFN2's packed layout and FFN2 runs on it. Per-token
// quantization is what makes the fusion possible (a per-tensor scale needs every token's activations
// before the first tile can be quantized) and it keeps each token's result independent of the batch.
// Returns false if a hidden activation was not finite.
bool run_ffn_q8(const Problem& p1, bool pairs1, const Problem& p2, bool pairs2, int num_threads, bool use_avx2,
                const AddNorm& ln) {
  const int64_t M = p1.M;
  const int64_t n_tiles = (M + kMaxW - 1) / kMaxW;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n_tiles)));
  std::atomic<bool> finite{true};
#pragma omp parallel num_threads(nt)
  {
    static thread_local Scratch xa_buf, acc_buf, h_buf, xb_buf, tok_buf;
    void* xa = xa_buf.get(static_cast<size_t>(p1.Kpad) * kMaxW);
    int32_t* acc = reinterpret_cast<int32_t*>(acc_buf.get(static_cast<size_t>(std::max(p1.nb, p2.nb)) * kMaxW));
    float* h = h_buf.get(static_cast<size_t>(p1.N) * kMaxW);
    void* xb = xb_buf.get(static_cast<size_t>(p2.Kpad) * kMaxW);
    float* tok = tok_buf.get(3 * kMaxW);  // per-token scale, 1 / scale, zero point (int32)
    float* scale = tok;
    float* inv = tok + kMaxW;
    int32_t* zp = reinterpret_cast<int32_t*>(tok + 2 * kMaxW);
    float lo = INFINITY, hi = -INFINITY;
#pragma omp single nowait
    g_last_threads.store(omp_get_num_threads(), std::memory_order_relaxed);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t m0 = t * kMaxW, w = std::min<int64_t>(kMaxW, M - m0);
      const int W1 = pairs1 ? static_cast<int>((w + 15) / 16) * 16 : static_cast<int>((w + 7) / 8) * 8;
      Problem a = p1;
      a.h_out = h;
      item_int8(a, pairs1, m0, w, 0, p1.N, xa, acc, false, use_avx2);
      if (!token_qparams(h, W1, p1.N, w, scale, inv, zp)) finite.store(false, std::memory_order_relaxed);
      Problem hq = p2;  // FFN2's input: the hidden tile, feature-major, tokens 0 .. w
      hq.x = h;
      hq.M = W1;
      hq.x_t = true;
      hq.x_inv_tok = inv;
      hq.x_zp_tok = zp;
      hq.tok_m0 = 0;
      pack_int8(hq, pairs2, 0, w, xb, use_avx2);
      Problem b = p2;
      b.x_scale_tok = scale;
      b.x_inv_tok = inv;
      b.x_zp_tok = zp;
      b.tok_m0 = m0;
      item_int8(b, pairs2, m0, w, 0, p2.N, xb, acc, true, use_avx2);
      add_norm_rows(ln, p2.y, p2.N, m0, m0 + w, lo, hi);
    }
    add_norm_reduce(ln, lo, hi);
  }
  return finite.load();
}

// Packed weight formats of the attention block: FP32 csr / block4, INT8 quads / pairs.
enum BlockFmt : int64_t { kCsr = 0, kBlock4 = 1, kQuads = 2, kPairs = 3 };

// One work item of a layer in any format: output rows [0, N) of tokens m0 .. m0+w (X packed here).
void item_any(const Problem& p, int64_t fmt, int64_t m0, int64_t w, float* xa, float* acc, bool use_avx2) {
  switch (fmt) {
    case kCsr: return item_fp32<Format::CSR>(p, m0, w, 0, p.N, xa, acc, false, use_avx2);
    case kBlock4: return item_fp32<Format::BLOCK4>(p, m0, w, 0, p.N, xa, acc, false, use_avx2);
    default: return item_int8(p, fmt == kPairs, m0, w, 0, p.N, xa, reinterpret_cast<int32_t*>(acc), false, use_avx2);
  }
}

// Fused attention block, one sequence per work item and thread (batch split across threads):
//   QKV^T [3HD, S] = QKV(x rows of the sequence)           feature-major, thread-local (L2)
//   ctx^T [HD, S]  = attention(QKV^T)                      attention.cpp, thread-local
//   a rows         = O(ctx^T)                              token-major, the output
// Neither the [3HD, tokens] projections nor the context go through memory. In INT8, QKV's input is
// quantized per tensor (p_qkv's x_scale / x_zp) and O's per token (each token's own range over
// ctx^T), as the unfused path does.
// Returns false if a context value was not finite (INT8 cannot quantize it).
bool run_attention_block(const Problem& p_qkv, int64_t fmt_qkv, const Problem& p_o, int64_t fmt_o, const float* mask,
                         int64_t batch, int64_t S, int64_t heads, int64_t head_dim, int num_threads, bool use_avx2,
                         bool avx512_attention, const AddNorm& ln) {
  const int64_t HD = heads * head_dim;
  std::atomic<bool> finite{true};
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, batch)));
#pragma omp parallel num_threads(nt)
  {
    static thread_local Scratch xa_buf, acc_buf, qkv_buf, ctx_buf, tok_buf;
    float* xa = xa_buf.get(static_cast<size_t>(std::max(p_qkv.Kpad, p_o.Kpad)) * kMaxW);
    float* acc = acc_buf.get(static_cast<size_t>(std::max(p_qkv.nb, p_o.nb)) * kMaxW);
    float* qkv = qkv_buf.get(static_cast<size_t>(3 * HD) * S);
    float* ctx = ctx_buf.get(static_cast<size_t>(HD) * S);
    float* tok = tok_buf.get(3 * kMaxW);
    int32_t* zp = reinterpret_cast<int32_t*>(tok + 2 * kMaxW);
    float lo = INFINITY, hi = -INFINITY;
#pragma omp single nowait
    g_last_threads.store(omp_get_num_threads(), std::memory_order_relaxed);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < batch; ++b) {
      Problem q = p_qkv;  // this sequence's tokens in, feature-major projections out
      q.x = p_qkv.x + b * S * p_qkv.K;
      q.M = S;
      q.y = qkv;
      q.x_t = false;
      q.y_t = true;
      for (int64_t m0 = 0; m0 < S; m0 += kMaxW) item_any(q, fmt_qkv, m0, std::min<int64_t>(kMaxW, S - m0), xa, acc, use_avx2);
      sparsebert::attention_sequence(qkv, mask ? mask + b * S : nullptr, ctx, S, heads, head_dim, avx512_attention);
      Problem o = p_o;  // the context in, this sequence's rows of the output out
      o.x = ctx;
      o.M = S;
      o.y = p_o.y + b * S * p_o.N;
      o.x_t = true;
      o.y_t = false;
      for (int64_t m0 = 0; m0 < S; m0 += kMaxW) {
        const int64_t w = std::min<int64_t>(kMaxW, S - m0);
        if (fmt_o == kQuads || fmt_o == kPairs) {
          if (!token_qparams(ctx + m0, S, HD, w, tok, tok + kMaxW, zp)) finite.store(false, std::memory_order_relaxed);
          o.x_scale_tok = tok;
          o.x_inv_tok = tok + kMaxW;
          o.x_zp_tok = zp;
          o.tok_m0 = m0;
        }
        item_any(o, fmt_o, m0, w, xa, acc, use_avx2);
      }
      add_norm_rows(ln, p_o.y, p_o.N, b * S, (b + 1) * S, lo, hi);
    }
    add_norm_reduce(ln, lo, hi);
  }
  return finite.load();
}

// A fresh multi-MB output is a fresh mmap: every 4 KiB page faults on first write (~1 us
// each here, 15 ms for a 4096 x 3072 output). Where transparent huge pages are in
// "madvise" mode, ask for 2 MiB pages on our own buffer: 512x fewer faults.
void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t(2) << 20;
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint: errors ignored
#else
  (void)ptr;
  (void)bytes;
#endif
}

// The float32 [rows, cols] output of an entry point: the caller's `out` (checked), else a new tensor.
at::Tensor output_tensor(const c10::optional<at::Tensor>& out, int64_t rows, int64_t cols, const at::Tensor& like,
                         const char* what) {
  if (out.has_value() && out->defined()) {
    TORCH_CHECK(out->scalar_type() == at::kFloat && out->is_contiguous() && out->dim() == 2 && out->size(0) == rows &&
                    out->size(1) == cols,
                what, ": out must be a contiguous float32 [", rows, ", ", cols, "] tensor");
    return *out;
  }
  at::Tensor y = at::empty({rows, cols}, like.options());
  advise_huge_pages(y.data_ptr<float>(), static_cast<size_t>(rows) * cols * sizeof(float));
  return y;
}

// Checks of a packed weight against K; fills its fields of `p` (geometry, arrays but the values).
void set_weight(Problem& p, int64_t K, const at::Tensor& order, const at::Tensor& row_ptr, const at::Tensor& col,
                const c10::optional<at::Tensor>& bias, int64_t N, int64_t k_chunk, int64_t n_block, bool blocked) {
  TORCH_CHECK(n_block >= kGroup && n_block % kGroup == 0, "spmm: n_block must be a multiple of 8");
  TORCH_CHECK(k_chunk > 0 && k_chunk % 4 == 0, "spmm: k_chunk must be a positive multiple of 4");
  const int64_t n_kc = std::max<int64_t>(1, (K + k_chunk - 1) / k_chunk);
  TORCH_CHECK(N >= 0 && row_ptr.numel() == n_kc * N + 1 && order.numel() == n_kc * N,
              "spmm: packed weight does not match K=", K, ", N=", N, ", k_chunk=", k_chunk);
  TORCH_CHECK(order.scalar_type() == at::kInt && row_ptr.scalar_type() == at::kInt &&
                  col.scalar_type() == at::kInt,
              "spmm: order/row_ptr/col must be int32");
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous(),
                "spmm: bias must be a contiguous float32 [N] tensor");
  p.bias = (bias.has_value() && bias->defined()) ? bias->data_ptr<float>() : nullptr;
  p.order = order.data_ptr<int32_t>();
  p.row_ptr = row_ptr.data_ptr<int32_t>();
  p.col = col.data_ptr<int32_t>();
  p.N = N; p.K = K;
  p.Kpad = blocked ? (K + 3) / 4 * 4 : K;
  p.n_kc = n_kc;
  p.nb = n_block;
}

// Checks shared by the entry points; fills the geometry of `p` and returns the output tensor.
at::Tensor prepare(Problem& p, const at::Tensor& x, const at::Tensor& order, const at::Tensor& row_ptr,
                   const at::Tensor& col, const c10::optional<at::Tensor>& bias, int64_t N,
                   int64_t k_chunk, int64_t n_block, const c10::optional<at::Tensor>& out,
                   bool x_t, bool y_t, int64_t tile_w, bool blocked) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "spmm: x must be a contiguous float32 [M, K] (or [K, M] with x_t) tensor");
  TORCH_CHECK(tile_w >= 8 && tile_w <= kMaxW && tile_w % 8 == 0,
              "spmm: tile_w must be a multiple of 8 in [8, 64]");
  const int64_t M = x.size(x_t ? 1 : 0), K = x.size(x_t ? 0 : 1);
  set_weight(p, K, order, row_ptr, col, bias, N, k_chunk, n_block, blocked);
  at::Tensor y = output_tensor(out, y_t ? N : M, y_t ? M : N, x, "spmm");
  p.x = x.data_ptr<float>();
  p.y = y.data_ptr<float>();
  p.M = M;
  p.x_t = x_t;
  p.y_t = y_t;
  return y;
}

void set_epilogue(Problem& p, int64_t act, const c10::optional<at::Tensor>& minmax) {
  TORCH_CHECK(act >= 0 && act <= 3, "spmm: act must be 0 (none), 1 (gelu), 2 (gelu tanh) or 3 (relu)");
  p.act = static_cast<int>(act);
  if (minmax.has_value() && minmax->defined()) {
    TORCH_CHECK(minmax->scalar_type() == at::kFloat && minmax->numel() == 2 && minmax->is_contiguous(),
                "spmm: minmax must be a contiguous float32 tensor of 2 elements");
    p.minmax = minmax->data_ptr<float>();
    p.minmax[0] = INFINITY;  // an empty output has the empty range
    p.minmax[1] = -INFINITY;
  }
}

// out[C, R] = x[R, C]^T (float32): 8x8 register transposes (AVX2) over row panels split across threads,
// scalar edges. torch's x.t().contiguous() takes ~0.8 ns an element here (100 us for a 128 x 1152 QKV
// output), which made the feature-major attention path cost more than it saved for dense layers.
#if SB_X86
SB_AVX2 void transpose_rows_avx2(const float* x, float* out, int64_t R, int64_t C, int64_t r0, int64_t r1) {
  const int64_t cfull = C / 8 * 8;
  int64_t r = r0;
  for (; r + 8 <= r1; r += 8) {
    for (int64_t c = 0; c < cfull; c += 8) {
      __m256 v[8];
      for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(x + (r + i) * C + c);
      transpose8x8(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + (c + i) * R + r, v[i]);
    }
    for (int64_t c = cfull; c < C; ++c)
      for (int i = 0; i < 8; ++i) out[c * R + r + i] = x[(r + i) * C + c];
  }
  for (; r < r1; ++r)
    for (int64_t c = 0; c < C; ++c) out[c * R + r] = x[r * C + c];
}
#endif

at::Tensor transpose(const at::Tensor& x, int64_t num_threads, const c10::optional<at::Tensor>& out_opt,
                     bool force_generic) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "transpose: x must be a contiguous float32 [R, C] tensor");
  const int64_t R = x.size(0), C = x.size(1);
  at::Tensor out = output_tensor(out_opt, C, R, x, "transpose");
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t panels = (R + 7) / 8;  // 8-row panels, the unit of work
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, R * C >= 16384 ? panels : 1)));
  const bool fast = cpu().avx2_fma && !force_generic;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t r0 = panels * t / nt * 8, r1 = std::min(R, panels * (t + 1) / nt * 8);
#if SB_X86
    if (fast) {
      transpose_rows_avx2(src, dst, R, C, r0, r1);
      continue;
    }
#endif
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < C; ++c) dst[c * R + r] = src[r * C + c];
  }
  (void)fast;
  return out;
}

// Raw entry points with minimal, cheap checks (the checked API is sparse_linear.py).
at::Tensor spmm(const at::Tensor& x, const at::Tensor& order,
                   const at::Tensor& row_ptr, const at::Tensor& col,
                   const at::Tensor& val, const c10::optional<at::Tensor>& bias,
                   int64_t N, int64_t fmt, int64_t k_chunk, int64_t n_block,
                   int64_t num_threads, const c10::optional<at::Tensor>& out, bool x_t, bool y_t,
                   int64_t tile_w, bool force_generic, int64_t act, const c10::optional<at::Tensor>& minmax) {
  TORCH_CHECK(fmt == 0 || fmt == 1, "spmm: fmt must be 0 (csr) or 1 (block4)");
  TORCH_CHECK(val.scalar_type() == at::kFloat, "spmm: val must be float32");
  Problem p;
  at::Tensor y = prepare(p, x, order, row_ptr, col, bias, N, k_chunk, n_block, out, x_t, y_t, tile_w, fmt == 1);
  TORCH_CHECK(val.numel() == col.numel() * (fmt == 1 ? 4 : 1), "spmm: val does not match col");
  set_epilogue(p, act, minmax);
  if (p.M == 0 || N == 0) return y;
  p.val = val.data_ptr<float>();
  const bool avx2 = cpu().avx2_fma && !force_generic;
  p.avx512 = avx2 && cpu().avx512;
  const int threads = static_cast<int>(std::max<int64_t>(1, num_threads));
  if (fmt == 0)
    run<Format::CSR>(p, threads, static_cast<int>(tile_w), avx2);
  else
    run<Format::BLOCK4>(p, threads, static_cast<int>(tile_w), avx2);
  return y;
}

// The AddNorm epilogue of an entry point from its optional arguments (checked against y [M, H]).
AddNorm make_addnorm(const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& gamma,
                     const c10::optional<at::Tensor>& beta, double eps, const c10::optional<at::Tensor>& minmax,
                     const at::Tensor& y, bool force_generic) {
  AddNorm ln;
  if (!(residual.has_value() && residual->defined())) return ln;
  const int64_t H = y.size(1);
  TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->is_contiguous() && residual->sizes() == y.sizes(),
              "add & norm: residual must be a contiguous float32 tensor shaped like the output");
  TORCH_CHECK(gamma.has_value() && beta.has_value() && gamma->scalar_type() == at::kFloat && gamma->is_contiguous() &&
                  gamma->numel() == H && beta->scalar_type() == at::kFloat && beta->is_contiguous() && beta->numel() == H,
              "add & norm: gamma and beta must be contiguous float32 [H] tensors");
  ln.residual = residual->data_ptr<float>();
  ln.gamma = gamma->data_ptr<float>();
  ln.beta = beta->data_ptr<float>();
  ln.eps = static_cast<float>(eps);
  ln.isa = force_generic ? 0 : cpu().avx512 ? 2 : cpu().avx2_fma ? 1 : 0;
  if (minmax.has_value() && minmax->defined()) {
    TORCH_CHECK(minmax->scalar_type() == at::kFloat && minmax->numel() == 2 && minmax->is_contiguous(),
                "add & norm: minmax must be a contiguous float32 tensor of 2 elements");
    ln.minmax = minmax->data_ptr<float>();
    ln.minmax[0] = INFINITY;
    ln.minmax[1] = -INFINITY;
  }
  return ln;
}

at::Tensor spmm_ffn(const at::Tensor& x, const at::Tensor& order1, const at::Tensor& row_ptr1, const at::Tensor& col1,
                    const at::Tensor& val1, const c10::optional<at::Tensor>& bias1, int64_t n1, int64_t fmt1,
                    int64_t k_chunk1, int64_t n_block1, const at::Tensor& order2, const at::Tensor& row_ptr2,
                    const at::Tensor& col2, const at::Tensor& val2, const c10::optional<at::Tensor>& bias2, int64_t n2,
                    int64_t fmt2, int64_t k_chunk2, int64_t n_block2, int64_t num_threads,
                    const c10::optional<at::Tensor>& out, int64_t act, bool force_generic,
                    const c10::optional<at::Tensor>& ln_residual, const c10::optional<at::Tensor>& ln_gamma,
                    const c10::optional<at::Tensor>& ln_beta, double ln_eps, const c10::optional<at::Tensor>& ln_minmax) {
  TORCH_CHECK((fmt1 == 0 || fmt1 == 1) && (fmt2 == 0 || fmt2 == 1), "spmm_ffn: fmt must be 0 (csr) or 1 (block4)");
  TORCH_CHECK(val1.scalar_type() == at::kFloat && val2.scalar_type() == at::kFloat, "spmm_ffn: val must be float32");
  TORCH_CHECK(val1.numel() == col1.numel() * (fmt1 == 1 ? 4 : 1) && val2.numel() == col2.numel() * (fmt2 == 1 ? 4 : 1),
              "spmm_ffn: val does not match col");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "spmm_ffn: x must be a contiguous float32 [M, K] tensor");
  const int64_t M = x.size(0);
  Problem p1, p2;
  set_weight(p1, x.size(1), order1, row_ptr1, col1, bias1, n1, k_chunk1, n_block1, fmt1 == 1);
  set_weight(p2, n1, order2, row_ptr2, col2, bias2, n2, k_chunk2, n_block2, fmt2 == 1);
  at::Tensor y = output_tensor(out, M, n2, x, "spmm_ffn");
  p1.x = x.data_ptr<float>();
  p1.y = nullptr;  // its output is the fused hidden tile
  p2.x = nullptr;  // its input is that tile
  p2.y = y.data_ptr<float>();
  p1.M = p2.M = M;
  p1.x_t = p1.y_t = p2.x_t = p2.y_t = false;  // token-major input and output
  p1.val = val1.data_ptr<float>();
  p2.val = val2.data_ptr<float>();
  set_epilogue(p1, act, c10::nullopt);
  if (M == 0 || n2 == 0) return y;
  const bool avx2 = cpu().avx2_fma && !force_generic;
  p1.avx512 = p2.avx512 = avx2 && cpu().avx512;
  const int threads = static_cast<int>(std::max<int64_t>(1, num_threads));
  const AddNorm ln = make_addnorm(ln_residual, ln_gamma, ln_beta, ln_eps, ln_minmax, y, force_generic);
  if (fmt1 == 0 && fmt2 == 0) run_ffn<Format::CSR, Format::CSR>(p1, p2, threads, avx2, ln);
  else if (fmt1 == 0) run_ffn<Format::CSR, Format::BLOCK4>(p1, p2, threads, avx2, ln);
  else if (fmt2 == 0) run_ffn<Format::BLOCK4, Format::CSR>(p1, p2, threads, avx2, ln);
  else run_ffn<Format::BLOCK4, Format::BLOCK4>(p1, p2, threads, avx2, ln);
  return y;
}

at::Tensor spmm_q8(const at::Tensor& x, const at::Tensor& order, const at::Tensor& row_ptr,
                   const at::Tensor& col, const at::Tensor& qval, const at::Tensor& wscale,
                   const at::Tensor& wsum, const c10::optional<at::Tensor>& bias, int64_t N,
                   int64_t k_chunk, int64_t n_block, double x_scale, int64_t x_zero_point,
                   int64_t num_threads, const c10::optional<at::Tensor>& out, bool x_t, bool y_t,
                   int64_t tile_w, bool force_generic, bool pairs, int64_t act,
                   const c10::optional<at::Tensor>& minmax, bool per_token) {
  // quads: 4 int8 weights per entry of col; pairs: 2 entries of col and one int32 (2 x int16) per pair
  TORCH_CHECK(qval.scalar_type() == at::kChar && qval.numel() == (pairs ? 2 : 4) * col.numel() && qval.is_contiguous(),
              "spmm_q8: qval must be a contiguous int8 tensor of 4 bytes per quad (quads: one col each; pairs: two)");
  TORCH_CHECK(!pairs || tile_w % 16 == 0, "spmm_q8: pairs need tile_w a multiple of 16");
  TORCH_CHECK(wscale.scalar_type() == at::kFloat && wscale.numel() == N && wscale.is_contiguous(),
              "spmm_q8: wscale must be a contiguous float32 [N] tensor");
  TORCH_CHECK(wsum.scalar_type() == at::kInt && wsum.numel() == N && wsum.is_contiguous(),
              "spmm_q8: wsum must be a contiguous int32 [N] tensor");
  TORCH_CHECK(x_scale > 0 && std::isfinite(x_scale), "spmm_q8: x_scale must be positive and finite");
  TORCH_CHECK(x_zero_point >= 0 && x_zero_point <= 127, "spmm_q8: x_zero_point must be in [0, 127]");
  Problem p;
  at::Tensor y = prepare(p, x, order, row_ptr, col, bias, N, k_chunk, n_block, out, x_t, y_t, tile_w, !pairs);
  set_epilogue(p, act, minmax);
  if (p.M == 0 || N == 0) return y;
  p.qval = qval.data_ptr<int8_t>();
  p.wscale = wscale.data_ptr<float>();
  p.wsum = wsum.data_ptr<int32_t>();
  p.x_scale = static_cast<float>(x_scale);
  p.x_inv_scale = 1.0f / static_cast<float>(x_scale);
  p.x_zp = static_cast<int32_t>(x_zero_point);
  const int threads = static_cast<int>(std::max<int64_t>(1, num_threads));
  std::vector<float> tok_scale, tok_inv;
  std::vector<int32_t> tok_zp;
  if (per_token) {  // each token's own range (arrays padded to whole tiles: the kernels read a tile's worth)
    tok_scale.assign(p.M + kMaxW, 1.0f);
    tok_inv.assign(p.M + kMaxW, 1.0f);
    tok_zp.assign(p.M + kMaxW, 0);
    TORCH_CHECK(all_token_qparams(p.x, p.M, p.K, p.x_t, threads, tok_scale.data(), tok_inv.data(), tok_zp.data()),
                "spmm_q8: cannot quantize activations with non-finite values (NaN or infinite)");
    p.x_scale_tok = tok_scale.data();
    p.x_inv_tok = tok_inv.data();
    p.x_zp_tok = tok_zp.data();
  }
  const bool avx2 = cpu().avx2_fma && !force_generic;
  p.vnni = avx2 && cpu().vnni;
  if (pairs)
    run<Format::Q8P>(p, threads, static_cast<int>(tile_w), avx2);
  else
    run<Format::Q8>(p, threads, static_cast<int>(tile_w), avx2);
  return y;
}

// Checks of one INT8 packed weight; fills its fields of `p`.
void set_weight_q8(Problem& p, int64_t K, const at::Tensor& order, const at::Tensor& row_ptr, const at::Tensor& col,
                   const at::Tensor& qval, const at::Tensor& wscale, const at::Tensor& wsum,
                   const c10::optional<at::Tensor>& bias, int64_t N, int64_t k_chunk, int64_t n_block, bool pairs) {
  TORCH_CHECK(qval.scalar_type() == at::kChar && qval.numel() == (pairs ? 2 : 4) * col.numel() && qval.is_contiguous(),
              "spmm_ffn_q8: qval must be a contiguous int8 tensor of 4 bytes per quad (quads: one col each; pairs: two)");
  TORCH_CHECK(wscale.scalar_type() == at::kFloat && wscale.numel() == N && wscale.is_contiguous() &&
                  wsum.scalar_type() == at::kInt && wsum.numel() == N && wsum.is_contiguous(),
              "spmm_ffn_q8: wscale / wsum must be contiguous float32 / int32 [N] tensors");
  set_weight(p, K, order, row_ptr, col, bias, N, k_chunk, n_block, !pairs);
  p.qval = qval.data_ptr<int8_t>();
  p.wscale = wscale.data_ptr<float>();
  p.wsum = wsum.data_ptr<int32_t>();
}

at::Tensor spmm_ffn_q8(const at::Tensor& x, const at::Tensor& order1, const at::Tensor& row_ptr1, const at::Tensor& col1,
                       const at::Tensor& qval1, const at::Tensor& wscale1, const at::Tensor& wsum1,
                       const c10::optional<at::Tensor>& bias1, int64_t n1, int64_t k_chunk1, int64_t n_block1, bool pairs1,
                       const at::Tensor& order2, const at::Tensor& row_ptr2, const at::Tensor& col2,
                       const at::Tensor& qval2, const at::Tensor& wscale2, const at::Tensor& wsum2,
                       const c10::optional<at::Tensor>& bias2, int64_t n2, int64_t k_chunk2, int64_t n_block2, bool pairs2,
                       double x_scale, int64_t x_zero_point, int64_t num_threads, const c10::optional<at::Tensor>& out,
                       int64_t act, bool force_generic, const c10::optional<at::Tensor>& ln_residual,
                       const c10::optional<at::Tensor>& ln_gamma, const c10::optional<at::Tensor>& ln_beta, double ln_eps,
                       const c10::optional<at::Tensor>& ln_minmax) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "spmm_ffn_q8: x must be a contiguous float32 [M, K] tensor");
  TORCH_CHECK(x_scale > 0 && std::isfinite(x_scale), "spmm_ffn_q8: x_scale must be positive and finite");
  TORCH_CHECK(x_zero_point >= 0 && x_zero_point <= 127, "spmm_ffn_q8: x_zero_point must be in [0, 127]");
  const int64_t M = x.size(0);
  Problem p1, p2;
  set_weight_q8(p1, x.size(1), order1, row_ptr1, col1, qval1, wscale1, wsum1, bias1, n1, k_chunk1, n_block1, pairs1);
  set_weight_q8(p2, n1, order2, row_ptr2, col2, qval2, wscale2, wsum2, bias2, n2, k_chunk2, n_block2, pairs2);
  at::Tensor y = output_tensor(out, M, n2, x, "spmm_ffn_q8");
  p1.x = x.data_ptr<float>();
  p1.y = nullptr;  // its output is the hidden tile
  p2.x = nullptr;  // its input is that tile
  p2.y = y.data_ptr<float>();
  p1.M = p2.M = M;
  p1.x_t = p1.y_t = p2.x_t = p2.y_t = false;  // token-major input and output
  p1.x_scale = static_cast<float>(x_scale);
  p1.x_inv_scale = 1.0f / p1.x_scale;
  p1.x_zp = static_cast<int32_t>(x_zero_point);
  set_epilogue(p1, act, c10::nullopt);
  if (M == 0 || n2 == 0) return y;
  const bool avx2 = cpu().avx2_fma && !force_generic;
  p1.vnni = p2.vnni = avx2 && cpu().vnni;
  const int threads = static_cast<int>(std::max<int64_t>(1, num_threads));
  const AddNorm ln = make_addnorm(ln_residual, ln_gamma, ln_beta, ln_eps, ln_minmax, y, force_generic);
  TORCH_CHECK(run_ffn_q8(p1, pairs1, p2, pairs2, threads, avx2, ln),
              "spmm_ffn_q8: the hidden activations hold NaN or infinite values (cannot quantize them)");
  return y;
}

// Checks of one packed weight of the attention block (any format); fills its fields of `p`.
void set_weight_any(Problem& p, int64_t K, const at::Tensor& order, const at::Tensor& row_ptr, const at::Tensor& col,
                    const at::Tensor& vals, const c10::optional<at::Tensor>& wscale, const c10::optional<at::Tensor>& wsum,
                    const c10::optional<at::Tensor>& bias, int64_t N, int64_t k_chunk, int64_t n_block, int64_t fmt) {
  TORCH_CHECK(fmt >= kCsr && fmt <= kPairs, "attention_block: fmt must be 0 (csr), 1 (block4), 2 (quads) or 3 (pairs)");
  if (fmt >= kQuads) {
    TORCH_CHECK(wscale.has_value() && wsum.has_value(), "attention_block: INT8 weights need wscale and wsum");
    return set_weight_q8(p, K, order, row_ptr, col, vals, *wscale, *wsum, bias, N, k_chunk, n_block, fmt == kPairs);
  }
  TORCH_CHECK(vals.scalar_type() == at::kFloat && vals.numel() == col.numel() * (fmt == kBlock4 ? 4 : 1),
              "attention_block: val must be float32 and match col");
  set_weight(p, K, order, row_ptr, col, bias, N, k_chunk, n_block, fmt == kBlock4);
  p.val = vals.data_ptr<float>();
}

at::Tensor attention_block(const at::Tensor& x, const c10::optional<at::Tensor>& mask, int64_t batch, int64_t seq,
                           int64_t heads, int64_t head_dim, const at::Tensor& order1, const at::Tensor& row_ptr1,
                           const at::Tensor& col1, const at::Tensor& vals1, const c10::optional<at::Tensor>& wscale1,
                           const c10::optional<at::Tensor>& wsum1, const c10::optional<at::Tensor>& bias1, int64_t k_chunk1,
                           int64_t n_block1, int64_t fmt1, const at::Tensor& order2, const at::Tensor& row_ptr2,
                           const at::Tensor& col2, const at::Tensor& vals2, const c10::optional<at::Tensor>& wscale2,
                           const c10::optional<at::Tensor>& wsum2, const c10::optional<at::Tensor>& bias2, int64_t n2,
                           int64_t k_chunk2, int64_t n_block2, int64_t fmt2, double x_scale, int64_t x_zero_point,
                           int64_t num_threads, const c10::optional<at::Tensor>& out, bool force_generic,
                           const c10::optional<at::Tensor>& ln_residual, const c10::optional<at::Tensor>& ln_gamma,
                           const c10::optional<at::Tensor>& ln_beta, double ln_eps,
                           const c10::optional<at::Tensor>& ln_minmax) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(0) == batch * seq,
              "attention_block: x must be a contiguous float32 [batch * seq, hidden] tensor");
  TORCH_CHECK((fmt1 >= kQuads) == (fmt2 >= kQuads), "attention_block: both layers FP32 or both INT8");
  const int64_t HD = heads * head_dim;
  const float* mk = nullptr;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kFloat && mask->is_contiguous() && mask->numel() == batch * seq,
                "attention_block: mask must be a contiguous float32 [batch, seq] tensor");
    mk = mask->data_ptr<float>();
  }
  Problem p1, p2;
  set_weight_any(p1, x.size(1), order1, row_ptr1, col1, vals1, wscale1, wsum1, bias1, 3 * HD, k_chunk1, n_block1, fmt1);
  set_weight_any(p2, HD, order2, row_ptr2, col2, vals2, wscale2, wsum2, bias2, n2, k_chunk2, n_block2, fmt2);
  at::Tensor y = output_tensor(out, batch * seq, n2, x, "attention_block");
  p1.x = x.data_ptr<float>();
  p2.y = y.data_ptr<float>();
  p1.x_scale = static_cast<float>(x_scale);
  p1.x_inv_scale = 1.0f / p1.x_scale;
  p1.x_zp = static_cast<int32_t>(x_zero_point);
  TORCH_CHECK(x_scale > 0 && std::isfinite(x_scale) && x_zero_point >= 0 && x_zero_point <= 127,
              "attention_block: x_scale must be positive and finite, x_zero_point in [0, 127]");
  if (batch == 0 || seq == 0 || n2 == 0) return y;
  const bool avx2 = cpu().avx2_fma && !force_generic;
  p1.avx512 = p2.avx512 = avx2 && cpu().avx512;
  p1.vnni = p2.vnni = avx2 && cpu().vnni;
  const int threads = static_cast<int>(std::max<int64_t>(1, num_threads));
  const AddNorm ln = make_addnorm(ln_residual, ln_gamma, ln_beta, ln_eps, ln_minmax, y, force_generic);
  TORCH_CHECK(run_attention_block(p1, fmt1, p2, fmt2, mk, batch, seq, heads, head_dim, threads, avx2,
                                  cpu().avx512 && !force_generic, ln),
              "attention_block: the attention context holds NaN or infinite values (cannot quantize it)");
  return y;
}

}  // namespace

namespace sparsebert {
at::Tensor attention_t(const at::Tensor& qkv_t, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim,
                       const c10::optional<at::Tensor>& mask, int64_t num_threads, bool avx512,
                       const c10::optional<at::Tensor>& out);  // attention.cpp
void add_layernorm_(at::Tensor& a, const at::Tensor& residual, const at::Tensor& gamma, const at::Tensor& beta, double eps,
                    int64_t num_threads, int isa, float* minmax);  // layernorm.cpp
}

namespace {

at::Tensor attention(const at::Tensor& qkv_t, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim,
                     const c10::optional<at::Tensor>& mask, int64_t num_threads, bool force_generic,
                     const c10::optional<at::Tensor>& out) {
  return sparsebert::attention_t(qkv_t, batch, seq, heads, head_dim, mask, num_threads, cpu().avx512 && !force_generic,
                                 out);
}

void add_layernorm(at::Tensor& a, const at::Tensor& residual, const at::Tensor& gamma, const at::Tensor& beta, double eps,
                   int64_t num_threads, bool force_generic, const c10::optional<at::Tensor>& minmax) {
  const int level = force_generic ? 0 : cpu().avx512 ? 2 : cpu().avx2_fma ? 1 : 0;
  float* mm = nullptr;
  if (minmax.has_value() && minmax->defined()) {
    TORCH_CHECK(minmax->scalar_type() == at::kFloat && minmax->numel() == 2 && minmax->is_contiguous(),
                "add_layernorm_: minmax must be a contiguous float32 tensor of 2 elements");
    mm = minmax->data_ptr<float>();
  }
  sparsebert::add_layernorm_(a, residual, gamma, beta, eps, num_threads, level, mm);
}

std::string isa() {
  return cpu().vnni ? "avx512_vnni" : cpu().avx512 ? "avx512f" : cpu().avx2_fma ? "avx2_fma" : "generic";
}

int last_num_threads() { return g_last_threads.load(std::memory_order_relaxed); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsebert sparse x dense kernels (unchecked; use sparsebert.engine.SparseLinear)";
  m.def("spmm", &spmm,
        "Y = X @ W^T (+ bias) with W packed as chunked, count-sorted CSR (fmt=0) or BLOCK4 (fmt=1)",
        py::arg("x"), py::arg("order"), py::arg("row_ptr"), py::arg("col"), py::arg("val"),
        py::arg("bias"), py::arg("n"), py::arg("fmt"), py::arg("k_chunk"), py::arg("n_block"),
        py::arg("num_threads"), py::arg("out") = py::none(), py::arg("x_t") = false,
        py::arg("y_t") = false, py::arg("tile_w") = 64,
        py::arg("force_generic") = false, py::arg("act") = 0, py::arg("minmax") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("spmm_ffn", &spmm_ffn,
        "Y = act(X @ W1^T + b1) @ W2^T + b2 (two packed FP32 weights, csr or block4), the hidden tile kept in cache",
        py::arg("x"), py::arg("order1"), py::arg("row_ptr1"), py::arg("col1"), py::arg("val1"), py::arg("bias1"),
        py::arg("n1"), py::arg("fmt1"), py::arg("k_chunk1"), py::arg("n_block1"), py::arg("order2"),
        py::arg("row_ptr2"), py::arg("col2"), py::arg("val2"), py::arg("bias2"), py::arg("n2"), py::arg("fmt2"),
        py::arg("k_chunk2"), py::arg("n_block2"), py::arg("num_threads"), py::arg("out") = py::none(),
        py::arg("act") = 0, py::arg("force_generic") = false, py::arg("ln_residual") = py::none(),
        py::arg("ln_gamma") = py::none(), py::arg("ln_beta") = py::none(), py::arg("ln_eps") = 1e-12,
        py::arg("ln_minmax") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("spmm_q8", &spmm_q8,
        "Y = dequant(quant(X) @ Wq^T) (+ bias): X quantized per tensor to [0, 127] with "
        "(x_scale, x_zero_point), or per token from its own range (per_token), Wq int8 quads packed like BLOCK4 (or pairs) with per-row scales wscale",
        py::arg("x"), py::arg("order"), py::arg("row_ptr"), py::arg("col"), py::arg("qval"),
        py::arg("wscale"), py::arg("wsum"), py::arg("bias"), py::arg("n"), py::arg("k_chunk"),
        py::arg("n_block"), py::arg("x_scale"), py::arg("x_zero_point"), py::arg("num_threads"),
        py::arg("out") = py::none(), py::arg("x_t") = false, py::arg("y_t") = false,
        py::arg("tile_w") = 64, py::arg("force_generic") = false, py::arg("pairs") = false,
        py::arg("act") = 0, py::arg("minmax") = py::none(), py::arg("per_token") = false,
        py::call_guard<py::gil_scoped_release>());
  m.def("spmm_ffn_q8", &spmm_ffn_q8,
        "Y = act(X @ W1^T + b1) @ W2^T + b2 in INT8 (two packed int8 weights, quads or pairs): X quantized per "
        "tensor with (x_scale, x_zero_point), the hidden activations per token inside the fused tile",
        py::arg("x"), py::arg("order1"), py::arg("row_ptr1"), py::arg("col1"), py::arg("qval1"), py::arg("wscale1"),
        py::arg("wsum1"), py::arg("bias1"), py::arg("n1"), py::arg("k_chunk1"), py::arg("n_block1"), py::arg("pairs1"),
        py::arg("order2"), py::arg("row_ptr2"), py::arg("col2"), py::arg("qval2"), py::arg("wscale2"),
        py::arg("wsum2"), py::arg("bias2"), py::arg("n2"), py::arg("k_chunk2"), py::arg("n_block2"), py::arg("pairs2"),
        py::arg("x_scale"), py::arg("x_zero_point"), py::arg("num_threads"), py::arg("out") = py::none(),
        py::arg("act") = 0, py::arg("force_generic") = false, py::arg("ln_residual") = py::none(),
        py::arg("ln_gamma") = py::none(), py::arg("ln_beta") = py::none(), py::arg("ln_eps") = 1e-12,
        py::arg("ln_minmax") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("attention_block", &attention_block,
        "out = O(attention(QKV(x))) one sequence per thread, the projections and context kept in cache (FP32: "
        "fmt 0 csr / 1 block4; INT8: 2 quads / 3 pairs, QKV input per tensor, O input per token)",
        py::arg("x"), py::arg("mask"), py::arg("batch"), py::arg("seq"), py::arg("heads"), py::arg("head_dim"),
        py::arg("order1"), py::arg("row_ptr1"), py::arg("col1"), py::arg("vals1"), py::arg("wscale1"), py::arg("wsum1"),
        py::arg("bias1"), py::arg("k_chunk1"), py::arg("n_block1"), py::arg("fmt1"), py::arg("order2"),
        py::arg("row_ptr2"), py::arg("col2"), py::arg("vals2"), py::arg("wscale2"), py::arg("wsum2"), py::arg("bias2"),
        py::arg("n2"), py::arg("k_chunk2"), py::arg("n_block2"), py::arg("fmt2"), py::arg("x_scale"),
        py::arg("x_zero_point"), py::arg("num_threads"), py::arg("out") = py::none(), py::arg("force_generic") = false,
        py::arg("ln_residual") = py::none(), py::arg("ln_gamma") = py::none(), py::arg("ln_beta") = py::none(),
        py::arg("ln_eps") = 1e-12, py::arg("ln_minmax") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("attention_t", &attention,
        "softmax(Q K^T / sqrt(D) + mask) V per head on feature-major activations: qkv_t [3*H*D, B*S] -> "
        "ctx_t [H*D, B*S] (see attention.cpp)",
        py::arg("qkv_t"), py::arg("batch"), py::arg("seq"), py::arg("heads"), py::arg("head_dim"),
        py::arg("mask"), py::arg("num_threads"), py::arg("force_generic") = false, py::arg("out") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("add_layernorm_", &add_layernorm,
        "a = LayerNorm(a + residual) * gamma + beta over the last dim, in place (see layernorm.cpp)",
        py::arg("a"), py::arg("residual"), py::arg("gamma"), py::arg("beta"), py::arg("eps"),
        py::arg("num_threads"), py::arg("force_generic") = false, py::arg("minmax") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("transpose", &transpose, "out[C, R] = x[R, C]^T for a contiguous float32 x (8x8 register transposes)",
        py::arg("x"), py::arg("num_threads"), py::arg("out") = py::none(), py::arg("force_generic") = false,
        py::call_guard<py::gil_scoped_release>());
  m.def("isa", &isa, "instruction set the kernels dispatch to on this CPU");
  m.def("last_num_threads", &last_num_threads,
        "OpenMP threads that ran the last kernel call's parallel region");
}
