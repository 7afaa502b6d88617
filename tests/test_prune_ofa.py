"""Prune Once For All (recipes/prune_ofa): KD on MLM logits, mask comparison, recipes, and every stage
through the CLI on a tiny BERT (teacher -> pruned student -> pattern-locked transfer to SST-2 -> QAT)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification
from typer.testing import CliRunner

from sparsebert import RecipeSession
from sparsebert.cli import app
from sparsebert.modifiers import kd_loss
from sparsebert.sparsity import compare_masks, load_checkpoint_tensors
from tests_helpers import save_tiny_model, tiny_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "prune_ofa"
ENCODER = "bert.encoder.layer.{}.attention.self.query.weight"


# --------------------------------------------------------------------------- KD on MLM logits


def test_kd_on_mlm_logits_counts_only_masked_positions():
    torch.manual_seed(0)
    config = tiny_config()
    student, teacher = BertForMaskedLM(config), BertForMaskedLM(config)
    session = RecipeSession("modifiers:\n  - !DistillationModifier\n    hardness: 0.5\n    temperature: 2.0\n", student, teacher=teacher)
    session.start(10)
    ids = torch.randint(5, 120, (2, 9))
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 5], labels[1, 7] = 11, 12, 13
    inputs = {"input_ids": ids, "labels": labels}
    out = student(**inputs)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    keep = labels != -100
    expected_kd = kd_loss(out.logits[keep], t_logits[keep], 2.0)  # 3 rows, batchmean over them
    got = session.modify_loss(out.loss, out, inputs)
    assert got.item() == pytest.approx((0.5 * out.loss + 0.5 * expected_kd).item(), rel=1e-6)
    all_positions = kd_loss(out.logits, t_logits, 2.0)
    assert abs(all_positions.item() - expected_kd.item()) > 1e-4  # averaging over every position would differ

    # logits at unlabelled positions do not matter
    noisy = out.logits.detach().clone()
    noisy[~keep] += 100 * torch.randn_like(noisy[~keep])
    assert kd_loss(noisy, t_logits, 2.0, keep).item() == pytest.approx(expected_kd.item(), rel=1e-6)
    # a batch without any masked token adds no KD (not nan)
    none = kd_loss(out.logits, t_logits, 2.0, torch.zeros_like(keep))
    assert none.item() == 0.0 and none.requires_grad


# --------------------------------------------------------------------------- mask comparison


def test_compare_masks_counts_identical_and_differing_tensors():
    torch.manual_seed(0)
    mlm = {ENCODER.format(i): torch.randn(8, 8) * (torch.rand(8, 8) > 0.5) for i in range(3)}
    mlm["cls.predictions.transform.dense.weight"] = torch.randn(8, 8)
    task = {k: v * 2.0 + (v != 0) for k, v in mlm.items() if k.startswith("bert.")}  # new values, same zeros
    task["classifier.weight"] = torch.zeros(2, 8)
    same = compare_masks(mlm, task)
    assert same.same and len(same.identical) == 3 and same.differing_elements == 0 and same.total_elements == 192
    assert same.sparsity_a == same.sparsity_b == pytest.approx(sum(int((v == 0).sum()) for k, v in task.items() if "encoder" in k) / 192)

    task[ENCODER.format(1)] = task[ENCODER.format(1)].clone()
    task[ENCODER.format(1)][0, :] = 0.0  # prune a row more
    extra = int((mlm[ENCODER.format(1)][0] != 0).sum())
    diff = compare_masks(mlm, task)
    assert not diff.same and diff.differing == ["encoder.layer.1.attention.self.query.weight"] and diff.differing_elements == extra
    # prefixes may differ (names line up from "encoder." on); a missing layer is reported
    other = {"distil." + k.split("bert.", 1)[1]: v for k, v in mlm.items() if k.startswith("bert.") and ".2." not in k}
    partial = compare_masks(mlm, other)
    assert partial.only_in_a == ["encoder.layer.2.attention.self.query.weight"] and not partial.same
    with pytest.raises(ValueError, match="shapes differ"):
        compare_masks(mlm, {ENCODER.format(0): torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="no tensor matches"):
        compare_masks(mlm, {"classifier.weight": torch.zeros(2, 8)})


# --------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("recipe, head, args", [
    ("teacher-mlm", BertForMaskedLM, None),
    ("teacher-mlm", BertForMaskedLM, {"train_encoder": False}),
    ("student-gmp80-unstructured", BertForMaskedLM, None),
    ("student-gmp90-unstructured", BertForMaskedLM, None),
    ("student-gmp80-block4", BertForMaskedLM, None),
    ("transfer-glue", BertForSequenceClassification, None),
    ("transfer-squad", BertForQuestionAnswering, None),
    ("transfer-qat", BertForSequenceClassification, None),
    ("transfer-qat", BertForQuestionAnswering, {"distill_keys": ["start_logits", "end_logits"]}),
])
def test_recipes_apply_to_their_models(recipe, head, args):
    torch.manual_seed(0)
    model, teacher = head(tiny_config()), head(tiny_config())
    session = RecipeSession(str(RECIPES / f"{recipe}.yaml"), model, teacher=teacher, recipe_args=args)
    session.start(4)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if args == {"train_encoder": False}:
        assert frozen and all(".encoder." in n for n in frozen) and model.bert.embeddings.word_embeddings.weight.requires_grad
    else:
        assert not frozen
    if recipe.startswith("student"):
        # only encoder Linear weights are pruned, never the tied embeddings/decoder or the MLM head
        assert set(session.masks()) == {n for n, _ in model.named_parameters() if ".encoder." in n and n.endswith("weight") and "LayerNorm" not in n}


# --------------------------------------------------------------------------- every stage through the CLI

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Run teacher preparation, student pruning and SST-2 sparse transfer through the CLI once."""
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present")
    tmp = tmp_path_factory.mktemp("ofa")
    corpus = tmp / "corpus" / "AA"
    corpus.mkdir(parents=True)
    for name in ("wiki_00", "wiki_15"):  # two real files cut at a document end: train on one, hold out the other
        text = (SHARED_DATA / "wikipedia-sample" / "text" / "AA" / name).read_text(encoding="utf-8")[:20000]
        (corpus / name).write_text(text[: text.rfind("</doc>") + 7], encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds waiting when the CPU is shared
    paths = {"mlm": save_tiny_model(tmp / "tiny-mlm", head="mlm"), "sst2-teacher": save_tiny_model(tmp / "tiny-sst2", head="cls", seed=1)}
    mlm_args = ["--task", "mlm", "--data-dir", corpus.parent, "--max-seq-length", 32, "--max-train-samples", 16,
                "--max-eval-samples", 4, "--batch-size", 8, "--logging-steps", 2]
    runs = [
        ("teacher", [*mlm_args, "--model", paths["mlm"], "--recipe", RECIPES / "teacher-mlm.yaml"]),
        ("student", [*mlm_args, "--model", tmp / "teacher", "--teacher", tmp / "teacher", "--recipe", RECIPES / "student-gmp80-block4.yaml",
                     "--recipe-args", '{"num_epochs": 2}']),
        ("sst2", [*GLUE_ARGS, "--teacher", paths["sst2-teacher"], "--model", tmp / "student", "--recipe", RECIPES / "transfer-glue.yaml"]),
    ]
    try:
        for name, args in runs:
            code, out = invoke("train", *args, "--output-dir", tmp / name)
            assert code == 0, f"{name}: {out}"
            paths[name] = tmp / name
    finally:
        torch.set_num_threads(threads)
    return paths


GLUE_ARGS = ["--task", "sst2", "--max-train-samples", 16, "--max-eval-samples", 16, "--batch-size", 8, "--recipe-args", '{"num_epochs": 1}']


def metrics(path: Path) -> dict:
    return json.loads((path / "metrics.json").read_text())


def test_teacher_and_student_mlm_stages(stages):
    m = metrics(stages["teacher"])
    assert set(m) >= {"heldout", "wikitext2"} and m["heldout"]["blocks"] == 4 and m["encoder_sparsity"] == 0.0
    assert m["heldout"]["perplexity"] == pytest.approx(2.718281828 ** m["heldout"]["loss"], rel=1e-6)
    assert "wiki_15" in m["data_note"]
    m = metrics(stages["student"])
    assert m["encoder_sparsity"] == pytest.approx(0.8, abs=0.01) and m["heldout"]["masked_tokens"] > 0
    assert json.loads((stages["student"] / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]


def test_sparse_transfer_keeps_the_pretrained_mask(stages):
    assert 0.0 <= metrics(stages["sst2"])["validation"]["accuracy"] <= 1.0
    # the encoder came from the MLM checkpoint and was fine-tuned (zeros kept, values moved)
    before, after = load_checkpoint_tensors(stages["student"]), load_checkpoint_tensors(stages["sst2"])
    assert not torch.equal(before[ENCODER.format(0)], after[ENCODER.format(0)])
    code, out = invoke("sparsity", stages["student"], "--compare-mask", stages["sst2"])
    assert code == 0 and "identical" in out and "12 identical, 0 differing" in out, out
    code, out = invoke("sparsity", stages["teacher"], "--compare-mask", stages["sst2"], "--json")
    assert code == 1 and json.loads(out)["same"] is False  # not the dense teacher's mask


@pytest.mark.slow
def test_qat_stage_keeps_the_pretrained_mask(stages, tmp_path):
    qat = tmp_path / "sst2-qat"
    code, out = invoke("train", *GLUE_ARGS, "--teacher", stages["sst2-teacher"], "--model", stages["sst2"],
                       "--recipe", RECIPES / "transfer-qat.yaml", "--output-dir", qat)
    assert code == 0, out
    assert (qat / "quantization.json").is_file()
    code, out = invoke("sparsity", stages["student"], "--compare-mask", qat)
    assert code == 0, out
