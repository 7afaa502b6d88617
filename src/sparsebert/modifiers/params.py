"""Resolve SparseML ``params`` specs (names, ``re:`` regexes, ``__ALL_PRUNABLE__``) to parameters."""

from __future__ import annotations

import re

import torch

__all__ = ["ALL_PRUNABLE", "ALL", "prunable_param_names", "match_names", "resolve_params"]

ALL_PRUNABLE = "__ALL_PRUNABLE__"
ALL = "__ALL__"


def prunable_param_names(model: torch.nn.Module) -> list[str]:
    """Weights of every ``nn.Linear`` and ``nn.Conv*`` (SparseML's ``__ALL_PRUNABLE__``)."""
    names = []
    for mod_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)):
            names.append(f"{mod_name}.weight" if mod_name else "weight")
    return names


def match_names(names: list[str], pattern: str, error, key: str, kind: str = "parameter") -> list[str]:
    """The ``names`` (in their order) that ``pattern`` selects: the exact name, or ``re:<regex>``
    (``re.match`` against the full name, as SparseML's recipes do; end it with ``$`` to anchor).

    Args:
        names: candidate names (parameter or module names, in model order).
        pattern: a name or ``re:<regex>``.
        error: ``callable(message, key, value) -> Exception`` (a modifier's ``error``).
        key: the recipe key the pattern came from, for the error.
        kind: what the names are ("parameter", "module"), for the error.

    Raises:
        whatever ``error`` builds: an invalid regex, or a pattern that matches none of ``names``.
    """
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as e:
            raise error(f"invalid regex: {e}", key, pattern) from None
        hits = [n for n in names if rx.match(n)]
    else:
        hits = [pattern] if pattern in names else []
    if not hits:
        sample = ", ".join(names[:4])
        raise error(f"matches no {kind} of the model (names look like: {sample}, ...)", key, pattern)
    return hits


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
        else:
            hits = match_names(list(named), pattern, error, "params")
        if not hits:  # __ALL_PRUNABLE__ / __ALL__ on a model without such parameters
            raise error("matches no parameter of the model", "params", pattern)
        chosen.update(hits)
    return {n: p for n, p in named.items() if n in chosen}
