"""Sparse CPU inference engine.

* :func:`compile` (:func:`.bert.compile_model`): a BERT checkpoint or deployment folder ->
  :class:`CompiledBert`, a callable running the encoder with packed sparse Linear layers (FP32 or
  INT8) and dense torch ops for the rest.
* Kernel layer: :class:`SparseLinear` (FP32) and :class:`SparseLinearInt8` replace
  ``torch.nn.Linear`` layers whose weights were pruned, running C++ sparse x dense kernels
  (AVX2/FMA, portable C++ elsewhere) compiled on first use (see :mod:`sparsebert.engine.kernels`).
"""

from .bert import CompiledBert, compile_model, int8_reference_model
from .loading import EngineError
from .quantized_linear import SparseLinearInt8, reference_int8_linear
from .sparse_linear import SparseLinear, kernel_isa, kernels_available, pack_weight

compile = compile_model  # noqa: A001 - the public name: sparsebert.engine.compile(model_or_dir)

__all__ = ["compile", "compile_model", "CompiledBert", "EngineError", "int8_reference_model", "SparseLinear",
           "SparseLinearInt8", "reference_int8_linear", "kernel_isa", "kernels_available", "pack_weight"]
