"""Layer dropping: remove whole encoder layers (Sajjad et al. 2020, "On the effect of dropping
layers of pre-trained transformer models", arXiv:2004.03844; SparseML's LayerPruningModifier)."""

from __future__ import annotations

import torch
from pydantic import field_validator

from ..base import Modifier, ModifierState

__all__ = ["LayerPruningModifier"]


class LayerPruningModifier(Modifier):
    """Drop the named layers (e.g. ``bert.encoder.layer.5``) from their ``nn.ModuleList``.

    The layers are removed before training (whatever ``start_epoch`` says: a model that changes
    shape mid-run cannot keep its optimizer and checkpoints), and ``config.num_hidden_layers``
    is updated so that ``save_pretrained``/``from_pretrained`` round-trip the smaller model.
    The remaining layers are renumbered from 0.
    """

    layers: list[str]
    update_frequency: float = -1.0

    @field_validator("layers")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("layers must name at least one layer")
        return v

    def apply_structure(self, state: ModifierState) -> None:
        """Remove the layers; an unknown layer name or one not inside a ModuleList is an error."""
        modules = dict(state.model.named_modules())
        by_parent: dict[str, list[int]] = {}
        for name in self.layers:
            parent, _, index = name.rpartition(".")
            if name not in modules or not index.isdigit() or not isinstance(modules.get(parent), torch.nn.ModuleList):
                raise self.error("not a layer inside an nn.ModuleList of the model", "layers", name)
            by_parent.setdefault(parent, []).append(int(index))
        for parent, drop in by_parent.items():
            old = modules[parent]
            kept = [m for i, m in enumerate(old) if i not in set(drop)]
            holder = modules[parent.rpartition(".")[0]] if "." in parent else state.model
            setattr(holder, parent.rpartition(".")[2], torch.nn.ModuleList(kept))
            config = getattr(state.model, "config", None)
            if config is not None and hasattr(config, "num_hidden_layers") and parent.endswith("encoder.layer"):
                config.num_hidden_layers = len(kept)
