"""Instruction throughput of this CPU's 512-bit multiply-add instructions: what bounds the engine's hot loops.

Compiles (torch cpp_extension, ~20 s once) a loop of 12 independent chains of each instruction and prints how many
it retires per nanosecond on one core:

* ``vfmadd231ps zmm`` (FP32 FMA, 16 MACs): the FP32 sparse loop and the attention kernel;
* ``vfmadd231ph zmm`` (FP16 FMA, 32 MACs; AVX512-FP16 only);
* ``vpdpwssd zmm`` (VNNI, int16 pairs, 32 MACs): the INT8 pairs loop, with and without the ``vpunpcklwd`` it needs;
* ``vpdpbusd zmm`` (VNNI, uint8 x int8 quads, 64 MACs): the INT8 quads loop;
* ``vdpbf16ps zmm`` (AVX512-BF16, 32 MACs).

    python benchmarks/isa_throughput.py

Prints a markdown table (instructions and MACs per ns); nothing is written to BENCHMARKS.md. Needs an x86-64 CPU with
AVX-512F; rows whose ISA extension the CPU lacks are skipped.
"""

from __future__ import annotations

import time

import torch
from torch.utils.cpp_extension import load_inline

_SRC = r"""
#include <immintrin.h>
#include <cstdint>
#define CHAINS(INIT, OP)                                                          \
  INIT;                                                                          \
  for (int64_t k = 0; k < n; ++k) {                                              \
    a0 = OP(a0); a1 = OP(a1); a2 = OP(a2); a3 = OP(a3); a4 = OP(a4); a5 = OP(a5);  \
    a6 = OP(a6); a7 = OP(a7); a8 = OP(a8); a9 = OP(a9); a10 = OP(a10); a11 = OP(a11); \
  }

#define T __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16,avx512fp16"), noinline))
// Distinct start values so the compiler cannot merge the chains; the sums are returned so they are not dropped.
#define F32_INIT __m512 a0 = _mm512_set1_ps(x), a1 = _mm512_set1_ps(x + 1), a2 = _mm512_set1_ps(x + 2), \
  a3 = _mm512_set1_ps(x + 3), a4 = _mm512_set1_ps(x + 4), a5 = _mm512_set1_ps(x + 5), a6 = _mm512_set1_ps(x + 6), \
  a7 = _mm512_set1_ps(x + 7), a8 = _mm512_set1_ps(x + 8), a9 = _mm512_set1_ps(x + 9), a10 = _mm512_set1_ps(x + 10), \
  a11 = _mm512_set1_ps(x + 11)
#define F32_SUM _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)), \
  _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)), \
  _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)))))
#define I32_INIT __m512i a0 = _mm512_set1_epi32(x), a1 = _mm512_set1_epi32(x + 1), a2 = _mm512_set1_epi32(x + 2), \
  a3 = _mm512_set1_epi32(x + 3), a4 = _mm512_set1_epi32(x + 4), a5 = _mm512_set1_epi32(x + 5), \
  a6 = _mm512_set1_epi32(x + 6), a7 = _mm512_set1_epi32(x + 7), a8 = _mm512_set1_epi32(x + 8), \
  a9 = _mm512_set1_epi32(x + 9), a10 = _mm512_set1_epi32(x + 10), a11 = _mm512_set1_epi32(x + 11)
#define I32_SUM _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), \
  _mm512_add_epi32(a2, a3)), _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a4, a5), _mm512_add_epi32(a6, a7)), \
  _mm512_add_epi32(_mm512_add_epi32(a8, a9), _mm512_add_epi32(a10, a11)))))

T double fma_ps(int64_t n, int x) {
  const __m512 b = _mm512_set1_ps(0.999f), c = _mm512_set1_ps(1e-3f);
#define OP(a) _mm512_fmadd_ps(a, b, c)
  CHAINS(F32_INIT, OP)
#undef OP
  return F32_SUM;
}
T double fma_ph(int64_t n, int x) {
  const __m512h b = _mm512_set1_ph((_Float16)0.999f), c = _mm512_set1_ph((_Float16)1e-3f);
  __m512h a0 = _mm512_set1_ph((_Float16)x), a1 = _mm512_set1_ph((_Float16)(x + 1)), a2 = _mm512_set1_ph((_Float16)(x + 2)),
          a3 = _mm512_set1_ph((_Float16)(x + 3)), a4 = _mm512_set1_ph((_Float16)(x + 4)), a5 = _mm512_set1_ph((_Float16)(x + 5)),
          a6 = _mm512_set1_ph((_Float16)(x + 6)), a7 = _mm512_set1_ph((_Float16)(x + 7)), a8 = _mm512_set1_ph((_Float16)(x + 8)),
          a9 = _mm512_set1_ph((_Float16)(x + 9)), a10 = _mm512_set1_ph((_Float16)(x + 10)), a11 = _mm512_set1_ph((_Float16)(x + 11));
#define OP(a) _mm512_fmadd_ph(a, b, c)
  CHAINS((void)0, OP)
#undef OP
  __m512h s = _mm512_add_ph(_mm512_add_ph(_mm512_add_ph(a0, a1), _mm512_add_ph(a2, a3)),
                            _mm512_add_ph(_mm512_add_ph(a4, a5), _mm512_add_ph(a6, a7)));
  s = _mm512_add_ph(s, _mm512_add_ph(_mm512_add_ph(a8, a9), _mm512_add_ph(a10, a11)));
  return (double)_mm512_reduce_add_ph(s);
}
T double dpwssd(int64_t n, int x) {
  const __m512i b = _mm512_set1_epi16(1), c = _mm512_set1_epi16(2);
#define OP(a) _mm512_dpwssd_epi32(a, b, c)
  CHAINS(I32_INIT, OP)
#undef OP
  return I32_SUM;
}
T double unpack_dpwssd(int64_t n, int x) {  // the INT8 pairs loop's pattern: an unpack feeding each vpdpwssd
  __m512i b = _mm512_set1_epi16(1), c = _mm512_set1_epi16(2);
#define OP(a) _mm512_dpwssd_epi32(a, _mm512_unpacklo_epi16(b, a), c)
  CHAINS(I32_INIT, OP)
#undef OP
  return I32_SUM;
}
T double dpbusd(int64_t n, int x) {
  const __m512i b = _mm512_set1_epi8(1), c = _mm512_set1_epi8(1);
#define OP(a) _mm512_dpbusd_epi32(a, b, c)
  CHAINS(I32_INIT, OP)
#undef OP
  return I32_SUM;
}
T double dpbf16(int64_t n, int x) {
  const __m512bh b = (__m512bh)_mm512_set1_epi16(0x3f80), c = (__m512bh)_mm512_set1_epi16(0x0001);
#define OP(a) _mm512_dpbf16_ps(a, b, c)
  CHAINS(F32_INIT, OP)
#undef OP
  return F32_SUM;
}
"""
_ROWS = [  # (function, instruction, MACs per instruction, cpuinfo flag needed)
    ("fma_ps", "vfmadd231ps zmm (FP32)", 16, "avx512f"),
    ("fma_ph", "vfmadd231ph zmm (FP16)", 32, "avx512_fp16"),
    ("dpwssd", "vpdpwssd zmm (int16 pairs)", 32, "avx512_vnni"),
    ("unpack_dpwssd", "vpunpcklwd + vpdpwssd zmm (the INT8 pairs loop)", 32, "avx512_vnni"),
    ("dpbusd", "vpdpbusd zmm (uint8 x int8 quads)", 64, "avx512_vnni"),
    ("dpbf16", "vdpbf16ps zmm (BF16 pairs)", 32, "avx512_bf16"),
]


def main() -> None:
    flags = set(open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split())
    names = [r[0] for r in _ROWS]
    mod = load_inline("sparsebert_isa_throughput", cpp_sources=_SRC + "\n".join(
        f"double run_{n}(int64_t k) {{ return {n}(k, 1); }}" for n in names),
        functions=[f"run_{n}" for n in names], extra_cflags=["-O2"], verbose=False)
    n = 50_000_000
    print("| instruction | per ns (1 core) | MACs per ns |\n|---|---|---|")
    for fn, label, macs, flag in _ROWS:
        if flag not in flags:
            print(f"| {label} | (no {flag}) | |")
            continue
        run = getattr(mod, f"run_{fn}")
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            run(n)
            best = min(best, time.perf_counter() - t)
        rate = 12 * n / best / 1e9
        print(f"| {label} | {rate:.2f} | {rate * macs:.0f} |", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
