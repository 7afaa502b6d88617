"""SparseLinear / sparse kernel correctness against torch dense ``x @ w.T + b``."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from sparsebert.engine import SparseLinear, kernel_isa, kernels_available, pack_weight
from sparsebert.engine import kernels as kernels_pkg
from sparsebert.engine import sparse_linear as sl


def _sparse_weight(n: int, k: int, sparsity: float, gen: torch.Generator, block4: bool = False):
    w = torch.randn(n, k, generator=gen)
    if block4:  # prune whole groups of 4 inputs
        keep = torch.rand(n, (k + 3) // 4, generator=gen) >= sparsity
        mask = keep.repeat_interleave(4, dim=1)[:, :k]
    else:
        mask = torch.rand(n, k, generator=gen) >= sparsity
    w = w * mask
    if n > 2:
        w[1] = 0.0  # an all-zero output row
    if k > 2:
        w[:, 2] = 0.0  # an all-zero input column
    return w


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return (y if b is None else y + b.double()).float()


def _assert_matches(y: torch.Tensor, ref: torch.Tensor) -> None:
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * scale)


needs_kernels = pytest.mark.skipif(
    os.environ.get("SPARSEBERT_DISABLE_KERNELS", "") not in ("", "0"), reason="kernels disabled by env"
)


@needs_kernels
def test_kernels_build_and_dispatch():
    assert kernels_available(), kernels_pkg.build_error()
    assert kernel_isa() in ("avx512_vnni", "avx512f", "avx2_fma", "generic")


SHAPES = [  # (M, K, N): none a multiple of 8/32 except where noted
    (1, 33, 17),
    (3, 33, 65),
    (5, 7, 9),
    (67, 100, 70),
    (130, 96, 64),  # two full 64-token tiles + ragged tail
    (64, 260, 136),  # several K chunks, partial n block
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M%d_K%d_N%d" % s)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("pattern", ["unstructured", "block4", "auto"])
def test_matches_dense(shape, sparsity, pattern):
    m, k, n = shape
    gen = torch.Generator().manual_seed(hash((shape, sparsity, pattern)) % 2**31)
    w = _sparse_weight(n, k, sparsity, gen, block4=(pattern == "block4" and sparsity == 0.5))
    b = torch.randn(n, generator=gen)
    x = torch.randn(m, k, generator=gen)
    lin = SparseLinear.from_dense(w, b, pattern=pattern, num_threads=2)
    assert torch.equal(lin.to_dense(), w)
    _assert_matches(lin(x), _reference(x, w, b))


@pytest.mark.parametrize("k_chunk,n_block", [(4, 8), (8, 16), (32, 8), (1024, 256)])
@pytest.mark.parametrize("pattern", ["unstructured", "block4"])
def test_tiling_parameters(k_chunk, n_block, pattern):
    gen = torch.Generator().manual_seed(1)
    w = _sparse_weight(45, 77, 0.8, gen)
    x = torch.randn(70, 77, generator=gen)
    lin = SparseLinear.from_dense(w, None, pattern=pattern, k_chunk=k_chunk, n_block=n_block)
    _assert_matches(lin(x), _reference(x, w, None))


@needs_kernels
@pytest.mark.parametrize("pattern", ["unstructured", "block4"])
def test_portable_path_matches_avx2_path(pattern):
    gen = torch.Generator().manual_seed(2)
    w = _sparse_weight(40, 50, 0.7, gen)
    b = torch.randn(40, generator=gen)
    x = torch.randn(75, 50, generator=gen)
    lin = SparseLinear.from_dense(w, b, pattern=pattern)
    mod = kernels_pkg.load()
    args = (x, lin.order, lin.row_ptr, lin.col, lin.val, lin.bias, 40, sl._FMT_CODE[lin.format],
            lin.k_chunk, lin.n_block, 2)
    generic = mod.spmm(*args, force_generic=True)
    _assert_matches(generic, _reference(x, w, b))
    _assert_matches(mod.spmm(*args), generic)


def test_n_m_pattern():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(24, 38, generator=gen)
    # 2:4: keep the 2 largest of every 4 consecutive inputs
    wp = torch.nn.functional.pad(w, (0, 2)).view(24, 10, 4)
    keep = wp.abs().topk(2, dim=-1).indices
    w24 = torch.zeros_like(wp).scatter(-1, keep, wp.gather(-1, keep)).view(24, 40)[:, :38].contiguous()
    x = torch.randn(9, 38, generator=gen)
    lin = SparseLinear.from_dense(w24, None, pattern="2:4")
    _assert_matches(lin(x), _reference(x, w24, None))
    with pytest.raises(ValueError, match="2:4"):
        SparseLinear.from_dense(w, None, pattern="2:4")


def test_auto_pattern_choice():
    gen = torch.Generator().manual_seed(4)
    assert SparseLinear.from_dense(torch.randn(16, 16, generator=gen), pattern="auto").format == "dense"
    assert SparseLinear.from_dense(_sparse_weight(64, 64, 0.9, gen), pattern="auto").format == "csr"
    blocky = _sparse_weight(64, 64, 0.8, gen, block4=True)
    assert SparseLinear.from_dense(blocky, pattern="auto").format == "block4"


def test_leading_dims_noncontiguous_and_out():
    gen = torch.Generator().manual_seed(5)
    w = _sparse_weight(19, 33, 0.9, gen)
    b = torch.randn(19, generator=gen)
    lin = SparseLinear.from_dense(w, b, pattern="unstructured")
    x = torch.randn(33, 3, 2, generator=gen).permute(2, 1, 0)  # [2, 3, 33], non-contiguous
    ref = _reference(x.reshape(-1, 33), w, b).view(2, 3, 19)
    _assert_matches(lin(x), ref)
    out = torch.empty(2, 3, 19)
    assert lin(x, out=out) is out
    _assert_matches(out, ref)
    assert lin(torch.randn(0, 33)).shape == (0, 19)


def test_num_threads_honoured_and_torch_threads_untouched():
    gen = torch.Generator().manual_seed(6)
    w = _sparse_weight(200, 150, 0.9, gen)
    b = torch.randn(200, generator=gen)
    before = torch.get_num_threads()
    for m in (1, 3, 100, 200):
        x = torch.randn(m, 150, generator=gen)
        y1 = SparseLinear.from_dense(w, b, pattern="unstructured", num_threads=1)(x)
        y2 = SparseLinear.from_dense(w, b, pattern="unstructured", num_threads=2)(x)
        assert torch.equal(y1, y2)  # same summation order whatever the split
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads"):
        SparseLinear.from_dense(w, b, num_threads=0)


def test_bad_inputs_name_expected_shape():
    lin = SparseLinear.from_dense(torch.zeros(8, 12), torch.zeros(8), pattern="unstructured")
    with pytest.raises(TypeError, match=r"\[\.\.\., 12\]"):
        lin(torch.zeros(4, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[\.\.\., 12\]"):
        lin(torch.zeros(4, 13))
    with pytest.raises(ValueError, match=r"\[4, 8\]"):
        lin(torch.zeros(4, 12), out=torch.empty(4, 9))
    with pytest.raises(TypeError, match="float32"):
        SparseLinear.from_dense(torch.zeros(8, 12, dtype=torch.float16))
    with pytest.raises(ValueError, match="2-D"):
        SparseLinear.from_dense(torch.zeros(8))
    with pytest.raises(ValueError, match=r"\[8\]"):
        SparseLinear.from_dense(torch.zeros(8, 12), torch.zeros(7))
    with pytest.raises(ValueError, match="pattern"):
        SparseLinear.from_dense(torch.zeros(8, 12), pattern="block8")


def test_torch_fallback_when_kernels_unavailable(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    w = _sparse_weight(21, 30, 0.9, gen)
    b = torch.randn(21, generator=gen)
    x = torch.randn(5, 30, generator=gen)
    monkeypatch.setattr(sl._kernels, "load", lambda *a, **k: None)
    monkeypatch.setattr(SparseLinear, "_warned_fallback", False)
    lin = SparseLinear.from_dense(w, b, pattern="unstructured")
    with pytest.warns(RuntimeWarning, match="fallback"):
        y = lin(x)
    _assert_matches(y, _reference(x, w, b))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        lin(x)
        _assert_matches(lin.forward_t(x.t()), _reference(x, w, b).t())
    assert kernel_isa() == "torch"


def test_pack_weight_layout_documented():
    w = torch.tensor([[0.0, 2.0, 0.0, 3.0, 0.0], [1.0, 0.0, 0.0, 0.0, 4.0]])
    p = pack_weight(w, "unstructured", k_chunk=4, n_block=8)
    assert p["format"] == "csr" and p["k_chunk"] == 4
    # chunk 0 (k 0..3): row 0 has 2 nonzeros, row 1 has 1 -> row 1 first; chunk 1: row 0 empty
    assert p["order"].tolist() == [1, 0, 0, 1]
    assert p["row_ptr"].tolist() == [0, 1, 3, 3, 4]
    assert p["col"].tolist() == [0, 1, 3, 4]
    assert p["val"].tolist() == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("pattern", ["unstructured", "block4", "dense"])
@pytest.mark.parametrize("m", [1, 3, 70, 130])
def test_feature_major_forward_t(pattern, m):
    gen = torch.Generator().manual_seed(8)
    w = _sparse_weight(37, 45, 0.85, gen)
    b = torch.randn(37, generator=gen)
    x = torch.randn(m, 45, generator=gen)
    lin = SparseLinear.from_dense(w, b, pattern=pattern)
    y_t = lin.forward_t(x.t().contiguous())
    assert y_t.shape == (37, m)
    _assert_matches(y_t, _reference(x, w, b).t())
    out = torch.empty(37, m)
    assert lin.forward_t(x.t(), out=out) is out
    _assert_matches(out, _reference(x, w, b).t())
    with pytest.raises(ValueError, match=r"\[45, M\]"):
        lin.forward_t(x)


@needs_kernels
def test_avx2_path_when_avx512_is_switched_off():
    """SPARSEBERT_NO_AVX512=1 keeps the AVX2 hot loops (FP32 and INT8); on an AVX-512 CPU this checks that path."""
    import subprocess
    import sys

    code = (
        "import torch; from sparsebert.engine import SparseLinear, kernel_isa\n"
        "torch.manual_seed(0)\n"
        "for pattern in ('unstructured', 'block4'):\n"
        "    for m in (1, 16, 64, 130):\n"
        "        w = torch.randn(70, 96) * (torch.rand(70, 96) > 0.8); b = torch.randn(70); x = torch.randn(m, 96)\n"
        "        y = SparseLinear.from_dense(w, b, pattern=pattern, num_threads=2)(x)\n"
        "        torch.testing.assert_close(y, (x.double() @ w.double().T + b.double()).float(), rtol=1e-4, atol=1e-3)\n"
        "from sparsebert.engine.sparse_linear import fused_ffn\n"
        "w1 = torch.randn(70, 96) * (torch.rand(70, 96) > 0.8); w2 = torch.randn(96, 70) * (torch.rand(96, 70) > 0.8)\n"
        "b1, b2, x = torch.randn(70), torch.randn(96), torch.randn(200, 96)\n"
        "f1 = SparseLinear.from_dense(w1, b1, pattern='unstructured', num_threads=2)\n"
        "f2 = SparseLinear.from_dense(w2, b2, pattern='unstructured', num_threads=2)\n"
        "h = torch.nn.functional.gelu(x.double() @ w1.double().T + b1.double())\n"
        "torch.testing.assert_close(fused_ffn(f1, f2, x, 'gelu'), (h @ w2.double().T + b2.double()).float(), rtol=1e-4, atol=1e-3)\n"
        "from sparsebert.engine.quantized_linear import SparseLinearInt8, reference_int8_linear\n"
        "for layout in ('quads', 'pairs'):\n"
        "    for m in (16, 32, 64, 130):\n"
        "        w = torch.randn(70, 96) * (torch.rand(70, 96) > 0.8); b = torch.randn(70); x = torch.randn(m, 96)\n"
        "        y = SparseLinearInt8.from_dense(w, b, num_threads=2, layout=layout)(x)\n"
        "        torch.testing.assert_close(y, reference_int8_linear(x, w, b), rtol=1e-5, atol=1e-4)\n"
        "print(kernel_isa())\n"
    )
    env = dict(os.environ, SPARSEBERT_NO_AVX512="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] in ("avx2_fma", "generic")


def test_dense_layer_packs_for_a_repeated_row_count_and_stays_exact():
    """Dense-format layers switch to MKL's pre-packed sgemm once a row count repeats (PACK_AFTER_CALLS);
    every call, packed or not, with or without transposed input/output, equals F.linear."""
    from sparsebert.engine import sparse_linear as sl

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 33, generator=g), torch.randn(40, generator=g)
    lin = SparseLinear.from_dense(w, b, pattern="dense")
    for m in (7, 7, 7, 5, 7, 600, 600, 600):  # 600 > PACK_MAX_ROWS: never packed
        x = torch.randn(m, 33, generator=g)
        expected = F.linear(x, w, b)
        assert torch.allclose(lin.run(x), expected, atol=1e-5)
        assert torch.allclose(lin.run(x.t().contiguous(), x_t=True, y_t=True), expected.t(), atol=1e-5)
    if sl._mkl_packing_available():
        assert lin._packed.packed is not None and lin._packed.packed[0] == 7
    with torch.no_grad():
        lin.weight.mul_(2)  # an in-place update (as load_state_dict does) must not reuse the old packing
    x, w2 = torch.randn(7, 33, generator=g), lin.weight.clone()
    assert not torch.allclose(F.linear(x, w2, b), F.linear(x, w2 / 2, b))
    for _ in range(3):
        assert torch.allclose(lin.run(x), F.linear(x, w2, b), atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("patterns", [("unstructured", "unstructured"), ("block4", "unstructured"),
                                      ("unstructured", "block4"), ("block4", "block4")])
@pytest.mark.parametrize("act", [None, "gelu", "relu"])
@pytest.mark.parametrize("generic", [False, True])
def test_fused_ffn_matches_two_layers(patterns, act, generic):
    """spmm_ffn (both FFN layers, the hidden tile kept in cache) equals act(x W1^T + b1) W2^T + b2 on odd
    sizes: ragged token tiles, hidden sizes not a multiple of 4 or 16, block4 padding rows."""
    gen = torch.Generator().manual_seed(21)
    m, k, hidden = 131, 45, 101
    w1 = _sparse_weight(hidden, k, 0.8, gen, block4=patterns[0] == "block4")
    w2 = _sparse_weight(k, hidden, 0.8, gen, block4=patterns[1] == "block4")
    b1, b2, x = torch.randn(hidden, generator=gen), torch.randn(k, generator=gen), torch.randn(m, k, generator=gen)
    first = SparseLinear.from_dense(w1, b1, pattern=patterns[0], num_threads=2)
    second = SparseLinear.from_dense(w2, b2, pattern=patterns[1], num_threads=2)
    h = _reference(x, w1, b1).double()
    h = {None: h, "gelu": F.gelu(h), "relu": F.relu(h)}[act]
    ref = (h @ w2.double().T + b2.double()).float()
    if generic:
        mod = kernels_pkg.load()
        got = mod.spmm_ffn(x, first.order, first.row_ptr, first.col, first.val, first.bias, hidden,
                           sl._FMT_CODE[first.format], first.k_chunk, first.n_block, second.order, second.row_ptr,
                           second.col, second.val, second.bias, k, sl._FMT_CODE[second.format], second.k_chunk,
                           second.n_block, 2, None, sl.ACT_CODES[act], True)
    else:
        out = torch.full((m, k), float("nan"))
        got = sl.fused_ffn(first, second, x, act, out=out)
        assert got is out
    _assert_matches(got, ref)
    assert sl.fused_ffn(first, second, x[:100], act) is None  # fewer than 64 tokens a thread: two calls instead
    dense = SparseLinear.from_dense(w2, b2, pattern="dense")
    assert sl.fused_ffn(first, dense, x, act) is None
