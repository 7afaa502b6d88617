"""Worker for the distributed tests: a tiny BERT trained under a recipe with SparseTrainer.

Run with ``torchrun --nproc-per-node N ddp_worker.py --out DIR --recipe FILE ...`` or plain
``python ddp_worker.py`` (one process). Data order is sequential, so N processes with per-device
batch B see exactly the global batches that one process with batch N*B sees (accelerate hands
whole batches to ranks round-robin). Every rank writes its masks to ``DIR/masks_rank{r}.pt``.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import BertForSequenceClassification, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests_helpers import tiny_config  # noqa: E402

from sparsebert import SparseTrainer  # noqa: E402
from sparsebert.train import shutdown_distributed  # noqa: E402


class KillAfterSave(TrainerCallback):
    """Simulate a crash: every rank exits at once after the checkpoint of step ``step`` is written."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os._exit(0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--per-device-batch", type=int, required=True)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--kill-after-save", type=int, default=0, help="hard-exit right after the checkpoint of this step")
    a = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 120, (64, 12), generator=g)
    labels = (ids[:, 0] > 60).long()  # learnable signal, so gradients are meaningful
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    torch.manual_seed(0)
    # no dropout: its random stream differs between 1 and 2 processes
    model = BertForSequenceClassification(tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    args = TrainingArguments(
        output_dir=a.out, num_train_epochs=a.epochs, max_steps=a.max_steps, per_device_train_batch_size=a.per_device_batch,
        learning_rate=5e-3, train_sampling_strategy="sequential", save_strategy="steps", save_steps=4, report_to=[],
        use_cpu=True, seed=0, dataloader_pin_memory=False, disable_tqdm=True, logging_steps=100,
    )
    trainer = SparseTrainer(recipe=a.recipe, model=model, args=args, train_dataset=data)
    if a.kill_after_save:
        trainer.add_callback(KillAfterSave(a.kill_after_save))
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    rank = int(os.environ.get("RANK", "0"))
    masks = trainer.session.masks()
    torch.save({"masks": masks, "weights": {n: p.detach() for n, p in model.named_parameters()}}, Path(a.out) / f"masks_rank{rank}.pt")
    if trainer.is_world_process_zero():
        trainer.save_model(str(Path(a.out) / "final"))
    shutdown_distributed()  # a rank leaving with gloo threads alive can die with SIGABRT at exit


if __name__ == "__main__":
    main()
