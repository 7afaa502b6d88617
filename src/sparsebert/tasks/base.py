"""The task interface: what ``sparsebert train``/``evaluate`` need from a task.

A task (GLUE, SQuAD, masked-LM) knows how to build its model head, load and tokenize its
data, collate batches and score predictions. Everything else (recipes, modifiers, the
Hugging Face ``Trainer``) is task-agnostic and lives elsewhere.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

__all__ = ["DataArgs", "TaskData", "Task", "DataError", "default_shared_data_dir"]


class DataError(ValueError):
    """Bad or missing task data. The message names the file, the column/field and the value."""


def default_shared_data_dir() -> Path | None:
    """Return ``../shared/data`` relative to the project root or the current directory, if it exists.

    Looked up in this order: ``$SPARSEBERT_DATA_DIR``, ``<cwd>/../shared/data``,
    ``<repo root>/../shared/data``. Returns ``None`` when none exists (the caller then falls
    back to the ``datasets`` hub loader).
    """
    import os

    candidates = []
    if os.environ.get("SPARSEBERT_DATA_DIR"):
        candidates.append(Path(os.environ["SPARSEBERT_DATA_DIR"]))
    candidates.append(Path.cwd().parent / "shared" / "data")
    candidates.append(Path(__file__).resolve().parents[3].parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None


@dataclasses.dataclass
class DataArgs:
    """Data options shared by all tasks (CLI flags of ``sparsebert train``/``evaluate``).

    Attributes:
        data_dir: task-data root (e.g. ``../shared/data/glue`` for GLUE, a folder with
            ``dev-v1.1.json`` for SQuAD). ``None``: the shared data folder if present, else
            the ``datasets`` hub.
        train_file / validation_file: explicit files (SQuAD JSON, MLM text); override data_dir.
        max_seq_length: tokens per example after tokenization (truncate; pad dynamically).
        max_train_samples / max_eval_samples: take the first N examples (after a seeded
            shuffle for train) -- for quick runs.
        seed: seed for shuffles and deterministic splits.
        doc_stride: SQuAD window overlap (tokens).
        split_by_article: SQuAD ``"TRAIN:EVAL"`` article counts to split one file.
        streaming: MLM: read, tokenise and pack the training corpus lazily (needs ``max_train_samples``).
        pad_to_max_length: SQuAD: pad every window to ``max_seq_length`` (``run_qa.py``'s default);
            ``False`` pads each batch to its longest window (SQuAD windows average ~45% of 384 tokens,
            so CPU training is ~3x faster; the loss then has no padding positions in its softmax).
    """

    data_dir: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    max_seq_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    seed: int = 42
    doc_stride: int = 128
    split_by_article: str | None = None
    streaming: bool = False
    pad_to_max_length: bool = True


@dataclasses.dataclass
class TaskData:
    """Tokenized data of one task.

    Attributes:
        train: tokenized training ``datasets.Dataset`` (``None`` for evaluate-only use).
        evals: eval split name -> tokenized ``datasets.Dataset`` (MNLI has two).
        raw_evals: eval split name -> the untokenized examples (needed by SQuAD post-processing).
        note: a human-readable remark on where the data came from, e.g. "train = 80% of dev
            (no local train split)". Printed and written into ``metrics.json``.
    """

    train: Any | None
    evals: dict[str, Any]
    raw_evals: dict[str, Any] = dataclasses.field(default_factory=dict)
    note: str | None = None


class Task(ABC):
    """One fine-tuning task. Subclasses: ``GlueTask``, ``SquadTask``, ``MlmTask``."""

    name: str

    @abstractmethod
    def build_model(self, model_name_or_path: str, **kwargs: Any):
        """Load a pre-trained model with this task's head (e.g. ``AutoModelForSequenceClassification``).

        Raises:
            ValueError: the checkpoint's label count does not match the task's.
        """

    @abstractmethod
    def load_data(self, tokenizer, args: DataArgs, need_train: bool = True) -> TaskData:
        """Read, (sub-)sample and tokenize the data.

        Raises:
            DataError: a missing file or column, or a malformed row; the message names them.
        """

    def data_collator(self, tokenizer) -> Callable:
        """The batch collator (default: dynamic padding)."""
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    @abstractmethod
    def evaluate(self, trainer, split: str, data: TaskData) -> dict[str, float]:
        """Run ``trainer.predict`` on ``data.evals[split]`` and return the task's metrics.

        Keys are prefixed by nothing; e.g. ``{"accuracy": 0.91}`` or ``{"exact_match": 80.1, "f1": 88.0}``.
        """

    def save_predictions(self, output_dir: Path) -> list[Path]:
        """Write the last evaluation's predictions in the task's official format (default: none)."""
        return []

    @property
    def distill_output_keys(self) -> tuple[str, ...]:
        """Model output keys that knowledge distillation compares by default."""
        return ("logits",)
