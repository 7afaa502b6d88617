"""The fused non-Linear kernels against torch: attention (``attention.cpp``) against
``scaled_dot_product_attention`` on odd sizes (sequence not a multiple of the 16-lane registers or the
64-query blocks, head sizes not a multiple of 4), padding masks, both code paths, and the engine with
and without it; residual add + LayerNorm (``layernorm.cpp``) against ``F.layer_norm(a + r)``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsebert.engine import kernels as _kernels

mod = _kernels.load()
pytestmark = pytest.mark.skipif(mod is None, reason="compiled kernels unavailable")


def _reference(qkv_t: torch.Tensor, b: int, s: int, h: int, d: int, mask: torch.Tensor | None) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in qkv_t.t().reshape(b, s, 3, h, d).unbind(2))  # [B, H, S, D]
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
    return ctx.permute(1, 3, 0, 2).reshape(h * d, b * s)  # feature-major, as the kernel writes it


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("b,s,h,d,masked", [(1, 128, 12, 32, False), (2, 77, 3, 64, True), (3, 5, 2, 7, True),
                                              (1, 200, 4, 20, False), (2, 1, 2, 16, True), (2, 65, 1, 33, True)])
def test_attention_matches_sdpa(b, s, h, d, masked, generic):
    g = torch.Generator().manual_seed(s * 31 + d)
    qkv_t = torch.randn(3 * h * d, b * s, generator=g) * 2
    mask = None
    if masked:
        keep = torch.ones(b, s)
        keep[0, max(1, s // 2):] = 0  # a padded sequence (never all padding)
        mask = ((1.0 - keep) * torch.finfo(torch.float32).min).contiguous()
    got = mod.attention_t(qkv_t, b, s, h, d, mask, 2, generic)
    assert got.shape == (h * d, b * s)
    assert float((got - _reference(qkv_t, b, s, h, d, mask)).abs().max()) < 1e-5
    out = torch.full((h * d, b * s), float("nan"))  # a reused buffer: every element overwritten
    assert mod.attention_t(qkv_t, b, s, h, d, mask, 2, generic, out).data_ptr() == out.data_ptr()
    assert torch.equal(out, got)


def test_attention_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match="expected"):
        mod.attention_t(torch.randn(10, 8), 2, 4, 1, 3, None, 1, False)
    with pytest.raises(RuntimeError, match="mask"):
        mod.attention_t(torch.randn(9, 8), 2, 4, 1, 3, torch.zeros(3), 1, False)
    with pytest.raises(RuntimeError, match="out must be"):
        mod.attention_t(torch.randn(9, 8), 2, 4, 1, 3, None, 1, False, torch.empty(8, 3))


def test_engine_same_logits_with_and_without_fused_attention(tmp_path, monkeypatch):
    from sparsebert.engine import bert, compile
    from tests_helpers import save_tiny_model

    folder = save_tiny_model(tmp_path / "m", head="cls", prune=0.8, seed=3, hidden_size=48, num_attention_heads=3,
                             intermediate_size=100)
    ids = torch.randint(0, 1000, (2, 70), generator=torch.Generator().manual_seed(0))
    keep = torch.ones_like(ids)
    keep[1, 40:] = 0
    model = compile(folder, num_threads=2)
    calls = {"attention_t": 0, "attention_block": 0}
    kernel, block = _kernels.load().attention_t, bert._attention_block

    def attention_t(*args):
        calls["attention_t"] += 1
        return kernel(*args)

    def attention_block(*args):
        out = block(*args)
        calls["attention_block"] += out is not None
        return out

    monkeypatch.setattr(bert, "_attention_block", attention_block)
    # batch 2 on 2 threads: the fused QKV + attention + output block; batch 1: the attention kernel alone
    for rows in (slice(0, 2), slice(1, 2)):
        outs = []
        for fused in (True, False):
            # The engine takes the kernels on AVX-512 CPUs only; here they are handed over on any CPU (their
            # portable loops where there is no AVX-512), so the fused paths run and are compared with SDPA.
            monkeypatch.setattr(bert, "_fused_attention", lambda fused=fused: attention_t if fused else None)
            outs.append(model(input_ids=ids[rows], attention_mask=keep[rows]).logits)
        assert float((outs[0] - outs[1]).abs().max()) < 1e-5, rows
    assert calls["attention_t"] and calls["attention_block"], calls


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("m,h", [(1, 7), (3, 33), (128, 384), (130, 768)])
def test_add_layernorm_matches_torch(m, h, generic):
    g = torch.Generator().manual_seed(m + h)
    a, r = torch.randn(m, h, generator=g) * 3 + 1, torch.randn(m, h, generator=g)
    gamma, beta = torch.randn(h, generator=g), torch.randn(h, generator=g)
    expected = F.layer_norm(a + r, (h,), gamma, beta, 1e-12)
    got = a.clone()
    mod.add_layernorm_(got, r, gamma, beta, 1e-12, 2, generic)  # in place
    assert float((got - expected).abs().max()) < 1e-5
    ranged, minmax = a.clone(), torch.full((2,), float("nan"))
    mod.add_layernorm_(ranged, r, gamma, beta, 1e-12, 2, generic, minmax)  # the same, plus the output's range
    assert torch.equal(ranged, got)
    assert torch.equal(minmax, torch.stack(torch.aminmax(got)))


def test_add_layernorm_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match="residual"):
        mod.add_layernorm_(torch.randn(4, 8), torch.randn(4, 9), torch.ones(8), torch.zeros(8), 1e-5, 1, False)
    with pytest.raises(RuntimeError, match="gamma"):
        mod.add_layernorm_(torch.randn(4, 8), torch.randn(4, 8), torch.ones(7), torch.zeros(8), 1e-5, 1, False)


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("rows,cols", [(128, 1152), (384, 128), (3, 5), (17, 9), (130, 77), (1, 1), (0, 4)])
def test_transpose_matches_torch(rows, cols, generic):
    """The kernels' transpose (8x8 register blocks, scalar edges, row panels over threads) equals x.T."""
    from sparsebert.engine.sparse_linear import transpose

    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * 7 + cols))
    assert torch.equal(mod.transpose(x, 2, None, generic), x.t().contiguous())
    out = torch.full((cols, rows), float("nan"))
    assert transpose(x, 2, out=out) is out and torch.equal(out, x.t())
    with pytest.raises(RuntimeError, match="out must be"):
        mod.transpose(x, 2, torch.empty(rows + 1, cols))


@pytest.fixture
def two_threads():
    """torch at 2 threads for the test (the attention block splits sequences over them), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _block_layers(precision: str, fmt: str, hidden: int, out_features: int, g: torch.Generator):
    from sparsebert.engine import SparseLinear, SparseLinearInt8

    def weight(n, k):
        if fmt == "block4":
            keep = (torch.rand(n, (k + 3) // 4, generator=g) >= 0.7).repeat_interleave(4, dim=1)[:, :k]
        else:
            keep = torch.rand(n, k, generator=g) >= 0.8
        return torch.randn(n, k, generator=g) * keep * 0.3

    make = [
        lambda w, b: SparseLinear.from_dense(w, b, pattern=fmt),
        lambda w, b: SparseLinearInt8.from_dense(w, b, layout="quads" if fmt == "block4" else "pairs"),
    ][precision == "int8"]
    qkv = make(weight(3 * hidden, hidden), torch.randn(3 * hidden, generator=g))
    o = make(weight(out_features, hidden), torch.randn(out_features, generator=g))
    return qkv, o


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("fmt", ["unstructured", "block4"])
@pytest.mark.parametrize("b,s,h,d,masked", [(2, 70, 3, 16, True), (4, 130, 2, 24, False), (2, 5, 4, 8, True)])
def test_attention_block_matches_unfused(precision, fmt, b, s, h, d, masked, two_threads):
    """attention_block (QKV -> attention -> output layer, one sequence per thread, intermediates in
    cache) gives the unfused layers' result: bit for bit on the SIMD path, within rounding on the
    portable one."""
    from sparsebert.engine import bert

    g = torch.Generator().manual_seed(b * 1000 + s + h + d)
    hidden, out_features = h * d, 37
    qkv, o = _block_layers(precision, fmt, hidden, out_features, g)
    x = torch.randn(b * s, hidden, generator=g) * 2 + 0.2
    mask = None
    if masked:
        keep = torch.ones(b, s)
        keep[1, max(1, s // 3):] = 0
        mask = ((1.0 - keep) * torch.finfo(torch.float32).min).contiguous()
    int8 = precision == "int8"
    qkv_t = qkv.run(x, y_t=True)
    ctx_t = mod.attention_t(qkv_t, b, s, h, d, mask, 2, False)
    expected = o.run(ctx_t, x_t=True, per_token=True) if int8 else o.run(ctx_t, x_t=True)
    if bert._fused_attention() is not None:  # the fused block runs on AVX-512 CPUs only
        out = torch.full((b * s, out_features), float("nan"))
        with torch.inference_mode():
            got = bert._attention_block(qkv, o, x, b, s, h, d, mask, None, out)
        assert got is out
        # The same sums; a sequence's last token tile may be narrower than the unfused one at that position,
        # and tiles of an odd number of 8-token registers run the AVX2 loop (FP32 block4 sums its four
        # weights in another order there): float rounding, which in INT8 can move a context value across a
        # 7-bit rounding boundary (one grid step times a weight).
        step = float(ctx_t.abs().max() / 63 * o.dequantized_weight().abs().max()) if int8 else 0.0
        assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max()) + step
        assert float((got - expected).abs().gt(1e-5 * float(expected.abs().max())).float().mean()) < 0.02
        # With the residual add + LayerNorm as its epilogue (and the range of the result):
        residual = torch.randn(b * s, out_features, generator=g)
        gamma, beta, minmax = torch.randn(out_features, generator=g), torch.randn(out_features, generator=g), torch.empty(2)
        with torch.inference_mode():
            normed = bert._attention_block(qkv, o, x, b, s, h, d, mask, None, torch.empty(b * s, out_features),
                                           (residual, gamma, beta, 1e-12, minmax))
        torch.testing.assert_close(normed, F.layer_norm(got + residual, (out_features,), gamma, beta, 1e-12), rtol=1e-4, atol=1e-4)
        assert torch.equal(minmax, torch.stack(torch.aminmax(normed)))
    from sparsebert.engine.quantized_linear import activation_qparams_7bit

    sx, zp = activation_qparams_7bit(x) if int8 else (1.0, 0)
    codes = bert._BLOCK_FMT
    vals = (lambda m: m.qval) if int8 else (lambda m: m.val)
    extra = (lambda m: (m.wscale, m.wsum)) if int8 else (lambda m: (None, None))
    generic = mod.attention_block(x, mask, b, s, h, d, qkv.order, qkv.row_ptr, qkv.col, vals(qkv), *extra(qkv), qkv.bias,
                                  qkv.k_chunk, qkv.n_block, codes[qkv.format], o.order, o.row_ptr, o.col, vals(o),
                                  *extra(o), o.bias, out_features, o.k_chunk, o.n_block, codes[o.format], sx, zp, 2,
                                  None, True)
    # Portable path: other float rounding (no FMA); in INT8 a context value may cross a 7-bit rounding
    # boundary, moving an output by one grid step times a weight.
    tol = 1e-4 * float(expected.abs().max())
    if int8:
        tol += float(ctx_t.abs().max() / 63 * o.dequantized_weight().abs().max())
    assert float((generic - expected).abs().max()) <= tol


def test_attention_block_applies_only_where_it_can(two_threads):
    from sparsebert.engine import SparseLinear, bert

    g = torch.Generator().manual_seed(7)
    qkv, o = _block_layers("fp32", "unstructured", 32, 32, g)
    x, out = torch.randn(3 * 8, 32, generator=g), torch.empty(3 * 8, 32)
    fused = bert._fused_attention() is not None  # AVX-512 CPUs; elsewhere the block never applies
    assert (bert._attention_block(qkv, o, x[:16], 2, 8, 2, 16, None, None, out[:16]) is not None) == fused
    assert bert._attention_block(qkv, o, x[:8], 1, 8, 2, 16, None, None, out[:8]) is None  # a thread would idle
    assert bert._attention_block(qkv, o, x, 3, 8, 2, 16, None, None, out) is None  # 2 + 1 sequences: uneven
    dense = SparseLinear.from_dense(torch.randn(32, 32), None, pattern="dense")
    assert bert._attention_block(qkv, dense, x[:16], 2, 8, 2, 16, None, None, out[:16]) is None
    int8_qkv, _ = _block_layers("int8", "unstructured", 32, 32, g)
    assert bert._attention_block(int8_qkv, o, x[:16], 2, 8, 2, 16, None, None, out[:16]) is None  # mixed precision


@pytest.mark.parametrize("pattern", ["unstructured", "block4"])
def test_fused_ffn_add_norm_matches_separate_layernorm(pattern):
    """FP32 spmm_ffn with the Add & Norm epilogue: LayerNorm(FFN(x) + residual) per tile, as the separate kernel."""
    from sparsebert.engine import SparseLinear
    from sparsebert.engine.sparse_linear import fused_ffn

    g = torch.Generator().manual_seed(3)
    w1, w2 = torch.randn(96, 40, generator=g), torch.randn(40, 96, generator=g)
    w1[torch.rand(96, 40, generator=g) < 0.8] = 0
    w2[torch.rand(40, 96, generator=g) < 0.8] = 0
    l1 = SparseLinear.from_dense(w1, torch.randn(96, generator=g), pattern=pattern)
    l2 = SparseLinear.from_dense(w2, torch.randn(40, generator=g), pattern=pattern)
    x, residual = torch.randn(150, 40, generator=g), torch.randn(150, 40, generator=g)
    gamma, beta = torch.randn(40, generator=g), torch.randn(40, generator=g)
    plain = fused_ffn(l1, l2, x, "gelu")
    expected = plain.clone()
    mod.add_layernorm_(expected, residual, gamma, beta, 1e-12, 2, False)
    got = fused_ffn(l1, l2, x, "gelu", add_norm=(residual, gamma, beta, 1e-12, None))
    assert torch.equal(got, expected)
