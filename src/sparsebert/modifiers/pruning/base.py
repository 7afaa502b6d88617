"""Shared machinery of pruning modifiers: parameter resolution, masks, the gradual schedule.

Masks are re-applied after every optimizer step (``update``), so a pruned weight stays exactly
zero through training, checkpoints, resume and the final save.
"""

from __future__ import annotations

from typing import Any, Union

import torch
from pydantic import PrivateAttr, field_validator

from ..base import Modifier, ModifierState
from ..masks import MaskPattern, check_shape, compute_masks, mask_sparsity, parse_mask_type
from ..params import resolve_params
from ..schedules import INTER_FUNCS, interpolate

__all__ = ["MaskedParamsModifier", "GradualPruningModifier", "check_sparsity"]


def check_sparsity(v: float) -> float:
    """``v`` as a float when it is a valid sparsity (a fraction in [0, 1)); else ValueError (pydantic names the field)."""
    if not 0.0 <= v < 1.0:
        raise ValueError("sparsity must be in [0, 1)")
    return float(v)


class MaskedParamsModifier(Modifier):
    """A modifier that owns boolean masks over some parameters and applies them.

    Recipe keys: ``params`` (names, ``re:`` regexes, ``__ALL_PRUNABLE__``), plus SparseML's
    ``update_frequency``/``log_types`` (accepted; logging is global here).
    """

    params: Union[str, list[str]]
    update_frequency: float = -1.0
    log_types: Union[str, list[str], None] = None

    _params: dict = PrivateAttr(default_factory=dict)
    _masks: dict = PrivateAttr(default_factory=dict)

    def apply_structure(self, state: ModifierState) -> None:
        """Resolve ``params`` against the model.

        Raises:
            RecipeError: a ``params`` entry matches no parameter.
        """
        self._params = resolve_params(state.model, self.params, self.error)

    def rebind(self, model: torch.nn.Module) -> None:
        """After layers were dropped: rename params to the model's current names (by identity)
        and forget params that are no longer in the model."""
        current = {id(p): n for n, p in model.named_parameters()}
        renamed = {n: current[id(p)] for n, p in self._params.items() if id(p) in current}
        self._params = {renamed[n]: p for n, p in self._params.items() if n in renamed}
        self._masks = {renamed[n]: m for n, m in self._masks.items() if n in renamed}

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every masked weight in place."""
        for name, mask in self._masks.items():
            p = self._params[name]
            p.mul_(mask.to(device=p.device, dtype=p.dtype))

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Current masks: parameter name -> ``torch.bool`` tensor (``True`` = kept)."""
        return dict(self._masks)

    def state_dict(self) -> dict[str, Any]:
        """``{"masks": {param name: torch.bool mask (CPU)}}``."""
        return {"masks": {k: m.cpu() for k, m in self._masks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (masks moved to their parameters' devices).

        Raises:
            RecipeError: a mask names a parameter this modifier does not own.
        """
        unknown = set(state.get("masks", {})) - set(self._params)
        if unknown:
            raise self.error(f"checkpoint masks for unknown parameters: {sorted(unknown)[:3]}")
        self._masks = {k: m.to(self._params[k].device) for k, m in state.get("masks", {}).items()}


class GradualPruningModifier(MaskedParamsModifier):
    """Gradual pruning on SparseML's schedule; subclasses define :meth:`scores`.

    Sparsity rises from ``init_sparsity`` at ``start_epoch`` to ``final_sparsity`` at
    ``end_epoch`` along ``inter_func`` (cubic: Zhu & Gupta 2017, arXiv:1710.01878), with a
    mask recomputation every ``update_frequency`` epochs. ``mask_type``: ``unstructured``,
    ``block4`` or ``"N:M"``. ``global_sparsity``: rank all params together. ``leave_enabled``:
    keep applying the final masks after ``end_epoch``.
    """

    init_sparsity: float = 0.05
    final_sparsity: float
    end_epoch: float
    update_frequency: float = 1.0
    inter_func: str = "cubic"
    mask_type: Union[str, list[int]] = "unstructured"
    global_sparsity: bool = False
    leave_enabled: bool = True

    _next_update: float | None = PrivateAttr(None)
    _done: bool = PrivateAttr(False)
    _sparsity: float = PrivateAttr(0.0)

    @field_validator("init_sparsity", "final_sparsity")
    @classmethod
    def _in_unit_interval(cls, v: float) -> float:
        return check_sparsity(v)

    @field_validator("end_epoch")
    @classmethod
    def _has_end(cls, v: float, info) -> float:
        if v < 0:
            raise ValueError("gradual pruning needs an end_epoch >= 0")
        if v < info.data.get("start_epoch", 0.0):
            raise ValueError(f"end_epoch is before start_epoch ({info.data.get('start_epoch')})")
        return float(v)

    @field_validator("inter_func")
    @classmethod
    def _known_inter_func(cls, v: str) -> str:
        if v not in INTER_FUNCS:
            raise ValueError(f"unknown inter_func; expected one of {INTER_FUNCS}")
        return v

    @field_validator("mask_type")
    @classmethod
    def _known_mask_type(cls, v):
        parse_mask_type(v)  # raises ValueError with the accepted values
        return v

    @property
    def pattern(self) -> MaskPattern:
        """The parsed ``mask_type``."""
        return parse_mask_type(self.mask_type)

    @property
    def sparsity(self) -> float:
        """Sparsity of the current masks (0 before the first update)."""
        return self._sparsity

    def apply_structure(self, state: ModifierState) -> None:
        """Resolve params and check that the mask pattern tiles every weight.

        Raises:
            RecipeError: a ``params`` entry matches nothing; ``final_sparsity`` is above the most the
                ``mask_type`` allows (e.g. 0.5 for 2:4); a weight's shape the pattern cannot tile.
        """
        super().apply_structure(state)
        pattern = self.pattern
        if self.final_sparsity > pattern.max_sparsity + 1e-9:
            raise self.error(f"{pattern} allows at most {pattern.max_sparsity:.3f} sparsity", "final_sparsity", self.final_sparsity)
        for name, p in self._params.items():
            why = check_shape(p.shape, pattern)
            if why:
                raise self.error(f"{name}: {why}", "mask_type", self.mask_type)

    def scores(self, state: ModifierState) -> dict[str, torch.Tensor]:
        """Importance of each weight (higher = keep): param name -> tensor shaped like the weight.

        Raises:
            NotImplementedError: always here; each pruning method defines its scores.
        """
        raise NotImplementedError

    def target_sparsity(self, epoch: float) -> float:
        """Scheduled sparsity at ``epoch``."""
        if self.ended(epoch):
            return self.final_sparsity
        return interpolate(epoch, self.start_epoch, self.end_epoch, self.init_sparsity, self.final_sparsity, self.inter_func)

    @torch.no_grad()
    def prune(self, state: ModifierState, sparsity: float) -> None:
        """Recompute masks at ``sparsity`` from :meth:`scores` and apply them."""
        self._masks = compute_masks(self.scores(state), sparsity, self.pattern, self.global_sparsity)
        self._sparsity = mask_sparsity(self._masks)
        self.apply_masks()

    def update(self, state: ModifierState) -> None:
        """Prune when an update is due; otherwise re-apply the current masks."""
        epoch = state.epoch
        if epoch < self.start_epoch or (self._done and not self.leave_enabled):
            return
        due = self._next_update is None or epoch >= self._next_update - 1e-9
        if (due and not self._done) or (self.ended(epoch) and not self._done):
            self.prune(state, self.target_sparsity(epoch))
            self._done = self.ended(epoch)
            step = self.update_frequency if self.update_frequency > 0 else self.end_epoch - self.start_epoch
            self._next_update = epoch + max(step, 1e-9)
            if self._done and not self.leave_enabled:
                self._masks = {}
                return
        self.apply_masks()

    def state_dict(self) -> dict[str, Any]:
        """The masks plus the schedule's position: ``next_update`` (epoch), ``done``, ``sparsity``."""
        return {**super().state_dict(), "next_update": self._next_update, "done": self._done, "sparsity": self._sparsity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            RecipeError: a mask names a parameter this modifier does not own.
            KeyError: ``state`` lacks ``next_update``, ``done`` or ``sparsity``.
        """
        super().load_state_dict(state)
        self._next_update, self._done, self._sparsity = state["next_update"], state["done"], state["sparsity"]
