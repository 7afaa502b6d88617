"""``sparsebert`` command line: train, evaluate, sparsity."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False, help="Sparsify BERT models with recipes; evaluate and inspect them.")
console = Console()


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def _data_args(data_dir, train_file, validation_file, max_seq_length, max_train_samples, max_eval_samples, seed, doc_stride, split_by_article, task):
    from .tasks import DataArgs

    if max_seq_length is None:
        max_seq_length = 384 if task.lower() == "squad" else 128
    return DataArgs(
        data_dir=data_dir, train_file=train_file, validation_file=validation_file, max_seq_length=max_seq_length,
        max_train_samples=max_train_samples, max_eval_samples=max_eval_samples, seed=seed, doc_stride=doc_stride,
        split_by_article=split_by_article,
    )


@app.command()
def train(
    task: str = typer.Option(..., help="cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli, squad"),
    output_dir: Path = typer.Option(..., help="Where the model, recipe.yaml, metrics.json and logs go."),
    model: Optional[str] = typer.Option(None, help="HF model id or local path (default: packaged all-MiniLM-L6-v2)."),
    recipe: Optional[Path] = typer.Option(None, help="SparseML-format recipe YAML."),
    recipe_args: Optional[str] = typer.Option(None, help='JSON overrides of recipe variables, e.g. \'{"num_epochs": 2}\'.'),
    teacher: Optional[str] = typer.Option(None, help="Dense fine-tuned teacher (path or id) for distillation modifiers."),
    data_dir: Optional[str] = typer.Option(None, help="Task data folder (default: ../shared/data/<task> if present, else the HF hub)."),
    train_file: Optional[str] = typer.Option(None, help="Training file (SQuAD JSON)."),
    validation_file: Optional[str] = typer.Option(None, help="Validation file (SQuAD JSON)."),
    split_by_article: Optional[str] = typer.Option(None, help='SQuAD: split one file by article, "TRAIN:EVAL" counts, e.g. 36:12.'),
    epochs: Optional[float] = typer.Option(None, help="Training epochs (default: the recipe's, else 3)."),
    batch_size: int = typer.Option(32, help="Per-device training batch size."),
    learning_rate: float = typer.Option(5e-5, help="Base learning rate (recipe LR modifiers override it)."),
    max_seq_length: Optional[int] = typer.Option(None, help="Tokens per example (default 128; SQuAD 384)."),
    doc_stride: int = typer.Option(128, help="SQuAD window overlap in tokens."),
    max_train_samples: Optional[int] = typer.Option(None, help="Use a seeded random subset of the training data."),
    max_eval_samples: Optional[int] = typer.Option(None, help="Use the first N eval examples."),
    seed: int = typer.Option(42),
    warmup_ratio: float = typer.Option(0.0),
    weight_decay: float = typer.Option(0.0),
    logging_steps: int = typer.Option(50),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output dir."),
    resume: bool = typer.Option(False, help="Resume from the last checkpoint in the output dir."),
    fp16: bool = typer.Option(False),
    bf16: bool = typer.Option(False),
):
    """Fine-tune (and sparsify, with a recipe) a model on a task."""
    from .recipe import RecipeError
    from .tasks import DataError
    from .train import OutputDirError, TrainConfig, run_train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        overrides = json.loads(recipe_args) if recipe_args else None
    except json.JSONDecodeError as e:
        _fail(f"--recipe-args is not JSON: {e}")
    cfg = TrainConfig(
        task=task, output_dir=str(output_dir), model=model, recipe=str(recipe) if recipe else None, recipe_args=overrides,
        teacher=teacher,
        data=_data_args(data_dir, train_file, validation_file, max_seq_length, max_train_samples, max_eval_samples, seed, doc_stride, split_by_article, task),
        epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed, warmup_ratio=warmup_ratio,
        weight_decay=weight_decay, logging_steps=logging_steps, overwrite=overwrite, resume=resume, fp16=fp16, bf16=bf16,
    )
    try:
        metrics = run_train(cfg)
    except (RecipeError, DataError, OutputDirError, ValueError, RuntimeError) as e:
        _fail(str(e))
    _print_metrics(metrics)
    console.print(f"[bold green]model:[/] {output_dir}   [bold green]metrics:[/] {output_dir / 'metrics.json'}")


@app.command()
def evaluate(
    task: str = typer.Option(...),
    model: str = typer.Option(..., help="Trained model folder or HF id."),
    data_dir: Optional[str] = typer.Option(None),
    validation_file: Optional[str] = typer.Option(None),
    split_by_article: Optional[str] = typer.Option(None),
    max_seq_length: Optional[int] = typer.Option(None),
    doc_stride: int = typer.Option(128),
    max_eval_samples: Optional[int] = typer.Option(None),
    batch_size: int = typer.Option(64),
    seed: int = typer.Option(42),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics to this file."),
):
    """Evaluate a model on the task's dev split(s)."""
    from .evaluate import run_evaluate
    from .tasks import DataError

    if not Path(model).exists() and model.startswith((".", "/", "runs")):
        _fail(f"model folder not found: {model}")
    try:
        metrics = run_evaluate(task, model, _data_args(data_dir, None, validation_file, max_seq_length, None, max_eval_samples, seed, doc_stride, split_by_article, task), batch_size)
    except (DataError, ValueError, OSError) as e:
        _fail(str(e))
    _print_metrics(metrics)
    if json_out:
        json_out.write_text(json.dumps(metrics, indent=2))


@app.command()
def sparsity(
    model: str = typer.Argument(..., help="Model folder (save_pretrained layout) or HF id."),
    params: Optional[str] = typer.Option(None, help="Regex of parameter names (default: all >= 2-D weights)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Per-layer sparsity and mask pattern of a checkpoint."""
    from .sparsity import load_checkpoint_tensors, sparsity_table

    try:
        if Path(model).is_dir():
            tensors = load_checkpoint_tensors(model)
        else:
            from transformers import AutoModel

            tensors = dict(AutoModel.from_pretrained(model).named_parameters())
    except (OSError, ValueError) as e:
        _fail(f"cannot read weights of {model}: {e}")
    rows = sparsity_table(tensors, params)
    total = sum(r.numel for r in rows)
    zeros = sum(r.zeros for r in rows)
    if json_out:
        print(json.dumps({"params": [r.__dict__ for r in rows], "overall_sparsity": zeros / max(total, 1)}, indent=1))
        return
    table = Table(title=f"sparsity of {model}")
    for col in ("parameter", "shape", "sparsity", "pattern"):
        table.add_column(col, justify="right" if col == "sparsity" else "left")
    for r in rows:
        table.add_row(r.name, "x".join(map(str, r.shape)), f"{100 * r.sparsity:.2f}%", r.pattern)
    table.add_row("[bold]total[/]", f"{total:,}", f"[bold]{100 * zeros / max(total, 1):.2f}%[/]", "")
    console.print(table)


def _print_metrics(metrics: dict) -> None:
    table = Table(title="metrics")
    table.add_column("name")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, dict):
            for k, v in value.items():
                table.add_row(f"{key}/{k}", f"{v:.4f}" if isinstance(v, float) else str(v))
        elif value is not None:
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


def main() -> None:  # pragma: no cover - console entry
    """Entry point for ``python -m sparsebert``."""
    app()
