"""The explicit registry of recipe modifiers: ``!Name`` in a recipe -> class.

Add a modifier here to make it usable from recipes (no package walking, no decorators).
"""

from __future__ import annotations

from .. import modifiers as m

__all__ = ["MODIFIERS"]

MODIFIERS: dict[str, type[m.Modifier]] = {
    "EpochRangeModifier": m.EpochRangeModifier,
    "LearningRateFunctionModifier": m.LearningRateFunctionModifier,
    "SetLearningRateModifier": m.SetLearningRateModifier,
    "TrainableParamsModifier": m.TrainableParamsModifier,
    "GMPruningModifier": m.GMPruningModifier,
    "MagnitudePruningModifier": m.MagnitudePruningModifier,
    "MovementPruningModifier": m.MovementPruningModifier,
    "OBSPruningModifier": m.OBSPruningModifier,
    "ConstantPruningModifier": m.ConstantPruningModifier,
    "LayerPruningModifier": m.LayerPruningModifier,
    "L0StructuredPruningModifier": m.L0StructuredPruningModifier,
    "DistillationModifier": m.DistillationModifier,
    "PerLayerDistillationModifier": m.PerLayerDistillationModifier,
    "QuantizationModifier": m.QuantizationModifier,
}
