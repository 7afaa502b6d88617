"""INT8 sparse kernel (``spmm_q8`` / ``SparseLinearInt8``) against the plain-torch fake-quant reference,
and the mixed-layout ``run`` entry points of both precisions against torch's dense matmul."""

from __future__ import annotations

import os

import pytest
import torch

from sparsebert.engine import SparseLinear, SparseLinearInt8, reference_int8_linear
from sparsebert.engine import kernels as kernels_pkg
from sparsebert.engine.quantized_linear import (activation_qparams_7bit, activation_qparams_per_token, fused_ffn_int8,
                                               quantize_weight)

needs_kernels = pytest.mark.skipif(
    os.environ.get("SPARSEBERT_DISABLE_KERNELS", "") not in ("", "0"), reason="kernels disabled by env"
)

SHAPES = [  # (M, K, N): odd sizes, not multiples of the SIMD width (8 floats / 32 bytes)
    (1, 33, 17),
    (5, 7, 9),
    (67, 100, 70),
    (130, 98, 64),  # two full 64-token tiles + a ragged tail; K not a multiple of 4
    (96, 300, 72),  # a 64- and a 32-token tile, three K chunks summed into one tile
    (64, 517, 136),  # several K chunks
    (32, 70, 33),  # tiles of 2 / 4 registers (the VNNI loops where the CPU has them)
    (48, 70, 33),  # 3 / 6 registers
]


def _weight(n: int, k: int, sparsity: float, pattern: str, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, generator=gen)
    if pattern == "block4":
        keep = (torch.rand(n, (k + 3) // 4, generator=gen) >= sparsity).repeat_interleave(4, dim=1)[:, :k]
    elif pattern == "2:4":  # the 2 largest of every 4 consecutive inputs
        wp = torch.nn.functional.pad(w, (0, (-k) % 4)).view(n, -1, 4)
        idx = wp.abs().topk(2, dim=-1).indices
        keep = torch.zeros_like(wp, dtype=torch.bool).scatter(-1, idx, True).view(n, -1)[:, :k]
    else:
        keep = torch.rand(n, k, generator=gen) >= sparsity
    w = w * keep
    if n > 2:
        w[1] = 0.0  # an all-zero output row
    return w


def _close(y: torch.Tensor, ref: torch.Tensor) -> None:
    # Same integers, same scales: only float32 rounding of the final scale-and-add differs.
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=2e-6 * scale)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M%d_K%d_N%d" % s)
@pytest.mark.parametrize("sparsity,pattern", [(0.0, "unstructured"), (0.9, "unstructured"), (0.8, "block4"), (0.5, "2:4")])
def test_int8_matches_fake_quant_reference(shape, sparsity, pattern):
    m, k, n = shape
    gen = torch.Generator().manual_seed(hash((shape, sparsity, pattern)) % 2**31)
    w = _weight(n, k, sparsity, pattern, gen)
    b = torch.randn(n, generator=gen)
    x = torch.randn(m, k, generator=gen) * 3 + 0.5  # asymmetric range: zero point != 0
    wq, _ = quantize_weight(w)
    ref = reference_int8_linear(x, w, b)
    for layout, fmt in (("quads", "q8"), ("pairs", "q8p")):
        lin = SparseLinearInt8.from_dense(w, b, pattern=pattern if pattern != "block4" else "auto", num_threads=2, layout=layout)
        assert lin.format == fmt
        assert torch.equal(lin.int_weight(), wq.float())
        _close(lin(x), ref)
        _close(lin.run(x.t().contiguous(), x_t=True, y_t=True).t(), ref)
        _close(lin.run(x, y_t=True).t(), ref)
    _close(SparseLinearInt8.from_dense(w, b, pattern="dense")(x), ref)


def test_int8_auto_layout():
    gen = torch.Generator().manual_seed(10)
    assert SparseLinearInt8.from_dense(_weight(64, 96, 0.9, "unstructured", gen)).format == "q8p"
    assert SparseLinearInt8.from_dense(_weight(64, 96, 0.8, "block4", gen)).format == "q8"
    assert SparseLinearInt8.from_dense(_weight(64, 96, 0.0, "unstructured", gen)).format == "q8"
    with pytest.raises(ValueError, match="layout"):
        SparseLinearInt8.from_dense(_weight(8, 8, 0.5, "unstructured", gen), layout="triples")


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES[1:4], ids=lambda s: "M%d_K%d_N%d" % s)
def test_int8_portable_path_matches_reference(shape):
    m, k, n = shape
    gen = torch.Generator().manual_seed(11)
    w, b, x = _weight(n, k, 0.7, "unstructured", gen), torch.randn(n, generator=gen), torch.randn(m, k, generator=gen)
    sx, zp = activation_qparams_7bit(x)
    mod = kernels_pkg.load()
    ref = reference_int8_linear(x, w, b)
    for layout in ("quads", "pairs"):
        lin = SparseLinearInt8.from_dense(w, b, layout=layout)
        args = (x, lin.order, lin.row_ptr, lin.col, lin.qval, lin.wscale, lin.wsum, lin.bias, n, lin.k_chunk, lin.n_block, sx, zp, 2)
        pairs = layout == "pairs"
        _close(mod.spmm_q8(*args, force_generic=True, pairs=pairs), ref)
        _close(mod.spmm_q8(*args, pairs=pairs), ref)
        _close(mod.spmm_q8(x.t().contiguous(), *args[1:], x_t=True, force_generic=True, pairs=pairs), ref)


def test_int8_qat_scales_and_quantization_error_bounded():
    gen = torch.Generator().manual_seed(12)
    w, x = _weight(40, 64, 0.8, "unstructured", gen), torch.randn(9, 64, generator=gen)
    scale = (w.abs().amax(1) / 100).clamp_min(1e-8)  # e.g. learned in QAT: values up to +-100
    lin = SparseLinearInt8.from_dense(w, None, weight_scale=scale)
    assert torch.equal(lin.wscale, scale) and int(lin.int_weight().abs().max()) == 100
    _close(lin(x), reference_int8_linear(x, w, None, scale))
    exact = x @ w.T  # the INT8 result stays within a few quantization steps of float32
    assert float((lin(x) - exact).abs().max()) < 0.05 * float(exact.abs().max())
    with pytest.raises(ValueError, match="40"):
        SparseLinearInt8.from_dense(w, None, weight_scale=torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        SparseLinearInt8.from_dense(w, None, weight_scale=torch.zeros(40))


def test_int8_bad_inputs():
    lin = SparseLinearInt8.from_dense(torch.randn(8, 12))
    with pytest.raises(ValueError, match=r"\[\.\.\., 12\]"):
        lin(torch.zeros(4, 13))
    with pytest.raises(ValueError, match="non-finite"):
        lin(torch.full((2, 12), float("inf")))
    with pytest.raises(ValueError, match="2:4"):
        SparseLinearInt8.from_dense(torch.randn(8, 12), pattern="2:4")
    # a wrong dtype is a TypeError, a wrong shape a ValueError, as for the FP32 SparseLinear.from_dense
    with pytest.raises(TypeError, match="float32"):
        SparseLinearInt8.from_dense(torch.zeros(8, 12, dtype=torch.float16))
    with pytest.raises(TypeError, match="bias must be a float32"):
        SparseLinearInt8.from_dense(torch.zeros(8, 12), torch.zeros(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D"):
        SparseLinearInt8.from_dense(torch.zeros(8))
    with pytest.raises(ValueError, match=r"\[8\]"):
        SparseLinearInt8.from_dense(torch.zeros(8, 12), torch.zeros(7))
    assert lin(torch.zeros(0, 12)).shape == (0, 8)


@pytest.mark.parametrize("pattern", ["unstructured", "block4", "dense"])
@pytest.mark.parametrize("x_t,y_t", [(False, False), (False, True), (True, False), (True, True)])
def test_fp32_run_layouts_match_dense(pattern, x_t, y_t):
    gen = torch.Generator().manual_seed(13)
    w, b, x = _weight(37, 45, 0.85, "unstructured", gen), torch.randn(37, generator=gen), torch.randn(70, 45, generator=gen)
    lin = SparseLinear.from_dense(w, b, pattern=pattern)
    y = lin.run(x.t().contiguous() if x_t else x, x_t=x_t, y_t=y_t)
    ref = (x.double() @ w.double().T + b.double()).float()
    torch.testing.assert_close(y.t() if y_t else y, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    out = torch.full((37, 70) if y_t else (70, 37), float("nan"))  # a reused buffer: every element overwritten
    got = lin.run(x.t().contiguous() if x_t else x, x_t=x_t, y_t=y_t, out=out)
    assert got is out or pattern == "dense"  # dense layers at <= PACK_MAX_ROWS rows return MKL's own output
    torch.testing.assert_close(got, y)


@pytest.mark.parametrize("pattern", ["unstructured", "block4", "dense"])
@pytest.mark.parametrize("y_t", [False, True])
def test_int8_run_writes_into_out(pattern, y_t):
    gen = torch.Generator().manual_seed(15)
    w, b, x = _weight(37, 48, 0.85, "unstructured", gen), torch.randn(37, generator=gen), torch.randn(70, 48, generator=gen)
    lin = SparseLinearInt8.from_dense(w, b, pattern=pattern)
    y = lin.run(x, y_t=y_t, act="gelu")
    out = torch.full(y.shape, float("nan"))
    assert lin.run(x, y_t=y_t, act="gelu", out=out) is out
    torch.testing.assert_close(out, y, rtol=0, atol=0)


@needs_kernels
def test_kernel_reports_threads_used():
    mod = kernels_pkg.load()
    gen = torch.Generator().manual_seed(14)
    w = _weight(256, 64, 0.5, "unstructured", gen)
    x = torch.randn(256, 64, generator=gen)  # 4 token tiles: enough work for 2 threads
    for threads in (1, 2):
        SparseLinear.from_dense(w, None, pattern="unstructured", num_threads=threads)(x)
        assert mod.last_num_threads() == threads
        for layout in ("quads", "pairs"):
            SparseLinearInt8.from_dense(w, None, num_threads=threads, layout=layout)(x)
            assert mod.last_num_threads() == threads


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("kind", ["csr", "block4", "dense", "q8", "q8p", "int8-dense"])
def test_fused_activation_and_range(act, kind):
    gen = torch.Generator().manual_seed(15)
    w, b = _weight(45, 53, 0.8, "unstructured", gen), torch.randn(45, generator=gen)
    x = torch.randn(67, 53, generator=gen)
    if kind in ("csr", "block4", "dense"):
        lin = SparseLinear.from_dense(w, b, pattern={"csr": "unstructured"}.get(kind, kind))
        pre = (x.double() @ w.double().T + b.double()).float()
    else:
        lin = SparseLinearInt8.from_dense(w, b, pattern="dense" if kind == "int8-dense" else "auto",
                                          layout={"q8": "quads", "q8p": "pairs"}.get(kind, "auto"))
        pre = reference_int8_linear(x, w, b)
    ref = {"gelu": torch.nn.functional.gelu(pre), "gelu_tanh": torch.nn.functional.gelu(pre, approximate="tanh"),
           "relu": pre.relu()}[act]
    minmax = torch.empty(2)
    for y_t in (False, True):
        y = lin.run(x, y_t=y_t, act=act, minmax=minmax)
        torch.testing.assert_close(y.t() if y_t else y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        assert torch.allclose(minmax, torch.stack(torch.aminmax(y)))
    if isinstance(lin, SparseLinearInt8):  # a known input range gives the same result as measuring it
        rng = torch.stack(torch.aminmax(x))
        torch.testing.assert_close(lin.run(x, x_range=rng), lin.run(x))


def test_per_token_qparams_match_per_tensor_on_each_row():
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(7, 30, generator=gen) * torch.arange(1, 8)[:, None] + torch.linspace(-2, 2, 7)[:, None]
    x[3] = x[3].abs()  # a row without negative values: zero point 0
    scale, zp = activation_qparams_per_token(x)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    for i in range(7):
        s, z = activation_qparams_7bit(x[i : i + 1])
        assert float(scale[i]) == pytest.approx(s, rel=1e-7) and int(zp[i]) == z
    assert int(zp[3]) == 0
    with pytest.raises(ValueError, match="non-finite"):
        activation_qparams_per_token(torch.tensor([[0.0, float("nan")]]))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M%d_K%d_N%d" % s)
@pytest.mark.parametrize("pattern", ["unstructured", "block4", "dense"])
def test_int8_per_token_matches_reference(shape, pattern):
    """Per-token activation quantization (the engine's FFN2 input): every layout equals the reference,
    and each token's result is that token's alone (the same as quantizing it by itself)."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(hash((shape, pattern, "tok")) % 2**31)
    w = _weight(n, k, 0.8, pattern if pattern != "dense" else "unstructured", gen)
    b = torch.randn(n, generator=gen)
    x = torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 5 + 0.3  # a range per token
    ref = reference_int8_linear(x, w, b, per_token=True)
    layouts = ("quads", "pairs") if pattern != "dense" else ("auto",)
    for layout in layouts:
        lin = SparseLinearInt8.from_dense(w, b, pattern="dense" if pattern == "dense" else "auto", num_threads=2,
                                          layout=layout)
        _close(lin.run(x, per_token=True), ref)
        _close(lin.run(x, per_token=True, y_t=True).t(), ref)
        _close(lin.run(x.t().contiguous(), x_t=True, per_token=True), ref)  # feature-major: a token per column
        if m > 1:
            _close(lin.run(x[-1:], per_token=True), ref[-1:])  # batch-independent
        bad = x.clone()
        bad[m // 2, k // 2] = float("nan")
        with pytest.raises((RuntimeError, ValueError), match="non-finite"):
            lin.run(bad, per_token=True)


FFN_SHAPES = [  # (M, H, FFN): odd sizes; M = whole 64-token tiles, a ragged tail, a 16-token tail
    (128, 40, 100),
    (130, 33, 70),
    (200, 64, 256),
    (144, 24, 520),  # several K chunks in FFN2
]


@needs_kernels
@pytest.mark.parametrize("shape", FFN_SHAPES, ids=lambda s: "M%d_H%d_F%d" % s)
@pytest.mark.parametrize("layouts", [("pairs", "pairs"), ("quads", "quads"), ("pairs", "quads"), ("quads", "pairs")])
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_fused_ffn_int8_equals_two_calls(shape, layouts, act):
    """spmm_ffn_q8 (FFN1 -> per-token quantized hidden tile -> FFN2, one 64-token tile at a time) gives
    bit for bit the two-call result, on the SIMD and the portable path, and matches the float64 reference."""
    m, h, f = shape
    gen = torch.Generator().manual_seed(hash((shape, layouts, act)) % 2**31)
    w1, b1 = _weight(f, h, 0.8, "unstructured", gen), torch.randn(f, generator=gen)
    w2, b2 = _weight(h, f, 0.8, "block4" if layouts[1] == "quads" else "unstructured", gen), torch.randn(h, generator=gen)
    l1 = SparseLinearInt8.from_dense(w1, b1, num_threads=2, layout=layouts[0])
    l2 = SparseLinearInt8.from_dense(w2, b2, num_threads=2, layout=layouts[1])
    x = torch.randn(m, h, generator=gen) * 2 + 0.3
    two_calls = l2.run(l1.run(x, act=act), per_token=True)
    out = torch.full((m, h), float("nan"))
    assert fused_ffn_int8(l1, l2, x, act, out=out) is out
    assert torch.equal(out, two_calls)
    # With BERT's Add & Norm as the kernel's epilogue (and the range the next layer quantizes with):
    residual, gamma, beta, minmax = torch.randn(m, h, generator=gen), torch.randn(h, generator=gen), torch.randn(h, generator=gen), torch.empty(2)
    normed = fused_ffn_int8(l1, l2, x, act, add_norm=(residual, gamma, beta, 1e-12, minmax))
    expected = torch.nn.functional.layer_norm(two_calls + residual, (h,), gamma, beta, 1e-12)
    torch.testing.assert_close(normed, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(minmax, torch.stack(torch.aminmax(normed)))
    sx, zp = activation_qparams_7bit(x)
    mod = kernels_pkg.load()
    generic = mod.spmm_ffn_q8(x, l1.order, l1.row_ptr, l1.col, l1.qval, l1.wscale, l1.wsum, l1.bias, f, l1.k_chunk,
                              l1.n_block, l1.format == "q8p", l2.order, l2.row_ptr, l2.col, l2.qval, l2.wscale, l2.wsum,
                              l2.bias, h, l2.k_chunk, l2.n_block, l2.format == "q8p", sx, zp, 1, None,
                              {"gelu": 1, "relu": 3}[act], True)
    hidden = reference_int8_linear(x, w1, b1)
    hidden = torch.nn.functional.gelu(hidden) if act == "gelu" else hidden.relu()
    ref = reference_int8_linear(hidden, w2, b2, per_token=True)
    # A hidden value that differs in its last bit (the kernel's GELU vs torch's, < 1e-6; the portable
    # path's dequantization without FMA) can cross a rounding boundary of its 7-bit grid: allow one grid
    # step of one hidden value times the largest weight, on the few outputs it reaches.
    step = float(activation_qparams_per_token(hidden)[0].max() * w2.abs().max())
    for got in (generic, out):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * float(ref.abs().max()) + 1.01 * step)


@needs_kernels
def test_fused_ffn_int8_applies_only_where_it_can():
    gen = torch.Generator().manual_seed(17)
    l1 = SparseLinearInt8.from_dense(_weight(48, 16, 0.7, "unstructured", gen), num_threads=2)
    l2 = SparseLinearInt8.from_dense(_weight(16, 48, 0.7, "unstructured", gen), num_threads=2)
    dense = SparseLinearInt8.from_dense(_weight(16, 48, 0.0, "unstructured", gen), pattern="dense", num_threads=2)
    x = torch.randn(128, 16, generator=gen)
    assert fused_ffn_int8(l1, l2, x, "gelu") is not None
    assert fused_ffn_int8(l1, l2, x[:100], "gelu") is None  # fewer than a 64-token tile per thread
    assert fused_ffn_int8(l1, dense, x, "gelu") is None  # a dense-format layer
    assert fused_ffn_int8(l1, l2, x, "swish") is None  # an activation the kernel does not have
    with pytest.raises(RuntimeError, match="NaN or infinite"):
        big = SparseLinearInt8.from_dense(torch.full((48, 16), 1e37), num_threads=2)  # overflows to inf
        fused_ffn_int8(big, l2, x.abs() + 1, "relu")
