"""Evaluate a saved task model on its dev split(s) (``sparsebert evaluate``)."""

from __future__ import annotations

import tempfile
from typing import Any

from transformers import AutoTokenizer, Trainer, TrainingArguments

from .models import load_pretrained, resolve_model
from .sparsity import encoder_linear_sparsity
from .tasks import DataArgs, get_task

__all__ = ["run_evaluate"]


def run_evaluate(task_name: str, model: str | None, data: DataArgs, batch_size: int = 64) -> dict[str, Any]:
    """Metrics of ``model`` on every eval split of ``task_name``, plus its encoder sparsity.

    Raises:
        ValueError / DataError: unknown task, label-count mismatch, missing data.
    """
    task = get_task(task_name)
    path = resolve_model(model)
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, path, "--model")
    net = load_pretrained(task.build_model, path, "--model")
    task_data = task.load_data(tokenizer, data, need_train=False)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_eval_batch_size=batch_size, report_to=[], disable_tqdm=False)
        trainer = Trainer(model=net, args=args, data_collator=task.data_collator(tokenizer), processing_class=tokenizer)
        metrics: dict[str, Any] = {split: task.evaluate(trainer, split, task_data) for split in task_data.evals}
    metrics["encoder_sparsity"] = round(encoder_linear_sparsity(net), 6)
    metrics["data_note"] = task_data.note
    return metrics
