"""The main job: fine-tune a task model under a recipe with the Hugging Face Trainer.

``run_train`` is what ``sparsebert train`` calls. It works unchanged under ``torchrun`` and
``accelerate launch`` (the Trainer handles DDP; only rank 0 writes).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoTokenizer, TrainerCallback, TrainingArguments, set_seed

from .allocator import allocator_hint
from .atomic import path_overlap, write_json_atomic, write_text_atomic
from .integrations import JsonlLoggerCallback, SparseTrainer, StopOnSignalCallback
from .models import load_pretrained, resolve_model
from .recipe import load_recipe
from .sparsity import encoder_linear_sparsity
from .tasks import DataArgs, get_task

__all__ = ["TrainConfig", "run_train", "training_arguments", "check_output_dir", "prepare_output_dir", "save_model_files",
           "write_json_atomic", "OutputDirError"]

logger = logging.getLogger(__name__)


class OutputDirError(ValueError):
    """The output directory cannot be used as asked: a file, an input model's folder (or inside/around one),
    or non-empty without --overwrite/--resume."""


@dataclasses.dataclass
class TrainConfig:
    """Options of ``sparsebert train`` (see ``sparsebert train --help`` for each)."""

    task: str
    output_dir: str
    model: str | None = None
    recipe: str | None = None
    recipe_args: dict[str, Any] | None = None
    teacher: str | None = None
    data: DataArgs = dataclasses.field(default_factory=DataArgs)
    epochs: float | None = None
    batch_size: int = 32
    eval_batch_size: int = 64
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    seed: int = 42
    logging_steps: int = 50
    save_total_limit: int = 1
    save_steps: int | None = None
    overwrite: bool = False
    resume: bool = False
    fp16: bool = False
    bf16: bool = False
    use_cpu: bool = False
    eval_each_epoch: bool = False
    group_by_length: bool = False


def check_output_dir(path: str | os.PathLike, overwrite: bool, resume: bool,
                     inputs: dict[str, str | None] | None = None, resumable: bool = True) -> Path:
    """Refuse an output dir that cannot be used, touching nothing (so a job can fail before slow loading).

    Args:
        inputs: command-line flag -> the path it reads (``{"--model": ..., "--teacher": ...}``); values
            that are not existing local paths (hub ids, ``None``) are skipped.
        resumable: the job has a ``--resume`` (only changes the hint of the "not empty" error).

    Raises:
        OutputDirError: ``path`` is a file; it is, contains or lies inside an ``inputs`` path (``--overwrite``
            would delete the model it reads, or its output would mix with it); non-empty and neither
            ``overwrite`` nor ``resume``; ``resume`` with nothing to resume.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output dir {out} is a file, not a folder; choose another --output-dir")
    for flag, src in (inputs or {}).items():
        _refuse_overlap(out, flag, src)
    if not _is_rank0():  # under torchrun only rank 0 judges (and wipes) the folder's contents
        return out
    non_empty = out.is_dir() and any(out.iterdir())
    if non_empty and not (overwrite or resume):
        hint = "pass --overwrite to replace it or --resume to continue" if resumable else "pass --overwrite to replace it"
        raise OutputDirError(f"output dir {out} is not empty; {hint}")
    if resume and not non_empty:
        raise OutputDirError(f"--resume: output dir {out} has no checkpoint to resume from")
    return out


def _refuse_overlap(out: Path, flag: str, src: str | None) -> None:
    """OutputDirError when ``out`` is, contains or lies inside the existing local path ``src`` of ``flag``."""
    if not src or not Path(src).exists():
        return  # a hub id (or no such input): nothing on disk to protect
    relation = path_overlap(out, src)
    if relation:
        raise OutputDirError(f"output dir {out} {relation} the {flag} path {src}; choose an --output-dir outside it")


def prepare_output_dir(path: str | os.PathLike, overwrite: bool, resume: bool,
                       inputs: dict[str, str | None] | None = None, resumable: bool = True) -> Path:
    """Create ``path``; refuse a non-empty one unless ``overwrite`` (wipe) or ``resume`` (keep).

    Call it after everything that can fail on bad input (models, data) has loaded: ``overwrite``
    deletes the old contents here. ``inputs``/``resumable``: as in :func:`check_output_dir`.

    Raises:
        OutputDirError: as :func:`check_output_dir`.
    """
    out = check_output_dir(path, overwrite, resume, inputs, resumable)
    if _is_rank0() and not resume and out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)  # non-empty without resume: check_output_dir saw --overwrite
    out.mkdir(parents=True, exist_ok=True)
    return out


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def save_model_files(out: Path, *savers: Callable[[str], Any]) -> None:
    """Run each saver (``model.save_pretrained``, ``tokenizer.save_pretrained``, ...) into the temporary
    folder ``out/.final.tmp``, then move its files into ``out``: a kill mid-save never leaves a truncated
    ``model.safetensors`` in place of a good one.

    A stale ``metrics.json`` (a previous save of this folder, e.g. a run stopped early and resumed) is
    deleted before the first file moves in: the caller writes ``metrics.json`` last, so its presence keeps
    meaning "the files next to it belong to a finished save".
    """
    tmp = out / ".final.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    for save in savers:
        save(str(tmp))
    (out / "metrics.json").unlink(missing_ok=True)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


def _save_final(trainer, tokenizer, out: Path) -> None:
    """The trained model and tokenizer into ``out`` (see :func:`save_model_files`)."""
    save_model_files(out, trainer.save_model, tokenizer.save_pretrained)


def training_arguments(cfg: TrainConfig, output_dir: str | os.PathLike, epochs: float) -> TrainingArguments:
    """The Hugging Face ``TrainingArguments`` of a ``sparsebert train`` run (one place, so tests see what runs).

    ``cfg.group_by_length`` selects HF's ``LengthGroupedSampler`` (``train_sampling_strategy``); the
    recipe's modifiers, not these arguments, set the learning-rate schedule. Checkpoints: at each epoch end,
    or every ``cfg.save_steps`` optimizer steps when set (a kill then loses at most that many steps).
    """
    report_to = ["tensorboard"] if _has_tensorboard() else []
    save = dict(save_strategy="steps", save_steps=cfg.save_steps) if cfg.save_steps else dict(save_strategy="epoch")
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float < 1 is a fraction of the steps
        seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        **save,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="no",
        report_to=report_to,
        fp16=cfg.fp16,
        bf16=cfg.bf16,
        # without an accelerator, say so: accelerate then sets up torch.distributed with gloo under
        # torchrun (otherwise each process would silently train alone on the full data)
        use_cpu=cfg.use_cpu or not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # frozen/dropped params leave the graph before DDP wraps
        # batches of similar length: far less padding when lengths vary (SST-2: padded tokens 3.63x -> 1.06x the real)
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=False,
    )


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train ``cfg.task`` under ``cfg.recipe``; save the model, applied recipe, metrics and logs.

    Output folder: ``save_pretrained`` files, ``recipe.yaml`` (the recipe as applied),
    ``metrics.json`` (eval metrics, measured sparsity, data notes, ``train_wall_seconds``: the training
    steps' wall time summed over every resumed run, without model/data loading and evaluation),
    ``train_log.jsonl`` (one JSON line per log step; a resume drops the lines after its checkpoint and adds a marker), ``runs/`` (TensorBoard), ``checkpoint-*``.
    SIGTERM/SIGUSR1 stop the run at the next step with a checkpoint (see :class:`StopOnSignalCallback`);
    the model and metrics are still written, ``metrics.json`` then holds ``stopped_early``.

    Returns:
        The metrics dict written to ``metrics.json``.

    Raises:
        OutputDirError, RecipeError, DataError, ModelLoadError, ValueError: before any training step.
    """
    set_seed(cfg.seed)
    task = get_task(cfg.task)
    model_path = resolve_model(cfg.model)
    recipe = load_recipe(cfg.recipe, cfg.recipe_args) if cfg.recipe else None

    inputs = {"--model": model_path, "--teacher": cfg.teacher}
    check_output_dir(cfg.output_dir, cfg.overwrite, cfg.resume, inputs)  # fail fast, before the slow loading

    # models and data first: a bad --model/--teacher/--data-dir must fail before --overwrite wipes the output dir
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, model_path, "--model")
    model = load_pretrained(task.build_model, model_path, "--model")
    teacher = None
    if cfg.teacher:
        teacher = load_pretrained(task.build_model, cfg.teacher, "--teacher")
        _check_same_head(model, teacher, cfg.teacher)
    data = task.load_data(tokenizer, cfg.data, need_train=True)
    if data.note:
        logger.warning("data: %s", data.note)
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite, cfg.resume, inputs)

    epochs = cfg.epochs or (recipe.num_epochs if recipe else None) or 3.0
    args = training_arguments(cfg, out, epochs)
    if args.device.type == "cpu" and _is_rank0() and (hint := allocator_hint()):
        logger.warning("%s", hint)
    trainer = SparseTrainer(
        recipe=recipe,
        teacher=teacher,
        model=model,
        args=args,
        train_dataset=data.train,
        data_collator=task.data_collator(tokenizer),
        processing_class=tokenizer,
    )
    trainer.add_callback(JsonlLoggerCallback(out / "train_log.jsonl"))
    if cfg.eval_each_epoch:
        trainer.add_callback(EpochEvalCallback(trainer, task, data))
    # SIGTERM/SIGUSR1: checkpoint, then finish as below; the handlers stay until metrics.json is written, so a
    # signal after the last step (a deadline) waits for the final evaluation and save instead of losing them.
    stop = StopOnSignalCallback(trainer.accelerator, hold_after_train=True)
    trainer.add_callback(stop)
    try:
        train_result = trainer.train(resume_from_checkpoint=True if cfg.resume else None)

        metrics: dict[str, Any] = {"task": task.name, "model": model_path, "recipe": cfg.recipe, "teacher": cfg.teacher}
        for split in data.evals:
            metrics[split] = task.evaluate(trainer, split, data)
        metrics.update(
            encoder_sparsity=round(encoder_linear_sparsity(model), 6),
            train_wall_seconds=round(trainer.train_wall_seconds, 1),  # over every resumed run, when recorded
            train_samples=len(data.train),
            epochs=epochs,
            train_loss=train_result.training_loss,
            data_note=data.note,
        )
        if not trainer.wall_history_complete:
            metrics["train_wall_note"] = ("resumed from a checkpoint that does not record the training time before "
                                          "it: train_wall_seconds covers only the runs since")
        if stop.stopped_at is not None:  # evaluated mid-schedule: say so wherever the metrics go
            metrics["stopped_early"] = stop.stopped_at
        if trainer.is_world_process_zero():
            _save_final(trainer, tokenizer, out)
            trainer.session.save_artifacts(out)  # e.g. quantization.json of QAT
            if recipe is not None:
                write_text_atomic(out / "recipe.yaml", recipe.to_yaml())
            task.save_predictions(out)
            write_json_atomic(out / "metrics.json", metrics)
        if stop.received and stop.stopped_at is None:
            logger.warning("%s arrived after the last training step: the final evaluation and save ran first", stop.received)
    finally:
        stop.restore_handlers()  # also when training raises (in-process callers keep their handlers)
    shutdown_distributed()
    return metrics


def shutdown_distributed() -> None:
    """Under torchrun/accelerate: wait for every rank (rank 0 may still be saving), then destroy the process
    group, so no rank exits with gloo's threads alive ("terminate called without an active exception",
    SIGABRT at interpreter exit). A no-op in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class EpochEvalCallback(TrainerCallback):
    """Evaluate every eval split at each epoch end and log ``eval_<split>_<metric>`` (a learning curve).

    Runs on every rank (evaluation is distributed under DDP); the Trainer's loggers write on rank 0.
    """

    def __init__(self, trainer, task, data):
        self.trainer, self.task, self.data = trainer, task, data

    def on_epoch_end(self, args, state, control, **kwargs):
        """Evaluate every split of ``self.data.evals`` and log its numeric metrics as ``eval_<split>_<metric>``
        (at ``state.global_step``); the model goes back to train mode afterwards. ``control`` is unchanged."""
        logs = {}
        for split in self.data.evals:
            for k, v in self.task.evaluate(self.trainer, split, self.data).items():
                if isinstance(v, (int, float)):
                    logs[f"eval_{split}_{k}"] = v
        self.trainer.model.train()  # evaluation switched to eval mode; the next steps train
        self.trainer.log(logs)


def _check_same_head(model, teacher, teacher_path: str) -> None:
    n_s, n_t = getattr(model.config, "num_labels", None), getattr(teacher.config, "num_labels", None)
    if n_s != n_t:
        raise ValueError(f"teacher {teacher_path} has num_labels={n_t} but the task/student has {n_s}")


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None
