"""Pruning modifiers: gradual magnitude, constant (pattern lock), layer dropping."""

from .base import GradualPruningModifier, MaskedParamsModifier
from .constant import ConstantPruningModifier
from .layer import LayerPruningModifier
from .magnitude import GMPruningModifier, MagnitudePruningModifier

__all__ = [
    "MaskedParamsModifier",
    "GradualPruningModifier",
    "GMPruningModifier",
    "MagnitudePruningModifier",
    "ConstantPruningModifier",
    "LayerPruningModifier",
]
