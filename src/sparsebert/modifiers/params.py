"""Resolve SparseML ``params`` specs (names, ``re:`` regexes, ``__ALL_PRUNABLE__``) to parameters."""

from __future__ import annotations

import re

import torch

__all__ = ["ALL_PRUNABLE", "ALL", "prunable_param_names", "resolve_params"]

ALL_PRUNABLE = "__ALL_PRUNABLE__"
ALL = "__ALL__"


def prunable_param_names(model: torch.nn.Module) -> list[str]:
    """Weights of every ``nn.Linear`` and ``nn.Conv*`` (SparseML's ``__ALL_PRUNABLE__``)."""
    names = []
    for mod_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)):
            names.append(f"{mod_name}.weight" if mod_name else "weight")
    return names


def resolve_params(model: torch.nn.Module, patterns: str | list[str], error) -> dict[str, torch.nn.Parameter]:
    """Map recipe ``params`` to the model's named parameters, in model order.

    Args:
        model: the model.
        patterns: a name, ``re:<regex>`` (``re.match`` against the full name, as SparseML),
            ``__ALL_PRUNABLE__``, ``__ALL__``, or a list of those.
        error: ``callable(message, key, value) -> Exception`` building the error to raise
            (a modifier's :meth:`~sparsebert.modifiers.base.Modifier.error`).

    Returns:
        name -> parameter.

    Raises:
        whatever ``error`` builds, when a pattern matches no parameter.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    named = dict(model.named_parameters())
    chosen: set[str] = set()
    for pattern in patterns:
        if pattern == ALL_PRUNABLE:
            hits = [n for n in prunable_param_names(model) if n in named]
        elif pattern == ALL:
            hits = list(named)
        elif pattern.startswith("re:"):
            try:
                rx = re.compile(pattern[3:])
            except re.error as e:
                raise error(f"invalid regex: {e}", "params", pattern) from None
            hits = [n for n in named if rx.match(n)]
        else:
            hits = [pattern] if pattern in named else []
        if not hits:
            sample = ", ".join(list(named)[:4])
            raise error(f"matches no parameter of the model (names look like: {sample}, ...)", "params", pattern)
        chosen.update(hits)
    return {n: p for n, p in named.items() if n in chosen}
