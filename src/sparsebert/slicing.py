"""Physical removal of pruned attention heads and FFN neurons: structured sparsity -> smaller dense shapes.

Structured pruning (:class:`~sparsebert.modifiers.pruning.l0.L0StructuredPruningModifier`, FLOP /
CoFi: Wang et al. 2020, arXiv:1910.04732; Xia et al. 2022, arXiv:2204.00408) leaves whole heads
and FFN neurons as zeros. Zeros in a dense layer still cost their multiply-adds; removing the
structures makes every encoder Linear smaller, and dense BLAS (ONNX Runtime, the engine's dense
path) runs the smaller shapes at full speed. This is what nn_pruning's ``optimize_model`` and the
old Hugging Face ``prune_heads`` did; transformers 5 dropped ``prune_heads``, so it is done here.

Which structures go (exact by construction, so the sliced model computes the same outputs up to
float summation order):

* head ``h`` of a layer: every column of ``attention.output.dense.weight`` that reads its context
  (``[:, h*d:(h+1)*d]``, ``d`` = head size) is zero, so nothing the head computes reaches the
  output, whatever its query/key/value rows hold. Its query/key/value rows and biases go with it.
* FFN neuron ``j`` of a layer: column ``j`` of ``output.dense.weight`` is zero. Row ``j`` of
  ``intermediate.dense`` (and its bias) goes with it.

At least one head and one neuron stay in each layer (zero-width tensors break ONNX shape
inference and several kernels); a layer whose heads are all dead keeps one, which adds nothing.

The sliced model is for inference only: its layers no longer match ``config.json``
(``num_attention_heads``, ``intermediate_size`` are per layer now), so it is not saved with
``save_pretrained``. ``sparsebert export`` slices before tracing the ONNX graph and
``sparsebert.engine.compile`` slices its own copy; both start from the unsliced checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["SliceReport", "find_dead_structures", "dead_structures_from_tensors", "slice_structures", "sliced_copy",
           "slice_quantization_state"]


@dataclasses.dataclass
class SliceReport:
    """What :func:`slice_structures` removed.

    Attributes:
        heads_removed: per encoder layer, the removed head indices (original numbering).
        neurons_removed: per encoder layer, the number of removed FFN neurons.
        heads_total / neurons_total: per encoder layer, the counts before slicing.
        kept_rows: module name (as in ``model.named_modules()``) -> int64 indices of the output rows
            kept in that Linear (query/key/value/intermediate of sliced layers only): what per-channel
            quantization scales must be indexed with (:func:`slice_quantization_state`).
        params_before / params_after: parameter counts of the whole model.
    """

    heads_removed: list[list[int]]
    neurons_removed: list[int]
    heads_total: list[int]
    neurons_total: list[int]
    kept_rows: dict[str, torch.Tensor]
    params_before: int
    params_after: int

    @property
    def empty(self) -> bool:
        """``True`` when nothing was removed."""
        return not any(self.heads_removed) and not any(self.neurons_removed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for ``manifest.json``): totals and per-layer kept counts."""
        return {
            "heads_removed": sum(len(h) for h in self.heads_removed),
            "heads_total": sum(self.heads_total),
            "neurons_removed": sum(self.neurons_removed),
            "neurons_total": sum(self.neurons_total),
            "heads_kept_per_layer": [t - len(h) for t, h in zip(self.heads_total, self.heads_removed)],
            "neurons_kept_per_layer": [t - n for t, n in zip(self.neurons_total, self.neurons_removed)],
            "params_before": self.params_before,
            "params_after": self.params_after,
        }


def _encoder_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(module name, layer)`` of every BERT encoder layer. Raises ValueError for a non-BERT layout."""
    names = {id(m): n for n, m in model.named_modules()}
    base = getattr(model, getattr(model, "base_model_prefix", "bert"), model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None:
        raise ValueError(f"slicing needs a BERT-layout model (encoder.layer); got {type(model).__name__}")
    out = []
    for layer in layers:
        att = getattr(layer, "attention", None)
        if att is None or not hasattr(att, "self") or not hasattr(layer, "intermediate"):
            raise ValueError(f"slicing needs BERT encoder layers (attention.self, intermediate, output); got {type(layer).__name__}")
        out.append((names[id(layer)], layer))
    return out


def find_dead_structures(model: torch.nn.Module) -> tuple[list[list[int]], list[list[int]]]:
    """Heads and FFN neurons whose output weights are all exactly zero, per encoder layer.

    Args:
        model: a Hugging Face BERT model (any head), FP32/BF16/FP16 weights.

    Returns:
        ``(heads, neurons)``: per layer, sorted head indices and neuron indices that are dead
        (see the module docstring for the criterion). No "keep one" rule is applied here.

    Raises:
        ValueError: ``model`` is not a BERT-layout encoder.
    """
    heads, neurons = [], []
    for _, layer in _encoder_layers(model):
        h, n = _dead_in_layer(layer.attention.output.dense.weight.detach(), layer.output.dense.weight.detach(),
                              layer.attention.self.attention_head_size)
        heads.append(h)
        neurons.append(n)
    return heads, neurons


def _dead_in_layer(w_o: torch.Tensor, w_2: torch.Tensor, head_size: int) -> tuple[list[int], list[int]]:
    """Dead heads (all-zero ``head_size``-wide column groups of ``w_o`` ``[H, heads * d]``) and dead
    neurons (all-zero columns of ``w_2`` ``[H, intermediate]``) of one layer."""
    col_zero = (w_o == 0).all(dim=0)
    heads = [h for h in range(w_o.shape[1] // head_size) if bool(col_zero[h * head_size:(h + 1) * head_size].all())]
    return heads, torch.nonzero((w_2 == 0).all(dim=0)).flatten().tolist()


_ATT_OUT = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.attention\.output\.dense\.weight$")
_FFN_OUT = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.output\.dense\.weight$")


def dead_structures_from_tensors(tensors: Mapping[str, torch.Tensor], head_size: int) -> dict[str, Any]:
    """:func:`find_dead_structures` on a checkpoint's tensors (no model built), as a summary.

    Args:
        tensors: parameter name -> tensor (``sparsebert.sparsity.load_checkpoint_tensors``), BERT names
            (``...encoder.layer.N.attention.output.dense.weight``, ``...encoder.layer.N.output.dense.weight``).
        head_size: ``hidden_size // num_attention_heads`` of the checkpoint's config.

    Returns:
        ``{"heads_dead": int, "heads_total": int, "neurons_dead": int, "neurons_total": int,
        "heads_dead_per_layer": [int], "neurons_dead_per_layer": [int]}``; totals 0 when the names are not BERT's.
    """
    att = {int(m.group(1)): t for n, t in tensors.items() if (m := _ATT_OUT.search(n))}
    ffn = {int(m.group(1)): t for n, t in tensors.items() if (m := _FFN_OUT.search(n))}
    heads, neurons, h_total, n_total = [], [], 0, 0
    for i in sorted(set(att) & set(ffn)):
        h, n = _dead_in_layer(att[i], ffn[i], head_size)
        heads.append(len(h))
        neurons.append(len(n))
        h_total += att[i].shape[1] // head_size
        n_total += ffn[i].shape[1]
    return {"heads_dead": sum(heads), "heads_total": h_total, "neurons_dead": sum(neurons), "neurons_total": n_total,
            "heads_dead_per_layer": heads, "neurons_dead_per_layer": neurons}


def _sliced_linear(lin: torch.nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> torch.nn.Linear:
    """A new Linear holding ``lin``'s weight rows ``rows`` (outputs) and columns ``cols`` (inputs); same dtype/device."""
    w = lin.weight.detach()
    b = lin.bias.detach() if lin.bias is not None else None
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
        b = b.index_select(0, rows.to(w.device)) if b is not None else None
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    new.train(lin.training)
    return new


def _kept(total: int, dead: list[int]) -> list[int]:
    """Indices in ``range(total)`` not in ``dead``; at least the first one when all are dead."""
    dead_set = set(dead)
    kept = [i for i in range(total) if i not in dead_set]
    return kept or [0]


def slice_structures(model: torch.nn.Module) -> SliceReport:
    """Remove dead attention heads and FFN neurons from ``model`` in place (inference only).

    Dead = all-zero output weights (:func:`find_dead_structures`); at least one head and one neuron
    stay per layer. The attention's ``num_attention_heads`` / ``all_head_size`` follow the new
    shapes (Hugging Face BERT attention reshapes with ``-1`` heads, so its forward runs unchanged).
    Outputs equal the unsliced model's up to float summation order (~1e-6 relative).

    Args:
        model: a Hugging Face BERT model (``BertModel`` or a task model). Do not train or
            ``save_pretrained`` it afterwards: its config no longer describes its layers.

    Returns:
        A :class:`SliceReport` (``report.empty`` when nothing was removed; the model is then untouched).

    Raises:
        ValueError: ``model`` is not a BERT-layout encoder.
    """
    return _slice(model, *find_dead_structures(model))


def sliced_copy(model: torch.nn.Module) -> tuple[torch.nn.Module, SliceReport]:
    """:func:`slice_structures` on a copy of ``model``, copied only when something is dead.

    Returns:
        ``(sliced, report)``: ``sliced`` is ``model`` itself (untouched) when nothing is dead, else a
        sliced deep copy; ``model`` is never modified, so it stays the unsliced reference.

    Raises:
        ValueError: ``model`` is not a BERT-layout encoder.
    """
    dead_heads, dead_neurons = find_dead_structures(model)
    target = copy.deepcopy(model) if any(dead_heads) or any(dead_neurons) else model
    return target, _slice(target, dead_heads, dead_neurons)


def _slice(model: torch.nn.Module, dead_heads: list[list[int]], dead_neurons: list[list[int]]) -> SliceReport:
    """Slice the given dead heads / neurons (per layer, from :func:`find_dead_structures`) out of ``model`` in place."""
    params_before = sum(p.numel() for p in model.parameters())
    report = SliceReport([], [], [], [], {}, params_before, params_before)
    for (name, layer), heads, neurons in zip(_encoder_layers(model), dead_heads, dead_neurons):
        self_att = layer.attention.self
        d = self_att.attention_head_size
        n_heads = layer.attention.output.dense.weight.shape[1] // d
        n_inter = layer.output.dense.weight.shape[1]
        keep_h = _kept(n_heads, heads)
        keep_n = _kept(n_inter, neurons)
        report.heads_total.append(n_heads)
        report.neurons_total.append(n_inter)
        report.heads_removed.append(sorted(set(range(n_heads)) - set(keep_h)))
        report.neurons_removed.append(n_inter - len(keep_n))
        if len(keep_h) < n_heads:
            rows = torch.tensor([h * d + j for h in keep_h for j in range(d)], dtype=torch.long)
            for proj in ("query", "key", "value"):
                setattr(self_att, proj, _sliced_linear(getattr(self_att, proj), rows=rows))
                report.kept_rows[f"{name}.attention.self.{proj}"] = rows
            layer.attention.output.dense = _sliced_linear(layer.attention.output.dense, cols=rows)
            self_att.num_attention_heads = len(keep_h)
            self_att.all_head_size = len(keep_h) * d
        if len(keep_n) < n_inter:
            rows = torch.tensor(keep_n, dtype=torch.long)
            layer.intermediate.dense = _sliced_linear(layer.intermediate.dense, rows=rows)
            layer.output.dense = _sliced_linear(layer.output.dense, cols=rows)
            report.kept_rows[f"{name}.intermediate.dense"] = rows
    report.params_after = sum(p.numel() for p in model.parameters())
    return report


def slice_quantization_state(qstate: dict[str, Any], report: SliceReport) -> dict[str, Any]:
    """A copy of a ``quantization.json`` state whose per-channel weight scales follow the sliced rows.

    Per-output-channel ``weight_scale`` lists of the sliced query/key/value/intermediate Linears are
    indexed with ``report.kept_rows``; per-tensor scales, activation ranges and the column-sliced
    layers (their output channels are unchanged) are copied as they are.

    Args:
        qstate: the parsed ``quantization.json`` (``{"modules": {name: {"weight_scale": ...}}}``).
        report: the :func:`slice_structures` report of the same model.

    Raises:
        ValueError: a per-channel scale list shorter than the unsliced layer's rows (names the module).
    """
    out = copy.deepcopy(qstate)
    for name, rows in report.kept_rows.items():
        entry = out.get("modules", {}).get(name)
        if entry is None:
            continue
        scale = entry.get("weight_scale")
        if isinstance(scale, list) and len(scale) > 1:
            if int(rows.max()) >= len(scale):
                raise ValueError(f"quantization state module {name!r}: weight_scale has {len(scale)} channels, "
                                 f"fewer than the sliced layer's original rows")
            entry["weight_scale"] = [scale[i] for i in rows.tolist()]
    return out
