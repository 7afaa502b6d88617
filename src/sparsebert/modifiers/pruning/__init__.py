"""Pruning modifiers: gradual magnitude, movement, OBS (oBERT), constant (pattern lock), layer dropping,
L0 gates on heads / FFN neurons (structured)."""

from .base import GradualPruningModifier, MaskedParamsModifier
from .constant import ConstantPruningModifier
from .l0 import L0StructuredPruningModifier
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
    "L0StructuredPruningModifier",
]
