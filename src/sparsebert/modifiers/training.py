"""Training-control modifiers: epoch range, learning-rate functions, frozen parameters."""

from __future__ import annotations

from typing import Union

from pydantic import Field, PrivateAttr, field_validator

from .base import Modifier, ModifierState
from .params import resolve_params
from .schedules import LR_FUNCS, learning_rate

__all__ = ["EpochRangeModifier", "LearningRateFunctionModifier", "SetLearningRateModifier", "TrainableParamsModifier"]


class EpochRangeModifier(Modifier):
    """Sets how many epochs training runs (``end_epoch``); does nothing else."""


class LearningRateFunctionModifier(Modifier):
    """Learning rate as a function of the epoch inside ``[start_epoch, end_epoch)``.

    Keys as SparseML: ``lr_func`` (linear, cyclic_linear, cosine, constant), ``init_lr``,
    ``final_lr``, ``cycle_epochs`` (cyclic_linear), ``param_groups`` and ``update_frequency``
    (accepted; all groups are set every step). The trainer's scheduler reads :meth:`lr_at`.
    """

    lr_func: str = "linear"
    init_lr: float
    final_lr: float = 0.0
    cycle_epochs: float | None = Field(None, validate_default=True)
    param_groups: list[int] | None = None
    update_frequency: float = -1.0

    @field_validator("lr_func")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in LR_FUNCS:
            raise ValueError(f"unknown lr_func; expected one of {LR_FUNCS}")
        return v

    @field_validator("cycle_epochs")
    @classmethod
    def _positive(cls, v, info):
        if v is not None and v <= 0:
            raise ValueError("cycle_epochs must be > 0")
        if v is None and info.data.get("lr_func") == "cyclic_linear":
            raise ValueError("lr_func cyclic_linear needs cycle_epochs")
        return v

    def lr_at(self, epoch: float) -> float:
        """Learning rate at ``epoch`` (clamped to the range ends)."""
        end = self.end_epoch if self.end_epoch >= 0 else max(epoch, self.start_epoch)
        return learning_rate(epoch, self.lr_func, self.start_epoch, end, self.init_lr, self.final_lr, self.cycle_epochs)


class SetLearningRateModifier(Modifier):
    """A constant learning rate from ``start_epoch`` (SparseML's SetLearningRateModifier)."""

    learning_rate: float

    def lr_at(self, epoch: float) -> float:
        """Always ``learning_rate``."""
        return self.learning_rate


class TrainableParamsModifier(Modifier):
    """Freeze (``trainable: false``) or unfreeze ``params`` between ``start_epoch`` and ``end_epoch``.

    ``params_strict: false`` lets patterns match nothing (SparseML semantics). Parameters frozen
    from the start are frozen before the optimizer is built; when the range ends, they get
    their old ``requires_grad`` back (and join the optimizer if they were never in it).
    """

    params: Union[str, list[str]]
    trainable: bool = False
    params_strict: bool = True

    _params: dict = PrivateAttr(default_factory=dict)
    _original: dict = PrivateAttr(default_factory=dict)
    _applied: bool = PrivateAttr(False)

    def apply_structure(self, state: ModifierState) -> None:
        """Resolve params; freeze now if the range starts at 0."""
        patterns = [self.params] if isinstance(self.params, str) else self.params
        found = {}
        for pattern in patterns:
            try:
                found.update(resolve_params(state.model, pattern, self.error))
            except Exception:
                if self.params_strict:
                    raise
        self._params = found
        self._original = {n: p.requires_grad for n, p in found.items()}
        if self.start_epoch <= 0:
            self._set(state)

    def _set(self, state: ModifierState) -> None:
        for p in self._params.values():
            p.requires_grad_(self.trainable)
            if not self.trainable:
                p.grad = None
        self._applied = True

    def update(self, state: ModifierState) -> None:
        """Apply at ``start_epoch``; restore at ``end_epoch``."""
        if not self._applied and self.active(state.epoch):
            self._set(state)
        elif self._applied and self.ended(state.epoch):
            in_optimizer = {id(p) for g in state.optimizer.param_groups for p in g["params"]} if state.optimizer else set()
            for name, p in self._params.items():
                p.requires_grad_(self._original[name])
                if p.requires_grad and state.optimizer is not None and id(p) not in in_optimizer:
                    state.optimizer.add_param_group({"params": [p]})
            self._applied = False  # after end_epoch active() stays False: restored once
