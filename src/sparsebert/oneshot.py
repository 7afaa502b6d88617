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
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .modifiers import DistillationModifier, GradualPruningModifier, MovementPruningModifier, PerLayerDistillationModifier
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
            batch_size: int = 16) -> torch.nn.Module:
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

    Returns:
        ``model``, pruned (weights exactly zero; masks are not kept).

    Raises:
        RecipeError: the recipe does not fit the model. ValueError: no pruning modifier, or
        the batches give no loss.
    """
    if not isinstance(recipe, list):
        recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        # nothing trains, so a training recipe's distillation needs no teacher: drop it
        recipe = [m for m in recipe.modifiers if not isinstance(m, (DistillationModifier, PerLayerDistillationModifier))]
    session = RecipeSession(recipe, model)
    pruners = [m for m in session.modifiers if isinstance(m, GradualPruningModifier)]
    if not pruners:
        raise ValueError("oneshot: the recipe has no pruning modifier (GMP, OBS or movement)")
    loader = _calibration_loader(model, dataset, data_collator, num_calibration_samples, batch_size)
    state = session.state
    state.grad_sampler = make_grad_sampler(model, loader)
    state.steps_per_epoch = 1.0  # one "epoch" of one step: the whole schedule collapses into it
    for m in session.modifiers:
        m.initialize(state)
    for m in pruners:
        state.epoch = m.end_epoch
        if isinstance(m, MovementPruningModifier):
            state.epoch = m.start_epoch  # movement scores accumulate while the modifier is active
            for _ in state.grad_sampler(len(loader)):
                m.on_gradients(state)
        t0 = time.time()
        m.prune(state, m.final_sparsity)
        logger.info("oneshot: %s to %.3f sparsity in %.1f s", type(m).__name__, m.sparsity, time.time() - t0)
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
    Output folder: ``save_pretrained`` model + tokenizer, ``recipe.yaml``, ``metrics.json``.

    Raises:
        OutputDirError, RecipeError, DataError, ValueError: before any pruning.
    """
    from transformers import AutoTokenizer, Trainer, TrainingArguments, set_seed

    from .models import load_pretrained, resolve_model
    from .recipe import load_recipe
    from .sparsity import encoder_linear_sparsity
    from .tasks import get_task
    from .train import OutputDirError, prepare_output_dir, write_json_atomic

    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:  # prepare_output_dir would suggest --resume
        raise OutputDirError(f"output dir {out} is not empty; pass --overwrite to replace it")
    set_seed(cfg.seed)
    task = get_task(cfg.task)
    model_path = resolve_model(cfg.model)
    recipe = load_recipe(cfg.recipe, cfg.recipe_args)
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, model_path, "--model")
    model = load_pretrained(task.build_model, model_path, "--model")
    out = prepare_output_dir(out, cfg.overwrite, resume=False)  # after loading: a bad --model keeps the old dir
    data_args = dataclasses.replace(cfg.data, max_train_samples=cfg.num_calibration_samples, seed=cfg.seed)
    data = task.load_data(tokenizer, data_args, need_train=True)
    if data.note:
        logger.warning("data: %s", data.note)

    t0 = time.time()
    oneshot(model, recipe, data.train, task.data_collator(tokenizer), cfg.num_calibration_samples, cfg.batch_size)
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
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (Path(out) / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    write_json_atomic(Path(out) / "metrics.json", metrics)
    return metrics
