"""Recipe modifiers. Each class is a SparseML-compatible ``!Name`` in a recipe."""

from .base import Modifier, ModifierState
from .distillation import DistillationModifier, kd_loss
from .per_layer_distillation import PerLayerDistillationModifier, feature_distance
from .pruning import (
    ConstantPruningModifier,
    GMPruningModifier,
    GradualPruningModifier,
    L0StructuredPruningModifier,
    LayerPruningModifier,
    MagnitudePruningModifier,
    MaskedParamsModifier,
    MovementPruningModifier,
    OBSPruningModifier,
)
from .quantization import QuantizationModifier
from .training import EpochRangeModifier, LearningRateFunctionModifier, SetLearningRateModifier, TrainableParamsModifier

__all__ = [
    "Modifier",
    "ModifierState",
    "MaskedParamsModifier",
    "GradualPruningModifier",
    "GMPruningModifier",
    "MagnitudePruningModifier",
    "MovementPruningModifier",
    "OBSPruningModifier",
    "ConstantPruningModifier",
    "LayerPruningModifier",
    "L0StructuredPruningModifier",
    "DistillationModifier",
    "kd_loss",
    "PerLayerDistillationModifier",
    "feature_distance",
    "QuantizationModifier",
    "EpochRangeModifier",
    "LearningRateFunctionModifier",
    "SetLearningRateModifier",
    "TrainableParamsModifier",
]
