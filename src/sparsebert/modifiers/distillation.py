"""Knowledge distillation from a dense teacher (Hinton et al. 2015, arXiv:1503.02531).

SparseML's DistillationModifier semantics: ``loss = (1 - hardness) * task_loss + hardness *
kd_loss``, with ``kd_loss`` the temperature-softened KL divergence (times ``T^2`` so gradient
scale does not depend on T), averaged over ``distill_output_keys`` (e.g. ``logits``, or
``start_logits`` and ``end_logits`` for QA). For token-level logits with token labels (masked-LM,
Prune OFA's student pruning) only the positions whose label is not -100 (the masked tokens) count.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import field_validator

from .base import Modifier, ModifierState

__all__ = ["DistillationModifier", "freeze_teacher", "kd_loss", "teacher_forward"]

# batch keys that carry targets, not inputs: the teacher must not see them
_TARGET_KEYS = ("labels", "start_positions", "end_positions", "next_sentence_label")
IGNORE_INDEX = -100  # label of positions a Hugging Face loss skips (CrossEntropyLoss ignore_index)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None = None,
            classes: torch.Tensor | None = None) -> torch.Tensor:
    """Distillation loss between logits.

    Args:
        student, teacher: logits ``[..., C]`` (same shape), e.g. ``[B, C]`` (classification),
            ``[B, L]`` (QA span logits), ``[B, L, V]`` (masked-LM). ``C == 1`` (regression, STS-B)
            uses mean squared error instead of KL.
        temperature: softmax temperature T > 0.
        mask: optional ``bool`` ``[...]`` (``logits.shape[:-1]``) selecting the rows that count
            (e.g. the masked-LM positions); no selected row gives a zero loss.
        classes: optional ``bool`` of the logits' shape marking the classes that exist in each row
            (QA: the window's real tokens, not its padding); the others are left out of both
            softmaxes. A row needs at least one.

    Returns:
        Scalar: ``T^2 * mean over (selected) rows of KL(softmax(t/T) || softmax(s/T))``.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    if student.shape[-1] == 1:
        return F.mse_loss(student.float(), teacher.float())
    s = student.reshape(-1, student.shape[-1])
    t = teacher.reshape(-1, teacher.shape[-1])
    absent = None if classes is None else ~classes.reshape(-1, classes.shape[-1]).bool()
    if mask is not None:
        keep = mask.reshape(-1)
        if not keep.any():
            return student.sum() * 0.0  # keeps the graph; batchmean over 0 rows would be nan
        s, t = s[keep], t[keep]  # before .float(): [B*L, V] MLM logits are large
        absent = None if absent is None else absent[keep]
    s, t = s.float(), t.float()
    if absent is not None:  # absent classes get probability 0 in both (exp(-1e4 / T) == 0 in float32)
        s, t = s.masked_fill(absent, -1e4 * temperature), t.masked_fill(absent, -1e4 * temperature)
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


def freeze_teacher(modifier: Modifier, state: ModifierState) -> None:
    """Check that ``state.teacher`` exists, put it in eval mode and freeze its parameters.

    Raises:
        RecipeError: no teacher was given (named after ``modifier``'s file and position).
    """
    if state.teacher is None:
        raise modifier.error("the recipe distills but no teacher was given (--teacher, or teacher= in code)")
    state.teacher.eval()
    for p in state.teacher.parameters():
        p.requires_grad_(False)


def teacher_forward(state: ModifierState, inputs: dict, input_keys: list[str] | None = None) -> Any:
    """The teacher's outputs for this batch, computed once per batch (no grad).

    Every distillation modifier of a recipe calls this with the same ``inputs`` dict in one
    training step; the first call runs the teacher, the others reuse its outputs (and the layer
    outputs the teacher's forward hooks captured). ``input_keys`` (SparseML's
    ``teacher_input_keys``) picks the inputs the teacher sees; default: all but the targets.
    """
    keys = list(input_keys or [k for k in inputs if k not in _TARGET_KEYS])
    cached = state.teacher_cache
    if cached is not None and cached[0] is inputs and cached[1] == keys:
        return cached[2]
    with torch.no_grad():
        out = state.teacher(**{k: inputs[k] for k in keys})
    state.teacher_cache = (inputs, keys, out)
    return out


def _real_positions(logits: torch.Tensor, inputs: dict) -> torch.Tensor | None:
    """The batch's ``attention_mask`` (as ``bool``) when ``logits`` are per-position span logits of
    its shape (QA start/end logits ``[B, L]``): padding positions are not classes a window has, so KD
    leaves them out of the softmax (with windows padded to 384, ~55% of SQuAD positions are padding
    and at T 5.5 hold much of the teacher's softened mass); else ``None``."""
    attention = inputs.get("attention_mask")
    if isinstance(attention, torch.Tensor) and logits.dim() == 2 and attention.shape == logits.shape:
        return attention.bool()
    return None


def _scored_positions(logits: torch.Tensor, inputs: dict) -> torch.Tensor | None:
    """``labels != -100`` when ``labels`` has one label per logits row (token-level: masked-LM
    ``[B, L]`` for ``[B, L, V]`` logits), so KD skips the positions the task loss ignores; else ``None``.
    Sequence-level labels (``[B]`` for ``[B, C]``) are never -100, so GLUE is unaffected either way."""
    labels = inputs.get("labels")
    if isinstance(labels, torch.Tensor) and logits.dim() >= 3 and labels.shape == logits.shape[:-1]:
        return labels != IGNORE_INDEX
    return None


class DistillationModifier(Modifier):
    """Add a KD term from ``state.teacher`` to the training loss while active.

    Keys: ``hardness`` in [0, 1] (weight of the KD term; 1.0 = teacher only), ``temperature``
    > 0, ``distill_output_keys`` (default ``["logits"]``), SparseML's ``teacher_input_keys``
    and ``update_frequency`` (accepted). ``mask_padding`` (not a SparseML key; default true): QA
    start/end logits leave the window's padding positions out of the KD softmax (SparseML's loss
    keeps them). The teacher is given on the CLI (``--teacher``) or in code.
    """

    hardness: float = 0.5
    temperature: float = 2.0
    distill_output_keys: list[str] = ["logits"]
    teacher_input_keys: list[str] | None = None
    update_frequency: float = -1.0
    mask_padding: bool = True

    @field_validator("hardness")
    @classmethod
    def _unit(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("hardness must be in [0, 1]")
        return v

    @field_validator("temperature")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("temperature must be > 0")
        return v

    def apply_structure(self, state: ModifierState) -> None:
        """A teacher must be present (it is frozen and put in eval mode)."""
        freeze_teacher(self, state)

    def modify_loss(self, state: ModifierState, loss: torch.Tensor, outputs: Any, inputs: dict) -> torch.Tensor:
        """``(1 - hardness) * loss + hardness * mean_k kd_loss(student[k], teacher[k])``."""
        if not self.active(state.epoch):
            return loss
        teacher_out = teacher_forward(state, inputs, self.teacher_input_keys)
        terms = []
        for key in self.distill_output_keys:
            if key not in outputs or key not in teacher_out:
                raise self.error(f"model output has no '{key}' (outputs: {list(outputs.keys())})", "distill_output_keys", key)
            logits = outputs[key]
            classes = _real_positions(logits, inputs) if self.mask_padding else None
            terms.append(kd_loss(logits, teacher_out[key], self.temperature, _scored_positions(logits, inputs), classes))
        distill = torch.stack(terms).mean()
        state.record_loss("distillation", distill)
        return (1.0 - self.hardness) * loss + self.hardness * distill
