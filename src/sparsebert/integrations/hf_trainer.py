"""Hugging Face ``Trainer`` integration: recipes inside a user's own training script.

Two lines in a user's script::

    from sparsebert import SparseTrainer
    trainer = SparseTrainer(recipe="recipe.yaml", teacher=teacher, model=model, args=args, ...)

``SparseTrainer`` is ``RecipeTrainerMixin`` + ``transformers.Trainer``; mix the former into any
Trainer subclass instead. It adds the distillation loss, drives the recipe's learning rate,
registers :class:`RecipeCallback`, which applies masks after every optimizer step, and writes the
modifier state (``sparsebert_state.pt``) into every checkpoint before older ones are deleted;
``--resume`` continues from the newest complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, has_length

from ..atomic import write_json_atomic, write_text_atomic
from ..session import SESSION_STATE_FILE, RecipeSession

__all__ = ["RecipeCallback", "RecipeTrainerMixin", "SparseTrainer", "JsonlLoggerCallback", "StopOnSignalCallback"]

logger = logging.getLogger(__name__)

PROGRESS_FILE = "sparsebert_progress.json"  # in each checkpoint: training wall time so far, over all resumes


def steps_per_epoch(args, max_steps: int, train_dataloader=None) -> float:
    """Optimizer steps per epoch as the Trainer counts them (global: every rank steps together)."""
    if args.max_steps <= 0 and args.num_train_epochs > 0:
        return max_steps / args.num_train_epochs
    n = len(train_dataloader)
    return max(n // args.gradient_accumulation_steps + int(n % args.gradient_accumulation_steps > 0), 1)


class RecipeCallback(TrainerCallback):
    """Drive a :class:`RecipeSession` from Trainer events.

    ``on_train_begin`` starts the session (steps per epoch from the Trainer state),
    ``on_step_end`` (after ``optimizer.step``) updates schedules and re-applies masks,
    ``on_train_end`` finalizes. :class:`RecipeTrainerMixin` writes the modifier state into each
    checkpoint itself (before rotation) and builds this callback with ``save_state=False``.

    Args:
        session: the session to drive.
        save_state: write the state in ``on_save`` -- only for a plain ``Trainer`` with this callback
            added by hand. transformers calls ``on_save`` after it has already deleted the older
            checkpoints, so a kill in between leaves a checkpoint without masks; prefer the mixin.
    """

    def __init__(self, session: RecipeSession, save_state: bool = True):
        self.session = session
        self.save_state = save_state

    def on_train_begin(self, args, state, control, optimizer=None, train_dataloader=None, **kwargs):
        """Move the teacher to the training device and start the session at ``state.global_step``
        (the checkpoint's step on resume). Raises ``ValueError`` when steps per epoch come out <= 0."""
        if self.session.state.teacher is not None:
            self.session.state.teacher.to(args.device)
        if not self.session._started:
            self.session.start(steps_per_epoch(args, state.max_steps, train_dataloader), optimizer=optimizer, step=state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """Gradients are ready, the optimizer steps next: modifiers read them (e.g. movement scores)."""
        self.session.on_gradients()

    def on_step_end(self, args, state, control, **kwargs):
        """After the optimizer step: advance schedules to ``state.global_step`` and re-apply masks."""
        self.session.update(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the recipe's scalars (epoch, scheduled sparsity, loss terms) to training-loss logs."""
        if logs is not None and "loss" in logs:
            logs.update(self.session.log_values())

    def on_save(self, args, state, control, **kwargs):
        """With ``save_state`` (plain Trainer only): write the state and artifacts into the new checkpoint
        on the saving process(es)."""
        if self.save_state and args.should_save:
            ckpt = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if ckpt.is_dir():
                self.session.save(ckpt)
                self.session.save_artifacts(ckpt)

    def on_train_end(self, args, state, control, **kwargs):
        """Final mask application and modifier clean-up (idempotent)."""
        self.session.finalize()


class StopOnSignalCallback(TrainerCallback):
    """Stop training cleanly on SIGTERM or SIGUSR1 (preemption, a scheduler's time limit, ``timeout``).

    At the next optimizer step every process stops together: a checkpoint is saved (``--resume``
    continues from it, masks and schedules included) and training ends as usual, so the caller still
    evaluates and saves the model. :attr:`stopped_at` then says where (``{"signal", "step", "epoch"}``);
    ``sparsebert train`` writes it into ``metrics.json`` as ``stopped_early``. Without a signal it
    stays ``None`` and nothing changes.

    A second signal while stopping restores the previous handler and re-raises, so it acts as before
    (SIGTERM's default: terminate at once). Handlers are installed at ``on_train_begin`` and the previous
    ones restored at ``on_train_end``, or, with ``hold_after_train``, only when the caller calls
    :meth:`restore_handlers` (in a ``finally``, after its final evaluation and saving): a signal that
    arrives after the last step then waits until the outputs are written instead of killing the
    process between the last step and ``metrics.json``. Call :meth:`restore_handlers` in a ``finally``
    when training may raise. Off the main thread (where Python allows no handlers) the callback does
    nothing. Under torch.distributed the processes agree through ``accelerator.set_trigger`` /
    ``check_trigger``, one small all-reduce every ``sync_every`` steps (a signal to any rank stops
    all); a single process checks its own flag every step at no cost.

    Args:
        accelerator: the Trainer's ``accelerate.Accelerator`` (``trainer.accelerator``).
        sync_every: steps between the cross-process checks under torch.distributed.
        hold_after_train: keep the handlers past ``on_train_end`` until :meth:`restore_handlers`.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, accelerator, sync_every: int = 10, hold_after_train: bool = False):
        self.accelerator = accelerator
        self.sync_every = max(int(sync_every), 1)
        self.hold_after_train = hold_after_train
        self.received: str | None = None
        self.stopped_at: dict | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.received is not None:  # asked twice: stop waiting for the step boundary
            self.restore_handlers()
            signal.raise_signal(signum)
            return
        self.received = signal.Signals(signum).name  # only a flag: the training loop acts on it

    def restore_handlers(self) -> None:
        """Put back the handlers that were installed before training (idempotent)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)  # None: a handler set outside Python
        self._previous.clear()

    def on_train_begin(self, args, state, control, **kwargs):
        """Install the SIGTERM/SIGUSR1 handlers (main thread only; once)."""
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return  # no handlers off the main thread; already installed
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handler)

    def on_step_end(self, args, state, control, **kwargs):
        """After a signal (on any rank): record :attr:`stopped_at`, ask for a checkpoint and stop training."""
        if self.accelerator.num_processes > 1:
            if state.global_step % self.sync_every:
                return
            if self.received:
                self.accelerator.set_trigger()
            stop = self.accelerator.check_trigger()
        else:
            stop = self.received is not None
        if stop and self.stopped_at is None:
            self.stopped_at = {"signal": self.received or "another rank", "step": state.global_step,
                               "epoch": round(state.epoch, 4)}
            logger.warning("%s received: stopping at step %d (epoch %.2f), saving a checkpoint; continue with --resume",
                           self.stopped_at["signal"], state.global_step, state.epoch)
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        """Restore the previous handlers, unless ``hold_after_train`` (then :meth:`restore_handlers` does)."""
        if not self.hold_after_train:
            self.restore_handlers()


class JsonlLoggerCallback(TrainerCallback):
    """Append every Trainer log (loss, lr, sparsity, eval metrics) as one JSON line (rank 0 only).

    Every line has ``step`` (global optimizer steps) and ``epoch``. On a resumed run the lines of steps
    after the checkpoint (logged before the kill, about to be logged again) are dropped and a
    ``{"step": N, "resumed_from_step": N}`` line marks the resume, so each step appears once.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        """On a resumed run (``state.global_step`` > 0, restored from the checkpoint): rewrite the file
        atomically without lines of later steps (and without a line torn by the kill), then add the marker."""
        if not state.is_world_process_zero or state.global_step <= 0:
            return
        step = state.global_step
        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.is_file() else []
        kept = []
        for i, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s line %d is not JSON (cut off by the kill?): dropped on resume", self.path, i)
                continue
            if not (isinstance(record, dict) and isinstance(record.get("step"), (int, float)) and record["step"] > step):
                kept.append(line)
        kept.append(json.dumps({"step": step, "resumed_from_step": step}))
        write_text_atomic(self.path, "\n".join(kept) + "\n")

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Append ``{"step", "epoch", **logs}`` as one line (rank 0; nothing for empty logs)."""
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "epoch": state.epoch, **logs}
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


class RecipeTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass to apply a recipe.

    Extra constructor arguments: ``recipe`` (path, YAML text, :class:`~sparsebert.recipe.Recipe`,
    or modifier list), ``teacher`` (model or ``None``), ``recipe_args`` (variable overrides).
    The session is built -- and the recipe validated -- before the Trainer builds its optimizer.
    Each checkpoint gets the session state (``sparsebert_state.pt``) before older checkpoints are deleted.

    Raises:
        ValueError: no model (``ValueError("SparseTrainer needs model=")``).
        RecipeError: the recipe is invalid for the model.
    """

    def __init__(self, *args, recipe=None, teacher: torch.nn.Module | None = None, recipe_args=None, **kwargs):
        """See the class docstring; raises ``ValueError("SparseTrainer needs model=")`` without a model."""
        model = kwargs.get("model", args[0] if args else None)
        if model is None:
            raise ValueError("SparseTrainer needs model=")
        self.session = RecipeSession(recipe, model, teacher=teacher, recipe_args=recipe_args)
        super().__init__(*args, **kwargs)
        epochs = self.session.recipe.num_epochs
        if epochs is not None and self.args.max_steps <= 0 and self.args.num_train_epochs < epochs - 1e-6:
            logger.warning(
                "num_train_epochs=%s but the recipe schedules %s epochs: training ends before the "
                "recipe does (e.g. before final sparsity)",
                self.args.num_train_epochs, epochs,
            )
        self.add_callback(RecipeCallback(self.session, save_state=False))  # _save_checkpoint writes the state
        self.session.state.grad_sampler = self.sample_gradients
        # seconds in finished train() calls; a resume starts from the checkpoint's record of earlier runs
        self._wall_seconds = 0.0
        self.wall_history_complete = True  # False: a checkpoint on the way did not record the time before it
        self._train_started: float | None = None

    @property
    def train_wall_seconds(self) -> float:
        """Seconds spent in :meth:`train` by this process (including checkpoint saves), plus -- after a
        resume -- the earlier runs' seconds recorded in the checkpoint (``sparsebert_progress.json``).
        A checkpoint without that record (written before it existed) adds nothing, and
        :attr:`wall_history_complete` is then ``False``."""
        running = time.time() - self._train_started if self._train_started is not None else 0.0
        return self._wall_seconds + running

    def sample_gradients(self, num_batches: int):
        """Yield ``num_batches`` times with fresh gradients of the training loss in ``.grad``.

        Batches come from the Trainer's own training DataLoader (same dataset, collator and, under
        DDP, sampler), so no second copy of the data exists; under DDP the gradients are
        all-reduced by the wrapped model's backward. Gradients are zeroed before each batch and
        after the last one. The model is left in the train/eval mode it was in.
        """
        model = self.model_wrapped if self.model_wrapped is not None else self.model
        was_training = model.training
        model.train()
        produced = 0
        try:
            while produced < num_batches:
                for inputs in self.get_train_dataloader():
                    if produced >= num_batches:
                        break
                    model.zero_grad(set_to_none=True)
                    inputs = self._prepare_inputs(inputs)
                    loss = super().compute_loss(model, inputs)  # task loss only (no distillation)
                    self.accelerator.backward(loss)
                    produced += 1
                    yield produced
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss (per-batch mean), then the recipe's loss modifiers (distillation).

        ``num_items_in_batch`` is deliberately not passed on: with it, transformers multiplies the
        loss by the number of processes (for models whose loss sums over tokens), which for BERT's
        mean-reduced heads would double the task loss under 2-process DDP and unbalance it against
        the KD term. Per-batch means, averaged by DDP, equal the one-process loss on the global batch.
        """
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
        if model.training:
            loss = self.session.modify_loss(loss, outputs, inputs)
        return (loss, outputs) if return_outputs else loss

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """With recipe LR modifiers, a LambdaLR that follows them; else the Trainer's own."""
        if self.lr_scheduler is None and self.session.has_lr_schedule:
            optimizer = optimizer or self.optimizer
            base_lr = self.args.learning_rate
            spe = steps_per_epoch(self.args, num_training_steps, self.get_train_dataloader() if self.args.max_steps > 0 else None)
            session = self.session

            def factor(step: int) -> float:
                lr = session.learning_rate(step / spe)
                return 1.0 if lr is None else lr / base_lr

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    def _get_eval_sampler(self, eval_dataset):
        """The dataset's own order for eval/predict, also under ``group_by_length``: transformers 5
        length-groups eval batches too, which reorders the predictions, and SQuAD's post-processing
        maps prediction ``i`` to window ``i`` (it read F1 4.9 instead of ~66 for a good model)."""
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_eval_sampler(eval_dataset)
        if eval_dataset is None or not has_length(eval_dataset):
            return None
        return torch.utils.data.SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

    def _save_checkpoint(self, model, trial) -> None:
        """Write the session state and artifacts into ``checkpoint-<step>`` first, then the Trainer's checkpoint.

        transformers' ``_save_checkpoint`` ends by deleting older checkpoints (``save_total_limit``) and
        calls ``on_save`` only after that, so state written there could be missing from the only
        checkpoint left after a kill. Writing it before everything else needs no knowledge of the
        Trainer's internals beyond the folder name; ``trainer_state.json``, written last by the
        Trainer, then marks a complete checkpoint. Only the saving process(es) write (``should_save``:
        rank 0, or each node's local rank 0 with ``save_on_each_node``).
        """
        if self.args.should_save:
            ckpt = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            ckpt.mkdir(parents=True, exist_ok=True)
            self.session.save(ckpt)
            self.session.save_artifacts(ckpt)
            progress = {"train_wall_seconds": round(self.train_wall_seconds, 1), "global_step": self.state.global_step,
                        "complete_history": self.wall_history_complete}
            write_json_atomic(ckpt / PROGRESS_FILE, progress)
        super()._save_checkpoint(model, trial)

    def _last_complete_checkpoint(self) -> str:
        """The newest ``checkpoint-N`` in ``args.output_dir`` that was completely written: it has
        ``trainer_state.json`` (the Trainer writes it last) and, when the recipe keeps state,
        ``sparsebert_state.pt``. Newer incomplete folders are skipped with a warning (and kept).

        Raises:
            ValueError: no ``checkpoint-*`` folder, or none of them complete (each one's missing files named).
        """
        out = Path(self.args.output_dir)
        numbered = []
        for d in out.iterdir() if out.is_dir() else []:
            name, _, number = d.name.partition("-")
            if name == PREFIX_CHECKPOINT_DIR and number.isdigit() and d.is_dir():
                numbered.append((int(number), d))
        if not numbered:
            raise ValueError(f"--resume: no checkpoint-* folder in {out}")
        required = ["trainer_state.json"] + ([SESSION_STATE_FILE] if self.session.has_state else [])
        skipped = []
        for _, d in sorted(numbered, reverse=True):
            missing = [f for f in required if not (d / f).is_file()]
            if not missing:
                return str(d)
            logger.warning("--resume: skipping %s, it was not completely written (no %s)", d, ", ".join(missing))
            skipped.append(f"{d.name} (no {', '.join(missing)})")
        raise ValueError(f"--resume: no complete checkpoint-* folder in {out}: {'; '.join(skipped)}")

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """``Trainer.train`` that also restores modifier state (masks) from the checkpoint.

        ``resume_from_checkpoint=True`` continues from the newest complete checkpoint in
        ``args.output_dir`` (see :meth:`_last_complete_checkpoint`); a path resumes from that folder.

        Raises:
            ValueError: ``True`` (``--resume``) but no checkpoint-* folder in the output folder, or none
                complete; a checkpoint without ``sparsebert_state.pt`` although the recipe keeps state.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self._last_complete_checkpoint()
        if resume_from_checkpoint:
            self.session.load(resume_from_checkpoint)
            self._wall_seconds, self.wall_history_complete = _recorded_wall_seconds(Path(resume_from_checkpoint))
        self._train_started = time.time()
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            self._wall_seconds = self.train_wall_seconds
            self._train_started = None


def _recorded_wall_seconds(checkpoint: Path) -> tuple[float, bool]:
    """``(seconds, complete)``: the training seconds before ``checkpoint`` as its ``sparsebert_progress.json``
    records them, and whether they cover every earlier run; ``(0.0, False)`` when the file is absent (a
    checkpoint written before it existed)."""
    path = checkpoint / PROGRESS_FILE
    if not path.is_file():
        logger.warning("--resume: %s has no %s: train_wall_seconds will not include the time before it", checkpoint,
                       PROGRESS_FILE)
        return 0.0, False
    record = json.loads(path.read_text())
    return float(record["train_wall_seconds"]), bool(record.get("complete_history", True))


class SparseTrainer(RecipeTrainerMixin, Trainer):
    """``transformers.Trainer`` with a recipe (see :class:`RecipeTrainerMixin`)."""
