"""Movement pruning: Sanh, Wolf & Rush 2020 (arXiv:2005.07683); SparseML's MovementPruningModifier."""

from __future__ import annotations

import logging
from typing import Any

import torch
from pydantic import PrivateAttr

from ..base import ModifierState
from .base import GradualPruningModifier

__all__ = ["MovementPruningModifier"]

logger = logging.getLogger(__name__)


class MovementPruningModifier(GradualPruningModifier):
    """Prune the weights moving towards zero: score ``S = -sum_t w_t * dL/dw_t`` (higher = keep).

    Hard movement pruning (Sanh et al. 2020, eq. 4 with straight-through scores): ``S``
    accumulates in :meth:`on_gradients` (after backward, before the optimizer step) from the
    moment the modifier is active (``epoch >= start_epoch``) until its final masks are set.
    A weight whose gradient pushes it away from zero (``w * grad < 0``) gains score.
    Masks follow the :class:`GradualPruningModifier` schedule and keys (``mask_type``
    unstructured, block4, N:M; ``global_sparsity``); pruned weights score ``-inf`` so they stay
    pruned. At a pruning step before any gradient was seen (e.g. ``init_sparsity`` at the very
    start of training) ``S`` is all zeros, so that step ranks by ``|w|`` instead.

    Example::

        - !MovementPruningModifier
          params: ["re:bert.encoder.layer.*.(query|key|value|dense).weight"]
          init_sparsity: 0.0
          final_sparsity: 0.9
          start_epoch: 0.0
          end_epoch: 8.0
          update_frequency: 0.1
    """

    _scores: dict = PrivateAttr(default_factory=dict)
    _num_accumulated: int = PrivateAttr(0)

    @property
    def movement_scores(self) -> dict[str, torch.Tensor]:
        """Accumulated ``S`` per parameter (float32, shaped like the weight); empty before any step."""
        return dict(self._scores)

    @torch.no_grad()
    def on_gradients(self, state: ModifierState) -> None:
        """``S -= w * grad`` for every param with a gradient, while the schedule is running."""
        if state.epoch < self.start_epoch or self._done:
            return
        for name, p in self._params.items():
            if p.grad is None:
                continue
            s = self._scores.get(name)
            if s is None:
                s = self._scores[name] = torch.zeros_like(p, dtype=torch.float32)
            s.sub_(p.detach().float() * p.grad.detach().float())
        self._num_accumulated += 1

    def scores(self, state: ModifierState) -> dict[str, torch.Tensor]:
        """``S`` per param, float32 shaped like the weight (``|w|`` before any gradient was seen);
        ``-inf`` on pruned weights."""
        if self._num_accumulated == 0:
            logger.info("movement pruning: no gradients accumulated yet; this pruning step ranks by |w|")
        out = {}
        for name, p in self._params.items():
            if self._num_accumulated == 0:
                s = p.detach().abs().float()
            else:
                s = self._scores.get(name, torch.zeros_like(p, dtype=torch.float32)).clone()
            if name in self._masks:
                s = s.masked_fill(~self._masks[name], float("-inf"))  # masks stay monotone
            out[name] = s
        return out

    def finalize(self, state: ModifierState) -> None:
        """Training ended: the scores are no longer needed."""
        self._scores = {}

    def state_dict(self) -> dict[str, Any]:
        """The gradual-pruning state plus the accumulated ``scores`` (CPU) and ``num_accumulated``."""
        return {**super().state_dict(), "scores": {k: s.cpu() for k, s in self._scores.items()},
                "num_accumulated": self._num_accumulated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            RecipeError: a mask or a score names a parameter this modifier does not own.
        """
        super().load_state_dict(state)
        unknown = set(state.get("scores", {})) - set(self._params)
        if unknown:
            raise self.error(f"checkpoint movement scores for unknown parameters: {sorted(unknown)[:3]}")
        self._scores = {k: s.to(self._params[k].device) for k, s in state.get("scores", {}).items()}
        self._num_accumulated = int(state.get("num_accumulated", 0))
