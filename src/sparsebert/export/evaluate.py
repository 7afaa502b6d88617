"""Dev-set metrics of a deployment folder, run by an engine (ONNX Runtime by default).

The task's own tokenization (``Task.load_data``) and scoring (``Task.evaluate``: GLUE metrics,
SQuAD post-processing + official EM/F1) are reused unchanged: :class:`EnginePredictor` stands in
for the ``Trainer`` that ``Task.evaluate`` calls ``predict`` on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..deployment import DeploymentError, create_engine, load_manifest, run_padded

__all__ = ["evaluate_onnx", "EnginePredictor"]


class EnginePredictor:
    """A ``Trainer.predict`` look-alike over an engine: batches a tokenized ``datasets.Dataset``.

    Args:
        run: engine callable (see :mod:`sparsebert.deployment`).
        manifest: the deployment's manifest (inputs, outputs, static shapes).
        pad_token_id: id used to pad ``input_ids`` (masks/types pad with 0).
        batch_size: rows per engine call.
    """

    def __init__(self, run, manifest: dict[str, Any], pad_token_id: int = 0, batch_size: int = 32):
        self.run, self.manifest, self.pad_token_id, self.batch_size = run, manifest, pad_token_id, batch_size

    def predict(self, dataset):
        """Run every row; returns ``PredictionOutput(predictions, label_ids, metrics=None)`` where
        ``predictions`` is the logits array ``[N, C]`` (QA: the tuple ``(start, end)``, ``[N, seq]``)
        and ``label_ids`` the ``labels`` column (``None`` without one). A progress bar (stderr)
        counts the batches, like the ``Trainer``'s."""
        from transformers.trainer_utils import PredictionOutput

        names = self.manifest["inputs"]
        outs: list[list[np.ndarray]] = []
        for start in tqdm(range(0, len(dataset), self.batch_size), desc="predict", unit="batch", leave=False):
            rows = dataset[start:start + self.batch_size]
            seq = max(len(x) for x in rows["input_ids"])
            feeds = {}
            for name in names:
                values = rows[name] if name in rows else [[0] * len(x) for x in rows["input_ids"]]
                pad = self.pad_token_id if name == "input_ids" else 0
                feeds[name] = np.array([list(x) + [pad] * (seq - len(x)) for x in values], dtype=np.int64)
            outs.append(run_padded(self.run, self.manifest, feeds, self.pad_token_id))
        joined = [_concat([o[i] for o in outs]) for i in range(len(self.manifest["outputs"]))]
        labels = np.asarray(dataset["labels"]) if "labels" in dataset.column_names else None
        return PredictionOutput(predictions=joined[0] if len(joined) == 1 else tuple(joined), label_ids=labels, metrics=None)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate along rows, padding QA ``[n, seq]`` outputs of different ``seq`` with -1e4 (never
    chosen as a span; batches differ in ``seq`` when SQuAD windows are not padded to max_seq_length)."""
    width = max(p.shape[1] for p in parts) if parts[0].ndim == 2 else None
    if width is not None and any(p.shape[1] != width for p in parts):
        parts = [np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=-1e4) for p in parts]
    return np.concatenate(parts)


def evaluate_onnx(deployment_dir: str | Path, task: str | None = None, data_args=None, engine: str = "onnxruntime",
                  batch_size: int = 32, num_threads: int | None = None) -> dict[str, Any]:
    """Metrics of ``deployment_dir`` on every dev split of ``task``, computed as ``sparsebert evaluate`` does.

    Args:
        task: a task name (default: the manifest's ``task``).
        data_args: :class:`~sparsebert.tasks.DataArgs` (default: defaults with the manifest's
            ``max_seq_length``); ``max_seq_length`` is capped at a static export's sequence length.
        engine: a name in :data:`sparsebert.deployment.ENGINES`.

    Returns:
        ``{split: {metric: value}, "precision": ..., "engine": ..., "data_note": ...}`` (GLUE
        metrics as fractions, SQuAD EM/F1 in [0, 100]).

    Raises:
        DeploymentError: bad folder, the manifest's task is only a kind (pass ``task``), or ``task``
            does not fit the exported model (other task kind, or another label count).
        DataError / ValueError: missing data, unknown task.
    """
    import dataclasses

    from transformers import AutoTokenizer

    from ..tasks import DataArgs, get_task

    manifest = load_manifest(deployment_dir)
    name = task or manifest["task"]
    if name in ("text-classification", "question-answering"):
        raise DeploymentError(f"{Path(deployment_dir) / 'manifest.json'}: task is {name!r}; pass a task name (e.g. sst2, squad)")
    task_obj = get_task(name)
    _check_task_matches(manifest, name, task_obj, Path(deployment_dir) / "manifest.json")
    data_args = data_args or DataArgs(max_seq_length=manifest["max_seq_length"])
    if manifest.get("sequence_length"):
        data_args = dataclasses.replace(data_args, max_seq_length=min(data_args.max_seq_length, manifest["sequence_length"]))
    tokenizer = AutoTokenizer.from_pretrained(str(deployment_dir))
    data = task_obj.load_data(tokenizer, data_args, need_train=False)
    predictor = EnginePredictor(create_engine(engine, deployment_dir, num_threads), manifest, tokenizer.pad_token_id or 0, batch_size)
    metrics: dict[str, Any] = {split: task_obj.evaluate(predictor, split, data) for split in data.evals}
    metrics.update(precision=manifest["precision"], engine=engine, data_note=data.note)
    return metrics


def _check_task_matches(manifest: dict[str, Any], name: str, task_obj: Any, path: Path) -> None:
    """DeploymentError when task ``name`` cannot score this deployment: another task kind than the manifest's
    ``task_kind``, or a classifier with another label count than the manifest's ``labels``."""
    from .specs import get_export_spec

    kind = get_export_spec(name).kind
    if kind != manifest["task_kind"]:
        raise DeploymentError(f"{path}: task_kind is {manifest['task_kind']!r} (exported for task {manifest.get('task')!r}), "
                              f"but --task {name} needs a {kind!r} model")
    labels = manifest.get("labels")
    want = getattr(task_obj, "num_labels", None)
    if kind == "text-classification" and labels and want is not None and len(labels) != want:
        raise DeploymentError(f"{path}: the model has {len(labels)} labels (exported for task {manifest.get('task')!r}), "
                              f"but --task {name} has {want}")
