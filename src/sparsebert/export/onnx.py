"""Export a trained output folder to an ONNX deployment folder, validated against PyTorch.

Deployment folder (``export_onnx``)::

    model.onnx          opset 17, TorchScript exporter (dynamo=False), eager attention
    manifest.json       format_version, task, labels, max_seq_length, sparsity, precision, inputs, ...
    config.json         the model config
    tokenizer files     tokenizer.json, tokenizer_config.json, vocab.txt, ...
    model.safetensors   the PyTorch weights (for the ``torch`` engine of benchmark/serve)
    recipe.yaml         the applied recipe, when the trained folder has one
    quantization.json   QAT scales, when the trained folder has one

Why the TorchScript exporter with ``attn_implementation="eager"``: it runs with torch 2.13 +
transformers 5 and gives a plain MatMul/Softmax graph (the ``sdpa`` path adds IsNaN/Where per layer);
``dynamo=True`` needs onnxscript rewrites for little gain here. Every export is run in ONNX Runtime
on random inputs and compared with PyTorch (like optimum's ``validate_model_outputs``); FP32 exports
whose max |logit difference| exceeds ``atol`` (1e-4) are refused.

The folder is built in ``<output_dir>.tmp`` and swapped in (``sparsebert.atomic.replace_dir``) only
after validation: a refused, failed or killed export leaves an existing deployment as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import path_overlap, remove_path, replace_dir, write_json_atomic
from .specs import ALL_INPUTS, ExportSpec, get_export_spec

__all__ = ["export_onnx", "ExportError", "initializer_sparsity", "validate_onnx_outputs", "MANIFEST", "FORMAT_VERSION", "OPSET", "ATOL"]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
OPSET = 17
ATOL = 1e-4


class ExportError(ValueError):
    """An export that cannot be done as asked; the message names the path and the field."""


def export_onnx(
    model_dir: str | Path,
    output_dir: str | Path,
    task: str | None = None,
    sequence_length: int | None = None,
    batch_size: int | None = None,
    precision: str = "fp32",
    overwrite: bool = False,
    int8_format: str = "qdq",
    atol: float = ATOL,
    slice_structures: bool = True,
) -> Path:
    """Export ``model_dir`` (a ``save_pretrained`` folder, e.g. a ``sparsebert train`` output) to ONNX.

    The deployment is built in ``<output_dir>.tmp`` (a stale one from a killed export is removed
    first) and moved to ``output_dir`` with :func:`sparsebert.atomic.replace_dir` only once it is
    validated and ``manifest.json`` is written; every check on the arguments runs before any work.
    A failed or killed export therefore leaves an existing ``output_dir`` exactly as it was.

    Args:
        model_dir: folder with ``config.json``, weights and tokenizer files.
        output_dir: the deployment folder to create (must be empty or absent unless ``overwrite``;
            never the model folder, a folder inside it or a parent of it).
        task: a task name (``sst2``, ``squad``) or kind (``text-classification``,
            ``question-answering``); default: ``metrics.json``'s ``task``, else the architecture.
        sequence_length / batch_size: fix that axis (static shape); ``None`` = dynamic axis.
        precision: ``"fp32"``, or ``"int8"`` from a QAT folder (needs ``quantization.json``).
        overwrite: replace a non-empty ``output_dir`` (or a file at that path) at the end of a
            successful export.
        int8_format: ``"qdq"`` (QuantizeLinear/DequantizeLinear) or ``"qoperator"`` (MatMulInteger);
            checked for every precision.
        atol: max |output difference| (logit units) allowed between ONNX Runtime and PyTorch for FP32.
        slice_structures: remove attention heads and FFN neurons whose output weights are all zero
            (structured pruning) from the graph (:func:`sparsebert.slicing.slice_structures`): exact,
            smaller dense layers. The graph is validated against the unsliced model; the manifest's
            ``slicing`` records what was removed. The copied ``model.safetensors`` stays unsliced.

    Returns:
        Path of the deployment folder (``output_dir``).

    Raises:
        ExportError: missing folder/config/tokenizer/quantization.json, a corrupt ``config.json`` or
            ``quantization.json`` (names the file and field), unknown task, precision or int8_format,
            a non-empty output folder without ``overwrite``, an output folder that is, contains or
            sits inside the model folder, or an FP32 export outside ``atol``.
        OSError: a file cannot be read or written (the previous deployment is left untouched).
    """
    from .quantize import INT8_FORMATS

    started = time.perf_counter()
    model_dir, out = Path(model_dir), Path(output_dir)
    # Every check on the arguments comes first: a refused export must neither write nor delete anything.
    if not model_dir.is_dir():
        raise ExportError(f"model folder not found: {model_dir}")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{model_dir} has no config.json (not a save_pretrained folder)")
    config_json = _read_json(config_path)
    if precision not in ("fp32", "int8"):
        raise ExportError(f"precision must be 'fp32' or 'int8', got {precision!r}")
    if int8_format not in INT8_FORMATS:
        raise ExportError(f"int8_format must be one of {', '.join(INT8_FORMATS)}, got {int8_format!r}")
    qpath = model_dir / "quantization.json"
    if precision == "int8" and not qpath.is_file():
        raise ExportError(f"precision int8 needs {qpath} (train with a QuantizationModifier recipe)")
    qstate = _read_quantization_json(qpath) if precision == "int8" else None
    for name, v in (("sequence_length", sequence_length), ("batch_size", batch_size)):
        if v is not None and v < 1:
            raise ExportError(f"{name} must be >= 1, got {v}")
    max_pos = config_json.get("max_position_embeddings")
    if sequence_length is not None and isinstance(max_pos, int) and sequence_length > max_pos:
        raise ExportError(f"sequence_length {sequence_length} > max_position_embeddings {max_pos} of {config_path}")
    task_name = _resolve_task(model_dir, task, config_json)
    try:
        spec = get_export_spec(task_name)
    except ValueError as e:
        raise ExportError(f"task: {e}") from None
    _check_output_dir(model_dir, out, overwrite)

    target = out.resolve()  # the real folder (through a symlink): its sibling <name>.tmp is on the same file system
    with _staging_dir(target) as tmp:
        manifest = _build_deployment(model_dir, tmp, out, task_name, spec, sequence_length, batch_size, precision,
                                     int8_format, atol, qstate, slice_structures)
        write_json_atomic(tmp / MANIFEST, manifest)
        replace_dir(tmp, target)  # an old folder (or a file) at the target goes only now
    logger.info("export: wrote %s in %.1f s (max |ORT - torch| = %.3g)", out, time.perf_counter() - started,
                manifest["validation"]["max_abs_diff"])
    return out


def _build_deployment(model_dir: Path, tmp: Path, out: Path, task_name: str, spec: ExportSpec, sequence_length: int | None,
                      batch_size: int | None, precision: str, int8_format: str, atol: float,
                      qstate: dict[str, Any] | None, slice_structures: bool = True) -> dict[str, Any]:
    """Write model.onnx, tokenizer, config, weights and extras of the deployment into ``tmp``; returns
    the manifest (not yet written). ``out`` is only named in messages. Raises ExportError as export_onnx."""
    import onnx
    from transformers import AutoTokenizer

    with _stage(f"loading tokenizer and model from {model_dir}"):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as e:
            raise ExportError(f"{model_dir}: cannot load tokenizer files ({e})") from None
        model = _load_model(model_dir, spec)
    config = model.config
    seq_len = sequence_length or min(spec.default_sequence_length, config.max_position_embeddings)
    if seq_len > config.max_position_embeddings:
        raise ExportError(f"sequence_length {seq_len} > max_position_embeddings {config.max_position_embeddings} of {model_dir / 'config.json'}")
    inputs = tuple(n for n in ALL_INPUTS if n in tokenizer.model_input_names or n == "input_ids")

    qpath = model_dir / "quantization.json"
    if qstate is not None:
        from .quantize import bake_embeddings

        _check_quantized_modules(qstate, model, qpath)
        bake_embeddings(model, qstate)
    unsliced, slicing, graph_qstate = model, None, qstate
    if slice_structures:
        from ..slicing import slice_quantization_state, sliced_copy

        with _stage("slicing dead attention heads and FFN neurons"):
            model, report = sliced_copy(unsliced)  # unsliced stays the validation reference: proves the slicing exact
            slicing = report.to_dict()
            if qstate is not None and not report.empty:
                graph_qstate = slice_quantization_state(qstate, report)
            logger.info("export: removed %d of %d heads and %d of %d FFN neurons (%d -> %d parameters)",
                        slicing["heads_removed"], slicing["heads_total"], slicing["neurons_removed"], slicing["neurons_total"],
                        slicing["params_before"], slicing["params_after"])
    dummy = _dummy_inputs(inputs, batch_size or 2, sequence_length or min(16, seq_len), config, seed=0)
    onnx_path = tmp / "model.onnx"
    with _stage(f"tracing ONNX (opset {OPSET}, TorchScript exporter)"), torch.no_grad():
        torch.onnx.export(
            _OutputTuple(model, spec).eval(), tuple(torch.from_numpy(dummy[n]) for n in inputs), str(onnx_path),
            input_names=list(inputs), output_names=list(spec.outputs), opset_version=OPSET, dynamo=False,
            do_constant_folding=True, dynamic_axes=spec.dynamic_axes(inputs, batch_size, sequence_length),
        )
    model.eval()  # export restores the wrapper's train/eval mode: keep dropout off
    proto = onnx.load(str(onnx_path))
    param_map = map_initializers_to_params(proto, model)
    reference = unsliced
    if precision == "int8":
        from ..modifiers.quantization import load_quantized
        from .quantize import quantize_onnx

        with _stage(f"INT8 rewrite ({int8_format}) with {qpath.name}"):
            try:
                proto, param_map = quantize_onnx(proto, param_map, graph_qstate, int8_format)
            except ValueError as e:
                raise ExportError(f"{qpath}: {e}") from None
            onnx.save(proto, str(onnx_path))
        reference = load_quantized(unsliced, qstate)  # fake-quant model: the INT8 graph's reference
    try:
        onnx.checker.check_model(str(onnx_path))
    except onnx.checker.ValidationError as e:
        raise ExportError(f"export of {model_dir}: the ONNX graph fails onnx.checker ({e})") from None

    checks = [dummy]
    if batch_size is None or sequence_length is None:  # a second shape proves the axes are dynamic
        checks.append(_dummy_inputs(inputs, batch_size or 3, sequence_length or min(11, seq_len), config, seed=1))
    examples = sum(len(c["input_ids"]) for c in checks)
    with _stage(f"validating against PyTorch on {examples} examples"):
        diff = validate_onnx_outputs(onnx_path, reference, spec, checks)
        graph_diff = validate_onnx_outputs(onnx_path, reference, spec, checks, optimized=False) if precision == "int8" else diff
    if precision == "fp32" and diff > atol:
        raise ExportError(f"export of {model_dir} to {out}: ONNX Runtime vs PyTorch max |diff| {diff:.3g} > atol {atol} "
                          f"(nothing written; {out} left as it was)")

    with _stage("copying tokenizer, config and weights"):
        tokenizer.save_pretrained(str(tmp))
        config.save_pretrained(str(tmp))
        for f in [*model_dir.glob("*.safetensors"), *model_dir.glob("*.safetensors.index.json")]:
            shutil.copy2(f, tmp / f.name)
        for extra in ("recipe.yaml", "quantization.json"):
            if (model_dir / extra).is_file():
                shutil.copy2(model_dir / extra, tmp / extra)

    return {
        "format_version": FORMAT_VERSION,
        "task": task_name,
        "task_kind": spec.kind,
        "labels": {str(k): v for k, v in (config.id2label or {}).items()} if spec.kind == "text-classification" else None,
        "problem_type": getattr(config, "problem_type", None),
        "max_seq_length": seq_len,
        "batch_size": batch_size,
        "sequence_length": sequence_length,
        "precision": precision,
        "int8_format": int8_format if precision == "int8" else None,
        "inputs": list(inputs),
        "outputs": list(spec.outputs),
        "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in spec.dynamic_axes(inputs, batch_size, sequence_length).items()},
        "opset": OPSET,
        "sparsity": {"encoder_linear": _encoder_linear_sparsity(unsliced), "initializers": initializer_sparsity(proto, param_map)},
        "slicing": slicing,
        "validation": {"max_abs_diff": diff, "max_abs_diff_unfused": graph_diff, "atol": atol if precision == "fp32" else None,
                       "reference": "PyTorch fake-quant (QAT) model" if precision == "int8" else "PyTorch FP32 model",
                       "shapes": [list(c["input_ids"].shape) for c in checks]},
        "source": str(model_dir.resolve()),
        "versions": _versions(),
    }


@contextlib.contextmanager
def _stage(what: str):
    """Log the start of an export stage and its duration in seconds."""
    logger.info("export: %s", what)
    t0 = time.perf_counter()
    yield
    logger.info("export: %s done in %.1f s", what, time.perf_counter() - t0)


@contextlib.contextmanager
def _staging_dir(out: Path):
    """Yield the empty work folder ``<out>.tmp`` (a stale one is removed first); on any error it is removed."""
    tmp = out.with_name(out.name + ".tmp")
    remove_path(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_output_dir(model_dir: Path, out: Path, overwrite: bool) -> None:
    """Refuse an output that would destroy the model folder, or a non-empty one without ``overwrite``."""
    target = out.resolve()
    if path_overlap(target, model_dir):
        raise ExportError(f"output dir {out} is, contains or sits inside the model folder {model_dir}; "
                          "export to a folder outside it")
    for work in (target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")):
        if path_overlap(work, model_dir) in ("is", "contains"):  # the export deletes these work folders
            raise ExportError(f"output dir {out}: its work folder {work} is or contains the model folder {model_dir}; "
                              "choose another output dir")
    if out.exists() and not overwrite:
        if not out.is_dir():
            raise ExportError(f"output dir {out} is an existing file; pass --overwrite to replace it")
        if any(out.iterdir()):
            raise ExportError(f"output dir {out} is not empty; pass --overwrite to replace it")


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``. Raises ExportError (not JSON / not an object), OSError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_quantization_json(path: Path) -> dict[str, Any]:
    """Parsed and checked ``quantization.json``. Raises ExportError naming the file, module and field."""
    from .quantize import check_quantization_state

    qstate = _read_json(path)
    try:
        check_quantization_state(qstate)
    except ValueError as e:
        raise ExportError(f"{path}: {e}") from None
    return qstate


def _check_quantized_modules(qstate: dict[str, Any], model: torch.nn.Module, qpath: Path) -> None:
    """Every module of ``quantization.json`` exists in ``model`` with the recorded type (else ExportError)."""
    modules = dict(model.named_modules())
    for name, entry in qstate["modules"].items():
        kind = {"linear": torch.nn.Linear, "embedding": torch.nn.Embedding}[entry["type"]]
        if name not in modules:
            raise ExportError(f"{qpath}: module {name!r} is not in the model of {qpath.parent}")
        if not isinstance(modules[name], kind):
            raise ExportError(f"{qpath}: module {name!r} has type {entry['type']!r} but is a {type(modules[name]).__name__} in the model")


class _OutputTuple(torch.nn.Module):
    """Wrap a HF model so the traced graph returns a plain tuple in ``spec.outputs`` order."""

    def __init__(self, model: torch.nn.Module, spec: ExportSpec):
        super().__init__()
        self.model, self.names = model, spec.outputs

    def forward(self, *args):
        names = ("input_ids", "attention_mask", "token_type_ids")[: len(args)]
        out = self.model(**dict(zip(names, args)), return_dict=True)
        return tuple(out[n] for n in self.names)


def _resolve_task(model_dir: Path, task: str | None, config_json: dict[str, Any]) -> str:
    """``task``, else ``metrics.json``'s ``task``, else the kind of the ``architectures`` in config.json."""
    if task:
        return task
    metrics = model_dir / "metrics.json"
    if metrics.is_file():
        try:
            name = json.loads(metrics.read_text()).get("task")
        except json.JSONDecodeError:
            name = None
        if name:
            return name
    archs = config_json.get("architectures") or []
    if any(a.endswith("ForQuestionAnswering") for a in archs):
        return "question-answering"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "text-classification"
    raise ExportError(f"{model_dir / 'config.json'}: cannot infer the task from architectures={archs}; pass task=")


def _load_model(model_dir: Path, spec: ExportSpec) -> torch.nn.Module:
    import transformers

    auto = getattr(transformers, spec.auto_class)
    try:
        model = auto.from_pretrained(str(model_dir), attn_implementation="eager")
    except (OSError, ValueError) as e:
        raise ExportError(f"{model_dir}: cannot load a {spec.kind} model ({e})") from None
    return model.eval()


def _dummy_inputs(inputs, batch: int, seq: int, config, seed: int) -> dict[str, np.ndarray]:
    """Random token ids ``[batch, seq]`` int64; the first row half padded; token types 0/1."""
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, config.vocab_size, size=(batch, seq), dtype=np.int64)}
    mask = np.ones((batch, seq), dtype=np.int64)
    if batch > 1:
        mask[0, max(1, seq // 2):] = 0
    types = np.zeros((batch, seq), dtype=np.int64)
    if getattr(config, "type_vocab_size", 1) > 1:
        types[:, seq // 2:] = 1
    feeds["attention_mask"], feeds["token_type_ids"] = mask, types
    return {n: feeds[n] for n in inputs}


def validate_onnx_outputs(onnx_path: str | Path, model: torch.nn.Module, spec: ExportSpec, feeds_list: list[dict[str, np.ndarray]],
                          optimized: bool = True) -> float:
    """Max |ONNX Runtime - PyTorch| over all outputs and all ``feeds_list`` batches.

    Args:
        onnx_path: the ``.onnx`` file, run on ONNX Runtime's CPU provider.
        model: the PyTorch reference (eval mode), called with the same feeds.
        spec: names the outputs compared (``logits``, or ``start_logits``/``end_logits``).
        feeds_list: batches, each a dict input name (``input_ids``, ``attention_mask``,
            ``token_type_ids``) -> int64 array ``[batch, seq]``.
        optimized: ``False`` runs ORT with basic graph optimizations only: an INT8 graph then executes
            its Q/DQ nodes literally (the graph's own semantics), whereas the full optimization level
            fuses them into ORT's integer kernels, whose numerics differ slightly.

    Returns:
        The largest absolute difference (float, in output units: logits before softmax).

    Raises:
        onnxruntime's own errors when the graph cannot be loaded or a feed does not fit its inputs.
    """
    import onnxruntime as ort
    from tqdm import tqdm

    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    worst = 0.0
    for feeds in tqdm(feeds_list, desc="export: validating", unit="batch", leave=False, file=sys.stderr):
        got = session.run(list(spec.outputs), feeds)
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}, return_dict=True)
        for name, g in zip(spec.outputs, got):
            worst = max(worst, float(np.abs(g - ref[name].float().numpy()).max()))
    return worst


def map_initializers_to_params(proto, model: torch.nn.Module) -> dict[str, tuple[str, bool]]:
    """ONNX initializer name -> (PyTorch parameter name, transposed?) for 2-D weights.

    The TorchScript exporter renames constant-folded Linear weights (``onnx::MatMul_123``, stored
    transposed ``[in, out]``), so they are matched by content (a hash of the bytes).
    """
    from onnx import numpy_helper

    shapes = {tuple(i.dims) for i in proto.graph.initializer if len(i.dims) == 2}
    by_hash: dict[str, tuple[str, bool]] = {}
    for name, p in model.named_parameters():
        if p.dim() != 2:
            continue
        w = p.detach().float().contiguous().numpy()
        if w.shape in shapes:
            by_hash.setdefault(_digest(w), (name, False))
        if w.shape[::-1] in shapes:
            by_hash.setdefault(_digest(np.ascontiguousarray(w.T)), (name, True))
    out = {}
    for init in proto.graph.initializer:
        if len(init.dims) == 2:
            hit = by_hash.get(_digest(numpy_helper.to_array(init)))
            if hit:
                out[init.name] = hit
    return out


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(str(a.shape).encode() + np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def initializer_sparsity(proto, param_map: dict[str, tuple[str, bool]] | None = None) -> list[dict[str, Any]]:
    """Sparsity of every 2-D (weight) initializer of ``proto``, float or int8.

    Returns:
        One dict per initializer: ``name``, ``param`` (the PyTorch parameter, or ``None``),
        ``transposed`` (stored as the parameter's transpose, e.g. MatMul weights ``[in, out]``), ``shape``, ``dtype``, ``zeros`` (count) and ``sparsity`` (fraction in [0, 1]).
    """
    from onnx import numpy_helper

    rows = []
    param_map = param_map or {}
    for init in proto.graph.initializer:
        if len(init.dims) != 2:
            continue
        a = numpy_helper.to_array(init)
        zeros = int((a == 0).sum())
        param, transposed = param_map.get(init.name, (None, None))
        rows.append({"name": init.name, "param": param, "transposed": transposed, "shape": list(a.shape),
                     "dtype": str(a.dtype), "zeros": zeros, "sparsity": round(zeros / max(a.size, 1), 6)})
    return rows


def _encoder_linear_sparsity(model: torch.nn.Module) -> float | None:
    """Zeros / elements of the encoder Linear weights (``sparsity.ENCODER_LINEAR_RE``), or ``None``
    (counted directly: ``sparsity_table`` also detects patterns, which is slow on large models)."""
    import re

    from ..sparsity import ENCODER_LINEAR_RE

    rx = re.compile(ENCODER_LINEAR_RE)
    weights = [p.detach() for n, p in model.named_parameters() if rx.match(n)]
    if not weights:
        return None
    return round(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights), 6)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
