"""Shared by the benchmark scripts: run a logged CLI command, measure the padding of a training
dataloader, and write results into BENCHMARKS.md between a benchmark's own markers (replacing an
older run)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_logged(cmd: list[str], log: Path) -> None:
    """Echo ``cmd``, run it from the repo root with stdout+stderr to ``log``.

    Raises:
        subprocess.CalledProcessError: the command failed (its output is in ``log``).
    """
    print("$", shlex.join(cmd), flush=True)
    with log.open("w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)


def write_section(path: Path, name: str, title: str, body: str) -> str:
    """Put ``body`` between ``<!-- name:begin -->``/``<!-- name:end -->`` in ``path``; a new
    section gets the heading ``## title``. Returns the marked block."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text += f"\n## {title}\n\n{block}\n"
    path.write_text(text)
    return block


def train_padding_ratio(task, tokenizer, model, train_dataset, batch_size: int, group_by_length: bool) -> float:
    """Padded / real tokens over one epoch of ``train_dataset`` as ``sparsebert train`` batches it
    (the trainer's own dataloader and the task's collator; ``model`` is only needed to build the
    trainer and never runs)."""
    import tempfile

    from sparsebert.integrations import SparseTrainer
    from sparsebert.train import TrainConfig, training_arguments

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(task=task.name, output_dir=tmp, batch_size=batch_size, group_by_length=group_by_length)
        trainer = SparseTrainer(recipe=None, teacher=None, model=model, args=training_arguments(cfg, tmp, 1.0),
                                train_dataset=train_dataset, data_collator=task.data_collator(tokenizer),
                                processing_class=tokenizer)
        padded = real = 0
        for batch in trainer.get_train_dataloader():
            padded += batch["input_ids"].numel()
            real += int(batch["attention_mask"].sum())
    return padded / real
