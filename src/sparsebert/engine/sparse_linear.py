"""``SparseLinear``: an inference-only drop-in for ``torch.nn.Linear`` with a sparse weight.

The weight ``W`` (``[N, K]`` = out x in, the ``nn.Linear`` layout) is packed once by
:meth:`SparseLinear.from_dense`; :meth:`SparseLinear.forward` computes
``Y[..., N] = X[..., K] @ W.T + b`` with the C++ kernels in :mod:`.kernels` (AVX2/FMA when
the CPU has them, portable C++ otherwise), or with plain torch when the extension cannot be
built (a ``RuntimeWarning`` is emitted once).

Packed formats (all arrays contiguous, on CPU)
----------------------------------------------
K is cut into ``n_kc = ceil(K / k_chunk)`` chunks of ``k_chunk`` inputs. The kernel walks a
block of output rows chunk by chunk so the activations of one chunk stay in L1 cache.

``"csr"`` (pattern ``"unstructured"`` and ``"n:m"``)
    ``row_ptr`` int32 ``[n_kc * N + 1]``; ``col`` int32 ``[nnz]``; ``val`` float32 ``[nnz]``.
    The nonzeros of output row ``n`` inside chunk ``c`` are
    ``col/val[row_ptr[c*N + n] : row_ptr[c*N + n + 1]]``; ``col`` holds the absolute input
    index ``k`` (ascending), ``val`` holds ``W[n, k]``. Memory: 8 bytes per nonzero.
``"block4"``
    Same, but each entry is a block of 4 consecutive inputs ``k .. k+3`` (``k`` a multiple
    of 4) of one output row: ``col`` int32 ``[nblocks]`` is ``k``, ``val`` float32
    ``[nblocks * 4]`` holds ``W[n, k:k+4]`` (pruned positions inside a kept block are
    stored as 0). Memory: 5 bytes per stored weight; pays off when blocks are (nearly) full.
``"dense"``
    ``weight`` float32 ``[N, K]``; used by ``pattern="auto"`` when the weight is too dense
    for sparse kernels to beat the BLAS (``torch.nn.functional.linear``).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from . import kernels as _kernels

__all__ = ["SparseLinear", "kernels_available", "pack_weight", "kernel_isa"]

# pattern="auto" keeps the dense BLAS above this density: the sparse kernel's cost per
# nonzero is ~2-4x a BLAS FMA (AVX2 vs AVX-512 BLAS, index loads), so below ~30% nonzeros
# it wins. Measured with benchmarks/kernels.py.
AUTO_DENSE_ABOVE_DENSITY = 0.30
# pattern="auto" picks block4 when at least this fraction of the stored values are nonzero.
AUTO_BLOCK4_MIN_FILL = 0.85
# Inputs per K chunk: 128 * 64 tokens * 4 B = 32 KiB of activations, i.e. one L1 cache.
DEFAULT_K_CHUNK = 128
# Output rows whose accumulators (n_block * 64 tokens * 4 B) stay in L1 next to the chunk.
DEFAULT_N_BLOCK = 32

_FMT_CODE = {"csr": 0, "block4": 1}
_PATTERNS = ("auto", "unstructured", "block4", "dense")


def kernels_available() -> bool:
    """True when the compiled sparse kernels load (building them on first call)."""
    return _kernels.load() is not None


def kernel_isa() -> str:
    """``"avx2_fma"``, ``"generic"`` (portable C++), or ``"torch"`` (no extension)."""
    mod = _kernels.load()
    return mod.isa() if mod is not None else "torch"


# --------------------------------------------------------------------------------------
# Packing (pure torch, done once per layer).
# --------------------------------------------------------------------------------------


def _pack_sorted(w: torch.Tensor, k_chunk: int, n_block: int, block: int) -> dict:
    """Chunked, count-sorted CSR of ``w`` with entries of ``block`` consecutive inputs."""
    n, k = w.shape
    n_kc = max(1, math.ceil(k / k_chunk))
    wc = F.pad(w, (0, n_kc * k_chunk - k)).view(n, n_kc, k_chunk // block, block).transpose(0, 1)
    emask = (wc != 0).any(-1)  # [n_kc, N, k_chunk / block]: entry stored?
    counts = emask.sum(-1)  # [n_kc, N]
    # Within each (chunk, block of n_block rows) process rows by increasing entry count.
    n_blk = math.ceil(n / n_block)
    padded = F.pad(counts, (0, n_blk * n_block - n), value=k_chunk + 1)  # padding rows sort last
    slot = padded.view(n_kc, n_blk, n_block).sort(dim=-1, stable=True).indices
    rows = (slot + torch.arange(n_blk)[:, None] * n_block).view(n_kc, -1)
    order = rows[rows < n].view(n_kc, n)
    chunk = torch.arange(n_kc)[:, None]
    wc, emask = wc[chunk, order], emask[chunk, order]
    row_ptr = torch.zeros(n_kc * n + 1, dtype=torch.int64)
    row_ptr[1:] = counts[chunk, order].flatten().cumsum(0)
    idx = emask.nonzero()  # row-major: (chunk, slot, entry) in processing order
    col = idx[:, 0] * k_chunk + idx[:, 2] * block
    return {
        "order": order.flatten().to(torch.int32).contiguous(),
        "row_ptr": row_ptr.to(torch.int32),
        "col": col.to(torch.int32).contiguous(),
        "val": wc[emask].flatten().contiguous(),
    }


def _check_n_m(w: torch.Tensor, n: int, m: int) -> None:
    k = w.shape[1]
    wp = F.pad(w, (0, (-k) % m)).view(w.shape[0], -1, m)
    worst = int((wp != 0).sum(-1).max()) if wp.numel() else 0
    if worst > n:
        raise ValueError(f"weight does not follow the {n}:{m} pattern: a group of {m} consecutive "
                         f"inputs has {worst} nonzeros (at most {n} allowed)")


def _block4_fill(w: torch.Tensor) -> float:
    """Fraction of nonzeros among the values block4 would store (1.0 = all blocks full)."""
    nnz = int((w != 0).sum())
    if nnz == 0:
        return 1.0
    blocks = int((F.pad(w, (0, (-w.shape[1]) % 4)).view(w.shape[0], -1, 4) != 0).any(-1).sum())
    return nnz / (4 * blocks)


def pack_weight(weight: torch.Tensor, pattern: str = "auto", k_chunk: int = DEFAULT_K_CHUNK,
                n_block: int = DEFAULT_N_BLOCK) -> dict:
    """Pack a dense ``[N, K]`` float32 weight; returns a dict of the format and its tensors.

    ``pattern``: ``"auto"``, ``"unstructured"``, ``"block4"``, ``"dense"`` or ``"n:m"``
    (e.g. ``"2:4"``, checked, then stored as CSR). See the module docstring for layouts.
    """
    w = weight.detach().to("cpu").contiguous()
    density = float((w != 0).sum()) / max(1, w.numel())
    fmt = pattern
    if pattern == "auto":
        if density > AUTO_DENSE_ABOVE_DENSITY:
            fmt = "dense"
        elif _block4_fill(w) >= AUTO_BLOCK4_MIN_FILL:
            fmt = "block4"
        else:
            fmt = "csr"
    elif pattern == "unstructured":
        fmt = "csr"
    elif ":" in pattern:
        try:
            n, m = (int(v) for v in pattern.split(":"))
        except ValueError:
            n = m = 0
        if not 0 < n <= m:
            raise ValueError(f"bad N:M pattern {pattern!r}; expected e.g. '2:4'")
        _check_n_m(w, n, m)
        fmt = "csr"
    elif pattern not in _PATTERNS:
        raise ValueError(f"pattern must be one of {_PATTERNS} or 'n:m' (e.g. '2:4'), got {pattern!r}")

    out = {"format": fmt, "k_chunk": k_chunk, "n_block": n_block, "density": density}
    if fmt == "dense":
        out["weight"] = w
    else:
        if k_chunk <= 0 or k_chunk % 4:
            raise ValueError(f"k_chunk must be a positive multiple of 4, got {k_chunk}")
        if n_block <= 0 or n_block % 8:
            raise ValueError(f"n_block must be a positive multiple of 8, got {n_block}")
        if w.numel() >= 2**31:
            raise ValueError("weights with 2**31 or more elements are not supported (int32 indices)")
        out.update(_pack_sorted(w, k_chunk, n_block, 1 if fmt == "csr" else 4))
    return out


# --------------------------------------------------------------------------------------
# Module.
# --------------------------------------------------------------------------------------


class SparseLinear(torch.nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored sparse (inference only, CPU, float32).

    Build with :meth:`from_dense`. ``forward`` takes ``x`` float32 ``[..., in_features]``
    (any leading shape; flattened to ``M`` rows) and returns float32
    ``[..., out_features]``. ``num_threads`` (``None`` = ``torch.get_num_threads()`` at call
    time) is passed to the kernel's OpenMP region; torch's own thread setting is not touched.

    Attributes: ``in_features`` (K), ``out_features`` (N), ``format`` (``"csr"``,
    ``"block4"`` or ``"dense"``), ``density`` (nonzero fraction of W), ``k_chunk``.
    """

    _warned_fallback = False

    def __init__(self, in_features: int, out_features: int, packed: dict, bias: torch.Tensor | None,
                 num_threads: int | None = None):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.format: str = packed["format"]
        self.k_chunk: int = int(packed["k_chunk"])
        self.n_block: int = int(packed["n_block"])
        self.density: float = float(packed["density"])
        self.num_threads = num_threads
        for name in ("order", "row_ptr", "col", "val", "weight"):
            self.register_buffer(name, packed.get(name), persistent=True)
        self.register_buffer("bias", bias, persistent=True)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, pattern: str = "auto",
                   num_threads: int | None = None, k_chunk: int = DEFAULT_K_CHUNK,
                   n_block: int = DEFAULT_N_BLOCK) -> "SparseLinear":
        """Pack ``weight`` (float32 ``[N, K]``, zeros = pruned) and ``bias`` (float32 ``[N]``)."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D tensor [out_features, in_features], got "
                             f"{getattr(weight, 'shape', type(weight))}")
        if weight.dtype != torch.float32:
            raise TypeError(f"weight must be float32, got {weight.dtype}")
        n, k = weight.shape
        if bias is not None:
            if bias.dtype != torch.float32:
                raise TypeError(f"bias must be float32, got {bias.dtype}")
            if tuple(bias.shape) != (n,):
                raise ValueError(f"bias must have shape [{n}] (out_features), got {list(bias.shape)}")
            bias = bias.detach().to("cpu").contiguous().clone()
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
        return cls(k, n, pack_weight(weight, pattern, k_chunk, n_block), bias, num_threads)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, **kwargs) -> "SparseLinear":
        """Shortcut for ``from_dense(linear.weight, linear.bias, **kwargs)``."""
        return cls.from_dense(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(),
                              **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format}, density={self.density:.3f}, bias={self.bias is not None}")

    def to_dense(self) -> torch.Tensor:
        """The weight as a dense float32 ``[N, K]`` tensor (for checks and the fallback)."""
        if self.format == "dense":
            return self.weight
        n, k, kc = self.out_features, self.in_features, self.k_chunk
        n_kc = max(1, math.ceil(k / kc))
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        rows = self.order.long().repeat_interleave(counts)
        w = torch.zeros(n, n_kc * kc + 4)
        if self.format == "csr":
            w[rows, self.col.long()] = self.val
        else:
            cols = self.col.long()[:, None] + torch.arange(4)
            w[rows[:, None].expand(-1, 4), cols] = self.val.view(-1, 4)
        return w[:, :k].contiguous()

    def _check_input(self, x: torch.Tensor) -> None:
        k = self.in_features
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a float32 tensor of shape [..., {k}], got {type(x).__name__}")
        if x.dtype != torch.float32:
            raise TypeError(f"expected float32 input of shape [..., {k}], got dtype {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != k:
            raise ValueError(f"expected input of shape [..., {k}] (in_features={k}), got {list(x.shape)}")
        if x.device.type != "cpu":
            raise ValueError(f"SparseLinear runs on CPU; got input on {x.device}")

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()
        if self.format == "dense":
            y = F.linear(x2, self.weight, self.bias)
        else:
            mod = _kernels.load()
            if mod is None:
                y = self._fallback(x2)
            else:
                threads = self.num_threads or torch.get_num_threads()
                y = mod.spmm(x2, self.order, self.row_ptr, self.col, self.val, self.bias,
                             self.out_features, _FMT_CODE[self.format], self.k_chunk, self.n_block,
                             threads)
        return y.view(*lead, self.out_features)

    def _fallback(self, x2: torch.Tensor) -> torch.Tensor:
        # Pure torch: rebuild the dense weight once and let the BLAS do it.
        if not SparseLinear._warned_fallback:
            warnings.warn("SparseLinear: compiled kernels unavailable, using dense torch fallback "
                          f"({_kernels.build_error()})", RuntimeWarning, stacklevel=3)
            SparseLinear._warned_fallback = True
        if getattr(self, "_dense_cache", None) is None:
            self._dense_cache = self.to_dense()
        return F.linear(x2, self._dense_cache, self.bias)
