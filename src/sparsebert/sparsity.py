"""Measure a model's sparsity: per-parameter table and encoder-Linear summary."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Mapping

import torch

from .modifiers.masks import detect_pattern

__all__ = ["ParamSparsity", "sparsity_table", "load_checkpoint_tensors", "encoder_linear_sparsity", "ENCODER_LINEAR_RE",
           "MaskComparison", "compare_masks"]

# The six Linear weights of every BERT encoder layer (Q, K, V, attention output, FFN in/out).
ENCODER_LINEAR_RE = r".*encoder\.layer\.\d+\..*(query|key|value|dense)\.weight$"


@dataclasses.dataclass
class ParamSparsity:
    """One row of the sparsity table: name, shape, element count, zeros, sparsity (0-1), pattern."""

    name: str
    shape: tuple
    numel: int
    zeros: int
    sparsity: float
    pattern: str


def load_checkpoint_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a ``save_pretrained`` folder's ``*.safetensors`` files, without building the model.

    Raises:
        FileNotFoundError: the folder has no ``.safetensors`` file.
    """
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def sparsity_table(
    params: torch.nn.Module | Mapping[str, torch.Tensor], params_regex: str | None = None, min_dims: int = 2
) -> list[ParamSparsity]:
    """Sparsity of every tensor matching ``params_regex`` (default: all with ``>= min_dims`` dims).

    Args:
        params: a model, or name -> tensor (e.g. from :func:`load_checkpoint_tensors`).
        params_regex: matched from the start of each name (``re.match``); a leading ``re:`` is dropped.

    Raises:
        ValueError: ``params_regex`` does not compile (names it).
    """
    if params_regex and params_regex.startswith("re:"):  # a recipe's `re:` spelling means the same here
        params_regex = params_regex[3:]
    try:
        rx = re.compile(params_regex) if params_regex else None
    except re.error as e:
        raise ValueError(f"--params {params_regex!r} is not a valid regular expression: {e}") from None
    named = params.named_parameters() if isinstance(params, torch.nn.Module) else params.items()
    rows = []
    for name, p in named:
        if p.dim() < min_dims or (rx and not rx.match(name)):
            continue
        w = p.detach()
        zeros = int((w == 0).sum())
        rows.append(ParamSparsity(name, tuple(w.shape), w.numel(), zeros, zeros / w.numel(), detect_pattern(w)))
    return rows


def encoder_linear_sparsity(model: torch.nn.Module) -> float:
    """Overall sparsity of the encoder Linear weights (what pruning recipes target), in [0, 1].

    Raises:
        ValueError: the model has no parameter matching :data:`ENCODER_LINEAR_RE`.
    """
    rows = sparsity_table(model, ENCODER_LINEAR_RE)
    if not rows:
        raise ValueError("model has no encoder Linear weights matching " + ENCODER_LINEAR_RE)
    return sum(r.zeros for r in rows) / sum(r.numel for r in rows)


@dataclasses.dataclass
class MaskComparison:
    """Result of :func:`compare_masks`.

    Attributes:
        identical / differing: names (``encoder.layer.N...``) of tensors whose zero masks are equal / differ.
        differing_elements: positions, over all compared tensors, that are zero in one and not the other.
        total_elements: elements compared.
        only_in_a / only_in_b: matching names present in one checkpoint only (not compared).
        sparsity_a / sparsity_b: overall zero fraction of the compared tensors in each.
    """

    identical: list[str]
    differing: list[str]
    differing_elements: int
    total_elements: int
    only_in_a: list[str]
    only_in_b: list[str]
    sparsity_a: float
    sparsity_b: float

    @property
    def same(self) -> bool:
        """True when every compared mask is identical and both sides have the same tensors."""
        return bool(self.identical) and not (self.differing or self.only_in_a or self.only_in_b)


def _by_encoder_name(params: Mapping[str, torch.Tensor], params_regex: str) -> dict[str, torch.Tensor]:
    """Matching tensors keyed from ``encoder.`` on, so the MLM (``bert.encoder...``, ``cls...``) and
    task checkpoints (``bert.encoder...``, ``classifier...``) of one encoder line up."""
    rx = re.compile(params_regex)
    out = {}
    for name, p in params.items():
        if rx.match(name):
            i = name.find("encoder.")
            out[name[i:] if i >= 0 else name] = p.detach()
    return out


def compare_masks(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], params_regex: str = ENCODER_LINEAR_RE) -> MaskComparison:
    """Compare the zero masks (``w == 0``) of the tensors matching ``params_regex`` in two checkpoints.

    Used to check sparse transfer (Prune OFA): a task model fine-tuned with a pattern lock must keep
    exactly the mask of the sparse pre-trained checkpoint it started from.

    Args:
        a, b: name -> tensor (e.g. :func:`load_checkpoint_tensors` of two model folders); names are
            matched from ``encoder.`` on, so head prefixes may differ.
        params_regex: which tensors (default: the encoder Linear weights).

    Raises:
        ValueError: a matched pair has different shapes, or nothing matches in either checkpoint.
    """
    ta, tb = _by_encoder_name(a, params_regex), _by_encoder_name(b, params_regex)
    if not ta or not tb:
        raise ValueError(f"no tensor matches {params_regex} in {'the first' if not ta else 'the second'} checkpoint")
    identical, differing = [], []
    diff_elems = total = zeros_a = zeros_b = 0
    for name in sorted(ta.keys() & tb.keys()):
        za, zb = ta[name] == 0, tb[name] == 0
        if za.shape != zb.shape:
            raise ValueError(f"{name}: shapes differ, {tuple(za.shape)} vs {tuple(zb.shape)}")
        n = int((za != zb).sum())
        (differing if n else identical).append(name)
        diff_elems += n
        total += za.numel()
        zeros_a += int(za.sum())
        zeros_b += int(zb.sum())
    return MaskComparison(identical, differing, diff_elems, total, sorted(ta.keys() - tb.keys()), sorted(tb.keys() - ta.keys()),
                          zeros_a / max(total, 1), zeros_b / max(total, 1))
