"""Errors raised while loading or validating a recipe."""

from __future__ import annotations

from typing import Any

__all__ = ["RecipeError"]


class RecipeError(ValueError):
    """A recipe is wrong. The message names the file, the modifier, the key and the value.

    Attributes:
        source: recipe file path (or ``"<string>"``).
        modifier: e.g. ``"pruning_modifiers[1] !GMPruningModifier"``; ``None`` for file-level errors.
        key: the offending key, if any.
        value: the offending value, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        modifier: str | None = None,
        key: str | None = None,
        value: Any = None,
    ):
        self.source, self.modifier, self.key, self.value = source, modifier, key, value
        where = ": ".join(p for p in (source, modifier) if p)
        what = f"key '{key}' = {value!r}: " if key is not None else ""
        super().__init__(f"{where}: {what}{message}" if where else f"{what}{message}")
