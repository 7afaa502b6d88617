"""One-shot pruning: apply a pruning recipe once, on calibration data, without training.

``oneshot(model, recipe, dataset)`` prunes every pruning modifier of the recipe straight to its
``final_sparsity``: OBS (oBERT, Kurtic et al. 2022, arXiv:2203.07259, one-shot setting of its
section 4) from calibration gradients in ``num_recomputations`` sub-steps, magnitude from
``|w|``, movement from ``-w * grad`` summed over one pass of the calibration batches.
``run_oneshot`` is what ``sparsebert oneshot`` calls: prune, evaluate, save.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from .modifiers import (
    DistillationModifier,
    GradualPruningModifier,
    L0StructuredPruningModifier,
    MovementPruningModifier,
    PerLayerDistillationModifier,
)
from .recipe import Recipe, load_recipe
from .session import RecipeSession
from .tasks import DataArgs

__all__ = ["oneshot", "make_grad_sampler", "OneshotConfig", "run_oneshot"]

logger = logging.getLogger(__name__)


def _calibration_loader(model, dataset, data_collator, num_samples: int, batch_size: int):
    """DataLoader over the first ``num_samples`` rows, with columns the model cannot take dropped."""
    n = min(num_samples, len(dataset))
    if hasattr(dataset, "select") and hasattr(dataset, "column_names"):  # a datasets.Dataset
        dataset = dataset.select(range(n))
        accepted = set(inspect.signature(model.forward).parameters) | {"labels", "label", "label_ids"}
        drop = [c for c in dataset.column_names if c not in accepted]  # as Trainer's remove_unused_columns
        if drop:
            dataset = dataset.remove_columns(drop)
    else:
        dataset = torch.utils.data.Subset(dataset, range(n))
    if data_collator is None:
        from transformers import default_data_collator

        data_collator = default_data_collator
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=data_collator)


def make_grad_sampler(model: torch.nn.Module, loader) -> Callable[[int], Any]:
    """A :attr:`ModifierState.grad_sampler` over ``loader``: ``sampler(num_batches)`` yields
    ``num_batches`` times with ``.grad`` = gradient of the model's loss on the next batch
    (cycling through ``loader``). Dropout is off (eval mode) so repeated batches give the same
    gradient; the mode is restored and the gradients cleared afterwards.

    Raises (while iterating):
        ValueError: the model returns no ``loss`` (the batches need labels).
    """
    device = next(model.parameters()).device

    def sampler(num_batches: int):
        was_training = model.training
        model.eval()
        produced = 0
        try:
            while produced < num_batches:
                for batch in loader:
                    if produced >= num_batches:
                        break
                    model.zero_grad(set_to_none=True)
                    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    loss = model(**batch).loss
                    if loss is None:
                        raise ValueError("calibration batches give no loss: the dataset needs labels")
                    loss.backward()
                    produced += 1
                    yield produced
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)

    return sampler


def oneshot(model: torch.nn.Module, recipe, dataset, data_collator=None, num_calibration_samples: int = 512,
            batch_size: int = 16, log_path: str | Path | None = None) -> torch.nn.Module:
    """Prune ``model`` in place with ``recipe`` at each pruning modifier's ``final_sparsity``; no training.

    Args:
        model: a model whose forward returns ``.loss`` when given ``labels`` (HF task models).
        recipe: recipe path, YAML text, :class:`~sparsebert.recipe.Recipe` or modifier list; its
            :class:`GradualPruningModifier` s (GMP, OBS, movement) run in recipe order, their
            schedules (epochs, init_sparsity) ignored. Structural modifiers (layer dropping)
            apply too; constant-pruning masks are re-applied at the end; others are ignored
            (distillation is dropped, so a training recipe with KD runs without a teacher).
        dataset: calibration rows (a ``datasets.Dataset`` or a sequence of feature dicts) with labels.
        data_collator: batches rows (``DataCollatorWithPadding`` for unpadded token ids);
            default ``transformers.default_data_collator`` (rows of equal length).
        num_calibration_samples: the first N rows are used.
        batch_size: rows per calibration gradient. OBS draws ``num_grads`` gradients, cycling
            through the ``ceil(N / batch_size)`` batches when there are fewer (repeats add no
            information, so ``num_grads <= N / batch_size`` saves time).
        log_path: append one JSON line per pruning modifier applied to this file: ``modifier`` (class
            name), ``index`` (position among the pruners), ``seconds`` (wall time, scoring included),
            ``sparsity`` (the modifier's sparsity after pruning, a fraction).

    Returns:
        ``model``, pruned (weights exactly zero; masks are not kept).

    Raises:
        RecipeError: the recipe does not fit the model, or holds an L0StructuredPruningModifier (needs training). ValueError: no pruning modifier, or
        the batches give no loss.
    """
    if not isinstance(recipe, list):
        recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        # nothing trains, so a training recipe's distillation needs no teacher: drop it
        recipe = [m for m in recipe.modifiers if not isinstance(m, (DistillationModifier, PerLayerDistillationModifier))]
    session = RecipeSession(recipe, model)
    for m in session.modifiers:
        if isinstance(m, L0StructuredPruningModifier):
            raise m.error("L0 gates are learned during training: use sparsebert train")
    pruners = [m for m in session.modifiers if isinstance(m, GradualPruningModifier)]
    if not pruners:
        raise ValueError("oneshot: the recipe has no pruning modifier (GMP, OBS or movement)")
    loader = _calibration_loader(model, dataset, data_collator, num_calibration_samples, batch_size)
    state = session.state
    state.grad_sampler = make_grad_sampler(model, loader)
    state.steps_per_epoch = 1.0  # one "epoch" of one step: the whole schedule collapses into it
    for m in session.modifiers:
        m.initialize(state)
    for i, m in enumerate(pruners):
        t0 = time.time()
        state.epoch = m.end_epoch
        if isinstance(m, MovementPruningModifier):
            state.epoch = m.start_epoch  # movement scores accumulate while the modifier is active
            batches = state.grad_sampler(len(loader))
            for _ in tqdm(batches, total=len(loader), desc="movement scores", unit="batch", leave=False):
                m.on_gradients(state)
        m.prune(state, m.final_sparsity)  # OBS shows its own progress bar over the calibration gradients
        seconds = time.time() - t0
        logger.info("oneshot: %s to %.3f sparsity in %.1f s", type(m).__name__, m.sparsity, seconds)
        if log_path is not None:  # append-only: a killed run keeps the lines of the modifiers it finished
            record = {"modifier": type(m).__name__, "index": i, "seconds": round(seconds, 3), "sparsity": float(m.sparsity)}
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
    session.finalize()
    return model


@dataclasses.dataclass
class OneshotConfig:
    """Options of ``sparsebert oneshot`` (see ``sparsebert oneshot --help``)."""

    task: str
    recipe: str
    output_dir: str
    model: str | None = None
    recipe_args: dict[str, Any] | None = None
    data: DataArgs = dataclasses.field(default_factory=DataArgs)
    num_calibration_samples: int = 512
    batch_size: int = 16
    eval_batch_size: int = 64
    seed: int = 42
    overwrite: bool = False


def run_oneshot(cfg: OneshotConfig) -> dict[str, Any]:
    """Prune ``cfg.model`` one-shot on ``cfg.task``'s training rows, evaluate on its dev split(s), save.

    Calibration rows: a seeded random subset of ``num_calibration_samples`` training examples.
    Output folder: ``save_pretrained`` model + tokenizer (moved in whole, see
    :func:`~sparsebert.train.save_model_files`), ``recipe.yaml``, ``oneshot_log.jsonl`` (one line per
    pruning modifier, see :func:`oneshot`), the task's predictions (SQuAD: ``predictions.json``,
    ``article_split.json``) and, last, ``metrics.json``.

    Raises:
        OutputDirError, RecipeError, DataError, ModelLoadError, ValueError: before any pruning, and before
        ``--overwrite`` deletes the old output folder.
    """
    from transformers import AutoTokenizer, Trainer, TrainingArguments, set_seed

    from .models import load_pretrained, resolve_model
    from .recipe import load_recipe
    from .sparsity import encoder_linear_sparsity
    from .tasks import get_task
    from .atomic import write_json_atomic, write_text_atomic
    from .train import check_output_dir, prepare_output_dir, save_model_files

    model_path = resolve_model(cfg.model)
    inputs = {"--model": model_path}
    check_output_dir(cfg.output_dir, cfg.overwrite, resume=False, inputs=inputs, resumable=False)  # fail fast
    set_seed(cfg.seed)
    task = get_task(cfg.task)
    recipe = load_recipe(cfg.recipe, cfg.recipe_args)
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, model_path, "--model")
    model = load_pretrained(task.build_model, model_path, "--model")
    data_args = dataclasses.replace(cfg.data, max_train_samples=cfg.num_calibration_samples, seed=cfg.seed)
    data = task.load_data(tokenizer, data_args, need_train=True)
    if data.note:
        logger.warning("data: %s", data.note)
    # only now, with model and data loaded: a bad --model or --data-dir keeps the old folder
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite, resume=False, inputs=inputs, resumable=False)

    t0 = time.time()
    oneshot(model, recipe, data.train, task.data_collator(tokenizer), cfg.num_calibration_samples, cfg.batch_size,
            log_path=out / "oneshot_log.jsonl")
    prune_seconds = time.time() - t0

    metrics: dict[str, Any] = {"task": task.name, "model": model_path, "recipe": cfg.recipe}
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_eval_batch_size=cfg.eval_batch_size, report_to=[],
                                 dataloader_num_workers=0, seed=cfg.seed)
        trainer = Trainer(model=model, args=args, data_collator=task.data_collator(tokenizer), processing_class=tokenizer)
        for split in data.evals:
            metrics[split] = task.evaluate(trainer, split, data)
    metrics.update(
        encoder_sparsity=round(encoder_linear_sparsity(model), 6),
        prune_wall_seconds=round(prune_seconds, 1),
        calibration_samples=len(data.train),
        data_note=data.note,
    )
    save_model_files(out, model.save_pretrained, tokenizer.save_pretrained)
    write_text_atomic(out / "recipe.yaml", recipe.to_yaml())
    task.save_predictions(out)  # SQuAD: predictions.json and article_split.json, as `train` writes them
    write_json_atomic(out / "metrics.json", metrics)  # last: its presence means the folder is complete
    return metrics
