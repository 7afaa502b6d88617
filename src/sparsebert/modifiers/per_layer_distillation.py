"""Per-layer (feature-imitation) distillation: the student's layer outputs follow the teacher's.

SparseML's ``PerLayerDistillationModifier``: ``loss = task_loss + gain * sum_i d_i`` with, for
each pair of layers (``student_layer_names[i]``, ``teacher_layer_names[i]``), ``d_i`` the mean
squared difference of their outputs, divided by the mean square of the teacher's output when
``normalize`` is true. Layer-wise distillation of hidden states is TinyBERT's (Jiao et al. 2020,
arXiv:1909.10351) and CoFi's (Xia et al. 2022, arXiv:2204.00408); pruned students keep the
teacher's architecture, so layer ``i`` of one maps to layer ``i`` of the other.

One deviation from SparseML: the mean runs over the real tokens only (``attention_mask``), not
the padding, whose hidden states carry no signal and whose number changes with dynamic padding.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import PrivateAttr, field_validator, model_validator

from .base import Modifier, ModifierState
from .distillation import freeze_teacher, teacher_forward
from .params import match_names

__all__ = ["PerLayerDistillationModifier", "feature_distance"]


def feature_distance(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
                     normalize: bool = True, epsilon: float = 1e-6) -> torch.Tensor:
    """Mean squared difference of two layer outputs, optionally relative to the teacher's energy.

    Args:
        student, teacher: layer outputs of the same shape, e.g. ``[B, L, H]`` hidden states.
        mask: optional ``[B, L]`` (``attention_mask``: 1 = real token); when given and the
            outputs are ``[B, L, ...]``, only the real tokens' rows count.
        normalize: divide by ``mean(teacher ** 2) + epsilon`` (SparseML's ``normalize``), so
            the term is a relative error, comparable across layers of different scale.
        epsilon: guards the division.

    Returns:
        A float32 scalar; 0 when the outputs are equal.

    Raises:
        ValueError: the shapes differ.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} differ")
    s, t = student.float(), teacher.float()
    if mask is not None and s.dim() >= 2 and tuple(mask.shape) == tuple(s.shape[:2]):
        keep = mask.bool()
        s, t = s[keep], t[keep]
    mse = (s - t).square().mean()
    if normalize:
        mse = mse / (t.square().mean() + epsilon)
    return mse


def _first_tensor(output: Any) -> torch.Tensor:
    """A module's output tensor (older ``BertLayer``\\ s return a tuple whose first item it is)."""
    return output[0] if isinstance(output, (tuple, list)) else output


class PerLayerDistillationModifier(Modifier):
    """Add ``gain * sum_i feature_distance(student layer i, teacher layer i)`` to the loss.

    Keys (SparseML's): ``gain`` (weight of the term, added to the task/KD loss), ``normalize``,
    ``epsilon``, ``student_layer_names`` and ``teacher_layer_names`` (module names as in
    ``model.named_modules()``, or ``re:`` patterns, matched from the start as in ``params``, so
    end them with ``$``; equal length, paired in order; one list alone is used for both), ``project_features``, ``update_frequency`` (accepted).

    Outputs are captured with forward hooks while the modifier is active; the teacher runs once
    per batch even when a :class:`DistillationModifier` also distills its logits.
    ``project_features`` (SparseML: a learned Linear from student to teacher width) is only
    needed when the widths differ; pruned students keep the teacher's widths, so sparsebert
    compares the outputs directly and refuses a width mismatch.

    Raises:
        RecipeError: when the recipe is loaded, lists of different length or neither list given;
            before training, no teacher (:meth:`apply_structure`), a name or pattern that matches no
            module or student and teacher names matching different numbers of modules
            (:meth:`initialize`); during training, in :meth:`modify_loss` at the first active step, a
            layer whose output was not captured or student/teacher outputs of different shapes.
    """

    gain: float = 1.5
    normalize: bool = True
    epsilon: float = 1e-6
    student_layer_names: list[str] | None = None
    teacher_layer_names: list[str] | None = None
    project_features: bool = True
    update_frequency: float = -1.0

    _handles: list = PrivateAttr(default_factory=list)
    _student_out: dict = PrivateAttr(default_factory=dict)  # layer name -> output of this step
    _teacher_out: dict = PrivateAttr(default_factory=dict)
    _pairs: list = PrivateAttr(default_factory=list)  # (student name, teacher name)
    _active: bool = PrivateAttr(False)  # set by update(); hooks capture only while active

    @field_validator("gain")
    @classmethod
    def _non_negative(cls, v: float) -> float:
        if v < 0:
            raise ValueError("gain must be >= 0")
        return v

    @model_validator(mode="after")
    def _paired(self) -> "PerLayerDistillationModifier":
        s, t = self.student_layer_names, self.teacher_layer_names
        if s is None and t is None:
            raise ValueError("give student_layer_names and/or teacher_layer_names (e.g. the encoder layers)")
        if s is not None and t is not None and len(s) != len(t):
            raise ValueError(f"student_layer_names has {len(s)} names but teacher_layer_names has {len(t)}")
        return self

    # -- setup -----------------------------------------------------------------------------
    def _resolve(self, model: torch.nn.Module, names: list[str], key: str) -> list[str]:
        """Module names for ``names`` (exact names or ``re:`` patterns), pattern by pattern, each in model order."""
        modules = [n for n, _ in model.named_modules() if n]
        found: list[str] = []
        for name in names:
            found += [h for h in match_names(modules, name, self.error, key, "module") if h not in found]
        return found

    def apply_structure(self, state: ModifierState) -> None:
        """A teacher must be present (it is frozen and put in eval mode).

        Raises:
            RecipeError: no teacher was given.
        """
        freeze_teacher(self, state)

    def initialize(self, state: ModifierState) -> None:
        """Resolve the layer names (after structural changes such as dropped layers) and hook them.

        Raises:
            RecipeError: a name or pattern matches no module; the student and teacher names match
                different numbers of modules.
        """
        student_names = self._resolve(state.model, self.student_layer_names or self.teacher_layer_names, "student_layer_names")
        teacher_names = self._resolve(state.teacher, self.teacher_layer_names or self.student_layer_names, "teacher_layer_names")
        if len(student_names) != len(teacher_names):
            raise self.error(f"the student names match {len(student_names)} modules but the teacher names match "
                             f"{len(teacher_names)}", "teacher_layer_names", self.teacher_layer_names)
        self._pairs = list(zip(student_names, teacher_names))
        self._remove_hooks()
        self._hook(state.model, student_names, self._student_out, only_with_grad=True)
        self._hook(state.teacher, teacher_names, self._teacher_out, only_with_grad=False)

    def _hook(self, model: torch.nn.Module, names: list[str], store: dict, only_with_grad: bool) -> None:
        modules = dict(model.named_modules())

        def capture(name):
            def hook(_module, _args, output):
                # the student's evaluation passes (no grad) need no copies
                if self._active and (torch.is_grad_enabled() or not only_with_grad):
                    store[name] = _first_tensor(output)
            return hook

        for name in names:
            self._handles.append(modules[name].register_forward_hook(capture(name)))

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._student_out.clear()
        self._teacher_out.clear()

    # -- per step --------------------------------------------------------------------------
    def update(self, state: ModifierState) -> None:
        """Capture layer outputs only inside ``[start_epoch, end_epoch)``."""
        self._active = self.active(state.epoch)
        if not self._active:
            self._student_out.clear()
            self._teacher_out.clear()

    def modify_loss(self, state: ModifierState, loss: torch.Tensor, outputs: Any, inputs: dict) -> torch.Tensor:
        """``loss + gain * sum_i feature_distance(student_i, teacher_i)`` (0-d tensors).

        Raises (during training):
            RecipeError: no output was captured for a student or teacher layer in this step (the layer is
                not used in the forward pass); a student output's shape differs from its teacher's.
        """
        if not self._active or self.gain == 0:
            return loss
        teacher_forward(state, inputs)  # fills self._teacher_out (once per batch across modifiers)
        mask = inputs.get("attention_mask")
        total = loss.new_zeros(())
        for s_name, t_name in self._pairs:
            s_out, t_out = self._student_out.pop(s_name, None), self._teacher_out.get(t_name)
            if s_out is None or t_out is None:
                raise self.error(f"no output captured for '{s_name}' / '{t_name}' in this step "
                                 "(is the layer used in the forward pass?)", "student_layer_names", s_name)
            if s_out.shape != t_out.shape:
                raise self.error(f"student '{s_name}' output {tuple(s_out.shape)} differs from teacher '{t_name}' "
                                 f"output {tuple(t_out.shape)}; project_features between widths is not supported",
                                 "project_features", self.project_features)
            total = total + feature_distance(s_out, t_out, mask, self.normalize, self.epsilon)
        state.record_loss("per_layer_distillation", total)  # before the gain: comparable across gains
        return loss + self.gain * total

    def finalize(self, state: ModifierState) -> None:
        """Remove the hooks."""
        self._remove_hooks()
