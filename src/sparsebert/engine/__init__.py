"""Sparse CPU inference engine.

Kernel layer: :class:`SparseLinear` replaces ``torch.nn.Linear`` layers whose weights were
pruned, running C++/AVX2 sparse x dense kernels compiled on first use (see
:mod:`sparsebert.engine.kernels`).
"""

from .sparse_linear import SparseLinear, kernel_isa, kernels_available, pack_weight

__all__ = ["SparseLinear", "kernel_isa", "kernels_available", "pack_weight"]
