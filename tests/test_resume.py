"""Crash-safe checkpoints: the recipe state is in every checkpoint before older ones are deleted, ``--resume``
takes the newest complete checkpoint, a checkpoint without masks is an error, and the JSONL log has no repeats."""

import json
import logging
import shutil

import pytest
import torch
import transformers.trainer
from transformers import BertForSequenceClassification, TrainerControl, TrainerState, TrainingArguments

from sparsebert import RecipeSession, SparseTrainer
from sparsebert.integrations import JsonlLoggerCallback
from tests_helpers import tiny_config

GMP = """
pruning_modifiers:
  - !GMPruningModifier
    params: ["re:bert.encoder.layer.*.(query|key|value|dense).weight"]
    init_sparsity: 0.1
    final_sparsity: 0.5
    start_epoch: 0.0
    end_epoch: 1.0
    update_frequency: 0.25
    mask_type: unstructured
"""
LR_ONLY = """
training_modifiers:
  - !SetLearningRateModifier
    learning_rate: 1e-3
"""


def rows(n=16):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 120, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": int(torch.randint(0, 2, (1,), generator=g))} for _ in range(n)]


def trainer(out, recipe=GMP, max_steps=4, save_steps=2, logging_steps=100, keep=1, seed=0):
    """A tiny BERT on 16 rows, batch 4 (4 steps an epoch), checkpoints every ``save_steps``, ``keep`` kept."""
    torch.manual_seed(seed)
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], save_strategy="steps", save_steps=save_steps, save_total_limit=keep, use_cpu=True,
                             logging_steps=logging_steps, disable_tqdm=True, seed=seed)
    return SparseTrainer(recipe=recipe, model=BertForSequenceClassification(tiny_config()), args=args, train_dataset=rows())


def test_state_is_in_the_checkpoint_before_rotation(tmp_path, monkeypatch):
    """save_total_limit=1: when the older checkpoint is deleted, the new one already holds the masks."""
    rotations = []
    rotate = transformers.trainer.rotate_checkpoints

    def checking_rotate(output_dir, **kw):
        newest = tmp_path / f"checkpoint-{len(rotations) * 2 + 2}"
        assert (newest / "sparsebert_state.pt").is_file(), sorted(p.name for p in newest.iterdir())
        rotations.append(newest.name)
        return rotate(output_dir, **kw)

    monkeypatch.setattr(transformers.trainer, "rotate_checkpoints", checking_rotate)
    t = trainer(tmp_path)
    t.train()
    assert rotations == ["checkpoint-2", "checkpoint-4"]
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-4"]
    saved = torch.load(tmp_path / "checkpoint-4" / "sparsebert_state.pt", weights_only=True)
    assert saved["modifiers"][0]["masks"].keys() == t.session.masks().keys()


@pytest.mark.parametrize("partial", [["config.json"], ["config.json", "trainer_state.json"]])
def test_resume_skips_an_incomplete_newer_checkpoint(tmp_path, monkeypatch, caplog, partial):
    """A kill mid-save leaves checkpoint-999 half written (no trainer_state.json, or, from the old on_save
    writer, no sparsebert_state.pt): --resume warns and continues from the newest complete one."""
    trainer(tmp_path).train()
    fake = tmp_path / "checkpoint-999"
    fake.mkdir()
    for name in partial:
        shutil.copy(tmp_path / "checkpoint-4" / name, fake / name)
    loaded = []
    load = RecipeSession.load
    monkeypatch.setattr(RecipeSession, "load", lambda self, d: loaded.append(str(d)) or load(self, d))
    t = trainer(tmp_path, max_steps=6)
    with caplog.at_level(logging.WARNING, logger="sparsebert.integrations.hf_trainer"):
        t.train(resume_from_checkpoint=True)
    assert loaded == [str(tmp_path / "checkpoint-4")]
    missing = "sparsebert_state.pt" if "trainer_state.json" in partial else "trainer_state.json, sparsebert_state.pt"
    assert f"--resume: skipping {fake}, it was not completely written (no {missing})" in caplog.text
    assert t.state.global_step == 6


def test_resume_without_a_complete_checkpoint_is_an_error(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=f"^--resume: no complete checkpoint-\\* folder in {tmp_path}: "
                                         r"checkpoint-3 \(no trainer_state.json, sparsebert_state.pt\)$"):
        trainer(tmp_path).train(resume_from_checkpoint=True)
    shutil.rmtree(tmp_path / "checkpoint-3")
    with pytest.raises(ValueError, match=f"^--resume: no checkpoint-\\* folder in {tmp_path}$"):
        trainer(tmp_path).train(resume_from_checkpoint=True)


def test_checkpoint_without_masks_is_an_error(tmp_path):
    """An explicit checkpoint lacking sparsebert_state.pt under a pruning recipe fails before any step
    (re-deriving the masks would continue on different ones); a recipe that keeps no state resumes."""
    trainer(tmp_path, recipe=LR_ONLY).train()
    ckpt = tmp_path / "checkpoint-4"
    (ckpt / "sparsebert_state.pt").unlink()
    t = trainer(tmp_path, max_steps=6)
    with pytest.raises(ValueError, match=f"^checkpoint {ckpt} has no sparsebert_state.pt "):
        t.train(resume_from_checkpoint=str(ckpt))
    assert t.state.global_step == 0  # refused before training
    assert not RecipeSession(LR_ONLY, BertForSequenceClassification(tiny_config())).has_state
    t = trainer(tmp_path, recipe=LR_ONLY, max_steps=6)
    t.train(resume_from_checkpoint=str(ckpt))
    assert t.state.global_step == 6


def test_jsonl_log_has_each_step_once_after_resume(tmp_path):
    """Steps 5-6 were logged, then the run died before their checkpoint: the resumed run logs them once."""
    log = tmp_path / "train_log.jsonl"
    t = trainer(tmp_path, max_steps=6, save_steps=4, logging_steps=1, keep=2)
    t.add_callback(JsonlLoggerCallback(log))
    t.train()
    shutil.rmtree(tmp_path / "checkpoint-6")  # killed before step 6's checkpoint
    assert sorted({r["step"] for r in map(json.loads, log.read_text().splitlines())}) == [1, 2, 3, 4, 5, 6]
    t = trainer(tmp_path, max_steps=6, save_steps=4, logging_steps=1)
    t.add_callback(JsonlLoggerCallback(log))
    t.train(resume_from_checkpoint=True)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r for r in records if "resumed_from_step" in r] == [{"step": 4, "resumed_from_step": 4}]
    assert records.index({"step": 4, "resumed_from_step": 4}) == 4  # after steps 1-4, before the new 5


def test_jsonl_truncation_drops_later_and_torn_lines(tmp_path, caplog):
    log = tmp_path / "train_log.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)] + ['{"step": 3, "resumed_from_step": 3}']
    lines += [json.dumps({"step": s, "loss": 1.0}) for s in (4, 5)]
    log.write_text("\n".join(lines) + '\n{"step": 6, "lo')  # the kill cut the last line
    cb = JsonlLoggerCallback(log)
    cb.on_train_begin(None, TrainerState(global_step=0), TrainerControl())
    assert log.read_text().endswith('{"step": 6, "lo')  # a fresh run leaves the file alone
    with caplog.at_level(logging.WARNING, logger="sparsebert.integrations.hf_trainer"):
        cb.on_train_begin(None, TrainerState(global_step=4), TrainerControl())
    assert log.read_text() == "\n".join(lines[:5] + ['{"step": 4, "resumed_from_step": 4}']) + "\n"
    assert f"{log} line 7 is not JSON (cut off by the kill?): dropped on resume" in caplog.text
    assert not list(tmp_path.glob("*.tmp"))


class _Clock:
    """A stand-in for ``time``: 100 s pass at each optimizer step and nowhere else."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now


def test_train_wall_seconds_add_up_over_resumes(tmp_path, monkeypatch, caplog):
    """Each checkpoint records the training time so far (sparsebert_progress.json); a resumed run adds its own,
    so a run stopped and resumed reports its whole training time. A checkpoint without the record (written by
    an older version) counts as 0 s and the result says it is incomplete."""
    from transformers import TrainerCallback

    from sparsebert.integrations import hf_trainer

    clock = _Clock()
    monkeypatch.setattr(hf_trainer, "time", clock)

    class Tick(TrainerCallback):
        def on_step_end(self, *args, **kw):
            clock.now += 100.0

    t = trainer(tmp_path, max_steps=2, save_steps=2, keep=3)
    t.add_callback(Tick())
    t.train()
    assert t.train_wall_seconds == 200.0 and t.wall_history_complete
    assert json.loads((tmp_path / "checkpoint-2" / "sparsebert_progress.json").read_text()) == {
        "train_wall_seconds": 200.0, "global_step": 2, "complete_history": True}

    t = trainer(tmp_path, max_steps=4, save_steps=2, keep=3)
    t.add_callback(Tick())
    t.train(resume_from_checkpoint=True)
    assert t.train_wall_seconds == 400.0 and t.wall_history_complete  # 200 s before + 2 steps now
    assert json.loads((tmp_path / "checkpoint-4" / "sparsebert_progress.json").read_text())["train_wall_seconds"] == 400.0

    (tmp_path / "checkpoint-4" / "sparsebert_progress.json").unlink()  # as an older version wrote it
    t = trainer(tmp_path, max_steps=6, save_steps=2, keep=3)
    t.add_callback(Tick())
    with caplog.at_level(logging.WARNING, logger="sparsebert.integrations.hf_trainer"):
        t.train(resume_from_checkpoint=True)
    assert "checkpoint-4 has no sparsebert_progress.json" in caplog.text
    assert t.train_wall_seconds == 200.0 and not t.wall_history_complete
    assert json.loads((tmp_path / "checkpoint-6" / "sparsebert_progress.json").read_text())["complete_history"] is False
