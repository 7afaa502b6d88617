"""``SparseLinear``: an inference-only drop-in for ``torch.nn.Linear`` with a sparse weight.

The weight ``W`` (``[N, K]`` = out x in, the ``nn.Linear`` layout, float32, zeros = pruned)
is packed once by :meth:`SparseLinear.from_dense`; :meth:`SparseLinear.forward` computes
``Y[..., N] = X[..., K] @ W.T + b`` (float32) with the C++ kernels of :mod:`.kernels`
(AVX2/FMA when the CPU has them, portable C++ otherwise), or with plain torch when the
extension cannot be built (a ``RuntimeWarning`` is emitted once).

This module is the checked API; ``kernels.load().spmm`` is the raw kernel, which trusts its
arguments (shapes, dtypes, packing) beyond a few cheap checks.

Packed formats ("chunked, count-sorted CSR"; all arrays contiguous, CPU)
------------------------------------------------------------------------
K is cut into ``n_kc = ceil(K / k_chunk)`` chunks of ``k_chunk`` inputs and N into blocks
of ``n_block`` output rows. The kernel keeps a block's accumulators in L1 and applies the
chunks one at a time, so the activations a chunk touches stay in L1 too. Within a
(chunk, block) pair rows are processed by increasing entry count, which keeps the inner
loop's trip count predictable for the branch predictor.

For chunk ``c`` and processing slot ``i`` (``0 <= i < N``; the slots of block ``j`` are
``j*n_block .. j*n_block + n_block - 1`` and hold rows of that block):

* ``order``   int32 ``[n_kc * N]``: ``order[c*N + i]`` is the output row ``n`` of the slot;
* ``row_ptr`` int32 ``[n_kc * N + 1]``: its entries are ``row_ptr[c*N + i] ..
  row_ptr[c*N + i + 1] - 1`` (the entries of W[n] inside chunk c, ``k`` ascending);
* ``"csr"`` (patterns ``"unstructured"``, ``"n:m"``): one entry per nonzero,
  ``col`` int32 ``[nnz]`` = ``k``, ``val`` float32 ``[nnz]`` = ``W[n, k]``.
  Memory: ~8 bytes per nonzero.
* ``"block4"``: one entry per block of 4 consecutive inputs with any nonzero,
  ``col`` int32 ``[nblocks]`` = ``k`` (a multiple of 4), ``val`` float32 ``[4 * nblocks]``
  = ``W[n, k:k+4]`` (pruned weights inside a kept block stored as 0). Memory: 5 bytes per
  stored weight, one index load per 4 FMAs; pays off when blocks are (nearly) full.
* ``"dense"``: ``weight`` float32 ``[N, K]``; chosen by ``pattern="auto"`` when W is too
  dense for the sparse kernel to beat the BLAS (``torch.nn.functional.linear``; in ``run``, MKL's
  pre-packed sgemm once a small row count repeats, see ``PACK_MAX_ROWS``).
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F

from . import kernels as _kernels

__all__ = ["SparseLinear", "fused_ffn", "kernels_available", "kernel_isa", "pack_weight", "transpose"]

# pattern="auto" falls back to the dense BLAS above this density. Measured with
# benchmarks/kernels.py (1 thread): at density 1.0 the csr kernel runs at ~0.84x an AVX2
# MKL and ~0.47x an AVX-512 MKL, at density 0.2 at ~3.2x and ~1.7x; time ~ nnz.
AUTO_DENSE_ABOVE_DENSITY_AVX2 = 0.7
AUTO_DENSE_ABOVE_DENSITY_AVX512 = 0.4
# pattern="auto" picks block4 when at least this fraction of the stored values are nonzero.
AUTO_BLOCK4_MIN_FILL = 0.85
# Inputs per K chunk: 128 * 64 tokens * 4 B = 32 KiB of activations (an L1 cache). Very
# sparse rows have few nonzeros per chunk, so the per-(row, chunk) overhead dominates:
# use longer chunks below AUTO_LONG_CHUNK_DENSITY.
DEFAULT_K_CHUNK = 128
LONG_K_CHUNK = 256
AUTO_LONG_CHUNK_DENSITY = 0.08
# Output rows per block: accumulators n_block * 64 tokens * 4 B = 16 KiB stay in L1.
DEFAULT_N_BLOCK = 64

# Dense layers: MKL's sgemm on a weight packed once for a row count M (cblas_sgemm_pack via torch.ops.mkl,
# as torch.compile's CPU freezing does) runs 10-18% faster than F.linear at M = 128 (batch 1, seq 128),
# the same above ~512 rows. The packing holds for one M: a layer packs for an M once it has seen it
# PACK_AFTER_CALLS times in a row (a server or benchmark at a fixed padded shape), and keeps one packing.
PACK_MAX_ROWS = 512
PACK_AFTER_CALLS = 2

_FMT_CODE = {"csr": 0, "block4": 1}
# Epilogue activations of the kernels (``act`` argument of ``SparseLinear.run``).
ACT_CODES = {None: 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}


def apply_epilogue(y: torch.Tensor, act: str | None, minmax: torch.Tensor | None) -> torch.Tensor:
    """The kernels' epilogue in torch (for the dense and fallback paths): ``act`` in place on
    ``y`` (float32, any shape), and ``(min, max)`` of the result into ``minmax`` (float32 ``[2]``;
    ``(inf, -inf)`` for an empty ``y``) when given. Returns ``y``.

    Raises:
        ValueError: ``act`` is not a key of ``ACT_CODES``.
    """
    if act == "gelu":
        y = torch.ops.aten.gelu_(y)
    elif act == "gelu_tanh":
        y = torch.ops.aten.gelu_(y, approximate="tanh")
    elif act == "relu":
        y = y.relu_()
    elif act is not None:
        raise ValueError(f"act must be one of {list(ACT_CODES)}, got {act!r}")
    if minmax is not None:
        if y.numel():
            lo, hi = torch.aminmax(y)
            minmax[0], minmax[1] = lo, hi
        else:
            minmax.copy_(torch.tensor([float("inf"), float("-inf")]))
    return y


_PATTERNS = ("auto", "unstructured", "block4", "dense")


def transpose(x: torch.Tensor, num_threads: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` float32 ``[R, C]`` -> a contiguous ``[C, R]`` copy of ``x.T`` (into ``out`` when given).

    The kernels' 8x8 register transposes: ~5x ``x.t().contiguous()`` on a 128 x 1152 QKV output (21 vs
    103 us, 2 threads), which is what lets dense layers feed the feature-major attention kernel.
    Plain torch when the kernels are unavailable.
    """
    mod = _kernels.load()
    if mod is None or x.dtype != torch.float32:
        return x.t().contiguous() if out is None else out.copy_(x.t())
    return mod.transpose(x.contiguous(), num_threads or torch.get_num_threads(), out)


def kernels_available() -> bool:
    """True when the compiled sparse kernels load (building them on first call)."""
    return _kernels.load() is not None


def kernel_isa() -> str:
    """The instruction set the kernels dispatch to: ``"avx512_vnni"``, ``"avx512f"``, ``"avx2_fma"``,
    ``"generic"`` (portable C++), or ``"torch"`` (no extension)."""
    mod = _kernels.load()
    return mod.isa() if mod is not None else "torch"


def _auto_dense_threshold() -> float:
    cap = torch.backends.cpu.get_cpu_capability().upper()
    return AUTO_DENSE_ABOVE_DENSITY_AVX512 if "AVX512" in cap else AUTO_DENSE_ABOVE_DENSITY_AVX2


# --------------------------------------------------------------------------------------
# Packing (pure torch, once per layer).
# --------------------------------------------------------------------------------------


def _pack_sorted(w: torch.Tensor, k_chunk: int, n_block: int, block: int) -> dict:
    """Chunked, count-sorted CSR of ``w`` whose entries are ``block`` consecutive inputs."""
    n, k = w.shape
    n_kc = max(1, math.ceil(k / k_chunk))
    wc = F.pad(w, (0, n_kc * k_chunk - k)).view(n, n_kc, k_chunk // block, block).transpose(0, 1)
    emask = (wc != 0).any(-1)  # [n_kc, N, k_chunk / block]: is the entry stored?
    counts = emask.sum(-1)  # [n_kc, N]
    # Slot order: within each (chunk, block of rows), rows by increasing entry count.
    n_blk = math.ceil(n / n_block)
    padded = F.pad(counts, (0, n_blk * n_block - n), value=k_chunk + 1)  # padding rows last
    slot = padded.view(n_kc, n_blk, n_block).sort(dim=-1, stable=True).indices
    rows = (slot + torch.arange(n_blk)[:, None] * n_block).view(n_kc, -1)
    order = rows[rows < n].view(n_kc, n)
    chunk = torch.arange(n_kc)[:, None]
    wc, emask = wc[chunk, order], emask[chunk, order]
    row_ptr = torch.zeros(n_kc * n + 1, dtype=torch.int64)
    row_ptr[1:] = counts[chunk, order].flatten().cumsum(0)
    idx = emask.nonzero()  # row-major: (chunk, slot, entry) = processing order
    col = idx[:, 0] * k_chunk + idx[:, 2] * block
    return {
        "order": order.flatten().to(torch.int32).contiguous(),
        "row_ptr": row_ptr.to(torch.int32),
        "col": col.to(torch.int32).contiguous(),
        "val": wc[emask].flatten().contiguous(),
    }


def _check_n_m(w: torch.Tensor, n: int, m: int) -> None:
    wp = F.pad(w, (0, (-w.shape[1]) % m)).view(w.shape[0], -1, m)
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


def pack_weight(weight: torch.Tensor, pattern: str = "auto", k_chunk: int | None = None,
                n_block: int = DEFAULT_N_BLOCK) -> dict:
    """Pack a dense float32 ``[N, K]`` weight; returns ``{"format", "k_chunk", "n_block",
    "density", <tensors>}`` (see the module docstring for the layouts).

    ``pattern``: ``"auto"`` (dense BLAS, block4 or csr from the weight's density and block
    fill), ``"unstructured"`` (csr), ``"block4"``, ``"dense"`` or ``"n:m"`` such as ``"2:4"``
    (checked, then stored as csr). ``k_chunk`` ``None`` picks one from the density.

    Raises:
        ValueError: ``pattern`` is unknown, a malformed ``"n:m"`` (not ``0 < n <= m``) or one the weight
            breaks; ``k_chunk`` is not a positive multiple of 4; ``n_block`` is not a positive multiple
            of 8; a sparse format would need ~2**31 or more elements (int32 indices).
    """
    w = weight.detach().to("cpu", torch.float32).contiguous()
    density = float((w != 0).sum()) / max(1, w.numel())
    if pattern == "auto":
        if density > _auto_dense_threshold():
            fmt = "dense"
        elif _block4_fill(w) >= AUTO_BLOCK4_MIN_FILL:
            fmt = "block4"
        else:
            fmt = "csr"
    elif pattern in ("unstructured", "block4", "dense"):
        fmt = {"unstructured": "csr"}.get(pattern, pattern)
    elif isinstance(pattern, str) and ":" in pattern:
        try:
            n, m = (int(v) for v in pattern.split(":"))
        except ValueError:
            n = m = 0
        if not 0 < n <= m:
            raise ValueError(f"bad N:M pattern {pattern!r}; expected e.g. '2:4'")
        _check_n_m(w, n, m)
        fmt = "csr"
    else:
        raise ValueError(f"pattern must be one of {_PATTERNS} or 'n:m' (e.g. '2:4'), got {pattern!r}")

    if k_chunk is None:
        k_chunk = LONG_K_CHUNK if density < AUTO_LONG_CHUNK_DENSITY else DEFAULT_K_CHUNK
    if k_chunk <= 0 or k_chunk % 4:
        raise ValueError(f"k_chunk must be a positive multiple of 4, got {k_chunk}")
    if n_block <= 0 or n_block % 8:
        raise ValueError(f"n_block must be a positive multiple of 8, got {n_block}")
    out = {"format": fmt, "k_chunk": k_chunk, "n_block": n_block, "density": density}
    if fmt == "dense":
        out["weight"] = w
    else:
        if w.numel() + w.shape[0] * k_chunk >= 2**31:
            raise ValueError("weights with ~2**31 or more elements are not supported (int32 indices)")
        out.update(_pack_sorted(w, k_chunk, n_block, 1 if fmt == "csr" else 4))
    return out


# --------------------------------------------------------------------------------------
# Module.
# --------------------------------------------------------------------------------------


def _mkl_packing_available() -> bool:
    return (torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
            and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"))


class _PackedDense:
    """``y = x @ W.T + b`` with MKL's pre-packed sgemm for one row count ``M`` (see ``PACK_MAX_ROWS``).

    ``__call__(x, weight, bias)`` (``x`` float32 ``[M, K]`` contiguous, ``weight`` ``[N, K]``) returns ``y``
    ``[M, N]``, or ``None`` when there is no packing for this ``M`` and this weight (yet): the caller then
    runs ``F.linear``. A packing is keyed by the weight tensor and its version counter, so a replaced or
    in-place updated weight (``.to()``, ``load_state_dict``) is packed again. ``SPARSEBERT_NO_MKL_PACK=1``
    (read when the layer is built) turns packing off.
    """

    def __init__(self):
        self.enabled = _mkl_packing_available() and not os.environ.get("SPARSEBERT_NO_MKL_PACK")
        # (M, weight, its version, packed weight), swapped atomically
        self.packed: tuple[int, torch.Tensor, int, torch.Tensor] | None = None
        self.seen = (0, 0)  # (M, consecutive calls with it)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        m = x.shape[0]
        packed = self.packed
        if packed is not None and packed[0] == m and packed[1] is weight and packed[2] == weight._version:
            return torch.ops.mkl._mkl_linear(x, packed[3], weight, bias, m)
        if not self.enabled or m > PACK_MAX_ROWS or m == 0:
            return None
        self.seen = (m, self.seen[1] + 1) if self.seen[0] == m else (m, 1)
        if self.seen[1] >= PACK_AFTER_CALLS:
            try:
                self.packed = (m, weight, weight._version, torch.ops.mkl._mkl_reorder_linear_weight(weight, m))
            except RuntimeError:  # an MKL build without packing support: stay on F.linear
                self.enabled = False
        return None


class SparseLinear(torch.nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored sparse (inference only, CPU, float32).

    Build with :meth:`from_dense` (or :meth:`from_linear`). ``forward(x)`` takes ``x``
    float32 ``[..., in_features]`` (any leading dims, flattened to ``M`` rows; need not be
    contiguous) and returns a new float32 ``[..., out_features]`` tensor, or writes into
    ``out`` (contiguous float32 of that shape) when given, which saves the page faults
    of a fresh allocation for large outputs. Runs under ``torch.no_grad()``.

    ``num_threads`` (``None`` = ``torch.get_num_threads()`` at call time) sizes the kernel's
    own OpenMP region; torch's global thread setting is neither read at pack time nor changed.

    Attributes: ``in_features`` (K), ``out_features`` (N), ``format`` (``"csr"``,
    ``"block4"`` or ``"dense"``), ``density`` (nonzero fraction of W), ``k_chunk``,
    ``n_block``; buffers ``order``, ``row_ptr``, ``col``, ``val`` (sparse formats) or
    ``weight`` (dense), and ``bias`` (float32 ``[N]`` or ``None``).
    """

    _warned_fallback = False

    def __init__(self, in_features: int, out_features: int, packed: dict,
                 bias: torch.Tensor | None = None, num_threads: int | None = None):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.format: str = packed["format"]
        self.k_chunk: int = int(packed["k_chunk"])
        self.n_block: int = int(packed["n_block"])
        self.density: float = float(packed["density"])
        self.num_threads = num_threads
        for name in ("order", "row_ptr", "col", "val", "weight"):
            self.register_buffer(name, packed.get(name))
        self.register_buffer("bias", bias)
        self._dense_cache: torch.Tensor | None = None
        self._packed = _PackedDense() if self.format == "dense" else None

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, pattern: str = "auto",
                   num_threads: int | None = None, k_chunk: int | None = None,
                   n_block: int = DEFAULT_N_BLOCK) -> "SparseLinear":
        """Pack ``weight`` (float32 ``[N, K]``, zeros = pruned) and ``bias`` (float32 ``[N]``).

        ``pattern``: ``"auto"`` | ``"unstructured"`` | ``"block4"`` | ``"dense"`` | ``"n:m"``
        (see :func:`pack_weight`). ``k_chunk`` / ``n_block`` are tuning knobs (cache
        blocking); the defaults suit 32-48 KiB L1 caches.

        Raises:
            ValueError: ``weight`` is not a 2-D tensor; ``bias`` is not of shape ``[N]``; ``num_threads``
                is not a positive int or ``None``; a bad ``pattern`` / ``k_chunk`` / ``n_block`` (see
                :func:`pack_weight`).
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
        return cls(k, n, pack_weight(weight, pattern, k_chunk, n_block), bias, num_threads)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, **kwargs) -> "SparseLinear":
        """``from_dense(linear.weight, linear.bias, **kwargs)``."""
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_dense(linear.weight.detach(), bias, **kwargs)

    def extra_repr(self) -> str:
        """One line for ``repr(module)``: shape, storage format, density and whether there is a bias."""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format}, density={self.density:.3f}, bias={self.bias is not None}")

    def to_dense(self) -> torch.Tensor:
        """The weight as a dense float32 ``[N, K]`` tensor (for checks and the fallback)."""
        if self.format == "dense":
            return self.weight
        n, k, kc = self.out_features, self.in_features, self.k_chunk
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        rows = self.order.long().repeat_interleave(counts)
        w = torch.zeros(n, max(1, math.ceil(k / kc)) * kc + 4)
        if self.format == "csr":
            w[rows, self.col.long()] = self.val
        else:
            cols = self.col.long()[:, None] + torch.arange(4)
            w[rows[:, None].expand(-1, 4), cols] = self.val.view(-1, 4)
        return w[:, :k].contiguous()

    def _check_input(self, x: torch.Tensor, out: torch.Tensor | None) -> None:
        k, n = self.in_features, self.out_features
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a float32 tensor of shape [..., {k}], got {type(x).__name__}")
        if x.dtype != torch.float32:
            raise TypeError(f"expected float32 input of shape [..., {k}] (in_features={k}), got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != k:
            raise ValueError(f"expected input of shape [..., {k}] (in_features={k}), got {list(x.shape)}")
        if x.device.type != "cpu":
            raise ValueError(f"SparseLinear runs on CPU; got input on {x.device}")
        if out is not None:
            want = [*x.shape[:-1], n]
            if (not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or list(out.shape) != want
                    or not out.is_contiguous() or out.device.type != "cpu"):
                raise ValueError(f"out must be a contiguous float32 CPU tensor of shape {want}, got "
                                 f"{getattr(out, 'dtype', None)} {list(getattr(out, 'shape', []))}")

    @torch.no_grad()
    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` float32 ``[..., in_features]`` -> float32 ``[..., out_features]`` (into ``out`` when given), no autograd.

        Raises:
            TypeError: ``x`` is not a tensor or not float32.
            ValueError: ``x`` has no last dim of ``in_features`` or is not on the CPU; ``out`` is not a
                contiguous float32 CPU tensor of shape ``[..., out_features]``.
        """
        self._check_input(x, out)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()
        out2 = None if out is None else out.view(-1, self.out_features)
        if self.format == "dense":
            y = self._dense(x2, self.weight, out2)
        else:
            mod = _kernels.load()
            if mod is None:
                y = self._fallback(x2, out2)
            else:
                threads = self.num_threads or torch.get_num_threads()
                y = mod.spmm(x2, self.order, self.row_ptr, self.col, self.val, self.bias,
                             self.out_features, _FMT_CODE[self.format], self.k_chunk, self.n_block,
                             threads, out2)
        return y.view(*lead, self.out_features) if out is None else out

    @torch.no_grad()
    def forward_t(self, x_t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Feature-major variant: ``Y^T = W @ X^T + b[:, None]``.

        ``x_t`` float32 ``[in_features, M]`` (tokens contiguous) -> float32
        ``[out_features, M]``. The kernel works on this layout internally, so it skips the
        two transposes of :meth:`forward` (~15-20% of its time at M = 4096); an engine
        that keeps activations feature-major between layers should call this.

        Raises:
            ValueError: ``x_t`` is not a float32 2-D tensor with ``in_features`` rows, or not on the CPU;
                ``out`` is not a contiguous float32 tensor of shape ``[out_features, M]``.
        """
        k, n = self.in_features, self.out_features
        if (not isinstance(x_t, torch.Tensor) or x_t.dtype != torch.float32 or x_t.dim() != 2
                or x_t.shape[0] != k):
            raise ValueError(f"expected a float32 tensor of shape [{k}, M] (in_features={k}, tokens), got "
                             f"{getattr(x_t, 'dtype', type(x_t).__name__)} {list(getattr(x_t, 'shape', []))}")
        if x_t.device.type != "cpu":
            raise ValueError(f"SparseLinear runs on CPU; got input on {x_t.device}")
        m = x_t.shape[1]
        if out is not None and (not isinstance(out, torch.Tensor) or out.dtype != torch.float32
                                or list(out.shape) != [n, m] or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous float32 CPU tensor of shape [{n}, {m}]")
        x_t = x_t.contiguous()
        mod = _kernels.load() if self.format != "dense" else None
        if mod is None:
            w = self.weight if self.format == "dense" else self._fallback_weight()
            b = None if self.bias is None else self.bias[:, None]
            y = torch.mm(w, x_t) if b is None else torch.addmm(b, w, x_t)
            return y if out is None else out.copy_(y)
        threads = self.num_threads or torch.get_num_threads()
        return mod.spmm(x_t, self.order, self.row_ptr, self.col, self.val, self.bias, n,
                        _FMT_CODE[self.format], self.k_chunk, self.n_block, threads, out,
                        x_t=True, y_t=True)

    def run(self, x: torch.Tensor, x_t: bool = False, y_t: bool = False, act: str | None = None,
            minmax: torch.Tensor | None = None, out: torch.Tensor | None = None, x_range=None,
            per_token: bool = False) -> torch.Tensor:
        """Unchecked 2-D entry point for engines: ``x`` float32 ``[M, K]`` (``[K, M]`` when
        ``x_t``) -> float32 ``[M, N]`` (``[N, M]`` when ``y_t``). No autograd.

        ``act``: ``None``, ``"gelu"`` (erf), ``"gelu_tanh"`` or ``"relu"``, applied to the output
        in the kernel's epilogue (no extra pass over memory). ``minmax``: a float32 tensor of 2
        elements that receives ``(min, max)`` of the output (for the next INT8 layer). ``out``: a
        contiguous float32 tensor of the output's shape to write into (an engine's reused buffer:
        a fresh multi-MB output costs its page faults on every call). Returns the output: ``out``,
        except on the pre-packed MKL path of a dense layer (at most ``PACK_MAX_ROWS`` rows, where
        MKL allocates its own and a copy would cost more than it saves), or a new tensor.
        ``x_range`` / ``per_token``: how :meth:`SparseLinearInt8.run` quantizes ``x``; accepted and ignored
        here (FP32 quantizes nothing), so an engine calls both precisions alike.
        """
        # Called ~25 times per MiniLM forward: no decorator, positional kernel arguments (pybind's
        # keyword parsing and torch.no_grad's context manager cost ~15 us a call, ~4% at batch 1).
        x = x.contiguous()
        mod = _kernels.load() if self.format != "dense" else None
        if mod is None:
            with torch.no_grad():
                if self._packed is not None and x.shape[1 if x_t else 0] <= PACK_MAX_ROWS:
                    threads = self.num_threads or torch.get_num_threads()
                    y = self._packed(transpose(x, threads) if x_t else x, self.weight, self.bias)  # M <= 512 rows
                    if y is not None:
                        return apply_epilogue(transpose(y, threads, out) if y_t else y, act, minmax)
                w = self.weight if self.format == "dense" else self._fallback_weight()
                b = self.bias
                if y_t:  # Y^T = W @ X^T (+ b[:, None])
                    a, m, bb = w, (x if x_t else x.t()), (None if b is None else b[:, None])
                else:  # Y = X @ W^T (+ b), as F.linear
                    a, m, bb = (x.t() if x_t else x), w.t(), b
                y = torch.mm(a, m, out=out) if bb is None else torch.addmm(bb, a, m, out=out)
                return apply_epilogue(y, act, minmax)
        # positional after the threads: out, x_t, y_t, tile_w, force_generic, act, minmax
        return mod.spmm(x, self.order, self.row_ptr, self.col, self.val, self.bias, self.out_features,
                        _FMT_CODE[self.format], self.k_chunk, self.n_block, self.num_threads or torch.get_num_threads(),
                        out, x_t, y_t, 64, False, ACT_CODES[act], minmax)

    def _dense(self, x2: torch.Tensor, w: torch.Tensor, out2: torch.Tensor | None) -> torch.Tensor:
        if out2 is None:
            return F.linear(x2, w, self.bias)
        if self.bias is None:
            return torch.mm(x2, w.t(), out=out2)
        return torch.addmm(self.bias, x2, w.t(), out=out2)

    def _fallback_weight(self) -> torch.Tensor:
        # No compiled kernels: rebuild the dense weight once and let the BLAS do the work.
        if not SparseLinear._warned_fallback:
            warnings.warn("SparseLinear: compiled kernels unavailable, using the dense torch "
                          f"fallback ({_kernels.build_error()})", RuntimeWarning, stacklevel=4)
            SparseLinear._warned_fallback = True
        if self._dense_cache is None:
            self._dense_cache = self.to_dense()
        return self._dense_cache

    def _fallback(self, x2: torch.Tensor, out2: torch.Tensor | None) -> torch.Tensor:
        return self._dense(x2, self._fallback_weight(), out2)


def fused_ffn(first: SparseLinear, second: SparseLinear, x: torch.Tensor, act: str | None,
              out: torch.Tensor | None = None, add_norm: tuple | None = None) -> torch.Tensor | None:
    """``second(act(first(x)))`` in one kernel call, or ``None`` where that call does not apply.

    ``x`` float32 ``[M, K]`` -> float32 ``[M, second.out_features]`` (into ``out`` when given). The
    kernel (``spmm_ffn``) runs both layers one 64-token tile at a time and keeps the tile's hidden
    activations in cache in the layout the second layer reads, so the ``[M, first.out_features]``
    intermediate is never written, transposed and read back (1.13x-1.38x the two calls on MiniLM- and
    bert-base-shaped FFNs at 80-90%, ``benchmarks/fused_ops.py``). Applies when both layers are
    sparse formats (csr / block4) with compiled kernels, and ``M`` fills at least one tile per thread
    (below that the two calls split the rows of each layer across threads instead); ``None`` otherwise.
    Same sums as the two calls (FP32, no reassociation beyond theirs).
    ``add_norm``: ``(residual, gamma, beta, eps, minmax)`` to finish with BERT's "Add & Norm", ``out =
    LayerNorm(out + residual)``, on each tile while it is in cache (``minmax``: ``None`` or a float32 ``[2]``
    that receives the result's ``(min, max)``).
    """
    threads = first.num_threads or torch.get_num_threads()
    if (first.format not in _FMT_CODE or second.format not in _FMT_CODE or x.shape[0] < 64 * threads
            or first.out_features != second.in_features or act not in ACT_CODES):
        return None
    mod = _kernels.load()
    if mod is None:
        return None
    return mod.spmm_ffn(x.contiguous(), first.order, first.row_ptr, first.col, first.val, first.bias,
                        first.out_features, _FMT_CODE[first.format], first.k_chunk, first.n_block,
                        second.order, second.row_ptr, second.col, second.val, second.bias,
                        second.out_features, _FMT_CODE[second.format], second.k_chunk, second.n_block,
                        threads, out, ACT_CODES[act], False, *(add_norm or ()))
