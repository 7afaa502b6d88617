"""Deployment folders (written by ``sparsebert export``) and the engines that run them.

``ENGINES`` is the registry used by ``benchmark``, ``serve`` and ``evaluate_onnx``: engine name ->
``factory(deployment_dir, num_threads) -> run``, where ``run(feeds)`` takes a dict of int64 numpy
arrays ``[batch, seq]`` (the manifest's ``inputs``) and returns the manifest's ``outputs`` as a list
of float32 numpy arrays. Built in: ``onnxruntime``, ``torch``, ``sparsebert`` (the sparse CPU engine,
:mod:`sparsebert.engine`) and ``sparsebert-int8``; others register with :func:`register_engine`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["DeploymentError", "ENGINES", "Engine", "register_engine", "create_engine", "load_manifest", "random_inputs", "run_padded"]

Engine = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


#: manifest.json fields every engine and command reads
MANIFEST_KEYS = ("task_kind", "inputs", "outputs", "max_seq_length")


class DeploymentError(ValueError):
    """A deployment folder that cannot be used (missing files, unsupported shape); names the path."""


def load_manifest(deployment_dir: str | Path) -> dict[str, Any]:
    """Read ``manifest.json`` of a deployment folder.

    Raises:
        DeploymentError: the folder or its ``manifest.json`` is missing or unreadable, or a field of
            :data:`MANIFEST_KEYS` is missing (names the path and the fields).
    """
    path = Path(deployment_dir) / "manifest.json"
    if not Path(deployment_dir).is_dir():
        raise DeploymentError(f"deployment folder not found: {deployment_dir}")
    if not path.is_file():
        raise DeploymentError(f"{path} not found: not a deployment folder (create one with `sparsebert export`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeploymentError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in MANIFEST_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise DeploymentError(f"{path}: missing field(s) {missing}; re-create the folder with `sparsebert export`")
    return manifest


def _onnxruntime(deployment_dir: Path, num_threads: int | None) -> Engine:
    """ONNX Runtime CPU: ``intra_op_num_threads=num_threads``, sequential, all graph optimizations."""
    import onnxruntime as ort

    manifest = load_manifest(deployment_dir)
    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    onnx_path = Path(deployment_dir) / "model.onnx"
    if not onnx_path.is_file():
        raise DeploymentError(f"{onnx_path} not found: the onnxruntime engine needs the exported graph")
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    outputs = manifest["outputs"]
    return lambda feeds: session.run(outputs, feeds)


def _torch(deployment_dir: Path, num_threads: int | None) -> Engine:
    """PyTorch eager (HF default attention) on the folder's ``model.safetensors`` (FP32 weights)."""
    import torch
    import transformers

    manifest = load_manifest(deployment_dir)
    if not list(Path(deployment_dir).glob("*.safetensors")):
        raise DeploymentError(f"{deployment_dir}: no *.safetensors weights for the torch engine")
    if num_threads:
        torch.set_num_threads(num_threads)
    auto = "AutoModelForQuestionAnswering" if manifest["task_kind"] == "question-answering" else "AutoModelForSequenceClassification"
    model = getattr(transformers, auto).from_pretrained(str(deployment_dir)).eval()
    outputs = manifest["outputs"]

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}, return_dict=True)
        return [out[n].float().numpy() for n in outputs]

    return run


def _sparsebert(deployment_dir: Path, num_threads: int | None, precision: str | None = None) -> Engine:
    """sparsebert's own CPU engine (:func:`sparsebert.engine.compile`) on the folder's PyTorch weights
    (or the manifest's ``source``), sparse kernels for pruned Linear layers; precision from the manifest."""
    import torch

    from .engine import EngineError, compile

    manifest = load_manifest(deployment_dir)
    try:
        model = compile(deployment_dir, num_threads=num_threads, precision=precision or manifest.get("precision", "fp32"),
                        task=manifest["task_kind"])
    except EngineError as e:
        raise DeploymentError(str(e)) from None
    outputs = manifest["outputs"]

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        return [out[n].numpy() for n in outputs]

    return run


def _sparsebert_int8(deployment_dir: Path, num_threads: int | None) -> Engine:
    """``sparsebert`` engine in INT8 whatever the manifest's precision (dynamic activation scales;
    weight scales from ``quantization.json`` when present, else per channel from the weights)."""
    return _sparsebert(deployment_dir, num_threads, "int8")


ENGINES: dict[str, Callable[[Path, int | None], Engine]] = {
    "onnxruntime": _onnxruntime,
    "torch": _torch,
    "sparsebert": _sparsebert,
    "sparsebert-int8": _sparsebert_int8,
}


def register_engine(name: str, factory: Callable[[Path, int | None], Engine]) -> None:
    """Add ``factory(deployment_dir, num_threads) -> run`` to :data:`ENGINES` under ``name``."""
    ENGINES[name] = factory


def create_engine(name: str, deployment_dir: str | Path, num_threads: int | None = None) -> Engine:
    """Build engine ``name`` on ``deployment_dir``.

    Raises:
        DeploymentError: unknown engine name (lists the known ones) or a bad folder.
    """
    if name not in ENGINES:
        raise DeploymentError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")
    load_manifest(deployment_dir)
    return ENGINES[name](Path(deployment_dir), num_threads)


def random_inputs(deployment_dir: str | Path, batch_size: int, sequence_length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids in ``[1000, vocab_size)`` (int64 ``[batch_size, sequence_length]``), mask of
    ones and token types 0, for the manifest's inputs."""
    manifest = load_manifest(deployment_dir)
    vocab = json.loads((Path(deployment_dir) / "config.json").read_text()).get("vocab_size", 30522)
    ids = np.random.default_rng(seed).integers(min(1000, vocab - 1), vocab, size=(batch_size, sequence_length), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {n: feeds[n] for n in manifest["inputs"]}


def run_padded(engine: Engine, manifest: dict[str, Any], feeds: dict[str, np.ndarray], pad_token_id: int = 0) -> list[np.ndarray]:
    """Run ``engine`` on any ``[n, seq]`` feeds, adapting to a static-shape export.

    A static ``sequence_length`` pads (``input_ids`` with ``pad_token_id``, the rest with 0)
    on the right; a static ``batch_size`` runs the rows in chunks, padding the last one. Outputs are
    cut back to ``n`` rows (and, for QA, to the input sequence length).

    Raises:
        DeploymentError: the inputs are longer than the static sequence length.
    """
    n, seq = feeds["input_ids"].shape
    static_seq, static_batch = manifest.get("sequence_length"), manifest.get("batch_size")
    if static_seq:
        if seq > static_seq:
            raise DeploymentError(f"inputs have {seq} tokens; the model was exported with sequence_length {static_seq}")
        feeds = {k: np.pad(v, ((0, 0), (0, static_seq - seq)), constant_values=pad_token_id if k == "input_ids" else 0) for k, v in feeds.items()}
    chunk = static_batch or max(n, 1)
    outs: list[list[np.ndarray]] = []
    for start in range(0, n, chunk):
        part = {k: v[start:start + chunk] for k, v in feeds.items()}
        rows = len(part["input_ids"])
        if static_batch and rows < static_batch:
            part = {k: np.concatenate([v, np.repeat(v[-1:], static_batch - rows, axis=0)]) for k, v in part.items()}
        outs.append([o[:rows] for o in engine(part)])
    result = [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]
    return [r[:, :seq] if r.ndim == 2 and manifest["task_kind"] == "question-answering" else r for r in result]
