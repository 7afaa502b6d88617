"""Layer dropping: remove whole encoder layers (Sajjad et al. 2020, "On the effect of dropping
layers of pre-trained transformer models", arXiv:2004.03844; SparseML's LayerPruningModifier)."""

from __future__ import annotations

import torch
from pydantic import PrivateAttr, field_validator

from ..base import Modifier, ModifierState

__all__ = ["LayerPruningModifier"]


class LayerPruningModifier(Modifier):
    """Drop the named layers (e.g. ``bert.encoder.layer.5``) from their ``nn.ModuleList``.

    Names are the model's original ones, as are the ``params`` of every other modifier in the
    recipe (SparseML semantics). The layers are removed before training (whatever ``start_epoch`` says: a model that changes
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

    _targets: list = PrivateAttr(default_factory=list)

    def apply_structure(self, state: ModifierState) -> None:
        """Find the layers by their original names (an unknown name is an error); dropping
        happens in :meth:`drop_layers`, after every modifier has resolved its ``params``
        against the original names (SparseML names never change, so recipes refer to them).

        Raises:
            RecipeError: a ``layers`` entry is not an indexed child of an ``nn.ModuleList`` of the model.
        """
        modules = dict(state.model.named_modules())
        self._targets = []
        for name in self.layers:
            parent, _, index = name.rpartition(".")
            if name not in modules or not index.isdigit() or not isinstance(modules.get(parent), torch.nn.ModuleList):
                raise self.error("not a layer inside an nn.ModuleList of the model", "layers", name)
            self._targets.append((modules[parent], modules[name]))

    def drop_layers(self, state: ModifierState) -> None:
        """Remove the resolved layers from their ModuleLists (in place) and update the config."""
        for module_list, layer in self._targets:
            for i, m in enumerate(module_list):
                if m is layer:
                    del module_list[i]
                    break
        config = getattr(state.model, "config", None)
        encoder_layers = [ml for name, ml in state.model.named_modules() if name.endswith("encoder.layer")]
        if config is not None and hasattr(config, "num_hidden_layers") and encoder_layers:
            config.num_hidden_layers = len(encoder_layers[0])
