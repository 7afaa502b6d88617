"""``sparsebert`` command line: train, evaluate, sparsity, oneshot, export, benchmark, serve."""

from __future__ import annotations

import json
import logging
import os
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


def _data_args(data_dir, train_file, validation_file, max_seq_length, max_train_samples, max_eval_samples, seed, doc_stride, split_by_article, task,
               pad_to_max_length=True):
    from .tasks import DataArgs

    if max_seq_length is None:
        max_seq_length = 384 if task.lower() == "squad" else 128
    return DataArgs(
        data_dir=data_dir, train_file=train_file, validation_file=validation_file, max_seq_length=max_seq_length,
        max_train_samples=max_train_samples, max_eval_samples=max_eval_samples, seed=seed, doc_stride=doc_stride,
        split_by_article=split_by_article, pad_to_max_length=pad_to_max_length,
    )


@app.command()
def train(
    task: str = typer.Option(..., help="cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli, squad, mlm"),
    output_dir: Path = typer.Option(..., help="Where the model, recipe.yaml, metrics.json and logs go."),
    model: Optional[str] = typer.Option(None, help="HF model id or local path (default: packaged all-MiniLM-L6-v2)."),
    recipe: Optional[Path] = typer.Option(None, help="SparseML-format recipe YAML."),
    recipe_args: Optional[str] = typer.Option(None, help='JSON overrides of recipe variables, e.g. \'{"num_epochs": 2}\'.'),
    teacher: Optional[str] = typer.Option(None, help="Dense fine-tuned teacher (path or id) for distillation modifiers."),
    data_dir: Optional[str] = typer.Option(None, help="Task data folder (default: ../shared/data/glue/<TASK> or ../shared/data/squad if present, else the HF hub); mlm: corpus file/folder (default ../shared/data/wikipedia-sample/text) or hub NAME[:CONFIG]."),
    train_file: Optional[str] = typer.Option(None, help="Training file (SQuAD JSON; mlm: corpus file or folder)."),
    validation_file: Optional[str] = typer.Option(None, help="Validation file (SQuAD JSON; mlm: held-out text)."),
    split_by_article: Optional[str] = typer.Option(None, help='SQuAD: split one file by article, "TRAIN:EVAL" counts, e.g. 36:12.'),
    epochs: Optional[float] = typer.Option(None, help="Training epochs (default: the recipe's, else 3)."),
    batch_size: int = typer.Option(32, help="Per-device training batch size."),
    learning_rate: float = typer.Option(5e-5, help="Base learning rate (recipe LR modifiers override it)."),
    max_seq_length: Optional[int] = typer.Option(None, help="Tokens per example (default 128; SQuAD 384)."),
    doc_stride: int = typer.Option(128, help="SQuAD window overlap in tokens."),
    max_train_samples: Optional[int] = typer.Option(None, min=1, help="Use a seeded random subset of the training data."),
    max_eval_samples: Optional[int] = typer.Option(None, min=1, help="Use the first N eval examples."),
    seed: int = typer.Option(42),
    warmup_ratio: float = typer.Option(0.0),
    weight_decay: float = typer.Option(0.0),
    logging_steps: int = typer.Option(50),
    save_steps: Optional[int] = typer.Option(None, min=1, help="Checkpoint every N optimizer steps instead of at each epoch end: a kill (OOM, SIGKILL) then loses at most N steps, not a whole epoch; --resume continues from the last checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output dir."),
    resume: bool = typer.Option(False, help="Resume from the last checkpoint in the output dir."),
    fp16: bool = typer.Option(False),
    bf16: bool = typer.Option(False),
    eval_each_epoch: bool = typer.Option(False, help="Evaluate at each epoch end (logged to train_log.jsonl)."),
    streaming: bool = typer.Option(False, help="mlm: read the training corpus lazily; an epoch is --max-train-samples blocks."),
    group_by_length: bool = typer.Option(False, help="Batch examples of similar length (HF LengthGroupedSampler): less padding, faster when lengths vary."),
    pad_to_max_length: bool = typer.Option(True, help="SQuAD: pad every window to max_seq_length (run_qa.py's default); --no-pad-to-max-length pads each batch to its longest window (~3x faster on a CPU)."),
):
    """Fine-tune (and sparsify, with a recipe) a model on a task."""
    from .train import TrainConfig, run_train

    if recipe_args and recipe is None:
        _fail("--recipe-args overrides recipe variables: it needs --recipe")
    overrides = _start_job(recipe_args)
    cfg = TrainConfig(
        task=task, output_dir=str(output_dir), model=model, recipe=str(recipe) if recipe else None, recipe_args=overrides,
        teacher=teacher,
        data=_data_args(data_dir, train_file, validation_file, max_seq_length, max_train_samples, max_eval_samples, seed, doc_stride, split_by_article, task,
                        pad_to_max_length),
        epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed, warmup_ratio=warmup_ratio,
        weight_decay=weight_decay, logging_steps=logging_steps, save_steps=save_steps, overwrite=overwrite, resume=resume,
        fp16=fp16, bf16=bf16, eval_each_epoch=eval_each_epoch, group_by_length=group_by_length,
    )
    cfg.data.streaming = streaming
    _run_and_report(run_train, cfg, output_dir)


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
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics to this file (its folder is created; an existing file needs --overwrite)."),
    overwrite: bool = typer.Option(False, help="Replace an existing --json file."),
    engine: str = typer.Option("onnxruntime", help="For a deployment folder (manifest.json): the engine that runs it."),
    pad_to_max_length: bool = typer.Option(True, help="SQuAD: pad every window to max_seq_length (run_qa.py's default); --no-pad-to-max-length pads each batch to its longest window (~3x faster on a CPU)."),
):
    """Evaluate a model (trained folder, HF id, or `sparsebert export` deployment folder) on the task's dev split(s)."""
    from .atomic import write_json_atomic
    from .deployment import DeploymentError, load_manifest
    from .evaluate import run_evaluate
    from .export import evaluate_onnx
    from .tasks import DataError

    if not Path(model).exists() and model.startswith((".", "/", "runs", "deploy")):
        _fail(f"model folder not found: {model}")
    if json_out and json_out.is_dir():
        _fail(f"--json {json_out} is a folder; name a file")
    if json_out and json_out.exists() and not overwrite:  # checked before the (slow) evaluation
        _fail(f"--json {json_out} already exists; pass --overwrite to replace it")
    data = _data_args(data_dir, None, validation_file, max_seq_length, None, max_eval_samples, seed, doc_stride, split_by_article, task,
                      pad_to_max_length)
    try:
        if (Path(model) / "manifest.json").is_file():
            if max_seq_length is None:  # the deployment's own max_seq_length, not the CLI default
                data.max_seq_length = load_manifest(model)["max_seq_length"]
            metrics = evaluate_onnx(model, task, data, engine=engine, batch_size=batch_size)
        else:
            metrics = run_evaluate(task, model, data, batch_size)
    except (DataError, DeploymentError, ValueError, OSError) as e:
        _fail(str(e))
    _print_metrics(metrics)
    if json_out:
        try:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(json_out, metrics)
        except OSError as e:
            _fail(f"--json {json_out}: cannot write the metrics ({e})")


@app.command()
def sparsity(
    model: str = typer.Argument(..., help="Model folder (save_pretrained layout) or HF id."),
    params: Optional[str] = typer.Option(None, help="Regex of parameter names (default: all >= 2-D weights)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    compare_mask: Optional[str] = typer.Option(None, "--compare-mask", help="Another checkpoint: compare the zero masks of the encoder Linear weights (exit 1 if they differ)."),
):
    """Per-layer sparsity and mask pattern of a checkpoint (or, with --compare-mask, whether two share a mask)."""
    from .sparsity import sparsity_table

    tensors = _checkpoint_tensors(model)
    if compare_mask:
        _compare_masks(model, tensors, compare_mask, json_out)
        return
    try:
        rows = sparsity_table(tensors, params)
    except ValueError as e:
        _fail(str(e))
    if params and not rows:
        _fail(f"--params {params!r} matches no parameter of {model} with >= 2 dims (names look like: "
              f"{', '.join(list(tensors)[:3])})")
    total = sum(r.numel for r in rows)
    zeros = sum(r.zeros for r in rows)
    dead = _dead_structures(model, tensors)
    if json_out:
        print(json.dumps({"params": [r.__dict__ for r in rows], "overall_sparsity": zeros / max(total, 1),
                          "dead_structures": dead}, indent=1))
        return
    table = Table(title=f"sparsity of {model}")
    for col in ("parameter", "shape", "sparsity", "pattern"):
        table.add_column(col, justify="right" if col == "sparsity" else "left")
    for r in rows:
        table.add_row(r.name, "x".join(map(str, r.shape)), f"{100 * r.sparsity:.2f}%", r.pattern)
    table.add_row("[bold]total[/]", f"{total:,}", f"[bold]{100 * zeros / max(total, 1):.2f}%[/]", "")
    console.print(table)
    if dead and (dead["heads_dead"] or dead["neurons_dead"]):
        console.print(f"structure: {dead['heads_dead']}/{dead['heads_total']} attention heads and {dead['neurons_dead']}/"
                      f"{dead['neurons_total']} FFN neurons have all-zero output weights (`sparsebert export` slices them out)")


def _dead_structures(model: str, tensors: dict) -> dict | None:
    """Dead heads / FFN neurons of a BERT checkpoint folder (``sparsebert.slicing``), or ``None`` without a
    readable config.json with ``hidden_size`` / ``num_attention_heads``."""
    from .slicing import dead_structures_from_tensors

    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
        head_size = int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None
    return dead_structures_from_tensors(tensors, head_size)


def _checkpoint_tensors(model: str) -> dict:
    """name -> tensor of a model folder (safetensors, no model built) or HF id; exit 2 if unreadable."""
    from .sparsity import load_checkpoint_tensors

    try:
        if Path(model).is_dir():
            return load_checkpoint_tensors(model)
        from transformers import AutoModel

        return dict(AutoModel.from_pretrained(model).named_parameters())
    except (OSError, ValueError) as e:
        _fail(f"cannot read weights of {model}: {e}")


def _compare_masks(model: str, tensors: dict, other: str, json_out: bool) -> None:
    """Print identical/differing encoder-Linear mask counts of two checkpoints; exit 1 if they differ."""
    from .sparsity import compare_masks

    try:
        c = compare_masks(tensors, _checkpoint_tensors(other))
    except ValueError as e:
        _fail(str(e))
    if json_out:
        print(json.dumps({**c.__dict__, "same": c.same}, indent=1))
    else:
        verdict = "[bold green]identical[/]" if c.same else "[bold red]DIFFERENT[/]"
        console.print(f"encoder Linear masks of {model} vs {other}: {verdict}\n"
                      f"  tensors: {len(c.identical)} identical, {len(c.differing)} differing, "
                      f"{len(c.only_in_a)} only in the first, {len(c.only_in_b)} only in the second\n"
                      f"  elements: {c.differing_elements:,} of {c.total_elements:,} differ; "
                      f"sparsity {100 * c.sparsity_a:.2f}% vs {100 * c.sparsity_b:.2f}%")
        for name in c.differing[:10]:
            console.print(f"  differs: {name}")
    if not c.same:
        raise typer.Exit(code=1)


def _start_job(recipe_args: str | None) -> dict | None:
    """Set up logging for a job and parse ``--recipe-args`` (JSON object of recipe variable overrides)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        overrides = json.loads(recipe_args) if recipe_args else None
    except json.JSONDecodeError as e:
        _fail(f"--recipe-args is not JSON: {e}")
    if overrides is not None and not isinstance(overrides, dict):
        _fail(f"--recipe-args must be a JSON object of recipe variables, e.g. '{{\"num_epochs\": 2}}'; got {recipe_args!r}")
    return overrides


def _run_and_report(run, cfg, output_dir: Path) -> None:
    """Run a job (``run_train``/``run_oneshot``); turn input errors into a clean exit 2; print the
    metrics and where the model and metrics are (rank 0 only under torchrun)."""
    from .recipe import RecipeError
    from .tasks import DataError
    from .train import OutputDirError

    try:
        metrics = run(cfg)
    except (RecipeError, DataError, OutputDirError, ValueError, RuntimeError) as e:
        _fail(str(e))
    if os.environ.get("RANK", "0") == "0":
        _print_metrics(metrics)
        console.print(f"[bold green]model:[/] {output_dir}   [bold green]metrics:[/] {output_dir / 'metrics.json'}")
        if metrics.get("stopped_early"):
            where = metrics["stopped_early"]
            console.print(f"[bold yellow]stopped early[/] by {where['signal']} at step {where['step']} (epoch {where['epoch']}): "
                          f"the metrics are mid-schedule; continue with the same command and --resume")


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


@app.command()
def oneshot(
    task: str = typer.Option(..., help="cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli, squad"),
    recipe: Path = typer.Option(..., help="Pruning recipe (GMP, OBS or movement modifiers); pruned straight to final_sparsity."),
    output_dir: Path = typer.Option(..., help="Where the pruned model, recipe.yaml, oneshot_log.jsonl (one line per pruning modifier), SQuAD's predictions.json and metrics.json go."),
    model: Optional[str] = typer.Option(None, help="Fine-tuned model folder or HF id (default: packaged all-MiniLM-L6-v2)."),
    recipe_args: Optional[str] = typer.Option(None, help='JSON overrides of recipe variables.'),
    num_calibration_samples: int = typer.Option(512, help="Training examples (seeded subset) used for calibration gradients."),
    batch_size: int = typer.Option(16, help="Examples per calibration gradient."),
    eval_batch_size: int = typer.Option(64),
    data_dir: Optional[str] = typer.Option(None, help="Task data folder (default: ../shared/data/glue/<TASK> or ../shared/data/squad if present, else the HF hub)."),
    split_by_article: Optional[str] = typer.Option(None, help='SQuAD: split one file by article, "TRAIN:EVAL" counts.'),
    max_seq_length: Optional[int] = typer.Option(None, help="Tokens per example (default 128; SQuAD 384)."),
    doc_stride: int = typer.Option(128),
    max_eval_samples: Optional[int] = typer.Option(None, min=1, help="Evaluate on the first N dev examples."),
    seed: int = typer.Option(42),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output dir."),
):
    """Prune a model one-shot (no training) with a recipe, evaluate it on the task's dev split(s), save it."""
    from .oneshot import OneshotConfig, run_oneshot

    overrides = _start_job(recipe_args)
    cfg = OneshotConfig(
        task=task, recipe=str(recipe), output_dir=str(output_dir), model=model, recipe_args=overrides,
        data=_data_args(data_dir, None, None, max_seq_length, None, max_eval_samples, seed, doc_stride, split_by_article, task),
        num_calibration_samples=num_calibration_samples, batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed,
        overwrite=overwrite,
    )
    _run_and_report(run_oneshot, cfg, output_dir)


@app.command("export")
def export_cmd(
    model_dir: Path = typer.Argument(..., help="Trained output folder (save_pretrained files, metrics.json, recipe.yaml)."),
    output_dir: Path = typer.Option(..., help="Deployment folder to write (model.onnx, manifest.json, tokenizer, config)."),
    task: Optional[str] = typer.Option(None, help="Task name or kind (default: metrics.json's task, else the architecture)."),
    sequence_length: Optional[int] = typer.Option(None, help="Static sequence length (default: dynamic axis)."),
    batch_size: Optional[int] = typer.Option(None, help="Static batch size (default: dynamic axis)."),
    precision: str = typer.Option("fp32", help="fp32, or int8 from a QAT folder (quantization.json)."),
    int8_format: str = typer.Option("qdq", help="INT8 graph format: qdq or qoperator."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output dir."),
    slice_structures: bool = typer.Option(True, "--slice/--no-slice",
                                          help="Remove attention heads / FFN neurons whose output weights are all zero (structured pruning): exact, smaller layers."),
):
    """Export a trained model folder to an ONNX deployment folder (checked against PyTorch)."""
    from .export import ExportError, export_onnx

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = export_onnx(model_dir, output_dir, task=task, sequence_length=sequence_length, batch_size=batch_size,
                          precision=precision, overwrite=overwrite, int8_format=int8_format, slice_structures=slice_structures)
    except (ExportError, OSError) as e:
        _fail(str(e))
    manifest = json.loads((out / "manifest.json").read_text())
    console.print(f"[bold green]exported:[/] {out / 'model.onnx'}  task={manifest['task']} precision={manifest['precision']} "
                  f"encoder sparsity={manifest['sparsity']['encoder_linear']}  max |ORT - torch|={manifest['validation']['max_abs_diff']:.2e}")
    sliced = manifest.get("slicing")
    if sliced and (sliced["heads_removed"] or sliced["neurons_removed"]):
        console.print(f"sliced: {sliced['heads_removed']}/{sliced['heads_total']} heads and {sliced['neurons_removed']}/"
                      f"{sliced['neurons_total']} FFN neurons removed ({sliced['params_before']:,} -> {sliced['params_after']:,} parameters)")


@app.command("benchmark")
def benchmark_cmd(
    deployment_dir: Path = typer.Argument(..., help="Deployment folder from `sparsebert export` (manifest.json, model.onnx)."),
    engine: str = typer.Option("onnxruntime", help="Engine: onnxruntime, torch, sparsebert (sparse CPU kernels) or sparsebert-int8 (see sparsebert.deployment.ENGINES)."),
    compare: Optional[list[str]] = typer.Option(None, help="Another deployment folder, engine, or FOLDER:ENGINE to measure interleaved (repeatable)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (default: static export shape, else 1)."),
    sequence_length: Optional[int] = typer.Option(None, help="Tokens per input (default: static shape, else max_seq_length)."),
    num_threads: Optional[int] = typer.Option(None, help="Intra-op threads per engine."),
    warmup: int = typer.Option(3, help="Untimed warm-up calls per target."),
    time_s: Optional[float] = typer.Option(None, "--time", help="Seconds to measure, all targets together (default 10)."),
    iterations: Optional[int] = typer.Option(None, min=1, help="Timed calls per target (instead of --time)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Latency (mean/p50/p90/p99 ms) and items/s of deployment folders, interleaved, with ratios to the first."""
    from .benchmark import run_benchmark
    from .deployment import DeploymentError

    try:
        report = run_benchmark(deployment_dir, engine, compare, batch_size, sequence_length, num_threads, warmup, time_s, iterations)
    except DeploymentError as e:
        _fail(str(e))
    if json_out:
        print(json.dumps(report, indent=1))
        return
    cfg = report["config"]
    table = Table(title=f"latency ms, batch {cfg['batch_size']} x seq {cfg['sequence_length']}, threads {cfg['num_threads'] or 'default'}")
    for col in ("target", "prec", "runs", "mean", "p50", "p90", "p99", "items/s", "speedup"):
        table.add_column(col, justify="left" if col in ("target", "prec") else "right", no_wrap=col != "target")
    for r in report["results"]:
        lat = r["latency_ms"]
        table.add_row(r["target"], str(r["precision"]), str(r["iterations"]), *(f"{lat[k]:.2f}" for k in ("mean", "p50", "p90", "p99")),
                      f"{r['items_per_second']:.1f}", f"{r['speedup_vs_first']:.2f}x")
    console.print(table)


@app.command("serve")
def serve_cmd(
    deployment_dir: Path = typer.Argument(..., help="Deployment folder from `sparsebert export`."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000),
    engine: str = typer.Option("onnxruntime", help="Engine: onnxruntime, torch, sparsebert (sparse CPU kernels) or sparsebert-int8 (see sparsebert.deployment.ENGINES)."),
    truncate: bool = typer.Option(True, "--truncate/--no-truncate", help="Truncate inputs over max_seq_length, or refuse them (422)."),
    num_threads: Optional[int] = typer.Option(None, help="Intra-op threads of the engine."),
):
    """Serve a deployment folder over HTTP: POST /predict (JSON), GET /health, /docs."""
    from .deployment import DeploymentError
    from .serve import serve

    try:
        serve(deployment_dir, host=host, port=port, engine=engine, truncate=truncate, num_threads=num_threads)
    except DeploymentError as e:
        _fail(str(e))
