"""Measure a model's sparsity: per-parameter table and encoder-Linear summary."""

from __future__ import annotations

import dataclasses
import re

import torch

from .modifiers.masks import detect_pattern

__all__ = ["ParamSparsity", "sparsity_table", "encoder_linear_sparsity", "ENCODER_LINEAR_RE"]

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


def sparsity_table(model: torch.nn.Module, params_regex: str | None = None, min_dims: int = 2) -> list[ParamSparsity]:
    """Sparsity of every parameter matching ``params_regex`` (default: all with ``>= min_dims`` dims)."""
    rx = re.compile(params_regex) if params_regex else None
    rows = []
    for name, p in model.named_parameters():
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
