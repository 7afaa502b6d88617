"""Fixed vs per-nonzero cost of one sparse layer: where a bert-base FFN1 call's time goes as sparsity rises.

One ``SparseLinear`` (FP32, unstructured) and one ``SparseLinearInt8`` (pairs, per-tensor activation
range given) of shape M x K x N (default 4096 x 768 x 3072: bert-base FFN1 at batch 32, seq 128), GELU
epilogue, output buffer reused, 2 threads, weights pruned at random to each sparsity. For each it prints
the best-of-rounds latency and two derived figures:

* cycles per nonzero per 64 tokens (the hot loop's unit of work; ``--ghz`` is the assumed clock), and
* the marginal cost between consecutive sparsities (the extra time per extra nonzero), whose intercept
  is the call's fixed cost (packing the input, dequantizing, the epilogue and storing the output).

    python benchmarks/kernel_costs.py
    python benchmarks/kernel_costs.py --shape 4096 3072 768 --sparsities 0.99 0.95 0.9

Prints a markdown table; nothing is written to BENCHMARKS.md (quote it with its command).
"""

from __future__ import annotations

import argparse
import time

import torch


def _best_ms(fn, rounds: int) -> float:
    fn()  # warm-up: workspace pages, kernel build
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return 1e3 * best


def main() -> None:
    from sparsebert.engine import SparseLinear
    from sparsebert.engine.quantized_linear import SparseLinearInt8

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[4096, 768, 3072], metavar=("M", "K", "N"))
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.995, 0.98, 0.95, 0.9, 0.8])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--ghz", type=float, default=2.7, help="clock assumed for the cycle figures")
    a = ap.parse_args()
    m, k, n = a.shape
    threads = 2
    torch.manual_seed(0)
    x = torch.randn(m, k)
    x_range = (float(x.min()), float(x.max()))
    out = torch.empty(m, n)
    cycles_per_s = threads * a.ghz * 1e9
    print(f"{m} x {k} x {n}, GELU epilogue, {threads} threads; cycles at {a.ghz} GHz x {threads} cores\n")
    print("| sparsity | nonzeros | FP32 ms | FP32 cyc/nz/64 tok | FP32 marginal | INT8 ms | INT8 cyc/nz/64 tok | INT8 marginal |")
    print("|---|---|---|---|---|---|---|---|")
    prev = None
    for sp in sorted(a.sparsities, reverse=True):
        w = torch.randn(n, k) * (torch.rand(n, k) >= sp)
        b = torch.randn(n)
        fp32 = SparseLinear.from_dense(w, b, pattern="unstructured", num_threads=threads)
        int8 = SparseLinearInt8.from_dense(w, b, num_threads=threads, layout="pairs")
        t32 = _best_ms(lambda: fp32.run(x, act="gelu", out=out), a.rounds)
        t8 = _best_ms(lambda: int8.run(x, act="gelu", x_range=x_range, out=out), a.rounds)
        nnz = int((w != 0).sum())
        cyc = [ms * 1e-3 * cycles_per_s / (nnz * m / 64) for ms in (t32, t8)]  # per (nonzero, 64-token tile)
        marg = ([f"{(ms - ms0) * 1e-3 * cycles_per_s / ((nnz - prev[0]) * m / 64):.2f} cyc/nz"
                 for ms, ms0 in zip((t32, t8), prev[1:])] if prev else ["", ""])
        print(f"| {sp:.1%} | {nnz} | {t32:.2f} | {cyc[0]:.2f} | {marg[0]} | {t8:.2f} | {cyc[1]:.2f} | {marg[1]} |", flush=True)
        prev = (nnz, t32, t8)


if __name__ == "__main__":
    main()
