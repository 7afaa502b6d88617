"""Measure a model's sparsity: per-parameter table and encoder-Linear summary."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Mapping

import torch

from .modifiers.masks import detect_pattern

__all__ = ["ParamSparsity", "sparsity_table", "load_checkpoint_tensors", "encoder_linear_sparsity", "ENCODER_LINEAR_RE"]

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
    """
    rx = re.compile(params_regex) if params_regex else None
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
