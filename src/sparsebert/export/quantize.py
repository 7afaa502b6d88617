"""Turn an FP32 ONNX export of a QAT model into an INT8 graph, with the scales learned in QAT.

Input: the FP32 graph, the initializer -> PyTorch parameter map (``map_initializers_to_params``)
and ``quantization.json`` (see :mod:`sparsebert.modifiers.quantization`). Weights are quantized
exactly as the fake-quant model did (symmetric, zero point 0, round half to even), so pruned zeros
stay zero. Two graph formats:

* ``qdq``: each Linear weight becomes an INT8 initializer + ``DequantizeLinear`` (per output
  channel); each quantized Linear input gets a ``QuantizeLinear -> DequantizeLinear`` pair with the
  QAT observer's static scale. ONNX Runtime fuses these into integer kernels.
* ``qoperator``: each ``MatMul``/``Gemm`` of a quantized Linear becomes ``QuantizeLinear`` (static
  scale; ``DynamicQuantizeLinear`` when QAT did not quantize the input) -> ``MatMulInteger`` ->
  ``Cast`` -> ``Mul`` by ``input_scale * weight_scale`` (-> ``Add`` bias for Gemm).

Embedding tables are exported as their fake-quantized FP32 values (:func:`bake_embeddings`; ONNX
``Gather`` has no INT8 kernel and a ``DequantizeLinear`` of the whole table would run on every call);
an embedding output quantizer becomes a Q/DQ pair after the ``Gather`` (when the lookup was not
constant-folded, e.g. position embeddings of a static-length export).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["quantize_onnx", "bake_embeddings", "check_quantization_state", "INT8_FORMATS"]

INT8_FORMATS = ("qdq", "qoperator")
# Fields of a quantization.json module entry that the export reads (see quantization_state).
_MODULE_FIELDS = ("type", "weight_bits", "per_channel", "weight_scale", "activation", "activation_bits", "activation_symmetric")
_ACTIVATION_FIELDS = ("min", "max", "scale", "zero_point", "qmin", "qmax")


def check_quantization_state(qstate: Any) -> None:
    """Check the structure of a parsed ``quantization.json`` before any export work.

    Checks: a ``modules`` object; per module the fields the export reads, ``type`` (``linear`` or
    ``embedding``), ``weight_bits`` (integer 2..8), ``weight_scale`` (a positive number or a
    non-empty list of them) and ``activation`` (``null`` or an object with min/max/scale/zero_point/
    qmin/qmax). The 8-bit activation rule is checked by :func:`quantize_onnx`.

    Raises:
        ValueError: the first problem, naming the module, the field and the value.
    """
    modules = qstate.get("modules") if isinstance(qstate, dict) else None
    if not isinstance(modules, dict):
        raise ValueError(f"field 'modules': expected an object of module name -> entry, got {modules!r}")
    for name, entry in modules.items():
        if not isinstance(entry, dict):
            raise ValueError(f"module {name!r}: expected an object, got {entry!r}")
        missing = [f for f in _MODULE_FIELDS if f not in entry]
        if missing:
            raise ValueError(f"module {name!r}: missing field(s) {', '.join(missing)}")
        if entry["type"] not in ("linear", "embedding"):
            raise ValueError(f"module {name!r} field 'type': expected 'linear' or 'embedding', got {entry['type']!r}")
        bits = entry["weight_bits"]
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"module {name!r} field 'weight_bits': expected an integer 2..8, got {bits!r}")
        scale = entry["weight_scale"]
        values = scale if isinstance(scale, list) else [scale]
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
            raise ValueError(f"module {name!r} field 'weight_scale': expected a positive number or a non-empty list of them, got {scale!r}")
        act = entry["activation"]
        if act is not None and (not isinstance(act, dict) or any(f not in act for f in _ACTIVATION_FIELDS)):
            raise ValueError(f"module {name!r} field 'activation': expected null or an object with {', '.join(_ACTIVATION_FIELDS)}, got {act!r}")


def _quantize(w: np.ndarray, scale: np.ndarray, axis: int | None, bits: int) -> np.ndarray:
    """``clamp(round_half_even(w * (1 / scale)), -qmax, qmax)`` as int8 (scale broadcast along ``axis``).

    Computed in float32 with the reciprocal, exactly as ``torch.fake_quantize_per_channel_affine``
    does, so that values next to a rounding tie land on the same integer as in QAT.
    """
    qmax = 2 ** (bits - 1) - 1
    s = scale.reshape(-1) if axis is None else scale.reshape([-1 if d == axis else 1 for d in range(w.ndim)])
    inv = (np.float32(1.0) / s.astype(np.float32)).astype(np.float32)
    return np.clip(np.round((w.astype(np.float32) * inv).astype(np.float32)), -qmax, qmax).astype(np.int8)


def bake_embeddings(model, qstate: dict[str, Any]) -> None:
    """Replace each quantized embedding table of ``model`` (in place) by its fake-quantized values.

    Done before ``torch.onnx.export``: a static-shape export constant-folds the position-embedding
    lookup into a new constant, which could no longer be matched and quantized afterwards.
    """
    import torch

    from ..modifiers.quantization import fake_quantize_weight

    with torch.no_grad():
        for name, entry in qstate["modules"].items():
            if entry["type"] == "embedding":
                weight = model.get_submodule(name).weight
                weight.copy_(fake_quantize_weight(weight, torch.tensor(entry["weight_scale"]), entry["weight_bits"]))


def quantize_onnx(proto, param_map: dict[str, tuple[str, bool]], qstate: dict[str, Any], fmt: str = "qdq"):
    """Rewrite ``proto`` (an ``onnx.ModelProto``, changed in place) to INT8 per ``qstate``.

    Args:
        param_map: initializer name -> (PyTorch parameter name, stored transposed?).
        qstate: the parsed ``quantization.json``.
        fmt: ``"qdq"`` or ``"qoperator"``.

    Returns:
        ``(proto, param_map)``; the map also names the new INT8 initializers.

    Raises:
        ValueError: unknown ``fmt``, activation bits other than 8, a quantized module whose weight is
            not an initializer of the graph, or (``qoperator``) a Gemm with transA/alpha/beta; the
            message names the module (or node), the field and the value. ``qstate`` is assumed to
            pass :func:`check_quantization_state`.
    """
    from onnx import helper, numpy_helper

    if fmt not in INT8_FORMATS:
        raise ValueError(f"int8_format must be one of {INT8_FORMATS}, got {fmt!r}")
    graph = proto.graph
    for i, node in enumerate(graph.node):  # nodes are keyed by name below: make names unique
        node.name = f"{node.name or node.op_type}_{i}"
    inits = {i.name: i for i in graph.initializer}
    by_module = {pname.rsplit(".", 1)[0]: (iname, transposed) for iname, (pname, transposed) in param_map.items() if pname.endswith(".weight")}
    new_map = dict(param_map)
    new_nodes: list = []  # (anchor node or None, [nodes to insert before it])
    replaced: dict[int, list] = {}

    for module, entry in qstate["modules"].items():
        if entry["type"] == "embedding":  # tables were baked before export (bake_embeddings)
            if entry["activation"] is not None and module in by_module:
                for gather in [n for n in graph.node if by_module[module][0] in n.input]:
                    _insert_qdq_after(graph, gather.output[0], entry["activation"], f"{module}.output", new_nodes, helper, numpy_helper)
            continue
        if module not in by_module:
            raise ValueError(f"module {module!r}: its weight is not an initializer of the ONNX graph (not a Linear of this model?)")
        iname, transposed = by_module[module]
        w = numpy_helper.to_array(inits[iname]).astype(np.float32)
        scale = np.asarray(entry["weight_scale"], dtype=np.float32)
        per_channel = scale.size > 1
        axis = (1 if transposed else 0) if per_channel else None
        act = entry["activation"]
        if act is not None and (entry["activation_bits"] != 8):
            raise ValueError(f"module {module!r} field 'activation_bits': only 8-bit activations can be exported, got {entry['activation_bits']!r}")
        q = _quantize(w, scale, axis, entry["weight_bits"])
        consumers = [n for n in graph.node if iname in n.input]
        graph.initializer.remove(inits[iname])
        qname = f"{iname}_quantized"
        new_map[qname] = param_map[iname]
        if fmt == "qdq" or not all(n.op_type in ("MatMul", "Gemm") for n in consumers):
            graph.initializer.extend([numpy_helper.from_array(q, qname), numpy_helper.from_array(scale if per_channel else scale.reshape(()), f"{iname}_scale"),
                                      numpy_helper.from_array(np.zeros(scale.shape if per_channel else (), np.int8), f"{iname}_zero_point")])
            kw = {"axis": axis} if per_channel else {}
            new_nodes.append((consumers[0], [helper.make_node("DequantizeLinear", [qname, f"{iname}_scale", f"{iname}_zero_point"], [iname], name=f"{module}.weight_dq", **kw)]))
            if act is not None:
                for node in consumers:
                    _insert_qdq_before(node, 0, act, f"{module}.input", new_nodes, graph, helper, numpy_helper)
            continue

        graph.initializer.append(numpy_helper.from_array(q if transposed else np.ascontiguousarray(q.T), qname))
        new_map[qname] = (param_map[iname][0], True)  # MatMulInteger takes [in, out]
        for k, node in enumerate(consumers):  # qoperator: MatMulInteger
            replaced[node.name] = _matmul_integer(node, qname, scale, act, f"{module}_{k}", graph, helper, numpy_helper)

    _rebuild(graph, new_nodes, replaced)
    return proto, new_map


def _qparams_init(graph, numpy_helper, act: dict[str, Any], prefix: str) -> tuple[str, str]:
    zp_dtype = np.int8 if act["qmin"] < 0 else np.uint8
    graph.initializer.extend([numpy_helper.from_array(np.array(act["scale"], np.float32), f"{prefix}_scale"),
                              numpy_helper.from_array(np.array(act["zero_point"], zp_dtype), f"{prefix}_zero_point")])
    return f"{prefix}_scale", f"{prefix}_zero_point"


def _insert_qdq_before(node, index: int, act, prefix: str, new_nodes, graph, helper, numpy_helper) -> None:
    """``node.input[index]`` -> QuantizeLinear -> DequantizeLinear -> ``node``."""
    s, z = _qparams_init(graph, numpy_helper, act, prefix)
    src = node.input[index]
    q = helper.make_node("QuantizeLinear", [src, s, z], [f"{prefix}_q"], name=f"{prefix}_quantize")
    dq = helper.make_node("DequantizeLinear", [f"{prefix}_q", s, z], [f"{prefix}_dq"], name=f"{prefix}_dequantize")
    node.input[index] = f"{prefix}_dq"
    new_nodes.append((node, [q, dq]))


def _insert_qdq_after(graph, tensor: str, act, prefix: str, new_nodes, helper, numpy_helper) -> None:
    """Every consumer of ``tensor`` reads it through QuantizeLinear -> DequantizeLinear."""
    consumers = [n for n in graph.node if tensor in n.input]
    s, z = _qparams_init(graph, numpy_helper, act, prefix)
    q = helper.make_node("QuantizeLinear", [tensor, s, z], [f"{prefix}_q"], name=f"{prefix}_quantize")
    dq = helper.make_node("DequantizeLinear", [f"{prefix}_q", s, z], [f"{prefix}_dq"], name=f"{prefix}_dequantize")
    for n in consumers:
        for i, name in enumerate(n.input):
            if name == tensor:
                n.input[i] = f"{prefix}_dq"
    new_nodes.append((consumers[0], [q, dq]))


def _matmul_integer(node, qname: str, scale, act, prefix, graph, helper, numpy_helper) -> list:
    """Nodes replacing one MatMul/Gemm by integer MatMul (weight ``qname``, ``[in, out]``) + rescale (+ bias)."""
    x, out = node.input[0], node.output[0]
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or not attrs.get("transB", 0):
            raise ValueError(f"ONNX node {node.name}: int8_format 'qoperator' supports only Gemm(transA=0, transB=1, alpha=beta=1), "
                             f"got transA={attrs.get('transA', 0)} transB={attrs.get('transB', 0)} alpha={attrs.get('alpha', 1.0)} beta={attrs.get('beta', 1.0)}")
    if act is not None:
        s, z = _qparams_init(graph, numpy_helper, act, f"{prefix}.input")
        nodes = [helper.make_node("QuantizeLinear", [x, s, z], [f"{prefix}_xq"], name=f"{prefix}_quantize")]
        x_scale = f"{prefix}_xscale"
        graph.initializer.append(numpy_helper.from_array((np.float32(act["scale"]) * scale).astype(np.float32), x_scale))
        mm_inputs = [f"{prefix}_xq", qname, z]
        rescale = [helper.make_node("Mul", [f"{prefix}_int_f", x_scale], [f"{prefix}_mm" if node.op_type == "Gemm" else out])]
    else:  # dynamic per-call input scale
        nodes = [helper.make_node("DynamicQuantizeLinear", [x], [f"{prefix}_xq", f"{prefix}_xs", f"{prefix}_xz"], name=f"{prefix}_dynquant")]
        graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), f"{prefix}_wscale"))
        mm_inputs = [f"{prefix}_xq", qname, f"{prefix}_xz"]
        rescale = [helper.make_node("Mul", [f"{prefix}_xs", f"{prefix}_wscale"], [f"{prefix}_s"]),
                   helper.make_node("Mul", [f"{prefix}_int_f", f"{prefix}_s"], [f"{prefix}_mm" if node.op_type == "Gemm" else out])]
    nodes += [helper.make_node("MatMulInteger", mm_inputs, [f"{prefix}_int"], name=f"{prefix}_matmulinteger"),
              helper.make_node("Cast", [f"{prefix}_int"], [f"{prefix}_int_f"], to=1), *rescale]
    if node.op_type == "Gemm" and len(node.input) > 2:
        nodes.append(helper.make_node("Add", [f"{prefix}_mm", node.input[2]], [out]))
    elif node.op_type == "Gemm":
        nodes.append(helper.make_node("Identity", [f"{prefix}_mm"], [out]))
    return nodes


def _rebuild(graph, new_nodes, replaced) -> None:
    """Insert the new nodes before their anchors and swap replaced nodes (keeps a topological order)."""
    from onnx import NodeProto

    before: dict[str, list] = {}
    for anchor, nodes in new_nodes:
        before.setdefault(anchor.name, []).extend(nodes)
    ordered = []
    for node in graph.node:
        ordered.extend(before.get(node.name, []))
        ordered.extend(replaced.get(node.name, [node]))
    ordered = [NodeProto().__class__.FromString(n.SerializeToString()) for n in ordered]  # detached copies
    del graph.node[:]
    graph.node.extend(ordered)
