"""The modifier base class and the training state modifiers see.

Lifecycle (after llm-compressor's Modifier, adapted to epoch schedules as in SparseML):

* ``apply_structure(state)`` -- once, before the optimizer exists: changes to the model's
  shape or trainability (drop layers, freeze parameters) and validation against the model
  (``re:`` patterns, mask shapes). Errors here stop the run before any training.
* ``initialize(state)`` -- once, when training starts (steps per epoch known).
* ``on_gradients(state)`` -- after backward, before the optimizer step (gradients present,
  already all-reduced under DDP): movement scores accumulate here.
* ``update(state)`` -- after every optimizer step, with ``state.epoch`` the fractional epoch.
  Pruning modifiers recompute masks on their schedule and re-apply them here.
* ``modify_loss(state, loss, outputs, inputs)`` -- distillation adds its term.
* ``finalize(state)`` -- once, when training ends.

Subclasses write only the hooks they need; the base does the epoch arithmetic.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationInfo, field_validator

from ..recipe.errors import RecipeError

__all__ = ["Modifier", "ModifierState"]


@dataclasses.dataclass
class ModifierState:
    """What modifiers see of the training run.

    Attributes:
        model: the student ``nn.Module`` (unwrapped; DDP wrappers share its parameters).
        teacher: the distillation teacher, or ``None``.
        optimizer: the optimizer once it exists (``None`` during ``apply_structure``).
        epoch: fractional epoch, ``global_step / steps_per_epoch``.
        step: optimizer steps taken so far.
        steps_per_epoch: optimizer steps per epoch (float; set when training starts).
        grad_sampler: ``callable(num_batches) -> iterator`` that, for each of ``num_batches``
            training batches, runs forward + backward on the model (zeroing grads first) and
            yields with ``.grad`` filled; set by the trainer integration (second-order pruning
            samples its empirical Fisher with it). ``None`` when unavailable.
        teacher_cache: ``(inputs, input_keys, outputs)`` of the teacher's last forward, so that two
            distillation modifiers in one recipe run the teacher once per batch
            (see :func:`~sparsebert.modifiers.distillation.teacher_forward`).
        loss_terms: running ``[sum, count]`` of each loss term recorded with :meth:`record_loss` since
            the last log (the session logs their means as ``loss/<name>``).
    """

    model: torch.nn.Module
    teacher: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    epoch: float = 0.0
    step: int = 0
    steps_per_epoch: float | None = None
    grad_sampler: Any = None
    teacher_cache: Any = None
    loss_terms: dict = dataclasses.field(default_factory=dict)

    def record_loss(self, name: str, value: torch.Tensor) -> None:
        """Add one batch's value of loss term ``name`` (a 0-d tensor) to the running mean that the next
        training log shows as ``loss/<name>``. Detached and kept on its device: no host sync per step."""
        acc = self.loss_terms.setdefault(name, [0.0, 0])
        acc[0] = acc[0] + value.detach().float()
        acc[1] += 1

    def pop_loss_means(self) -> dict[str, float]:
        """``{"loss/<name>": mean}`` of every term recorded since the last call; resets the sums."""
        out = {f"loss/{k}": float(f"{float(total) / count:.6g}") for k, (total, count) in self.loss_terms.items()}
        self.loss_terms.clear()
        return out


class Modifier(BaseModel):
    """Base of all recipe modifiers: pydantic fields = SparseML recipe keys (unknown keys fail).

    ``start_epoch``/``end_epoch`` follow SparseML: ``-1`` for end means "until training ends".
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, validate_assignment=True)

    start_epoch: float = 0.0
    end_epoch: float = -1.0

    _source: str = PrivateAttr("<code>")
    _where: str = PrivateAttr("")

    @field_validator("start_epoch")
    @classmethod
    def _start_from_zero(cls, v: float) -> float:
        return max(float(v), 0.0)  # SparseML writes -1 for "from the beginning"

    @field_validator("end_epoch")
    @classmethod
    def _end_after_start(cls, v: float, info: ValidationInfo) -> float:
        start = info.data.get("start_epoch", 0.0)
        if v >= 0 and v < start:
            raise ValueError(f"end_epoch is before start_epoch ({start})")
        return float(v)

    # -- identity and errors -------------------------------------------------------------
    def set_origin(self, source: str, where: str) -> None:
        """Record where the modifier was defined, for error messages."""
        self._source, self._where = source, where

    def error(self, message: str, key: str | None = None, value: Any = None) -> RecipeError:
        """A :class:`RecipeError` naming this modifier's file and position."""
        return RecipeError(message, source=self._source, modifier=self._where or f"!{type(self).__name__}", key=key, value=value)

    def recipe_fields(self) -> dict[str, Any]:
        """The fields as they would be written in a recipe (for the applied-recipe dump)."""
        return self.model_dump(mode="json", exclude_none=True)

    # -- schedule helpers ----------------------------------------------------------------
    def active(self, epoch: float) -> bool:
        """True when ``start_epoch <= epoch < end_epoch`` (no end: from start onwards)."""
        return epoch >= self.start_epoch and (self.end_epoch < 0 or epoch < self.end_epoch)

    def ended(self, epoch: float) -> bool:
        """True once ``epoch >= end_epoch`` (never when there is no end)."""
        return self.end_epoch >= 0 and epoch >= self.end_epoch

    # -- lifecycle hooks (no-ops by default) ---------------------------------------------
    def apply_structure(self, state: ModifierState) -> None:
        """Validate against the model and make structural changes; before the optimizer exists."""

    def initialize(self, state: ModifierState) -> None:
        """Training starts: ``state.steps_per_epoch`` and ``state.optimizer`` are set."""

    def on_gradients(self, state: ModifierState) -> None:
        """Gradients of this step are in ``param.grad`` (before the optimizer step)."""

    def update(self, state: ModifierState) -> None:
        """Called after every optimizer step (and once before the first)."""

    def modify_loss(self, state: ModifierState, loss: torch.Tensor, outputs: Any, inputs: dict) -> torch.Tensor:
        """Return the training loss to back-propagate: ``loss`` (a 0-d float tensor, the batch's loss so far)
        changed or not (default: unchanged); the result must be 0-d too."""
        return loss

    def finalize(self, state: ModifierState) -> None:
        """Training ended."""

    def save_artifacts(self, directory) -> list:
        """Write files the saved model needs besides its weights (e.g. ``quantization.json``) into
        ``directory`` (the final output folder and each checkpoint); return their paths."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """Resumable state (masks, counters); saved with each checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
