"""``SparseLinearInt8``: an INT8 drop-in for ``torch.nn.Linear`` with a sparse weight.

Quantization scheme (what :func:`reference_int8_linear` computes, in float64):

* weights: symmetric, per output channel, ``scale[n] = max|W[n]| / 127`` (or the QAT scales of
  ``quantization.json``), ``Wq = clamp(round_half_even(W * (1 / scale)), -127, 127)`` (int8;
  zero stays zero, so the sparsity pattern is kept);
* activations: dynamic, per tensor, asymmetric unsigned 7-bit: ``(sx, zp) =
  activation_qparams(min(x), max(x), bits=7)`` (range widened to include 0),
  ``xq = clamp(round_half_even(x * (1 / sx)) + zp, 0, 127)``. Seven bits ("reduce_range", as
  FBGEMM and ONNX Runtime use on CPUs without VNNI) keep ``_mm256_maddubs_epi16`` exact: a pair
  of products is at most ``2 * 127 * 127 < 2**15``;
* output: ``y = (xq - zp) @ Wq.T * (sx * scale) + b`` with exact int32 accumulation.
* per-token activations (``per_token=True``; the engine's attention-output and FFN2 inputs): each token
  (row of ``x``; column when ``x_t``) gets its own
  ``(sx, zp)`` from its own min/max (:func:`activation_qparams_per_token`). Each token's result then
  depends on that token alone, not on the rest of the batch, and the fused INT8 FFN
  (:func:`fused_ffn_int8`) can quantize a 64-token tile of hidden activations as soon as it is done.

Sources: affine (scale, zero point) INT8 with integer-only accumulation: Jacob et al. 2018, "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", arXiv:1712.05877. The 7-bit
"reduce_range" activations: the FBGEMM / PyTorch x86 quantization backend and ONNX Runtime's
``reduce_range`` option. Per-token dynamic activation quantization: Yao et al. 2022, "ZeroQuant: Efficient
and Affordable Post-Training Quantization for Large-Scale Transformers", arXiv:2206.01861.

Layouts (both in the chunked, count-sorted order of :mod:`.sparse_linear`):

* ``"q8"`` (quads): 4-input quads as the ``block4`` layout with int8 values (``qval`` int8
  ``[4 * entries]``; pruned weights inside a kept quad stored as 0), multiplied with
  ``_mm256_maddubs_epi16``. Best for block4 and dense weights: at density 1 it runs about twice
  as fast as float32 MKL on an AVX2 CPU.
* ``"q8p"`` (pairs): any two nonzeros of a row chunk (``col`` int32 ``[2 * pairs]`` = k_a, k_b;
  ``qval`` = int16 w_a, w_b per pair), activations as int16, ``_mm256_madd_epi16``. Unstructured
  sparsity leaves most quads with a single nonzero; pairs waste nothing (measured at 90%: 1.35x
  faster than quads, 1.15x faster than the float32 sparse kernel).

``layout="auto"`` picks the one with fewer entries (pairs vs quads). The kernel
(``kernels.load().spmm_q8``) quantizes X while packing its tile, so the float activations are read
once. ``pattern="dense"`` (and the fallback when the kernels cannot be built) keeps the same
integer math in torch: int8 values held as float32 for the BLAS (integer sums below ``2**24`` are
exact).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import kernels as _kernels
from .sparse_linear import ACT_CODES, DEFAULT_N_BLOCK, _check_n_m, _pack_sorted, apply_epilogue, transpose

__all__ = ["SparseLinearInt8", "quantize_weight", "activation_qparams_7bit", "activation_qparams_per_token",
           "reference_int8_linear", "fused_ffn_int8"]

QMAX_W = 127  # symmetric int8 weights: [-127, 127]
QMAX_X = 127  # 7-bit unsigned activations: [0, 127]
# Inputs per K chunk: int8 activations are 4x smaller than float32, so longer chunks still fit L1.
DEFAULT_K_CHUNK = 256
# Pairs are used when there are fewer than this many pairs per stored quad (both cost about the
# same per 16 tokens on AVX2; quads win for block4 and dense weights, pairs for unstructured).
PAIRS_OVER_QUADS = 1.0
_PATTERNS = ("auto", "unstructured", "block4", "dense")


def _count_quads_pairs(wq: torch.Tensor, k_chunk: int) -> tuple[int, int]:
    """Entries of the two sparse layouts of ``wq`` ``[N, K]``: nonzero quads, and pairs (per row and K chunk)."""
    n, k = wq.shape
    nz = F.pad(wq != 0, (0, (-k) % k_chunk))
    n_quads = int(nz.view(n, -1, 4).any(-1).sum())
    n_pairs = int(((nz.view(n, -1, k_chunk).sum(-1) + 1) // 2).sum())
    return n_quads, n_pairs


def _pack_pairs(csr: dict) -> dict:
    """Group the entries of each (chunk, slot) segment of a csr packing two by two (``q8p``).

    Returns ``order``, ``row_ptr`` (counting pairs), ``col`` int32 ``[2 * pairs]`` (k_a, k_b) and
    ``qval`` int8 ``[4 * pairs]`` (int16 w_a, int16 w_b, little-endian). A segment with an odd count
    ends with a padding pair (k_b = k_a, w_b = 0).
    """
    row_ptr = csr["row_ptr"].long()
    counts = row_ptr[1:] - row_ptr[:-1]
    pair_counts = (counts + 1) // 2
    new_ptr = torch.zeros_like(row_ptr)
    new_ptr[1:] = torch.cumsum(pair_counts, 0)
    seg = torch.repeat_interleave(torch.arange(counts.numel()), counts)  # segment of each entry
    pos = 2 * new_ptr[seg] + (torch.arange(seg.numel()) - row_ptr[seg])
    total = 2 * int(new_ptr[-1])
    col = torch.empty(total, dtype=torch.int32)
    val = torch.zeros(total, dtype=torch.int16)
    odd = torch.nonzero(counts % 2 == 1).flatten()
    col[2 * new_ptr[odd] + counts[odd]] = csr["col"][row_ptr[odd] + counts[odd] - 1]  # padding: repeat k_a
    col[pos] = csr["col"]
    val[pos] = csr["val"].to(torch.int16)
    return {"order": csr["order"], "row_ptr": new_ptr.to(torch.int32), "col": col, "qval": val.view(torch.int8).contiguous()}


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 quantization of a float32 ``[N, K]`` weight.

    ``scale``: float32 ``[N]`` (or ``[1]``, broadcast) to use, e.g. QAT's ``weight_scale``;
    default ``max|W[n]| / 127`` (never 0). Returns ``(wq, scale)``: ``wq`` int8 ``[N, K]`` =
    ``clamp(round_half_even(W * (1 / scale)), -127, 127)`` (the float32 reciprocal, as
    ``torch.fake_quantize_per_channel_affine`` computes it) and ``scale`` float32 ``[N]``.

    Raises:
        ValueError: ``scale`` has the wrong size or non-positive values.
    """
    from ..modifiers.quantization import weight_scales

    w = weight.detach().to("cpu", torch.float32)
    n = w.shape[0]
    if scale is None:
        scale = weight_scales(w, 8, per_channel=True)
    scale = torch.as_tensor(scale, dtype=torch.float32).flatten()
    if scale.numel() == 1:
        scale = scale.expand(n)
    if scale.numel() != n:
        raise ValueError(f"weight scale must have 1 or {n} (out_features) values, got {scale.numel()}")
    if not bool((scale > 0).all()):
        raise ValueError(f"weight scales must be positive, got min {float(scale.min())}")
    scale = scale.contiguous().clone()
    inv = (1.0 / scale)[:, None]
    return torch.clamp(torch.round(w * inv), -QMAX_W, QMAX_W).to(torch.int8), scale


def activation_qparams_7bit(x: torch.Tensor, x_range: torch.Tensor | None = None) -> tuple[float, int]:
    """Dynamic per-tensor ``(scale, zero_point)`` of ``x`` for 7-bit unsigned values [0, 127].

    ``x_range``: ``(min(x), max(x))`` when already known (skips the pass over ``x``).

    Raises:
        ValueError: ``x`` holds NaN or infinite values.
    """
    from ..modifiers.quantization import activation_qparams

    if x.numel() == 0:
        return 1.0, 0
    lo, hi = torch.aminmax(x) if x_range is None else x_range
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"cannot quantize activations with non-finite values (min {lo}, max {hi})")
    scale, zp, _, _ = activation_qparams(lo, hi, bits=7)
    return scale, zp


def activation_qparams_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) 7-bit ``(scale, zero_point)`` of ``x`` float32 ``[M, K]``: for each row what
    :func:`activation_qparams_7bit` gives for that row alone (float64 math as there).

    Returns ``scale`` float32 ``[M]`` (the float32 value of the float64 scale, as the kernels use it) and
    ``zero_point`` int32 ``[M]`` in [0, 127].

    Raises:
        ValueError: ``x`` holds NaN or infinite values.
    """
    from ..modifiers.quantization import _EPS

    if x.shape[0] == 0:
        return torch.ones(0), torch.zeros(0, dtype=torch.int32)
    lo, hi = torch.aminmax(x, dim=-1)
    if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
        raise ValueError("cannot quantize activations with non-finite values")
    lo, hi = lo.double().clamp(max=0.0), hi.double().clamp(min=0.0)
    scale = ((hi - lo) / QMAX_X).clamp(min=_EPS)
    zp = torch.round(-lo / scale).clamp(0, QMAX_X)
    return scale.float(), zp.to(torch.int32)


def _quantize_x(x: torch.Tensor, scale, zp) -> torch.Tensor:
    """``clamp(round(x * float32(1 / scale)) + zp, 0, 127)`` as float32 integers (the kernel's math).

    ``scale`` / ``zp``: numbers (per tensor) or ``[M]`` tensors (per row of ``x`` ``[M, K]``)."""
    if isinstance(scale, torch.Tensor):
        inv = (1.0 / scale.float())[:, None]
        return torch.clamp(torch.round(x * inv) + zp[:, None].float(), 0, QMAX_X)
    inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(scale, dtype=torch.float32)
    return torch.clamp(torch.round(x * inv) + zp, 0, QMAX_X)


def reference_int8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                          weight_scale: torch.Tensor | None = None, per_token: bool = False) -> torch.Tensor:
    """The INT8 scheme of this module computed with plain torch ops (float64 accumulation).

    ``x`` float32 ``[M, K]`` (``[..., K]`` unless ``per_token``), ``weight`` float32 ``[N, K]``, ``bias``
    ``[N]`` or ``None``, ``weight_scale`` as :func:`quantize_weight`; ``per_token``: activations
    quantized per row (:func:`activation_qparams_per_token`) instead of per tensor. Returns float32
    ``[..., N]``: the fake-quant result ``((xq - zp) * sx) @ (Wq * scale).T + b`` that
    :class:`SparseLinearInt8` reproduces.
    """
    wq, scale = quantize_weight(weight, weight_scale)
    if per_token:
        sx, zp = activation_qparams_per_token(x)
        xq = _quantize_x(x.float(), sx, zp).double() - zp[:, None].double()
        y = (xq @ wq.double().T) * (sx.double()[:, None] * scale.double())
        return (y if bias is None else y + bias.double()).float()
    sx, zp = activation_qparams_7bit(x)
    xq = _quantize_x(x.float(), sx, zp).double() - zp
    y = (xq @ wq.double().T) * (sx * scale.double())
    if bias is not None:
        y = y + bias.double()
    return y.float()


class SparseLinearInt8(torch.nn.Module):
    """``y = x @ W.T + b`` in INT8 (see the module docstring), W stored sparse (inference, CPU).

    Build with :meth:`from_dense` / :meth:`from_linear`. ``forward(x)`` takes float32
    ``[..., in_features]`` and returns float32 ``[..., out_features]``; :meth:`run` also takes
    and returns feature-major ``[features, M]`` matrices. ``num_threads`` (``None`` =
    ``torch.get_num_threads()`` at call time) sizes the kernel's OpenMP region.

    Attributes: ``in_features``, ``out_features``, ``format`` (``"q8"`` quads, ``"q8p"`` pairs, or
    ``"dense"``), ``density``, ``k_chunk``, ``n_block``; buffers ``wscale`` (float32 ``[N]``),
    ``wsum`` (int32 ``[N]``: row sums of Wq), ``bias``, and ``order``/``row_ptr``/``col``/``qval``
    (sparse layouts) or ``weight_q`` (``"dense"``: Wq as float32 ``[N, K]``).
    """

    _warned_fallback = False

    def __init__(self, in_features: int, out_features: int, packed: dict, wscale: torch.Tensor,
                 wsum: torch.Tensor, bias: torch.Tensor | None = None, num_threads: int | None = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.format: str = packed["format"]
        self.k_chunk, self.n_block = int(packed["k_chunk"]), int(packed["n_block"])
        self.density = float(packed["density"])
        self.num_threads = num_threads
        for name in ("order", "row_ptr", "col", "qval", "weight_q"):
            self.register_buffer(name, packed.get(name))
        self.register_buffer("wscale", wscale)
        self.register_buffer("wsum", wsum)
        self.register_buffer("bias", bias)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None,
                   pattern: str = "auto", num_threads: int | None = None, k_chunk: int = DEFAULT_K_CHUNK,
                   n_block: int = DEFAULT_N_BLOCK, layout: str = "auto") -> "SparseLinearInt8":
        """Quantize (:func:`quantize_weight`) and pack ``weight`` (float32 ``[N, K]``, zeros = pruned).

        ``pattern``: ``"auto"``, ``"unstructured"``, ``"block4"``, ``"n:m"`` (checked) or ``"dense"``
        (torch BLAS on the integer values). ``layout`` of the sparse ones: ``"quads"`` (``q8``),
        ``"pairs"`` (``q8p``) or ``"auto"`` (the one with less work: pairs for unstructured
        sparsity, quads for block4 and dense weights).

        Raises (as :meth:`SparseLinear.from_dense`):
            ValueError: ``weight`` is not a 2-D tensor; ``bias`` is not of shape ``[N]``; ``num_threads`` is
                not a positive int or ``None``; ``k_chunk`` is not a positive multiple of 4, ``n_block`` not
                a positive multiple of 8; ``pattern`` or ``layout`` is unknown, or an ``"n:m"`` pattern is
                malformed or broken by the weight; ``weight_scale`` is bad (:func:`quantize_weight`); the
                weight has ~2**31 or more elements.
            TypeError: ``weight`` or ``bias`` is not float32 (or ``bias`` not a tensor).
        """
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            got = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"weight must be a 2-D float32 tensor [out_features, in_features], got {got}")
        if weight.dtype != torch.float32:
            raise TypeError(f"weight must be float32 [out_features, in_features], got {weight.dtype}")
        n, k = weight.shape
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or bias.dtype != torch.float32:
                raise TypeError(f"bias must be a float32 tensor of shape [{n}], got "
                                f"{getattr(bias, 'dtype', type(bias).__name__)}")
            if tuple(bias.shape) != (n,):
                raise ValueError(f"bias must have shape [{n}] (out_features), got {list(bias.shape)}")
            bias = bias.detach().to("cpu").contiguous().clone()
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
        if k_chunk <= 0 or k_chunk % 4:
            raise ValueError(f"k_chunk must be a positive multiple of 4, got {k_chunk}")
        if n_block <= 0 or n_block % 8:
            raise ValueError(f"n_block must be a positive multiple of 8, got {n_block}")
        if isinstance(pattern, str) and ":" in pattern:
            try:
                nn_, mm_ = (int(v) for v in pattern.split(":"))
            except ValueError:
                nn_ = mm_ = 0
            if not 0 < nn_ <= mm_:
                raise ValueError(f"bad N:M pattern {pattern!r}; expected e.g. '2:4'")
            _check_n_m(weight, nn_, mm_)
        elif pattern not in _PATTERNS:
            raise ValueError(f"pattern must be one of {_PATTERNS} or 'n:m' (e.g. '2:4'), got {pattern!r}")
        wq, scale = quantize_weight(weight, weight_scale)
        density = float((wq != 0).sum()) / max(1, wq.numel())
        packed: dict = {"format": "dense", "k_chunk": k_chunk, "n_block": n_block, "density": density}
        if pattern == "dense":
            packed["weight_q"] = wq.float().contiguous()
        else:
            if wq.numel() + n * k_chunk >= 2**31:
                raise ValueError("weights with ~2**31 or more elements are not supported (int32 indices)")
            if layout not in ("auto", "quads", "pairs"):
                raise ValueError(f"layout must be 'auto', 'quads' or 'pairs', got {layout!r}")
            if layout == "auto":
                n_quads, n_pairs = _count_quads_pairs(wq, k_chunk)
                layout = "pairs" if n_pairs < PAIRS_OVER_QUADS * n_quads else "quads"
            if layout == "pairs":
                packed.update(format="q8p", **_pack_pairs(_pack_sorted(wq.float(), k_chunk, n_block, 1)))
            else:
                quads = _pack_sorted(wq.float(), k_chunk, n_block, 4)
                packed.update(format="q8", order=quads["order"], row_ptr=quads["row_ptr"], col=quads["col"],
                              qval=quads["val"].to(torch.int8).contiguous())
        wsum = wq.sum(1, dtype=torch.int32).contiguous()
        return cls(k, n, packed, scale, wsum, bias, num_threads)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, **kwargs) -> "SparseLinearInt8":
        """``from_dense(linear.weight, linear.bias, **kwargs)``."""
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_dense(linear.weight.detach(), bias, **kwargs)

    def extra_repr(self) -> str:
        """One line for ``repr(module)``: shape, INT8 layout, density and whether there is a bias."""
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"density={self.density:.3f}, bias={self.bias is not None}")

    def dequantized_weight(self) -> torch.Tensor:
        """``Wq * scale`` as float32 ``[N, K]`` (the weight the INT8 layer effectively uses)."""
        return self.int_weight() * self.wscale[:, None]

    def int_weight(self) -> torch.Tensor:
        """``Wq`` as float32 ``[N, K]`` integers."""
        if self.format == "dense":
            return self.weight_q
        n, k, kc = self.out_features, self.in_features, self.k_chunk
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        rows = self.order.long().repeat_interleave(counts)
        w = torch.zeros(n, max(1, math.ceil(k / kc)) * kc + 4)
        if self.format == "q8p":  # pairs: (k_a, k_b), int16 weights; a padding pair repeats k_a with weight 0
            vals = self.qval.view(torch.int16).view(-1, 2).float()
            cols = self.col.long().view(-1, 2)
            w.index_put_((rows.repeat_interleave(2), cols.flatten()), vals.flatten(), accumulate=True)
        else:
            cols = self.col.long()[:, None] + torch.arange(4)
            w[rows[:, None].expand(-1, 4), cols] = self.qval.view(-1, 4).float()
        return w[:, :k].contiguous()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` float32 ``[..., in_features]`` -> float32 ``[..., out_features]``: activations quantized per call
        (dynamic, per tensor, 7-bit unsigned: see the module docstring), INT8 weights, no autograd.

        Raises:
            ValueError: ``x`` is not float32 with ``in_features`` in its last dimension.
        """
        k = self.in_features
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() < 1 or x.shape[-1] != k:
            raise ValueError(f"expected a float32 tensor of shape [..., {k}] (in_features={k}), got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}")
        lead = x.shape[:-1]
        return self.run(x.reshape(-1, k)).view(*lead, self.out_features)

    def run(self, x: torch.Tensor, x_t: bool = False, y_t: bool = False, act: str | None = None,
            minmax: torch.Tensor | None = None, x_range: torch.Tensor | None = None,
            out: torch.Tensor | None = None, per_token: bool = False) -> torch.Tensor:
        """2-D entry point: ``x`` float32 ``[M, K]`` (``[K, M]`` when ``x_t``) -> float32 ``[M, N]``
        (``[N, M]`` when ``y_t``), no autograd. ``act`` / ``minmax`` / ``out``: the kernel epilogue and
        the output buffer, as in :meth:`SparseLinear.run`. ``x_range``: ``(min, max)`` of ``x`` when
        already known (e.g. the previous layer's ``minmax``), which saves a pass over ``x``.
        ``per_token``: quantize each token (row of ``x``, column when ``x_t``) with its own ``(scale, zp)``."""
        # No torch.no_grad decorator and positional kernel arguments: see SparseLinear.run.
        x = x.contiguous()
        mod = _kernels.load() if self.format != "dense" else None
        if mod is not None and per_token:  # the kernel measures each token's range itself
            sx, zp = 1.0, 0
        elif per_token:
            sx, zp = activation_qparams_per_token(x.t() if x_t else x)
        else:
            sx, zp = activation_qparams_7bit(x, x_range)
        if mod is None:
            if self.format != "dense" and not SparseLinearInt8._warned_fallback:
                import warnings

                warnings.warn("SparseLinearInt8: compiled kernels unavailable, using the dense torch fallback "
                              f"({_kernels.build_error()})", RuntimeWarning, stacklevel=3)
                SparseLinearInt8._warned_fallback = True
            with torch.no_grad():
                if self.weight_q is None:
                    self.weight_q = self.int_weight()
                y = apply_epilogue(self._dense(x, sx, zp, x_t, y_t, out), act, minmax)
                return y if out is None or y is out else out.copy_(y)
        # positional after the threads: out, x_t, y_t, tile_w, force_generic, pairs, act, minmax, per_token
        return mod.spmm_q8(x, self.order, self.row_ptr, self.col, self.qval, self.wscale, self.wsum, self.bias,
                           self.out_features, self.k_chunk, self.n_block, sx, zp, self.num_threads or torch.get_num_threads(),
                           out, x_t, y_t, 64, False, self.format == "q8p", ACT_CODES[act], minmax, per_token)

    def _dense(self, x: torch.Tensor, sx, zp, x_t: bool, y_t: bool,
               out: torch.Tensor | None = None) -> torch.Tensor:
        # Integer math in float32: |sum of products| <= 127 * 127 * K < 2**24 for K <= 1040; above
        # that the float32 sum may round (relative error ~1e-7, far below the quantization step).
        per_token = isinstance(sx, torch.Tensor)  # [M] scales / zero points
        if per_token:
            xq = _quantize_x(x.t() if x_t else x, sx, zp).sub_(zp[:, None].float())
        else:
            xq = _quantize_x(x, sx, zp).sub_(zp)
            xq = xq.t() if x_t else xq
        acc = torch.mm(xq, self.weight_q.t(), out=None if y_t else out)  # [M, N]
        y = acc.mul_(sx[:, None] * self.wscale) if per_token else acc.mul_(self.wscale * sx)
        if self.bias is not None:
            y = y.add_(self.bias)
        return transpose(y, self.num_threads, out) if y_t else y


def fused_ffn_int8(first: SparseLinearInt8, second: SparseLinearInt8, x: torch.Tensor, act: str | None,
                   x_range: tuple | None = None, out: torch.Tensor | None = None,
                   add_norm: tuple | None = None) -> torch.Tensor | None:
    """``second(act(first(x)))`` in INT8 in one kernel call, or ``None`` where that call does not apply.

    ``x`` float32 ``[M, K]`` (quantized per tensor; ``x_range`` = its ``(min, max)`` when known) -> float32
    ``[M, second.out_features]`` (into ``out`` when given). The kernel (``spmm_ffn_q8``) runs both layers one
    64-token tile at a time: FFN1's finished hidden activations stay in a per-thread tile in cache, each
    token is quantized with its own ``(scale, zp)`` from that tile, and FFN2 runs on it, so the
    ``[M, first.out_features]`` float intermediate never goes through memory. The result equals
    ``second.run(act(first.run(x)), per_token=True)`` (same integer sums; the same epilogue math). Applies
    when both layers are sparse formats with compiled kernels and ``M`` fills a 64-token tile per thread
    (below that, the two calls split each layer's rows across the threads instead); ``None`` otherwise.
    ``add_norm``: ``(residual, gamma, beta, eps, minmax)`` to finish with BERT's "Add & Norm", ``out =
    LayerNorm(out + residual)``, on each tile while it is in cache (``minmax``: ``None`` or a float32 ``[2]``
    that receives the result's ``(min, max)``).

    Raises:
        RuntimeError: the hidden activations hold NaN or infinite values.
    """
    threads = first.num_threads or torch.get_num_threads()
    if (first.format not in ("q8", "q8p") or second.format not in ("q8", "q8p") or x.shape[0] < 64 * threads
            or first.out_features != second.in_features or act not in ACT_CODES):
        return None
    mod = _kernels.load()
    if mod is None:
        return None
    x = x.contiguous()
    sx, zp = activation_qparams_7bit(x, x_range)
    return mod.spmm_ffn_q8(x, first.order, first.row_ptr, first.col, first.qval, first.wscale, first.wsum, first.bias,
                           first.out_features, first.k_chunk, first.n_block, first.format == "q8p",
                           second.order, second.row_ptr, second.col, second.qval, second.wscale, second.wsum,
                           second.bias, second.out_features, second.k_chunk, second.n_block, second.format == "q8p",
                           sx, zp, threads, out, ACT_CODES[act], False, *(add_norm or ()))
