"""RecipeSession: one recipe applied to one model, driven by training events.

The session holds the modifiers and the :class:`~sparsebert.modifiers.ModifierState` and
forwards lifecycle events to them in recipe order. It is explicit state (no globals): the HF
Trainer integration owns one session per trainer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .modifiers import (
    DistillationModifier,
    GradualPruningModifier,
    L0StructuredPruningModifier,
    LayerPruningModifier,
    LearningRateFunctionModifier,
    MaskedParamsModifier,
    Modifier,
    ModifierState,
    OBSPruningModifier,
    SetLearningRateModifier,
)
from .recipe import Recipe, load_recipe

__all__ = ["RecipeSession", "SESSION_STATE_FILE"]

logger = logging.getLogger(__name__)

SESSION_STATE_FILE = "sparsebert_state.pt"


class RecipeSession:
    """Apply ``recipe`` to ``model`` (with an optional distillation ``teacher``).

    Creating the session validates the recipe against the model and applies structural
    modifiers (layer dropping, freezing) -- so it must happen before the optimizer is built.

    Args:
        recipe: a :class:`Recipe`, a recipe path or YAML text, a list of modifiers, or ``None``
            (no-op session).
        model: the student model.
        teacher: the teacher for distillation modifiers.
        recipe_args: variable overrides (see :func:`~sparsebert.recipe.load_recipe`).

    Raises:
        RecipeError: the recipe is invalid for this model (the message names file/modifier/key/value).
    """

    def __init__(
        self,
        recipe: Recipe | str | Path | list[Modifier] | None,
        model: torch.nn.Module,
        teacher: torch.nn.Module | None = None,
        recipe_args: Mapping[str, Any] | None = None,
    ):
        if recipe is None:
            recipe = Recipe(source="<none>", variables={}, groups={})
        elif isinstance(recipe, list):
            recipe = Recipe(source="<code>", variables={}, groups={"modifiers": recipe})
        elif not isinstance(recipe, Recipe):
            recipe = load_recipe(recipe, recipe_args)
        self.recipe = recipe
        self.state = ModifierState(model=model, teacher=teacher)
        self._started = False
        self._finalized = False
        # every modifier resolves its params against the original names first, then layers are
        # dropped and the survivors renamed (SparseML recipes name layers by original index)
        self._check_l0_windows()
        for m in self.modifiers:
            m.apply_structure(self.state)
        droppers = [m for m in self.modifiers if isinstance(m, LayerPruningModifier)]
        for m in droppers:
            m.drop_layers(self.state)
        if droppers:
            for m in self.modifiers:
                if isinstance(m, MaskedParamsModifier):
                    m.rebind(model)

    def _check_l0_windows(self) -> None:
        """OBS's gradient sampler runs extra backward passes through the live L0 gates (their gradients would
        collect the sampled batches), so an OBS window may not overlap an L0 gated window.

        Raises:
            RecipeError: an ``OBSPruningModifier`` ``[start_epoch, end_epoch]`` overlaps an
                ``L0StructuredPruningModifier`` ``[start_epoch, end_epoch)``.
        """
        l0s = [m for m in self.modifiers if isinstance(m, L0StructuredPruningModifier)]
        for obs in (m for m in self.modifiers if isinstance(m, OBSPruningModifier)) if l0s else ():
            for l0 in l0s:
                obs_end = obs.end_epoch if obs.end_epoch >= 0 else float("inf")  # -1: no end
                if obs.start_epoch < l0.end_epoch and l0.start_epoch <= obs_end:
                    raise obs.error(
                        f"its window [{obs.start_epoch}, {obs.end_epoch}] overlaps the L0StructuredPruningModifier's gated "
                        f"window [{l0.start_epoch}, {l0.end_epoch}); OBS gradient sampling would train the gates: "
                        "start OBS at or after the L0 end_epoch", key="start_epoch", value=obs.start_epoch)

    @property
    def modifiers(self) -> list[Modifier]:
        """The recipe's modifiers, in file order."""
        return self.recipe.modifiers

    @property
    def has_state(self) -> bool:
        """True when a modifier keeps resumable state (masks, schedule counters, quantization): it
        overrides :meth:`Modifier.state_dict`, so a resume without :data:`SESSION_STATE_FILE` would lose it."""
        return any(type(m).state_dict is not Modifier.state_dict for m in self.modifiers)

    @property
    def has_lr_schedule(self) -> bool:
        """True when the recipe sets the learning rate."""
        return any(isinstance(m, (LearningRateFunctionModifier, SetLearningRateModifier)) for m in self.modifiers)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, steps_per_epoch: float, optimizer: torch.optim.Optimizer | None = None, step: int = 0) -> None:
        """Training begins (or resumes at ``step``): initialize modifiers, apply due pruning.

        Args:
            steps_per_epoch: optimizer steps per epoch (global, > 0; may be fractional).
            optimizer: the training optimizer (modifiers that touch its state use it).
            step: global optimizer steps already taken (0 for a fresh run).

        Raises:
            RuntimeError: called twice.
            ValueError: ``steps_per_epoch <= 0``.
        """
        if self._started:
            raise RuntimeError("RecipeSession.start() called twice")
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
        self._started = True
        self.state.steps_per_epoch = float(steps_per_epoch)
        self.state.optimizer = optimizer
        for m in self.modifiers:
            m.initialize(self.state)
        self.update(step)

    def on_gradients(self) -> None:
        """Backward done, optimizer step next: let modifiers read gradients."""
        for m in self.modifiers:
            m.on_gradients(self.state)

    def update(self, step: int) -> None:
        """After optimizer step number ``step`` (global steps taken): schedule and apply masks."""
        self.state.step = step
        self.state.epoch = step / self.state.steps_per_epoch if self.state.steps_per_epoch else 0.0
        for m in self.modifiers:
            m.update(self.state)

    def modify_loss(self, loss: torch.Tensor, outputs: Any, inputs: dict) -> torch.Tensor:
        """The training loss after every modifier's ``modify_loss`` (e.g. + distillation). When a modifier
        changed it, the task loss is recorded as ``loss/task`` beside the modifiers' own terms.

        ``DistillationModifier`` runs first, whatever the recipe order: it mixes the loss it is given
        (``(1 - hardness) * loss + hardness * KD``), so a term added before it (per-layer KD, the L0
        Lagrangian) would be scaled by ``1 - hardness`` -- dropped at hardness 1. The other modifiers
        add their terms after it, in recipe order.
        """
        task_loss = loss
        ordered = sorted(self.modifiers, key=lambda m: not isinstance(m, DistillationModifier))  # stable
        for m in ordered:
            loss = m.modify_loss(self.state, loss, outputs, inputs)
        if loss is not task_loss and torch.is_tensor(task_loss):
            self.state.record_loss("task", task_loss)
        return loss

    def finalize(self) -> None:
        """Training ended: final mask application, modifier clean-up. Idempotent."""
        if self._finalized:
            return
        self._finalized = True
        for m in self.modifiers:
            if isinstance(m, MaskedParamsModifier):
                m.apply_masks()
            m.finalize(self.state)

    # -- queries -------------------------------------------------------------------------------
    def learning_rate(self, epoch: float) -> float | None:
        """Recipe learning rate at ``epoch``: the modifier whose range holds ``epoch`` (the
        latest-starting one wins); before any range, ``None``; after all, the last value."""
        lr_mods = [m for m in self.modifiers if isinstance(m, (LearningRateFunctionModifier, SetLearningRateModifier))]
        current = [m for m in lr_mods if m.active(epoch)]
        if current:
            return max(current, key=lambda m: m.start_epoch).lr_at(epoch)
        past = [m for m in lr_mods if m.ended(epoch)]
        if past:
            last = max(past, key=lambda m: m.end_epoch)
            return last.lr_at(last.end_epoch)
        return None

    def masks(self) -> dict[str, torch.Tensor]:
        """All current masks, parameter name -> ``torch.bool`` (``True`` = kept)."""
        out: dict[str, torch.Tensor] = {}
        for m in self.modifiers:
            if isinstance(m, MaskedParamsModifier):
                out.update(m.masks)
        return out

    def log_values(self) -> dict[str, float]:
        """Scalars worth logging now: epoch, scheduled sparsity per pruning modifier (for L0 gates also the
        expected sparsity, target, Lagrange multipliers and kept heads/neurons), and the mean of each loss
        term since the last log (``loss/task``, ``loss/distillation``, ``loss/per_layer_distillation``, ...)."""
        logs = {"recipe_epoch": round(self.state.epoch, 4), **self.state.pop_loss_means()}
        for i, m in enumerate(self.modifiers):
            if isinstance(m, GradualPruningModifier):
                logs[f"sparsity/{i}_{type(m).__name__}"] = round(m.sparsity, 5)
            elif isinstance(m, L0StructuredPruningModifier):  # expected sparsity, target, multipliers, kept counts
                logs.update({f"{k}/{i}": v for k, v in m.log_values().items()})
                logs[f"sparsity/{i}_{type(m).__name__}"] = round(m.sparsity, 5)
        return logs

    # -- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Per-modifier state (masks, schedule counters), keyed by position in the recipe."""
        return {"modifiers": [m.state_dict() for m in self.modifiers], "step": self.state.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (the recipe must be the same).

        Raises:
            ValueError: the number of modifiers differs.
        """
        mods = state["modifiers"]
        if len(mods) != len(self.modifiers):
            raise ValueError(f"checkpoint has state for {len(mods)} modifiers, the recipe has {len(self.modifiers)}")
        for m, s in zip(self.modifiers, mods):
            m.load_state_dict(s)

    def save_artifacts(self, directory: str | os.PathLike) -> list[Path]:
        """Every modifier's extra files for a saved model (e.g. ``quantization.json``) into ``directory``."""
        return [p for m in self.modifiers for p in m.save_artifacts(Path(directory))]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the state into ``directory/sparsebert_state.pt`` atomically; returns the path."""
        path = Path(directory) / SESSION_STATE_FILE
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    def load(self, directory: str | os.PathLike) -> bool:
        """Load state saved by :meth:`save` from checkpoint folder ``directory``.

        Returns True when loaded; False when the folder has no state file and the recipe keeps no
        state (:attr:`has_state` is False), so there is nothing to restore.

        Raises:
            ValueError: the file is missing although the recipe keeps state (re-deriving the masks
                would silently continue on different ones), or it holds state for another recipe
                (:class:`~sparsebert.recipe.RecipeError`, a ``ValueError``, for masks of unknown parameters).
        """
        path = Path(directory) / SESSION_STATE_FILE
        if not path.is_file():
            if self.has_state:
                raise ValueError(
                    f"checkpoint {directory} has no {SESSION_STATE_FILE} (the recipe's masks and schedule state): "
                    "it was not completely written; resume from a complete checkpoint-* folder or start again")
            logger.info("no %s in %s: the recipe keeps no state to restore", SESSION_STATE_FILE, directory)
            return False
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return True
