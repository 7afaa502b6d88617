"""Find and load the PyTorch model behind a checkpoint or deployment folder for the engine.

Accepted sources (:func:`load_source`):

* a ``torch.nn.Module`` (a Hugging Face BERT model, used as is; not modified);
* a ``save_pretrained`` folder (``config.json`` + weights), e.g. a ``sparsebert train`` output;
* a deployment folder from ``sparsebert export`` (``manifest.json``): its copy of the PyTorch
  weights (``*.safetensors``), else the trained folder the manifest names as ``source`` when it
  still exists. The ONNX graph itself is not read.

``quantization.json`` (QAT scales) is taken from the same folder when present.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["EngineError", "Source", "load_source", "TASK_KINDS"]

TASK_KINDS = ("text-classification", "question-answering", "feature-extraction")
_AUTO = {
    "text-classification": "AutoModelForSequenceClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "feature-extraction": "AutoModel",
}


class EngineError(ValueError):
    """A model the engine cannot compile (missing files, unsupported architecture); names the path/field."""


@dataclasses.dataclass
class Source:
    """A loaded model: ``model`` (eval mode), its ``task_kind``, the folder it came from (or
    ``None``) and the parsed ``quantization.json`` (or ``None``)."""

    model: torch.nn.Module
    task_kind: str
    folder: Path | None
    quantization: dict[str, Any] | None


def _kind_from_model(model: torch.nn.Module) -> str:
    name = type(model).__name__
    if name.endswith("ForQuestionAnswering"):
        return "question-answering"
    if name.endswith("ForSequenceClassification"):
        return "text-classification"
    return "feature-extraction"


def _kind_from_config(folder: Path) -> str:
    try:
        archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except json.JSONDecodeError as e:
        raise EngineError(f"{folder / 'config.json'}: not valid JSON ({e})") from None
    if any(a.endswith("ForQuestionAnswering") for a in archs):
        return "question-answering"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "text-classification"
    return "feature-extraction"


def _weights_folder(folder: Path) -> Path:
    """The folder holding the PyTorch weights for ``folder`` (itself, or a deployment's source)."""
    if (folder / "config.json").is_file() and (list(folder.glob("*.safetensors")) or list(folder.glob("pytorch_model*.bin"))):
        return folder
    manifest = folder / "manifest.json"
    if manifest.is_file():
        source = json.loads(manifest.read_text()).get("source")
        if source and (Path(source) / "config.json").is_file():
            return Path(source)
        raise EngineError(f"{folder}: deployment folder without PyTorch weights (*.safetensors), and its manifest's "
                          f"source {source!r} is not a model folder; re-export it or pass the trained folder")
    if not (folder / "config.json").is_file():
        raise EngineError(f"{folder}: no config.json (not a save_pretrained folder) and no manifest.json (not a deployment folder)")
    raise EngineError(f"{folder}: config.json but no weights (*.safetensors or pytorch_model.bin)")


def load_source(model_or_dir: torch.nn.Module | str | Path, task: str | None = None) -> Source:
    """Load the model to compile.

    Args:
        model_or_dir: a model, a ``save_pretrained`` folder or a deployment folder.
        task: ``"text-classification"``, ``"question-answering"`` or ``"feature-extraction"``;
            default: the deployment manifest's ``task_kind``, else the config's architecture
            (a plain ``BertModel`` checkpoint gives ``feature-extraction``). Asking for a head
            the checkpoint lacks initialises it randomly (as ``from_pretrained`` does).

    Raises:
        EngineError: missing folder, config or weights; unknown task.
    """
    if task is not None and task not in TASK_KINDS:
        raise EngineError(f"task must be one of {TASK_KINDS}, got {task!r}")
    if isinstance(model_or_dir, torch.nn.Module):
        return Source(model_or_dir.eval(), task or _kind_from_model(model_or_dir), None, None)
    folder = Path(model_or_dir)
    if not folder.is_dir():
        raise EngineError(f"model folder not found: {folder}")
    kind = task
    if kind is None and (folder / "manifest.json").is_file():
        kind = json.loads((folder / "manifest.json").read_text()).get("task_kind")
    weights = _weights_folder(folder)
    kind = kind or _kind_from_config(weights)
    if kind not in _AUTO:
        raise EngineError(f"{folder}: unsupported task kind {kind!r}; supported: {TASK_KINDS}")
    import transformers

    try:
        model = getattr(transformers, _AUTO[kind]).from_pretrained(str(weights), attn_implementation="eager")
    except (OSError, ValueError) as e:
        raise EngineError(f"{weights}: cannot load a {kind} model ({e})") from None
    qfile = next((f / "quantization.json" for f in (folder, weights) if (f / "quantization.json").is_file()), None)
    qstate = json.loads(qfile.read_text()) if qfile else None
    return Source(model.eval(), kind, weights, qstate)
