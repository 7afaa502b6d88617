"""Gradual magnitude pruning (GMP): Zhu & Gupta 2017 (arXiv:1710.01878); SparseML's GMPruningModifier."""

from __future__ import annotations

import torch

from ..base import ModifierState
from .base import GradualPruningModifier

__all__ = ["GMPruningModifier", "MagnitudePruningModifier"]


class GMPruningModifier(GradualPruningModifier):
    """Prune the smallest-magnitude weights (score ``|w|``) on the gradual schedule.

    Example (SparseML recipe)::

        - !GMPruningModifier
          params: ["re:bert.encoder.layer.*.(attention|intermediate|output).*dense.weight"]
          init_sparsity: 0.0
          final_sparsity: 0.8
          start_epoch: 0.0
          end_epoch: 2.0
          update_frequency: 0.1
          inter_func: cubic
          mask_type: block4
    """

    def scores(self, state: ModifierState) -> dict[str, torch.Tensor]:
        """``|w|`` per weight, detached: param name -> tensor of the weight's shape and dtype (float32 in
        ordinary training)."""
        return {name: p.detach().abs() for name, p in self._params.items()}


class MagnitudePruningModifier(GMPruningModifier):
    """SparseML's name for the same algorithm (kept so existing recipes run unchanged)."""
