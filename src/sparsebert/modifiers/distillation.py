"""Knowledge distillation from a dense teacher (Hinton et al. 2015, arXiv:1503.02531).

SparseML's DistillationModifier semantics: ``loss = (1 - hardness) * task_loss + hardness *
kd_loss``, with ``kd_loss`` the temperature-softened KL divergence (times ``T^2`` so gradient
scale does not depend on T), averaged over ``distill_output_keys`` (e.g. ``logits``, or
``start_logits`` and ``end_logits`` for QA). For token-level logits with token labels (masked-LM,
Prune OFA's student pruning) only the positions whose label is not -100 (the masked tokens) count.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from pydantic import PrivateAttr, field_validator

from .base import Modifier, ModifierState

__all__ = ["DistillationModifier", "TeacherOutputCache", "freeze_teacher", "kd_loss", "teacher_forward"]

# batch keys that carry targets, not inputs: the teacher must not see them
_TARGET_KEYS = ("labels", "start_positions", "end_positions", "next_sentence_label")
logger = logging.getLogger(__name__)
_PER_POSITION_KEYS = ("start_logits", "end_logits")  # [B, L] outputs: one value per token (QA spans)
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

    Raises:
        ValueError: ``student`` and ``teacher`` have different shapes.
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


def _teacher_input_names(inputs: dict, input_keys: list[str] | None = None) -> list[str]:
    """The batch keys the teacher gets: ``input_keys`` (SparseML's ``teacher_input_keys``), else all but the targets."""
    return list(input_keys or [k for k in inputs if k not in _TARGET_KEYS])


def _shared_teacher_outputs(state: ModifierState, inputs: dict, keys: list[str]) -> Any:
    """The teacher's outputs for this very ``inputs`` dict and ``keys`` if a modifier already ran
    the teacher on it this step, else ``None``."""
    cached = state.teacher_cache
    return cached[2] if cached is not None and cached[0] is inputs and cached[1] == keys else None


def teacher_forward(state: ModifierState, inputs: dict, input_keys: list[str] | None = None) -> Any:
    """The teacher's outputs for this batch, computed once per batch (no grad).

    Every distillation modifier of a recipe calls this with the same ``inputs`` dict in one
    training step; the first call runs the teacher, the others reuse its outputs (and the layer
    outputs the teacher's forward hooks captured). ``input_keys`` (SparseML's
    ``teacher_input_keys``) picks the inputs the teacher sees; default: all but the targets.
    """
    keys = _teacher_input_names(inputs, input_keys)
    shared = _shared_teacher_outputs(state, inputs, keys)
    if shared is not None:
        return shared
    with torch.no_grad():
        out = state.teacher(**{k: inputs[k] for k in keys})
    state.teacher_cache = (inputs, keys, out)
    return out


class TeacherOutputCache:
    """The teacher's outputs per training example, computed once and reused in later epochs.

    A frozen teacher in eval mode gives the same outputs for the same input, so for a fixed
    training set (GLUE sentences, SQuAD windows) its forward pass -- about a quarter of a KD step's
    compute -- is needed once per example, not once per epoch (TextBrewer's ``is_caching_logits``).
    An example is keyed by a 16-byte BLAKE2 digest of its real tokens in ``input_ids`` and every
    other ``[B, L]`` teacher input (real = ``attention_mask`` set), so the same window in a batch of
    another padded length is found again. Only a batch's unseen examples go through the teacher.

    Kinds of output: ``span`` (QA ``start_logits``/``end_logits`` ``[B, L]``) is kept at the real
    positions and comes back with 0 at padding -- exact when the loss leaves padding out (KD's
    ``mask_padding``), else a padded batch goes through the teacher; ``token`` (any other
    ``[B, L, ...]``) likewise, but a padded batch always goes through the teacher (KD masks no
    padding there); ``example`` (``logits`` ``[B, C]``) is kept whole. Rows are kept on the CPU
    (one copy to the batch's device per step); memory is the outputs of each training example,
    e.g. ~1.4 KB a SQuAD window (2 x ~173 float32) or 8 bytes an SST-2 sentence, plus a 16-byte
    key and ~0.3 KB of Python objects.

    Under DDP each rank sees another part of the data each epoch, so a rank's cache fills only over
    several epochs (and holds up to the whole training set): the saving is a one-process one.

    Attributes:
        from_cache, from_teacher: examples served each way so far.
    """

    def __init__(self) -> None:
        self._rows: dict[bytes, dict[str, torch.Tensor]] = {}
        self._kind: dict[str, str] = {}
        self.from_cache = 0
        self.from_teacher = 0

    def __len__(self) -> int:
        return len(self._rows)

    @staticmethod
    def _digests(inputs: dict, keys: list[str]) -> tuple[list[bytes], torch.Tensor]:
        """One key per example and the CPU ``bool`` ``[B, L]`` real positions."""
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        real = (mask.bool() if isinstance(mask, torch.Tensor) else torch.ones_like(ids, dtype=torch.bool)).cpu()
        names = ["input_ids"] + [k for k in keys if k != "input_ids" and isinstance(inputs.get(k), torch.Tensor)
                                 and inputs[k].shape == ids.shape and k != "attention_mask"]
        seqs = [inputs[k].cpu() for k in names]
        digests = []
        for i in range(ids.shape[0]):
            h = hashlib.blake2b(digest_size=16)
            for t in seqs:
                h.update(t[i][real[i]].numpy().tobytes())
                h.update(b"|")
            digests.append(h.digest())
        return digests, real

    def _needs_teacher_values_at_padding(self, output_keys: list[str], padding_ok: bool) -> bool:
        kinds = [self._kind.get(k, "span" if k in _PER_POSITION_KEYS else "token") for k in output_keys]
        return any(kind == "token" or (kind == "span" and not padding_ok) for kind in kinds)

    def outputs(self, inputs: dict, keys: list[str], output_keys: list[str], padding_ok: bool,
                forward: Callable[[dict], Any], full: Any = None) -> Any:
        """The teacher's ``output_keys`` for this batch: cached rows, plus ``forward`` (the teacher on
        a dict of inputs) run on the rows not seen before, which are then cached. ``padding_ok``: the
        loss ignores span outputs at padding. ``full``: the teacher's outputs for the whole batch if
        another modifier already computed them (then nothing runs).

        Returns the teacher's output object when it ran on the whole batch, else a dict ``output key ->
        tensor`` on the device of ``inputs["input_ids"]``: per-example outputs stacked ``[B, ...]``,
        per-token / span outputs ``[B, L, ...]`` with zeros at padding positions.

        Raises:
            ValueError: the cached rows of a per-example output have different shapes (a per-token output
                of fewer than 3 dims that is not one of the span keys).
        """
        digests, real = self._digests(inputs, keys)
        missing = [i for i, d in enumerate(digests) if d not in self._rows]
        padded = not bool(real.all())
        if full is None and padded and self._needs_teacher_values_at_padding(output_keys, padding_ok):
            full = forward(inputs)  # the loss reads the teacher's values at padding
        if full is not None:
            self._store(full, missing, missing, digests, real, output_keys)
            self.from_teacher += len(digests)
            return full
        if missing:
            if len(missing) == len(digests):
                sub = inputs  # the same dict: teacher_forward shares one pass with other KD modifiers
            else:
                idx = torch.tensor(missing, device=inputs["input_ids"].device)
                sub = {k: v.index_select(0, idx) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                       for k, v in inputs.items()}
            self._store(forward(sub), list(range(len(missing))), missing, digests, real, output_keys)
        self.from_teacher += len(missing)
        self.from_cache += len(digests) - len(missing)
        rows = [self._rows[d] for d in digests]
        device = inputs["input_ids"].device
        result = {}
        for k in output_keys:
            values = [r[k] for r in rows]
            if self._kind[k] == "example":
                if len({v.shape for v in values}) > 1:
                    raise ValueError(f"cached teacher output '{k}' has rows of different shapes; per-token outputs "
                                     f"other than {_PER_POSITION_KEYS} need 3 dims to be cached")
                result[k] = torch.stack(values).to(device, non_blocking=True)
            else:  # one boolean-mask write: real positions in row-major order, as they were stored
                full_k = values[0].new_zeros((*real.shape, *values[0].shape[1:]))
                full_k[real] = torch.cat(values)
                result[k] = full_k.to(device, non_blocking=True)
        return result

    def _store(self, out: Any, out_rows: list[int], batch_rows: list[int], digests: list[bytes], real: torch.Tensor,
               output_keys: list[str]) -> None:
        """Cache row ``out_rows[j]`` of the teacher's ``out`` as batch row ``batch_rows[j]`` (on the CPU)."""
        if not batch_rows:
            return
        lengths = real[batch_rows].sum(1).tolist()
        per_key = {}
        for k in output_keys:  # by name, not shape: [B, C] class logits can have C == L in a batch
            value = out[k].detach()
            self._kind[k] = "token" if value.dim() >= 3 else "span" if k in _PER_POSITION_KEYS else "example"
            value = value[torch.as_tensor(out_rows, device=value.device)].cpu()
            if self._kind[k] == "example":
                per_key[k] = list(value.unbind(0))
            else:
                per_key[k] = list(value[real[batch_rows]].split(lengths))
        for j, i in enumerate(batch_rows):
            self._rows[digests[i]] = {k: per_key[k][j].clone() for k in output_keys}


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
    keeps them). ``cache_teacher_outputs`` (not a SparseML key; default false): keep the teacher's
    outputs per training example and reuse them in later epochs (:class:`TeacherOutputCache`) --
    the same loss without the teacher's forward pass after epoch 1; for fixed inputs only (an error
    with masked-LM, whose masking changes every step). The teacher is given on the CLI
    (``--teacher``) or in code.
    """

    hardness: float = 0.5
    temperature: float = 2.0
    distill_output_keys: list[str] = ["logits"]
    teacher_input_keys: list[str] | None = None
    update_frequency: float = -1.0
    mask_padding: bool = True
    cache_teacher_outputs: bool = False
    _cache: TeacherOutputCache | None = PrivateAttr(None)

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
        """``(1 - hardness) * loss + hardness * mean_k kd_loss(student[k], teacher[k])`` (0-d tensors).

        Raises:
            RecipeError: a ``distill_output_keys`` entry is missing from the model's (or the teacher's)
                outputs; ``cache_teacher_outputs`` on a batch it cannot key (no ``input_ids``, an
                ``attention_mask`` the teacher does not get, or token-level labels).
        """
        if not self.active(state.epoch):
            return loss
        teacher_out = self._teacher_outputs(state, inputs)
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

    def _teacher_outputs(self, state: ModifierState, inputs: dict) -> Any:
        """The teacher's outputs for this batch: :func:`teacher_forward`, through the cache with
        ``cache_teacher_outputs``."""
        if not self.cache_teacher_outputs:
            return teacher_forward(state, inputs, self.teacher_input_keys)
        keys = _teacher_input_names(inputs, self.teacher_input_keys)
        if "input_ids" not in inputs:
            raise self.error("cache_teacher_outputs keys examples by their input_ids; the batch has none",
                             "cache_teacher_outputs", True)
        if "attention_mask" in inputs and "attention_mask" not in keys:
            raise self.error("cache_teacher_outputs keys examples by their real tokens, but the teacher does not get "
                             "the attention_mask (its outputs would depend on the padding)", "teacher_input_keys", keys)
        labels = inputs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.shape == inputs["input_ids"].shape:
            raise self.error("cache_teacher_outputs needs fixed inputs, but token-level labels (masked-LM) mean "
                             "the inputs are masked anew every step", "cache_teacher_outputs", True)
        if self._cache is None:
            self._cache = TeacherOutputCache()
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                logger.warning("cache_teacher_outputs under DDP: each rank sees other examples each epoch, so its "
                               "cache fills only over several epochs and saves less than on one process")

        def forward(x: dict) -> Any:
            out = teacher_forward(state, x, self.teacher_input_keys)
            absent = [k for k in self.distill_output_keys if k not in out]
            if absent:
                raise self.error(f"teacher output has no '{absent[0]}' (outputs: {list(out.keys())})",
                                 "distill_output_keys", absent[0])
            return out

        full = _shared_teacher_outputs(state, inputs, keys)  # another KD modifier's pass on this batch
        return self._cache.outputs(inputs, keys, self.distill_output_keys, self.mask_padding, forward, full)

    def finalize(self, state: ModifierState) -> None:
        """Log how many examples' teacher outputs came from the cache, and free it."""
        if self._cache is not None:
            logger.info("teacher output cache: %d examples kept; %d served from the cache, %d through the teacher",
                        len(self._cache), self._cache.from_cache, self._cache.from_teacher)
            self._cache = None
