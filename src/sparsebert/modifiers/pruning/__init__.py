"""Pruning modifiers: gradual magnitude, movement, OBS (oBERT), constant (pattern lock), layer dropping."""

from .base import GradualPruningModifier, MaskedParamsModifier
from .constant import ConstantPruningModifier
from .layer import LayerPruningModifier
from .magnitude import GMPruningModifier, MagnitudePruningModifier
from .movement import MovementPruningModifier
from .obs import OBSPruningModifier

__all__ = [
    "MaskedParamsModifier",
    "GradualPruningModifier",
    "GMPruningModifier",
    "MagnitudePruningModifier",
    "MovementPruningModifier",
    "OBSPruningModifier",
    "ConstantPruningModifier",
    "LayerPruningModifier",
]
