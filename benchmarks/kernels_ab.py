"""Single-layer A/B of the sparse kernels' hot loops: AVX-512 (FP32) / VNNI (INT8) vs the AVX2 loops.

Each (M, K, N, pattern) SparseLinear / SparseLinearInt8 is timed in this process (the best ISA of the CPU)
and in a child started with ``SPARSEBERT_NO_AVX512=1`` (AVX2 loops), 2 threads, random weights magnitude-
free pruned at random (speed does not depend on the values).

    python benchmarks/kernels_ab.py            # prints a markdown table
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

SHAPES = [(128, 384, 1536), (128, 1536, 384), (4096, 768, 3072), (4096, 3072, 768)]
CASES = [("fp32", 0.9, "unstructured"), ("fp32", 0.8, "block4"), ("int8", 0.9, "unstructured"), ("int8", 0.8, "block4")]


def measure() -> dict:
    """Median-of-runs latency (ms) of every (shape, case) with the kernels this process dispatches to."""
    import torch

    from sparsebert.engine import SparseLinear, kernel_isa
    from sparsebert.engine.quantized_linear import SparseLinearInt8

    torch.manual_seed(0)
    out = {"isa": kernel_isa(), "ms": {}}
    for m, k, n in SHAPES:
        for precision, sp, pattern in CASES:
            w = torch.randn(n, k)
            keep = (torch.rand(n, k // 4) >= sp).repeat_interleave(4, 1) if pattern == "block4" else torch.rand(n, k) >= sp
            w = w * keep
            cls = SparseLinear if precision == "fp32" else SparseLinearInt8
            lin = cls.from_dense(w, torch.randn(n), pattern=pattern if precision == "fp32" else "auto", num_threads=2)
            x = torch.randn(m, k)
            for _ in range(3):
                lin(x)
            times = []
            t_end = time.perf_counter() + 1.0
            while time.perf_counter() < t_end or len(times) < 5:
                t = time.perf_counter()
                lin(x)
                times.append(time.perf_counter() - t)
            times.sort()
            out["ms"][f"{m}x{k}x{n} {precision} {pattern} {sp:.0%}"] = 1e3 * times[len(times) // 2]
    return out


if __name__ == "__main__":
    if "--child" in sys.argv:
        print(json.dumps(measure()))
        sys.exit(0)
    best = measure()
    env = dict(os.environ, SPARSEBERT_NO_AVX512="1")
    avx2 = json.loads(subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True,
                                     check=True).stdout.strip().splitlines()[-1])
    print(f"| layer (M x K x N) | {avx2['isa']} (ms) | {best['isa']} (ms) | speedup |\n|---|---|---|---|")
    for key, ms in best["ms"].items():
        print(f"| {key} | {avx2['ms'][key]:.3f} | {ms:.3f} | {avx2['ms'][key] / ms:.2f}x |")
