"""Constant pruning: keep the zeros a loaded model already has (pattern lock).

Used for sparse transfer learning (Zafrir et al. 2021, Prune Once For All, arXiv:2111.05754;
SparseML's ConstantPruningModifier; Intel's "pattern lock").
"""

from __future__ import annotations

import torch

from ..base import ModifierState
from .base import MaskedParamsModifier

__all__ = ["ConstantPruningModifier"]


class ConstantPruningModifier(MaskedParamsModifier):
    """Freeze the sparsity pattern of ``params``: mask = ``weight != 0`` at the start.

    The mask is taken when the recipe is applied (before training); between ``start_epoch``
    and ``end_epoch`` (no end: always) it is re-applied after every optimizer step.
    """

    def apply_structure(self, state: ModifierState) -> None:
        """Resolve params and record their current zeros as the mask."""
        super().apply_structure(state)
        with torch.no_grad():
            self._masks = {name: p.detach() != 0 for name, p in self._params.items()}

    def update(self, state: ModifierState) -> None:
        """Re-apply the mask while active."""
        if self.active(state.epoch):
            self.apply_masks()
