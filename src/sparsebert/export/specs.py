"""Per-task ONNX export specs: model class, input/output names, dynamic axes (optimum-style).

A spec is a few lines of data; :func:`get_export_spec` maps a task name (``sst2``, ``squad``) or a
task kind (``text-classification``, ``question-answering``) to one.
"""

from __future__ import annotations

import dataclasses

__all__ = ["ExportSpec", "TEXT_CLASSIFICATION", "QUESTION_ANSWERING", "get_export_spec", "ALL_INPUTS"]

# BERT-family tokenizer outputs, in the order the model's forward() takes them.
ALL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    """What an exported graph of one task kind takes and returns.

    Attributes:
        kind: ``"text-classification"`` or ``"question-answering"``.
        auto_class: name of the ``transformers`` Auto class that loads the model.
        outputs: output names, in the order of the model's output tuple.
        default_sequence_length: tokens per example when none is given (GLUE 128, SQuAD 384,
            as the ``train`` CLI defaults).
    """

    kind: str
    auto_class: str
    outputs: tuple[str, ...]
    default_sequence_length: int

    def dynamic_axes(self, inputs: tuple[str, ...], batch_size: int | None, sequence_length: int | None) -> dict[str, dict[int, str]]:
        """``torch.onnx.export`` ``dynamic_axes``: batch (axis 0) and sequence (axis 1) are dynamic
        unless fixed by ``batch_size``/``sequence_length``. QA outputs are ``[batch, seq]``; logits
        ``[batch, num_labels]``."""
        names = {0: "batch_size"} if batch_size is None else {}
        seq = {1: "sequence_length"} if sequence_length is None else {}
        axes = {name: {**names, **seq} for name in inputs}
        for out in self.outputs:
            axes[out] = {**names, **(seq if self.kind == "question-answering" else {})}
        return {k: v for k, v in axes.items() if v}


TEXT_CLASSIFICATION = ExportSpec("text-classification", "AutoModelForSequenceClassification", ("logits",), 128)
QUESTION_ANSWERING = ExportSpec("question-answering", "AutoModelForQuestionAnswering", ("start_logits", "end_logits"), 384)


def get_export_spec(task: str) -> ExportSpec:
    """The spec of ``task``: a task name of :mod:`sparsebert.tasks` or a task kind.

    Raises:
        ValueError: unknown task (the message lists the accepted names).
    """
    from ..tasks import TASK_NAMES

    key = task.lower().replace("-", "").replace("_", "")
    if key in ("squad", "questionanswering", "qa"):
        return QUESTION_ANSWERING
    if key == "mlm":  # a sparse pre-trained checkpoint: fine-tune it on a task first (Prune OFA transfer)
        raise ValueError("masked-LM (task mlm) models are not exported; transfer them to a task first")
    if key in TASK_NAMES or key in ("textclassification", "sequenceclassification"):
        return TEXT_CLASSIFICATION
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASK_NAMES)}, text-classification, question-answering")
