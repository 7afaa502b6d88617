"""Quantization-aware training (QAT) with fake quantization (Jacob et al. 2018, arXiv:1712.05877).

``QuantizationModifier`` (SparseML's recipe keys) replaces the targeted ``nn.Linear``/``nn.Embedding``
modules by :class:`QuantLinear`/:class:`QuantEmbedding`, subclasses that *keep the original weight and
bias Parameter objects* (the optimizer, masks and ``state_dict`` names are unchanged) and run:

* weights: INT8 symmetric, per output channel (row) by default: ``scale = max|w_row| / 127``,
  ``w_q = clamp(round(w / scale), -127, 127) * scale`` with a straight-through gradient
  (``torch.fake_quantize_per_channel_affine``). Zero maps to exactly zero, so pruned weights stay 0.
* Linear inputs (``quantize_linear_activations``) and embedding outputs
  (``quantize_embedding_activations``): per-tensor, UINT8 asymmetric by default, range from a moving
  average of the batch min/max (averaging constant 0.01, as torch's MovingAverageMinMaxObserver).

Observers are frozen at ``disable_quantization_observer_epoch`` (scales fixed from then on). Fake-quant
state lives in non-persistent buffers, so ``save_pretrained`` writes plain weights;
:meth:`QuantizationModifier.save_artifacts` writes ``quantization.json`` (scales, zero points,
observer ranges) next to them, from which the INT8 ONNX export is built (:func:`load_quantized`
rebuilds the fake-quant model from it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import PrivateAttr, field_validator

from ..atomic import write_text_atomic
from .base import Modifier, ModifierState

__all__ = ["QuantizationModifier", "QuantLinear", "QuantEmbedding", "ActivationFakeQuant", "weight_scales",
           "fake_quantize_weight", "activation_qparams", "quantization_state", "load_quantized", "QUANT_FILE"]

QUANT_FILE = "quantization.json"
AVERAGING_CONSTANT = 0.01
_EPS = 1e-8


def weight_scales(w: torch.Tensor, bits: int = 8, per_channel: bool = True) -> torch.Tensor:
    """Symmetric scales of a weight ``[out, in]``: ``max|w| / (2**(bits-1) - 1)`` per row
    (``[out]``) or per tensor (``[1]``), float32, never 0."""
    qmax = 2 ** (bits - 1) - 1
    amax = w.detach().abs().amax(dim=1) if per_channel else w.detach().abs().max().reshape(1)
    return (amax.float() / qmax).clamp_min(_EPS)


def fake_quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``clamp(round(w / scale), -qmax, qmax) * scale`` (zero point 0, round half to even), with the
    straight-through gradient; ``scale`` is ``[out]`` (per row) or ``[1]``."""
    qmax = 2 ** (bits - 1) - 1
    if scale.numel() == 1:
        return torch.fake_quantize_per_tensor_affine(w, float(scale), 0, -qmax, qmax)
    zero = torch.zeros(scale.shape, dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale.to(w.device), zero, 0, -qmax, qmax)


def activation_qparams(lo: float, hi: float, bits: int = 8, symmetric: bool = False) -> tuple[float, int, int, int]:
    """``(scale, zero_point, qmin, qmax)`` for the range ``[lo, hi]`` (widened to include 0).

    Asymmetric: unsigned ``[0, 2**bits - 1]``; symmetric: signed ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``, zp 0.
    """
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return max(max(-lo, hi) / qmax, _EPS), 0, -qmax, qmax
    qmax = 2 ** bits - 1
    scale = max((hi - lo) / qmax, _EPS)
    return scale, int(min(max(round(-lo / scale), 0), qmax)), 0, qmax


class ActivationFakeQuant(torch.nn.Module):
    """Per-tensor fake quantization of an activation with a moving-average min/max observer.

    The observer updates in training mode while enabled; before its first observation the input
    passes through unchanged. State (``min_val``, ``max_val``) is in non-persistent buffers.
    """

    def __init__(self, bits: int = 8, symmetric: bool = False):
        super().__init__()
        self.bits, self.symmetric, self.observer_enabled = bits, symmetric, True
        self.register_buffer("min_val", torch.tensor(float("inf")), persistent=False)
        self.register_buffer("max_val", torch.tensor(float("-inf")), persistent=False)

    @property
    def initialized(self) -> bool:
        """True once a range has been observed (or loaded)."""
        return bool(torch.isfinite(self.min_val))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` (any float tensor) -> same shape and dtype, straight-through gradient.

        In training mode with the observer enabled, first moves ``min_val`` / ``max_val`` towards the
        batch min/max (the first batch sets them).
        """
        if self.training and self.observer_enabled:
            with torch.no_grad():
                lo, hi = x.detach().min().float(), x.detach().max().float()
                if not self.initialized:
                    self.min_val.copy_(lo), self.max_val.copy_(hi)
                else:
                    self.min_val.add_(AVERAGING_CONSTANT * (lo - self.min_val))
                    self.max_val.add_(AVERAGING_CONSTANT * (hi - self.max_val))
        if not self.initialized:
            return x
        scale, zp, qmin, qmax = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)

    def qparams(self) -> tuple[float, int, int, int]:
        """``(scale, zero_point, qmin, qmax)`` of the current range."""
        return activation_qparams(float(self.min_val), float(self.max_val), self.bits, self.symmetric)

    def state(self) -> dict[str, Any] | None:
        """JSON-able range and qparams, or ``None`` before any observation."""
        if not self.initialized:
            return None
        scale, zp, qmin, qmax = self.qparams()
        return {"min": float(self.min_val), "max": float(self.max_val), "scale": scale, "zero_point": zp, "qmin": qmin, "qmax": qmax}

    def load(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state` output."""
        if state is not None:
            self.min_val.fill_(state["min"]), self.max_val.fill_(state["max"])


class _WeightFakeQuant:
    """Mixin-free helper shared by QuantLinear/QuantEmbedding: weight scale + observer flag."""

    def _init_quant(self, bits: int, per_channel: bool) -> None:
        self.weight_bits, self.per_channel, self.observer_enabled = bits, per_channel, True
        self.register_buffer("weight_scale", weight_scales(self.weight, bits, per_channel), persistent=False)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight (scale re-measured from the weight while the observer is on).

        In eval mode without autograd the result is cached until the weight changes (its
        ``_version``): re-quantizing a 30k-row embedding table on every call is slow.
        """
        key = (self.weight._version, self.weight.data_ptr(), self.observer_enabled)
        cache = getattr(self, "_cached", None)
        inference = not self.training and not torch.is_grad_enabled()
        if inference and cache is not None and cache[0] == key:
            return cache[1]
        if self.observer_enabled:
            self.weight_scale = weight_scales(self.weight, self.weight_bits, self.per_channel)
        out = fake_quantize_weight(self.weight, self.weight_scale, self.weight_bits)
        self._cached = (key, out) if inference else None
        return out


class QuantLinear(torch.nn.Linear, _WeightFakeQuant):
    """``nn.Linear`` with fake-quantized weight and (optionally) input; shares the wrapped Parameters."""

    @classmethod
    def wrap(cls, linear: torch.nn.Linear, weight_bits: int = 8, per_channel: bool = True,
             input_quant: ActivationFakeQuant | None = None) -> "QuantLinear":
        """A QuantLinear whose ``weight``/``bias`` are ``linear``'s Parameter objects."""
        q = cls.__new__(cls)
        torch.nn.Module.__init__(q)
        q.in_features, q.out_features = linear.in_features, linear.out_features
        q.weight, q.bias = linear.weight, linear.bias
        q.train(linear.training)
        q._init_quant(weight_bits, per_channel)
        q.input_quant = input_quant
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float ``[..., in_features]`` -> ``[..., out_features]`` with the fake-quantized weight; ``x`` is
        fake-quantized first when there is an ``input_quant``."""
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(x, self.quantized_weight(), self.bias)


class QuantEmbedding(torch.nn.Embedding, _WeightFakeQuant):
    """``nn.Embedding`` with a fake-quantized table (per row) and optionally output; shares the Parameter."""

    @classmethod
    def wrap(cls, emb: torch.nn.Embedding, weight_bits: int = 8, per_channel: bool = True,
             output_quant: ActivationFakeQuant | None = None) -> "QuantEmbedding":
        """A QuantEmbedding whose ``weight`` is ``emb``'s Parameter object."""
        q = cls.__new__(cls)
        torch.nn.Module.__init__(q)
        for k in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"):
            setattr(q, k, getattr(emb, k))
        q.weight = emb.weight
        q.train(emb.training)
        q._init_quant(weight_bits, per_channel)
        q.output_quant = output_quant
        return q

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 ids ``[...]`` -> float ``[..., embedding_dim]`` rows of the fake-quantized table, fake-quantized
        again when there is an ``output_quant``."""
        out = F.embedding(ids, self.quantized_weight(), self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)
        return self.output_quant(out) if self.output_quant is not None else out


def quantization_state(model: torch.nn.Module, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """JSON-able fake-quant state of ``model``: per wrapped module its type, weight scales
    (zero points are 0) and activation ranges; plus ``settings`` (bits, symmetry)."""
    modules = {}
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            act = m.input_quant if isinstance(m, QuantLinear) else m.output_quant
            scale = m.weight_scale if not m.observer_enabled else weight_scales(m.weight, m.weight_bits, m.per_channel)
            modules[name] = {"type": "linear" if isinstance(m, QuantLinear) else "embedding", "weight_bits": m.weight_bits,
                             "per_channel": m.per_channel, "observer_enabled": m.observer_enabled,
                             "weight_scale": scale.cpu().tolist(), "activation": act.state() if act is not None else None,
                             "activation_bits": act.bits if act is not None else None,
                             "activation_symmetric": act.symmetric if act is not None else None}
    return {"format_version": 1, "weight_scheme": "symmetric, zero point 0", **(settings or {}), "modules": modules}


def load_quantized(model: torch.nn.Module, state: dict[str, Any]) -> torch.nn.Module:
    """Wrap ``model``'s modules as ``state`` (from ``quantization.json``) describes, with its scales and
    ranges, observers frozen; returns ``model`` (changed in place, in eval mode).

    Raises:
        AttributeError: a module named in ``state`` is not in ``model``.
        KeyError: ``state`` or one of its module entries lacks a field.
    """
    for name, entry in state["modules"].items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        act = None
        if entry["activation"] is not None:
            act = ActivationFakeQuant(entry["activation_bits"], entry["activation_symmetric"])
            act.load(entry["activation"])
            act.observer_enabled = False
        cls = QuantLinear if entry["type"] == "linear" else QuantEmbedding
        if isinstance(module, cls):  # already wrapped (resume): load into its quantizer
            q = module
            current = q.input_quant if cls is QuantLinear else q.output_quant
            if current is not None and act is not None:
                current.load(entry["activation"])
                current.observer_enabled = False
        else:
            q = cls.wrap(module, entry["weight_bits"], entry["per_channel"], act)
        q.weight_scale = torch.tensor(entry["weight_scale"], dtype=torch.float32)
        q.observer_enabled = False
        setattr(parent, child, q)
    return model.eval()


class QuantizationModifier(Modifier):
    """INT8 quantization-aware training of Linear (and Embedding) layers (SparseML recipe keys).

    Keys: ``start_epoch`` (wrap then; at 0 already in ``apply_structure``), ``submodules`` (module
    names to quantize inside; default: the whole model), ``ignore`` / ``exclude_module_types``
    (module names or class names to skip), ``disable_quantization_observer_epoch`` (freeze
    scales), ``freeze_bn_stats_epoch`` (accepted; BERT has no batch norm), ``quantize_embeddings``,
    ``quantize_embedding_activations``, ``quantize_linear_activations``, ``weight_bits``,
    ``activation_bits``, ``reduce_range`` (accepted, unused), and the choices ``weight_per_channel``
    (default True; else per tensor) and ``activation_symmetric`` (default False: UINT8 asymmetric).
    Weights are always symmetric, so zero stays zero.
    """

    submodules: Optional[list[str]] = None
    ignore: list[str] = []
    exclude_module_types: list[str] = []
    disable_quantization_observer_epoch: Optional[float] = None
    freeze_bn_stats_epoch: Optional[float] = None
    quantize_embeddings: bool = True
    quantize_embedding_activations: bool = True
    quantize_linear_activations: bool = True
    weight_bits: int = 8
    activation_bits: int = 8
    weight_per_channel: bool = True
    activation_symmetric: bool = False
    reduce_range: bool = False
    model_fuse_fn_name: Union[str, None] = None

    _model: Any = PrivateAttr(None)
    _wrapped: bool = PrivateAttr(False)
    _frozen: bool = PrivateAttr(False)

    @field_validator("weight_bits", "activation_bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if not 2 <= v <= 8:
            raise ValueError("bits must be between 2 and 8")
        return v

    def apply_structure(self, state: ModifierState) -> None:
        """Check ``submodules``; wrap now when ``start_epoch`` is 0 (Parameters are kept, so the
        optimizer built afterwards -- or before -- sees the same objects).

        Raises:
            RecipeError: a ``submodules`` entry names no module of the model.
        """
        self._model = state.model
        names = dict(state.model.named_modules())
        for sub in self.submodules or []:
            if sub not in names:
                raise self.error(f"no module named {sub!r} in the model", "submodules", sub)
        if self.start_epoch <= 0:
            self._wrap()

    def update(self, state: ModifierState) -> None:
        """Wrap at ``start_epoch``; freeze observers at ``disable_quantization_observer_epoch``."""
        if not self._wrapped and state.epoch >= self.start_epoch:
            self._wrap()
        obs_end = self.disable_quantization_observer_epoch
        if self._wrapped and not self._frozen and obs_end is not None and state.epoch >= obs_end:
            self._set_observers(False)

    def _skip(self, name: str, module: torch.nn.Module) -> bool:
        skip = set(self.ignore) | set(self.exclude_module_types)
        if type(module).__name__ in skip or any(name == s or name.startswith(s + ".") for s in skip):
            return True
        subs = self.submodules
        return subs is not None and not any(name == s or name.startswith(s + ".") for s in subs)

    def _wrap(self) -> None:
        for name, module in list(self._model.named_modules()):
            if isinstance(module, (QuantLinear, QuantEmbedding)) or self._skip(name, module):
                continue
            parent_name, _, child = name.rpartition(".")
            parent = self._model.get_submodule(parent_name) if parent_name else self._model
            if isinstance(module, torch.nn.Linear):
                act = ActivationFakeQuant(self.activation_bits, self.activation_symmetric) if self.quantize_linear_activations else None
                setattr(parent, child, QuantLinear.wrap(module, self.weight_bits, self.weight_per_channel, act))
            elif isinstance(module, torch.nn.Embedding) and self.quantize_embeddings:
                act = ActivationFakeQuant(self.activation_bits, self.activation_symmetric) if self.quantize_embedding_activations else None
                setattr(parent, child, QuantEmbedding.wrap(module, self.weight_bits, self.weight_per_channel, act))
        self._wrapped = True

    def _set_observers(self, enabled: bool) -> None:
        for m in self._model.modules():
            if isinstance(m, (QuantLinear, QuantEmbedding)):
                if not enabled:
                    m.weight_scale = weight_scales(m.weight, m.weight_bits, m.per_channel)
                m.observer_enabled = enabled
            elif isinstance(m, ActivationFakeQuant):
                m.observer_enabled = enabled
        self._frozen = not enabled

    def settings(self) -> dict[str, Any]:
        """The recipe settings recorded in ``quantization.json``."""
        return {"weight_bits": self.weight_bits, "activation_bits": self.activation_bits, "weight_per_channel": self.weight_per_channel,
                "activation_symmetric": self.activation_symmetric, "observers_frozen": self._frozen}

    def state_dict(self) -> dict[str, Any]:
        """``{"wrapped", "frozen", "quantization"}``: the flags and, once wrapped, :func:`quantization_state`."""
        return {"wrapped": self._wrapped, "frozen": self._frozen,
                "quantization": quantization_state(self._model, self.settings()) if self._wrapped else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output: re-wrap the modules with the saved scales and ranges
        (:func:`load_quantized`), back in train mode, observers enabled unless ``state["frozen"]``.

        Raises:
            AttributeError: a saved module is not in the model (see :func:`load_quantized`).
            KeyError: ``state`` lacks ``"frozen"`` or a field of the saved quantization state.
        """
        if state.get("quantization"):
            load_quantized(self._model, state["quantization"])
            self._model.train()
            self._wrapped = True
            self._set_observers(not state["frozen"])

    def save_artifacts(self, directory: str | Path) -> list[Path]:
        """Write ``quantization.json`` (see :func:`quantization_state`) into ``directory`` once wrapped."""
        if not self._wrapped:
            return []
        # atomic: a kill mid-write must not leave a truncated quantization.json in a checkpoint
        path = write_text_atomic(Path(directory) / QUANT_FILE,
                                 json.dumps(quantization_state(self._model, self.settings())) + "\n")
        return [path]
