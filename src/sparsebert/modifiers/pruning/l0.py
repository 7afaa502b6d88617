"""Structured pruning of attention heads and FFN neurons with L0 (hard-concrete) gates.

Every head of a gated encoder layer and every FFN intermediate neuron gets a stochastic gate
``z`` in [0, 1] with a learnable ``log_alpha`` (Louizos, Welling & Kingma 2018, "Learning Sparse
Neural Networks through L0 Regularization", arXiv:1712.01312). The gates multiply the input of
``attention.output.dense`` (per head) and of ``output.dense`` (per neuron) through forward
pre-hooks, so the model stays a standard Hugging Face BERT. The expected fraction of encoder Linear
weights removed, ``s_exp``, is driven to a target ``t`` (0 at ``start_epoch``, rising linearly to
``final_sparsity`` at ``warmup_end_epoch``) by the augmented Lagrangian
``lambda1 * (s_exp - t) + lambda2 * (s_exp - t)^2``, minimised over ``log_alpha`` and maximised over
the multipliers (Wang, Wohlwend & Lei 2020, "Structured Pruning of Large Language Models" (FLOP),
arXiv:1910.04732; Xia, Zhong & Chen 2022, CoFi, arXiv:2204.00408, which gates heads and FFN
dimensions and warms the target up linearly). In eval mode and when the structure is fixed at
``end_epoch`` the gates are deterministic (after CoFi's ``deterministic_z``): the scheduled target ``t``
of the gated weights is closed, split between heads and neurons in proportion to their expected closed
weight, lowest ``log_alpha`` first within each kind (:func:`closed_counts`); the others keep a soft value.
Fixing zeroes the closed heads and neurons, folds the open gates' values into the weights, removes
the hooks, and masks keep the removed weights at zero through the remaining (recovery) epochs.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from pydantic import PrivateAttr, field_validator

from ..base import ModifierState
from .base import MaskedParamsModifier, check_sparsity

__all__ = [
    "L0StructuredPruningModifier",
    "hard_concrete_sample",
    "hard_concrete_deterministic",
    "hard_concrete_prob_nonzero",
    "closed_counts",
    "STRUCTURES",
    "LIMIT_L",
    "LIMIT_R",
    "SOFT_GATE_SLOPE",
    "CONVERGENCE_TOLERANCE",
]

logger = logging.getLogger(__name__)

STRUCTURES = ("heads", "neurons")
LIMIT_L, LIMIT_R = -0.1, 1.1  # the stretch interval (gamma, zeta) of Louizos et al. 2018, section 4
_EPS = 1e-6  # keeps log(u) and log(1 - u) finite
SOFT_GATE_SLOPE = 0.8  # FLOP's "empirically validated magic number" for open eval gates (flop/hardconcrete.py)
CONVERGENCE_TOLERANCE = 0.05  # |expected sparsity - target| above which fixing warns that the Lagrangian had not converged


def hard_concrete_sample(log_alpha: torch.Tensor, temperature: float, l: float = LIMIT_L, r: float = LIMIT_R) -> torch.Tensor:
    """One draw of hard-concrete gates (Louizos et al. 2018, arXiv:1712.01312, eq. 10-12).

    ``u ~ U(0, 1)``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / temperature)``,
    ``z = clamp(s * (r - l) + l, 0, 1)``: exactly 0 or 1 with positive probability, differentiable
    in ``log_alpha`` in between.

    Args:
        log_alpha: gate locations, any shape, float.
        temperature: the concrete temperature beta (> 0; 2/3 in the paper).
        l, r: the stretch interval, ``l < 0 < 1 < r``.

    Returns:
        ``z``, same shape, device and dtype as ``log_alpha``, values in [0, 1].
    """
    u = torch.rand_like(log_alpha).clamp(_EPS, 1.0 - _EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / temperature)
    return (s * (r - l) + l).clamp(0.0, 1.0)


def hard_concrete_deterministic(log_alpha: torch.Tensor, temperature: float, l: float = LIMIT_L, r: float = LIMIT_R,
                                n_closed: Optional[Union[int, torch.Tensor]] = None) -> torch.Tensor:
    """Test-time gates: the ``n_closed`` lowest ``log_alpha`` over all entries together are 0, the others soft.

    CoFi's ``_deterministic_z`` (Xia et al. 2022, arXiv:2204.00408, ``models/l0_module.py``), after FLOP
    (Wang et al. 2020, arXiv:1910.04732, ``flop/hardconcrete.py``): by default (``n_closed=None``)
    ``n = round(sum(1 - P(z != 0)))`` (:func:`hard_concrete_prob_nonzero`; ``torch.round``, half to even like
    CoFi's Python ``round``), the expected number of closed gates; the modifier passes the count from
    :func:`closed_counts` instead. The ``n`` gates with the lowest
    ``log_alpha`` get ``z = 0`` (ties broken by position), the others
    ``z = sigmoid(log_alpha / temperature * SOFT_GATE_SLOPE)`` (0.8). Unlike the gate of Louizos et al. 2018 (eq. 13, zero
    only for ``log_alpha <= -2.4``), this closes a set number of gates whether or not any has polarised (the
    Lagrangian can meet its target with every ``log_alpha`` near -1.6, which eq. 13 would leave open). CoFi ranks within
    each layer; callers here pass all gated layers of one kind at once (rounding error at most half a gate
    per kind, not per layer, and layers may lose different numbers of heads/neurons).

    The soft value is CoFi's: FLOP's ``sigmoid(0.8 * log_alpha)`` approximates ``E[z]`` at its temperature
    1 (within 0.006 for ``|log_alpha| <= 3``, by sampling); CoFi's division by the temperature makes it
    sharper than ``E[z]`` at 2/3 (0.08 vs 0.14 at ``log_alpha = -2``). It is kept for parity with CoFi's
    published models; the recovery epochs after fixing retrain the folded scales anyway.

    Args:
        log_alpha: gate locations, any shape (e.g. ``[layers, heads]``), float.
        temperature: the concrete temperature beta (> 0).
        l, r: the stretch interval, ``l < 0 < 1 < r``.
        n_closed: how many gates to close (an int or a 0-d tensor on ``log_alpha``'s device; values beyond
            ``[0, numel]`` close none / all); ``None``: CoFi's expected count.

    Returns:
        ``z``, shaped like ``log_alpha``, same device and dtype, values in [0, 1]; differentiable in
        ``log_alpha`` where open. No host sync.
    """
    flat = log_alpha.detach().flatten()
    if n_closed is None:
        n_closed = torch.round((1.0 - hard_concrete_prob_nonzero(flat, temperature, l, r)).sum())
    closed = torch.empty_like(flat, dtype=torch.bool)
    closed[torch.argsort(flat, stable=True)] = torch.arange(flat.numel(), device=flat.device) < n_closed
    return torch.sigmoid(log_alpha / temperature * SOFT_GATE_SLOPE).masked_fill(closed.view_as(log_alpha), 0.0)


def hard_concrete_prob_nonzero(log_alpha: torch.Tensor, temperature: float, l: float = LIMIT_L, r: float = LIMIT_R) -> torch.Tensor:
    """``P(z != 0) = sigmoid(log_alpha - temperature * log(-l / r))`` (Louizos et al. 2018, eq. 12):
    the expected L0 norm of one gate. Differentiable; shaped like ``log_alpha``, values in (0, 1)."""
    return torch.sigmoid(log_alpha - temperature * math.log(-l / r))


def closed_counts(log_alpha: dict[str, torch.Tensor], weights_per: dict[str, int], target: Union[float, torch.Tensor],
                  temperature: float, l: float = LIMIT_L, r: float = LIMIT_R) -> dict[str, torch.Tensor]:
    """How many gates of each structure kind to close so that ``target`` of the gated weights is removed.

    CoFi (Xia et al. 2022, arXiv:2204.00408, ``_deterministic_z``, after FLOP, arXiv:1910.04732) closes the
    expected number of gates per kind, ``round(sum P(z == 0))``; the removed fraction then follows the
    *expected* sparsity, which misses ``final_sparsity`` whenever the Lagrangian has not converged (on a
    short gated window with ``reg_learning_rate`` 0.01, ``log_alpha`` moves ~0.01 per Adam step: a real
    SST-2 run fixed 0.195 instead of 0.5). Here, as SparseML's pruning modifiers meet ``final_sparsity``,
    the required closed weight ``W = target * total`` is met, keeping CoFi's relative allocation: kind ``k``
    (``w_k`` weights per structure, ``count_k`` structures) gets ``W_k = W * E_k / sum(E)`` with
    ``E_k = w_k * sum(1 - P(z != 0))`` (its expected closed weight, :func:`hard_concrete_prob_nonzero`;
    in proportion to ``w_k * count_k`` when ``sum(E)`` is ~0). A kind whose share exceeds its weight is
    capped and the excess goes to the other kinds (in proportion to their remaining weight), then
    ``n_k = round(W_k / w_k)``, clamped to ``[0, count_k]``. The removed weight is ``W`` within half a
    structure per kind. When the Lagrangian has converged (``sum(E) == W``), ``n_k`` is CoFi's
    ``round(sum P(z == 0))`` up to float rounding.

    Args:
        log_alpha: kind -> gate locations (any shape, float; all on one device); detached here.
        weights_per: kind -> weights one structure holds (``> 0``), same keys as ``log_alpha``.
        target: the fraction of the gated weights to close, in [0, 1].
        temperature, l, r: as in :func:`hard_concrete_prob_nonzero`.

    Returns:
        kind -> 0-d float32 tensor (an integer value) on ``log_alpha``'s device. No host sync.

    Raises:
        KeyError: ``weights_per`` lacks a kind of ``log_alpha``.
    """
    kinds = list(log_alpha)
    # new_full fills on the device: torch.tensor(list, device=...) would copy from the host and sync
    w = torch.stack([log_alpha[k].new_full((), float(weights_per[k]), dtype=torch.float32) for k in kinds])
    count = torch.stack([log_alpha[k].new_full((), float(log_alpha[k].numel()), dtype=torch.float32) for k in kinds])
    cap = w * count
    expected = torch.stack([(1.0 - hard_concrete_prob_nonzero(log_alpha[k].detach().float(), temperature, l, r)).sum()
                            for k in kinds]) * w
    share = torch.where(expected.sum() > 1e-9 * cap.sum(), expected, cap)
    want = target * cap.sum() * share / share.sum()
    over = (want - cap).clamp(min=0.0).sum()  # a kind asked for more than it holds: the rest goes to the others
    want = torch.minimum(want, cap)
    room = cap - want
    want = want + over * room / room.sum().clamp(min=1e-9)
    n = torch.minimum(torch.round(want / w).clamp(min=0.0), count)
    return {k: n[i] for i, k in enumerate(kinds)}


def _linear(module: torch.nn.Module, path: str) -> torch.nn.Linear | None:
    """``module.<path>`` when it is an ``nn.Linear``, else ``None``."""
    try:
        sub = module.get_submodule(path)
    except AttributeError:
        return None
    return sub if isinstance(sub, torch.nn.Linear) else None


_GATED_INPUT = {"heads": "attention.output.dense", "neurons": "output.dense"}  # the Linear whose input a gate scales
_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense")


class L0StructuredPruningModifier(MaskedParamsModifier):
    """Learn which attention heads and FFN neurons to remove with hard-concrete L0 gates.

    Sources: Louizos, Welling & Kingma 2018 (arXiv:1712.01312, hard-concrete gates); Wang, Wohlwend &
    Lei 2020 (FLOP, arXiv:1910.04732, L0 gates on structures + augmented Lagrangian sparsity control);
    Xia, Zhong & Chen 2022 (CoFi, arXiv:2204.00408, gates on heads and FFN dimensions, Lagrangian with
    a linearly warmed-up target).

    Recipe keys:
        structures: subset of ``["heads", "neurons"]`` (default both).
        final_sparsity: fraction in [0, 1) of the gated structures' weights to remove: a head holds
            ``4 * hidden * head_dim`` weights (its Q, K, V rows and its ``attention.output.dense``
            columns), a neuron ``2 * hidden`` (its ``intermediate.dense`` row and ``output.dense``
            column); with both structures that is every encoder Linear weight of the gated layers
            (biases not counted).
        start_epoch, end_epoch: the gates live and train in ``[start_epoch, end_epoch)``; at
            ``end_epoch`` (required, after ``start_epoch``) the structure is fixed.
        warmup_end_epoch: the target rises linearly from 0 at ``start_epoch`` to ``final_sparsity``
            here (in ``[start_epoch, end_epoch]``; default their midpoint).
        reg_learning_rate: learning rate of the gates' ``log_alpha`` and of the two Lagrange
            multipliers (their own AdamW, no weight decay; default 0.01).
        droprate_init: initial drop probability; ``log_alpha`` starts at
            ``log(1 - p) - log(p) + N(0, 0.01^2)`` (default 0.5).
        temperature: the hard-concrete temperature beta (default 2/3).
        layers: encoder layers to gate by module name (e.g. ``bert.encoder.layer.3``, original
            names as in :class:`LayerPruningModifier`); default every encoder layer.
        update_frequency, log_types: SparseML keys, accepted; no effect. ``params`` is not used
            (the gated weights follow from ``layers`` and ``structures``).

    The gates and multipliers are not parameters of the model: the training optimizer, its weight
    decay and its gradient clipping never see them. The modifier steps its own AdamW in
    :meth:`on_gradients` (gradient ascent on the multipliers through a hook that negates their
    gradient). The recipe order does not matter next to a :class:`DistillationModifier`: the session
    applies its loss (which replaces the loss at ``hardness`` 1.0) before every additive term. Should a
    loss modifier still drop the Lagrangian term, the first step raises a :class:`RecipeError`.

    In eval mode the gates are :func:`hard_concrete_deterministic` over all gated layers of a structure,
    with the counts of :func:`closed_counts` at the scheduled target (:meth:`target_sparsity` of the
    current epoch; ``final_sparsity`` once the warm-up is over): the lowest-``log_alpha`` heads and neurons
    making up the target fraction of the gated weights are closed, split between the kinds as CoFi's
    expected counts split them. At ``end_epoch`` exactly these are removed and the others' soft values
    folded in, so the fixed model computes what the gated model computed in eval and meets
    ``final_sparsity`` (within half a head and half a neuron) even if the Lagrangian has not converged;
    fixing then logs a warning (expected sparsity more than ``CONVERGENCE_TOLERANCE`` off the target).

    Checkpoints: a ``checkpoint-N`` folder saved while the gates are live holds the ungated weights; the
    gates and multipliers are in its ``sparsebert_state.pt``, which ``--resume`` loads. Evaluating or
    exporting such a folder directly gives the dense model, not the gated one. The final model (and any
    checkpoint saved after ``end_epoch``) has the structure fixed and the gates folded in.

    Next to other modifiers (a modifier does not see the rest of the recipe):

    * :class:`~sparsebert.modifiers.quantization.QuantizationModifier` starting inside the gated window
      replaces the hooked Linear layers; a pre-hook on each gated encoder layer re-registers the gates on
      the new modules, so they stay in the forward pass.
    * :class:`~sparsebert.modifiers.pruning.obs.OBSPruningModifier` pruning inside the gated window: its
      gradient sampler's extra forward/backward passes run with sampled gates and also accumulate into
      ``log_alpha.grad``, so the next gate step sees those gradients too (without the Lagrangian term, and
      the Fisher is estimated on a randomly gated model). :class:`~sparsebert.session.RecipeSession`
      therefore refuses an OBS ``[start_epoch, end_epoch]`` that overlaps ``[start_epoch, end_epoch)`` of
      this modifier (``RecipeError``).

    Approximations:

    * fp16 (GradScaler): the gates' gradients keep the loss scale (the training optimizer's unscale does
      not see them). AdamW is invariant to a constant scale (up to ``eps``), not across a change of the
      scale; and a step the training optimizer skips for an overflow in the model's gradients still steps
      the gates when their own gradients are finite.
    * Under torch.distributed the gates are broadcast from rank 0 in :meth:`initialize`; each rank then
      samples its own gates per batch (like dropout) and the gate gradients are averaged over ranks.

    Example::

        - !L0StructuredPruningModifier
          structures: [heads, neurons]
          final_sparsity: 0.5
          start_epoch: 0.0
          warmup_end_epoch: 1.0
          end_epoch: 2.0
    """

    params: Optional[Union[str, list[str]]] = None
    structures: list[str] = list(STRUCTURES)
    final_sparsity: float
    end_epoch: float
    warmup_end_epoch: Optional[float] = None
    reg_learning_rate: float = 0.01
    droprate_init: float = 0.5
    temperature: float = 2.0 / 3.0
    layers: Optional[list[str]] = None

    _layers: list = PrivateAttr(default_factory=list)  # (module name, encoder layer module)
    _sizes: dict = PrivateAttr(default_factory=dict)  # hidden, heads, head_dim, intermediate
    _log_alpha: dict = PrivateAttr(default_factory=dict)  # structure -> leaf tensor [layers, count]
    _lambdas: Optional[torch.Tensor] = PrivateAttr(None)  # [2]: lambda1, lambda2
    _reg_optimizer: Optional[torch.optim.Optimizer] = PrivateAttr(None)
    _pending_optimizer_state: Optional[dict] = PrivateAttr(None)
    _hooks: list = PrivateAttr(default_factory=list)  # every live hook handle (layer guards and gates); empty = gates off
    _gate_hooks: dict = PrivateAttr(default_factory=dict)  # (structure, layer row) -> (hooked module, handle)
    _warned_no_term: bool = PrivateAttr(False)
    _fixed: bool = PrivateAttr(False)
    _epoch: float = PrivateAttr(0.0)
    _term_added: bool = PrivateAttr(False)  # the Lagrangian term went into a loss since the last step
    _eval_gates: dict = PrivateAttr(default_factory=dict)  # deterministic_gates() result ...
    _eval_gates_key: Optional[tuple] = PrivateAttr(None)  # ... and the gate/epoch state it was computed for

    # -- validation ------------------------------------------------------------------------
    @field_validator("params")
    @classmethod
    def _no_params(cls, v):
        if v is not None:
            raise ValueError("not used: the gated weights follow from `layers` and `structures`")
        return v

    @field_validator("structures")
    @classmethod
    def _known_structures(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"structures must name at least one of {list(STRUCTURES)}")
        for s in v:
            if s not in STRUCTURES:
                raise ValueError(f"unknown structure {s!r}; expected a subset of {list(STRUCTURES)}")
        if len(set(v)) != len(v):
            raise ValueError("structures lists an entry twice")
        return [s for s in STRUCTURES if s in v]

    @field_validator("final_sparsity")
    @classmethod
    def _in_unit_interval(cls, v: float) -> float:
        return check_sparsity(v)

    @field_validator("end_epoch")
    @classmethod
    def _after_start(cls, v: float, info) -> float:
        start = info.data.get("start_epoch", 0.0)
        if v <= start:
            raise ValueError(f"end_epoch must be after start_epoch ({start}): the gates train in [start_epoch, end_epoch)")
        return float(v)

    @field_validator("warmup_end_epoch")
    @classmethod
    def _in_window(cls, v: Optional[float], info) -> Optional[float]:
        if v is None:
            return v
        start, end = info.data.get("start_epoch", 0.0), info.data.get("end_epoch")
        if v < start or (end is not None and v > end):
            raise ValueError(f"warmup_end_epoch must be in [start_epoch, end_epoch] = [{start}, {end}]")
        return float(v)

    @field_validator("reg_learning_rate", "temperature")
    @classmethod
    def _positive(cls, v: float, info) -> float:
        if not v > 0:
            raise ValueError(f"{info.field_name} must be > 0")
        return float(v)

    @field_validator("droprate_init")
    @classmethod
    def _open_unit_interval(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError("droprate_init must be in (0, 1)")
        return float(v)

    @field_validator("layers")
    @classmethod
    def _non_empty(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        if v is not None and not v:
            raise ValueError("layers must name at least one layer (leave it out for all encoder layers)")
        return v

    @property
    def warmup_end(self) -> float:
        """``warmup_end_epoch``, or the midpoint of ``start_epoch`` and ``end_epoch`` when not set."""
        return self.warmup_end_epoch if self.warmup_end_epoch is not None else (self.start_epoch + self.end_epoch) / 2

    # -- structure -----------------------------------------------------------------------
    def apply_structure(self, state: ModifierState) -> None:
        """Find the gated layers, check they are BERT layers of one shape, create the gates.

        ``log_alpha`` (float32, CPU until :meth:`initialize`) is ``[num layers, num heads]`` and
        ``[num layers, intermediate size]``; the multipliers start at 0.

        Raises:
            RecipeError: ``params`` is given; a ``layers`` entry is not a module of the model, or not a
                BERT layer (``attention.self.query/key/value``, ``attention.output.dense``,
                ``intermediate.dense``, ``output.dense`` Linear layers); no encoder layers are found;
                the gated layers differ in shape.
        """
        model = state.model
        modules = dict(model.named_modules())
        if self.layers is None:
            lists = [(n, m) for n, m in modules.items() if n.endswith("encoder.layer") and isinstance(m, torch.nn.ModuleList)]
            if not lists:
                raise self.error("the model has no BERT encoder layers (no `encoder.layer` ModuleList)", "layers", None)
            self._layers = [(f"{lists[0][0]}.{i}", layer) for i, layer in enumerate(lists[0][1])]
        else:
            self._layers = []
            for name in self.layers:
                if name not in modules:
                    raise self.error("not a module of the model", "layers", name)
                self._layers.append((name, modules[name]))
        sizes = None
        for name, layer in self._layers:
            lin = {p: _linear(layer, p) for p in _LINEARS}
            missing = [p for p, m in lin.items() if m is None]
            if missing:
                raise self.error(f"not a BERT encoder layer (no Linear {missing[0]})", "layers", name)
            heads = getattr(layer.attention.self, "num_attention_heads", None)
            all_head = lin["attention.self.query"].out_features
            if not heads or all_head % heads:
                raise self.error(f"cannot split {all_head} attention features into {heads} heads", "layers", name)
            layer_sizes = {"hidden": lin["attention.self.query"].in_features, "heads": heads, "head_dim": all_head // heads,
                           "intermediate": lin["intermediate.dense"].out_features}
            if lin["attention.output.dense"].in_features != all_head or lin["output.dense"].in_features != layer_sizes["intermediate"]:
                raise self.error("attention.output.dense / output.dense inputs do not match the heads / intermediate size", "layers", name)
            if sizes is not None and layer_sizes != sizes:
                raise self.error(f"gated layers differ in shape ({layer_sizes} vs {sizes})", "layers", name)
            sizes = layer_sizes
        self._sizes = sizes
        names = {id(p): n for n, p in model.named_parameters()}
        self._params = {names[id(p)]: p for p in self._gated_params()}
        mean = math.log(1.0 - self.droprate_init) - math.log(self.droprate_init)
        counts = {"heads": sizes["heads"], "neurons": sizes["intermediate"]}
        self._log_alpha = {s: torch.nn.Parameter(torch.empty(len(self._layers), counts[s]).normal_(mean, 1e-2)) for s in self.structures}
        self._lambdas = torch.nn.Parameter(torch.zeros(2))
        self._lambdas.register_hook(torch.neg)  # ascent on the multipliers by the same descent step

    def _gated_params(self) -> list[torch.nn.Parameter]:
        """The weights (and biases) of the gated layers that fixing the structure may zero or scale."""
        out = []
        for _, layer in self._layers:
            paths = []
            if "heads" in self.structures:
                paths += ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]
            if "neurons" in self.structures:
                paths += ["intermediate.dense", "output.dense"]
            for p in paths:
                lin = _linear(layer, p)
                out.append(lin.weight)
                if lin.bias is not None and not p.endswith(("attention.output.dense", "output.dense")):
                    out.append(lin.bias)  # biases of the rows a structure owns; outputs' biases are shared
        return out

    def rebind(self, model: torch.nn.Module) -> None:
        """After a :class:`LayerPruningModifier` dropped layers: forget the gates of the dropped layers
        and rename the rest (parameters by identity).

        Raises:
            RecipeError: every gated layer was dropped.
        """
        super().rebind(model)
        present = {id(m): n for n, m in model.named_modules()}
        keep = [i for i, (_, layer) in enumerate(self._layers) if id(layer) in present]
        if not keep:
            raise self.error("every gated layer is dropped by a LayerPruningModifier", "layers", self.layers)
        self._layers = [(present[id(self._layers[i][1])], self._layers[i][1]) for i in keep]
        self._log_alpha = {s: torch.nn.Parameter(la.detach()[keep].clone()) for s, la in self._log_alpha.items()}

    # -- gates -----------------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        """Module names of the gated layers (current names), in gate-row order."""
        return [n for n, _ in self._layers]

    @property
    def log_alpha(self) -> dict[str, torch.Tensor]:
        """``{"heads": [layers, heads], "neurons": [layers, intermediate]}`` (float32; the gated structures only)."""
        return dict(self._log_alpha)

    @property
    def lambdas(self) -> torch.Tensor:
        """The Lagrange multipliers ``[lambda1, lambda2]`` (float32, shape ``[2]``)."""
        return self._lambdas

    @property
    def fixed(self) -> bool:
        """True once the structure is fixed (gates folded into the weights, masks in place)."""
        return self._fixed

    def _weights_per(self) -> dict[str, int]:
        """Encoder Linear weights one head / one neuron holds (biases not counted)."""
        s = self._sizes
        return {"heads": 4 * s["hidden"] * s["head_dim"], "neurons": 2 * s["hidden"]}

    def expected_sparsity(self) -> torch.Tensor:
        """``1 - E[kept weights] / total`` over the gated structures: a 0-d float32 tensor,
        differentiable in ``log_alpha`` (``E`` from :func:`hard_concrete_prob_nonzero`)."""
        per = self._weights_per()
        kept, total = 0.0, 0
        for s, la in self._log_alpha.items():
            kept = kept + hard_concrete_prob_nonzero(la, self.temperature).sum() * per[s]
            total += la.numel() * per[s]
        return 1.0 - kept / total

    @torch.no_grad()
    def deterministic_gates(self) -> dict[str, torch.Tensor]:
        """Test-time gates per structure, ``[layers, count]`` float32: :func:`hard_concrete_deterministic`
        over all gated layers of the structure together, closing the :func:`closed_counts` at
        :meth:`target_sparsity` of the current epoch (what the eval hooks apply and fixing folds in).

        Computed once per change of the gates or the epoch: every eval hook of a forward reads the same
        result (the key holds each ``log_alpha``'s identity, storage and in-place version counter).
        """
        key = (self._epoch, *((id(la), la.data_ptr(), la._version) for la in self._log_alpha.values()))
        if self._eval_gates_key != key:
            n = closed_counts(self._log_alpha, self._weights_per(), self.target_sparsity(self._epoch), self.temperature)
            self._eval_gates = {s: hard_concrete_deterministic(la, self.temperature, n_closed=n[s])
                                for s, la in self._log_alpha.items()}
            self._eval_gates_key = key
        return self._eval_gates

    @property
    def sparsity(self) -> float:
        """Fraction of the gated structures' weights whose deterministic gate is 0 (after fixing: the
        fraction removed); the current target up to rounding (at most half a gate per structure)."""
        per = self._weights_per()
        z = self.deterministic_gates()
        removed = sum(int((g == 0).sum()) * per[s] for s, g in z.items())
        return removed / sum(g.numel() * per[s] for s, g in z.items())

    def target_sparsity(self, epoch: float) -> float:
        """Scheduled target at ``epoch``: 0 before ``start_epoch``, linear to ``final_sparsity`` at
        :attr:`warmup_end`, constant after."""
        if epoch < self.start_epoch:
            return 0.0
        span = self.warmup_end - self.start_epoch
        frac = 1.0 if span <= 0 else min(max((epoch - self.start_epoch) / span, 0.0), 1.0)
        return self.final_sparsity * frac

    def _gate(self, structure: str, index: int, training: bool) -> torch.Tensor:
        """Gates of layer row ``index`` of ``structure``: sampled in training, deterministic in eval (ranked
        over all gated layers: :meth:`deterministic_gates`, computed once for all the hooks)."""
        if training:
            return hard_concrete_sample(self._log_alpha[structure][index], self.temperature)
        return self.deterministic_gates()[structure][index]

    def _gate_heads(self, index: int, module: torch.nn.Module, args: tuple) -> tuple:
        """Pre-hook of ``attention.output.dense``: context ``[B, L, H * d]`` -> ``[B, L, H, d]`` times ``z_head``."""
        x = args[0]
        z = self._gate("heads", index, module.training).to(x.dtype)
        heads = self._sizes["heads"]
        x = (x.unflatten(-1, (heads, -1)) * z[:, None]).flatten(-2)
        return (x, *args[1:])

    def _gate_neurons(self, index: int, module: torch.nn.Module, args: tuple) -> tuple:
        """Pre-hook of ``output.dense`` (FFN2): activations ``[B, L, I]`` times ``z_neuron``."""
        x = args[0]
        return (x * self._gate("neurons", index, module.training).to(x.dtype), *args[1:])

    def install_hooks(self) -> None:
        """Put the gates into the forward pass (idempotent): a guard pre-hook on each gated encoder layer
        (:meth:`_sync_gate_hooks`) and the gate pre-hooks on its ``attention.output.dense`` / ``output.dense``."""
        if self._hooks:
            return
        for i, (_, layer) in enumerate(self._layers):
            self._hooks.append(layer.register_forward_pre_hook(partial(self._sync_gate_hooks, i)))
            self._sync_gate_hooks(i)

    def _sync_gate_hooks(self, index: int, *_: Any) -> None:
        """Make sure the gate pre-hooks of layer row ``index`` sit on the modules now at
        ``attention.output.dense`` / ``output.dense``, re-registering them on a replaced module.

        A :class:`~sparsebert.modifiers.quantization.QuantizationModifier` starting inside the gated window
        swaps every ``nn.Linear`` for a new ``QuantLinear`` that has none of these hooks; this runs as a
        forward pre-hook of the encoder layer (which is not replaced), so the gates act in the same forward
        whatever the recipe order. Costs one identity check per structure per layer forward.
        """
        layer = self._layers[index][1]
        for s in self.structures:
            module = layer.get_submodule(_GATED_INPUT[s])
            old = self._gate_hooks.get((s, index))
            if old is not None and old[0] is module:
                continue
            if old is not None:
                old[1].remove()
                self._hooks.remove(old[1])
            fn = self._gate_heads if s == "heads" else self._gate_neurons
            handle = module.register_forward_pre_hook(partial(fn, index))
            self._gate_hooks[(s, index)] = (module, handle)
            self._hooks.append(handle)

    def remove_hooks(self) -> None:
        """Take the gates out of the forward pass (idempotent)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._gate_hooks = {}

    @torch.no_grad()
    def fix_structure(self) -> None:
        """Make the plain model compute what the gated model computes in eval mode, then hold it.

        With deterministic gates ``z`` (:meth:`deterministic_gates`, the eval hooks' gates): a head with ``z == 0`` loses its Q/K/V weight rows and biases
        and its ``attention.output.dense`` columns; a neuron with ``z == 0`` its ``intermediate.dense``
        row and bias and its ``output.dense`` column. Kept heads' / neurons' ``z`` are multiplied into
        their ``attention.output.dense`` / ``output.dense`` columns. The hooks are removed and the
        masks (``True`` = kept) are re-applied after every later optimizer step.

        The removed fraction is the scheduled target (``final_sparsity`` at ``end_epoch``) up to rounding,
        whatever the expected sparsity; when that is more than ``CONVERGENCE_TOLERANCE`` off the target, a
        warning says the Lagrangian had not converged.
        """
        target = self.target_sparsity(self._epoch)
        expected = float(self.expected_sparsity().detach())
        if abs(expected - target) > CONVERGENCE_TOLERANCE:
            logger.warning("L0 structured pruning: the Lagrangian had not converged at epoch %.3f: expected sparsity %.4f, "
                           "target %.4f; fixing removes the target anyway, the heads and neurons with the lowest "
                           "log_alpha, so the ranking comes from log_alpha alone (use a larger reg_learning_rate or a "
                           "longer gated window, end_epoch - warmup_end_epoch)", self._epoch, expected, target)
        names = {id(p): n for n, p in self._params.items()}
        z = self.deterministic_gates()
        d = self._sizes["head_dim"]
        masks: dict[str, torch.Tensor] = {}

        def rows(lin: torch.nn.Linear, keep: torch.Tensor) -> None:
            masks[names[id(lin.weight)]] = keep[:, None].expand_as(lin.weight).clone()
            if lin.bias is not None:
                masks[names[id(lin.bias)]] = keep.clone()

        def columns(lin: torch.nn.Linear, scale: torch.Tensor) -> None:
            w = lin.weight
            w.mul_(scale.to(device=w.device, dtype=w.dtype)[None, :])
            masks[names[id(w)]] = (scale != 0)[None, :].expand_as(w).to(w.device).clone()

        for i, (_, layer) in enumerate(self._layers):
            if "heads" in z:
                scale = z["heads"][i].repeat_interleave(d)  # [H * d]
                keep = (scale != 0).to(layer.attention.self.query.weight.device)
                for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
                    rows(lin, keep)
                columns(layer.attention.output.dense, scale)
            if "neurons" in z:
                scale = z["neurons"][i]
                rows(layer.intermediate.dense, (scale != 0).to(layer.intermediate.dense.weight.device))
                columns(layer.output.dense, scale)
        self._masks = masks
        self.apply_masks()
        self.remove_hooks()
        self._fixed = True
        kept = {s: int((g > 0).sum()) for s, g in z.items()}
        logger.info("L0 structured pruning: structure fixed at epoch %.3f: %s; %.4f of the gated weights removed (target %.4f)",
                    self._epoch, ", ".join(f"{kept[s]}/{z[s].numel()} {s} kept" for s in z), self.sparsity, target)

    def _reg_params(self) -> list[torch.Tensor]:
        return [*self._log_alpha.values(), self._lambdas]

    # -- lifecycle -------------------------------------------------------------------------
    def initialize(self, state: ModifierState) -> None:
        """Move the gates to the model's device and build their AdamW (``reg_learning_rate``, no weight
        decay), restoring its state on resume. Under torch.distributed (initialized) ``log_alpha`` and the
        multipliers are broadcast from rank 0: each process drew its own ``log_alpha`` noise.

        Raises:
            RecipeError: no training optimizer (``oneshot``, or a session started without one): the gates
                are learned, so this modifier needs a training run (``sparsebert train``).
        """
        if state.optimizer is None:
            raise self.error("L0 gates are learned during training: this modifier needs a training run "
                             "(sparsebert train), not oneshot or a session without an optimizer")
        device = next(state.model.parameters()).device
        for p in self._reg_params():
            p.data = p.data.to(device)
        if dist.is_available() and dist.is_initialized():
            for p in self._reg_params():  # the same gates on every rank (NCCL needs them on the device: done above)
                dist.broadcast(p.data, src=0)
        self._reg_optimizer = torch.optim.AdamW(self._reg_params(), lr=self.reg_learning_rate, weight_decay=0.0)
        if self._pending_optimizer_state is not None:
            self._reg_optimizer.load_state_dict(self._pending_optimizer_state)
            self._pending_optimizer_state = None

    def update(self, state: ModifierState) -> None:
        """Gates on at ``start_epoch``; structure fixed at ``end_epoch``; masks re-applied after that."""
        self._epoch = state.epoch
        if self._fixed:
            self.apply_masks()
        elif self.ended(state.epoch):
            self.fix_structure()
        elif state.epoch >= self.start_epoch:
            self.install_hooks()

    def modify_loss(self, state: ModifierState, loss: torch.Tensor, outputs: Any, inputs: dict) -> torch.Tensor:
        """While the gates live: ``loss + lambda1 * (s_exp - t) + lambda2 * (s_exp - t)^2`` (0-d), with
        ``s_exp`` = :meth:`expected_sparsity` and ``t`` = :meth:`target_sparsity`; the term is recorded as
        ``loss/l0_lagrangian``."""
        if not self._hooks:
            return loss
        gap = self.expected_sparsity() - self.target_sparsity(state.epoch)
        term = self._lambdas[0] * gap + self._lambdas[1] * gap * gap
        self._term_added = True
        state.record_loss("l0_lagrangian", term)
        return loss + term.to(loss.dtype)

    @torch.no_grad()
    def on_gradients(self, state: ModifierState) -> None:
        """Step the gates and multipliers (their gradients averaged over ranks under torch.distributed),
        then clear their gradients. A step with a non-finite gradient (fp16 overflow, which the training
        optimizer skips too) is skipped. Gate gradients without the Lagrangian term this step (a training
        loop that never calls :meth:`RecipeSession.modify_loss`, e.g. a Trainer subclass overriding
        ``compute_loss``) log a warning, once: the gates then train on the task loss alone.

        Raises:
            RecipeError: the Lagrangian term was added but its multipliers got no gradient: a loss modifier
                applied after this one replaced the loss (a safety net: the session applies distillation,
                which does so at ``hardness`` 1.0, before the additive terms).
        """
        if not self._hooks or self._reg_optimizer is None:
            return
        if not self._term_added and not self._warned_no_term and any(la.grad is not None for la in self._log_alpha.values()):
            self._warned_no_term = True
            logger.warning("L0 Lagrangian term was not added to the loss this step: the gates train on the task loss alone, "
                           "with no sparsity target; call RecipeSession.modify_loss on the training loss (a Trainer "
                           "subclass that overrides compute_loss must call it)")
        params = self._reg_params()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten() for g in grads])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
        # one host sync: was the step finite, and did the term's gradient arrive? (lambda1's gradient is
        # -(s_exp - t), so it is 0 only when s_exp == t or a later modifier multiplied the loss by 0)
        lost = (self.expected_sparsity() - self.target_sparsity(state.epoch)).abs() > 1e-6
        lost = lost & (flat[-2:] == 0).all() if self._term_added else torch.zeros_like(lost)
        finite, lost = torch.stack([torch.isfinite(flat).all(), lost.to(flat.device)]).tolist()
        self._term_added = False
        if lost:
            raise self.error("the L0 Lagrangian term got no gradient: a loss modifier applied after this one replaced "
                             "the loss it was given (RecipeSession.modify_loss applies DistillationModifier first; "
                             "a loss modifier that replaces the loss must run before the additive terms)")
        if finite:
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad = g.view_as(p).clone()
            self._reg_optimizer.step()
        self._reg_optimizer.zero_grad(set_to_none=True)

    def finalize(self, state: ModifierState) -> None:
        """Training ended: fix the structure if the gates were live and it is not fixed yet (training
        stopped before ``end_epoch``), so the saved model computes what the gated model computed in eval.
        A run that ended before ``start_epoch`` leaves the model as it is."""
        if not self._fixed:
            if self._hooks:
                self.fix_structure()
            else:
                logger.warning("L0 structured pruning: training ended before start_epoch %s; no structure removed", self.start_epoch)
        self.remove_hooks()

    # -- logging and state -----------------------------------------------------------------
    @torch.no_grad()
    def log_values(self) -> dict[str, float]:
        """``l0/expected_sparsity``, ``l0/target`` (fractions), ``l0/lambda1``, ``l0/lambda2``, and the
        number of heads / neurons whose deterministic gate (:meth:`deterministic_gates`, what fixing now would keep)
        is open (``l0/heads_kept``, ``l0/neurons_kept``)."""
        logs = {"l0/expected_sparsity": round(float(self.expected_sparsity()), 5),
                "l0/target": round(self.target_sparsity(self._epoch), 5),
                "l0/lambda1": round(float(self._lambdas[0]), 6), "l0/lambda2": round(float(self._lambdas[1]), 6)}
        for s, g in self.deterministic_gates().items():
            logs[f"l0/{s}_kept"] = int((g > 0).sum())
        return logs

    def state_dict(self) -> dict[str, Any]:
        """Masks plus ``log_alpha`` (structure -> float32 CPU tensor), ``lambdas`` ([2]), ``fixed``
        (bool) and ``optimizer`` (the gates' AdamW state, or ``None`` before training)."""
        opt = self._reg_optimizer.state_dict() if self._reg_optimizer is not None else self._pending_optimizer_state
        return {**super().state_dict(), "log_alpha": {s: la.detach().cpu().clone() for s, la in self._log_alpha.items()},
                "lambdas": self._lambdas.detach().cpu().clone(), "fixed": self._fixed, "optimizer": opt}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (values copied into the existing gate tensors; the AdamW state
        is loaded now or, before :meth:`initialize`, there).

        Raises:
            RecipeError: a mask names a parameter this modifier does not own; the gates saved are for other
                structures or another shape.
            KeyError: ``state`` lacks ``log_alpha``, ``lambdas`` or ``fixed``.
        """
        saved = state["log_alpha"]
        if set(saved) != set(self._log_alpha):
            raise self.error(f"checkpoint gates are for {sorted(saved)}, the recipe gates {sorted(self._log_alpha)}", "structures", self.structures)
        for s, la in self._log_alpha.items():
            if tuple(saved[s].shape) != tuple(la.shape):
                raise self.error(f"checkpoint {s} gates have shape {tuple(saved[s].shape)}, the model needs {tuple(la.shape)}", "layers", self.layers)
        super().load_state_dict(state)
        for s, la in self._log_alpha.items():
            la.copy_(saved[s])
        self._lambdas.copy_(state["lambdas"])
        self._fixed = bool(state["fixed"])
        if self._fixed:
            self.remove_hooks()
        if state.get("optimizer") is not None:
            if self._reg_optimizer is not None:
                self._reg_optimizer.load_state_dict(state["optimizer"])
            else:
                self._pending_optimizer_state = state["optimizer"]
