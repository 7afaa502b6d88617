"""The engine's non-Linear fused kernels and its packed dense GEMM, each against the torch op it replaces.

Three A/B tables, 2 threads, each pair timed in alternation (7 rounds, the median of each round's best), so machine
noise hits both sides alike:

* attention: ``kernels/attention.cpp`` on feature-major Q/K/V vs ``F.scaled_dot_product_attention`` on the
  token-major QKV output (head split as views, then the ``[B*S, H]`` context copy the next layer needs);
* add + LayerNorm: ``kernels/layernorm.cpp`` vs ``F.layer_norm(a.add_(r))``;
* dense GEMM: MKL's pre-packed sgemm (``torch.ops.mkl._mkl_linear``) vs ``F.linear``;
* sparse FFN: ``fused_ffn`` (both FFN layers in one ``spmm_ffn`` call, the hidden tile kept in cache) vs the two
  ``SparseLinear.run`` calls (GELU in the first one's epilogue, output buffers reused as the engine does).

    python benchmarks/fused_ops.py            # prints the tables and writes them to BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from _report import ROOT, write_section


def ab(fa, fb, rounds: int = 7, reps: int = 20) -> tuple[float, float]:
    """Median over ``rounds`` of the best of ``reps`` calls (µs), ``fa`` and ``fb`` in alternation."""
    best_a, best_b = [], []
    for _ in range(rounds):
        for f, out in ((fa, best_a), (fb, best_b)):
            f()
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t)
            out.append(min(ts))
    return 1e6 * sorted(best_a)[rounds // 2], 1e6 * sorted(best_b)[rounds // 2]


def attention_rows(mod) -> list[str]:
    rows = []
    for b, s, h, d in ((1, 128, 12, 32), (1, 128, 12, 64), (32, 128, 12, 32), (32, 128, 12, 64)):
        qkv = torch.randn(b * s, 3 * h * d)
        qkv_t = qkv.t().contiguous()

        def sdpa():
            q, k, v = (t.transpose(1, 2) for t in qkv.view(b, s, 3, h, d).unbind(2))
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * s, h * d)

        def fused():
            return mod.attention_t(qkv_t, b, s, h, d, None, 2, False)

        reps = 20 if b == 1 else 3
        t_sdpa, t_fused = ab(sdpa, fused, reps=reps)
        rows.append(f"| batch {b}, seq {s}, {h} heads x {d} | {t_sdpa:.0f} | {t_fused:.0f} | {t_sdpa / t_fused:.2f}x |")
    return rows


def layernorm_rows(mod) -> list[str]:
    rows = []
    for m, h in ((128, 384), (128, 768), (4096, 384), (4096, 768)):
        a, r = torch.randn(m, h), torch.randn(m, h)
        g, bta = torch.randn(h), torch.randn(h)
        a1, a2 = a.clone(), a.clone()

        def torch_ln():
            return F.layer_norm(a1.copy_(a).add_(r), (h,), g, bta, 1e-12)

        def fused():
            mod.add_layernorm_(a2.copy_(a), r, g, bta, 1e-12, 2, False)

        t_torch, t_fused = ab(torch_ln, fused, reps=20 if m < 1000 else 5)
        rows.append(f"| {m} x {h} | {t_torch:.0f} | {t_fused:.0f} | {t_torch / t_fused:.2f}x |")
    return rows


def gemm_rows() -> list[str]:
    rows = []
    for m, k, n in ((128, 384, 1152), (128, 384, 1536), (128, 1536, 384), (128, 768, 2304), (128, 768, 3072),
                    (128, 3072, 768), (4096, 768, 3072)):
        x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
        t_lin, t_pack = ab(lambda: F.linear(x, w, b), lambda: torch.ops.mkl._mkl_linear(x, packed, w, b, m),
                           reps=20 if m < 1000 else 2)
        rows.append(f"| {m} x {k} x {n} | {t_lin:.0f} | {t_pack:.0f} | {t_lin / t_pack:.2f}x |")
    return rows


def ffn_rows() -> list[str]:
    from sparsebert.engine.sparse_linear import SparseLinear, fused_ffn

    rows = []
    for m, k, n, sparsity in ((128, 384, 1536, 0.9), (4096, 384, 1536, 0.9), (4096, 768, 3072, 0.8),
                              (4096, 768, 3072, 0.9)):
        w1, w2 = torch.randn(n, k), torch.randn(k, n)
        w1[torch.rand(n, k) < sparsity] = 0
        w2[torch.rand(k, n) < sparsity] = 0
        first = SparseLinear.from_dense(w1, torch.randn(n), pattern="unstructured", num_threads=2)
        second = SparseLinear.from_dense(w2, torch.randn(k), pattern="unstructured", num_threads=2)
        x, h, out = torch.randn(m, k), torch.empty(m, n), torch.empty(m, k)
        t_two, t_fused = ab(lambda: second.run(first.run(x, act="gelu", out=h), out=out),
                            lambda: fused_ffn(first, second, x, "gelu", out=out), reps=20 if m < 1000 else 3)
        rows.append(f"| {m} x {k} x {n}, {sparsity:.0%} | {t_two:.0f} | {t_fused:.0f} | {t_two / t_fused:.2f}x |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=True, help="write BENCHMARKS.md")
    a = ap.parse_args()
    from sparsebert.engine import kernel_isa
    from sparsebert.engine.kernels import load

    torch.manual_seed(0)
    torch.set_num_threads(2)
    mod = load()
    if mod is None:
        raise SystemExit("compiled kernels unavailable")
    t0 = time.time()
    body = [f"Command: `python benchmarks/fused_ops.py` (kernels: {kernel_isa()}, torch {torch.__version__}, 2 threads). "
            "Each pair timed in alternation, 7 rounds, median of each round's best call (µs); both LayerNorm "
            "columns include the copy that resets their input.", "",
            "| attention (fp32) | SDPA + context copy | fused (`attention.cpp`) | speedup |", "|---|---|---|---|",
            *attention_rows(mod), "",
            "| residual add + LayerNorm, rows x hidden | torch add_ + layer_norm | fused (`layernorm.cpp`) | speedup |",
            "|---|---|---|---|", *layernorm_rows(mod), ""]
    if torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"):
        body += ["| dense Linear, M x K x N | F.linear | MKL pre-packed (`torch.ops.mkl._mkl_linear`) | speedup |",
                 "|---|---|---|---|", *gemm_rows(), ""]
    body += ["| sparse FFN (GELU), M x H x 4H, unstructured | two `SparseLinear.run` calls | `fused_ffn` | speedup |",
             "|---|---|---|---|", *ffn_rows(), ""]
    body.append(f"({time.time() - t0:.0f} s)")
    text = "\n".join(body)
    print(text)
    if a.write:
        write_section(ROOT / "BENCHMARKS.md", "engine_fused_ops", "Engine: fused attention, add + LayerNorm, packed dense GEMM, fused sparse FFN", text)


if __name__ == "__main__":
    main()
