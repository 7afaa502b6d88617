"""Per-layer benchmark: SparseLinear kernels vs torch dense ``F.linear`` (MKL/oneDNN).

For the MiniLM-L6 and BERT-base Linear shapes (``N x K`` = out x in), M tokens (128 =
batch 1 x seq 128, 4096 = batch 32 x seq 128) and several sparsities, times torch dense
and the sparse kernel interleaved (dense, config 1, config 2, ..., repeated) so that
background load hits all of them alike, then prints a markdown table of milliseconds and
speedups over dense. The ratio uses the fastest repeat of each (least disturbed);
``--stat median`` uses medians instead.

    python benchmarks/kernels.py                     # full table, 2 threads
    python benchmarks/kernels.py --quick             # fewer repeats
    python benchmarks/kernels.py --mkl-avx2          # dense baseline limited to AVX2
                                                     # (what an AVX2-only CPU would get)
    python benchmarks/kernels.py --clock thread      # 1 thread, CPU time of the thread
    python benchmarks/kernels.py --int8              # + SparseLinearInt8 (auto quads/pairs) per config

On a shared machine wall-clock timings of multi-threaded runs are dominated by preemption
(other processes' time slices); ``--clock thread`` measures the CPU time the calling thread
spent (both MKL and the kernel then run in that thread), which is immune to it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

MINILM = [(384, 384), (1536, 384), (384, 1536)]
BERT_BASE = [(768, 768), (3072, 768), (768, 3072)]
CONFIGS = [  # (label, sparsity, pattern)
    ("0%", 0.0, "unstructured"),
    ("80%", 0.8, "unstructured"),
    ("90%", 0.9, "unstructured"),
    ("95%", 0.95, "unstructured"),
    ("80% block4", 0.8, "block4"),
]


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--m", type=int, nargs="+", default=[128, 4096], help="token counts M")
    p.add_argument("--models", nargs="+", default=["minilm", "bert-base"], choices=["minilm", "bert-base"])
    p.add_argument("--reps", type=int, default=0, help="repeats (default: 30 for M<=512, else 7)")
    p.add_argument("--quick", action="store_true", help="a third of the repeats")
    p.add_argument("--stat", choices=["min", "median"], default="min")
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="thread: single-threaded, time.thread_time (robust to other processes)")
    p.add_argument("--int8", action="store_true", help="also time SparseLinearInt8 (dynamic activations) per config")
    p.add_argument("--mkl-avx2", action="store_true",
                   help="re-run with MKL/oneDNN/ATen limited to AVX2 (emulates an AVX2-only CPU baseline)")
    return p.parse_args()


def _weight(n: int, k: int, sparsity: float, pattern: str, gen):
    import torch

    w = torch.randn(n, k, generator=gen) / k**0.5
    if pattern == "block4":
        keep = torch.rand(n, (k + 3) // 4, generator=gen) >= sparsity
        return w * keep.repeat_interleave(4, dim=1)[:, :k]
    return w * (torch.rand(n, k, generator=gen) >= sparsity)


def main() -> None:
    args = _parse()
    if args.mkl_avx2 and os.environ.get("MKL_ENABLE_INSTRUCTIONS") != "AVX2":
        env = dict(os.environ, MKL_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2",
                   ATEN_CPU_CAPABILITY="avx2")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    import torch
    import torch.nn.functional as F

    from sparsebert.engine import SparseLinear, SparseLinearInt8, kernel_isa

    if args.clock == "thread":
        args.threads = 1
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    shapes = (MINILM if "minilm" in args.models else []) + (BERT_BASE if "bert-base" in args.models else [])
    stat = min if args.stat == "min" else statistics.median

    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"MKL_ENABLE_INSTRUCTIONS={os.environ.get('MKL_ENABLE_INSTRUCTIONS', '-')}, "
          f"kernel ISA {kernel_isa()}, threads {args.threads}, clock {args.clock}, stat {args.stat}\n")
    labels = [c[0] for c in CONFIGS] + ([f"INT8 {c[0]}" for c in CONFIGS] if args.int8 else [])
    head = "| layer N x K | M | dense ms | " + " | ".join(f"{lb} ms (x)" for lb in labels) + " |"
    print(head)
    print("|" + "---|" * (3 + len(labels)))
    for m in args.m:
        for n, k in shapes:
            x = torch.randn(m, k, generator=gen)
            w_dense = torch.randn(n, k, generator=gen) / k**0.5
            b = torch.randn(n, generator=gen)
            weights = [_weight(n, k, s, pat, gen) for _, s, pat in CONFIGS]
            layers = [SparseLinear.from_dense(w, b, pattern=pat, num_threads=args.threads)
                      for w, (_, _, pat) in zip(weights, CONFIGS)]
            if args.int8:
                layers += [SparseLinearInt8.from_dense(w, b, num_threads=args.threads) for w in weights]
            fns = [lambda: F.linear(x, w_dense, b)] + [lambda lin=lin: lin(x) for lin in layers]
            for f in fns:  # warm-up (first-touch, caches, OpenMP pool)
                f()
            reps = args.reps or (30 if m <= 512 else 7)
            if args.quick:
                reps = max(3, reps // 3)
            times = [[] for _ in fns]
            for _ in range(reps):
                for f, t in zip(fns, times):
                    t0 = clock()
                    f()
                    t.append(clock() - t0)
            dense = stat(times[0]) * 1e3
            cells = [f"{stat(t) * 1e3:.3f} ({dense / (stat(t) * 1e3):.2f}x)" for t in times[1:]]
            print(f"| {n} x {k} | {m} | {dense:.3f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
