"""Tests of sparsebert.tasks.mlm: corpus reader, held-out split, packing, masking, metrics, data loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparsebert.tasks import get_task
from sparsebert.tasks.base import DataArgs, DataError
from sparsebert.tasks.mlm import (
    HELDOUT_EVERY, MaskedLmCollator, corpus_files, is_heldout_document, iter_blocks, mask_blocks,
    masked_token_stats, read_documents, split_corpus_files,
)

WIKI = """<doc id="1" url="?curid=1" title="Alpha &amp; Beta">
Alpha &amp; Beta

Alpha &amp; Beta is a [[Greek alphabet|pair of letters]] used in [[mathematics]].
Second line&lt;br&gt;with a break, and 2 &lt; 3 stays.

</doc>
<doc id="2" url="?curid=2" title="Empty stub">
Empty stub


</doc>
<doc id="3" url="?curid=3" title="Gamma">
Gamma

Gamma is the third letter.
</doc>
"""


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from sparsebert.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


def write_wiki(path: Path, titles: list[str]) -> Path:
    """A WikiExtractor file with one document per title (a few sentences each)."""
    docs = [f'<doc id="{i}" url="?curid={i}" title="{t}">\n{t}\n\n' + f"{t} is a document about {t.lower()} number {i}. " * 12
            + "\n</doc>\n" for i, t in enumerate(titles)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(docs), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- reader


def test_wikiextractor_documents_titles_markup_and_boundaries(tmp_path):
    f = tmp_path / "wiki_00"
    f.write_text(WIKI, encoding="utf-8")
    docs = list(read_documents(f))
    # the empty stub is skipped; the repeated title line is dropped; entities, links and tags cleaned
    assert docs == [
        "Alpha & Beta is a pair of letters used in mathematics.\nSecond line with a break, and 2 < 3 stays.",
        "Gamma is the third letter.",
    ]


def test_compressed_and_plain_text_documents(tmp_path):
    import bz2

    (tmp_path / "wiki_00.bz2").write_bytes(bz2.compress(WIKI.encode()))
    assert len(list(read_documents(tmp_path / "wiki_00.bz2"))) == 2
    plain = tmp_path / "plain.txt"
    plain.write_text("\n first doc line 1\nline 2\n \n\nsecond doc\n<unk> kept as is\n", encoding="utf-8")
    assert list(read_documents(plain)) == ["first doc line 1\nline 2", "second doc\n<unk> kept as is"]


def test_malformed_doc_files_name_file_and_line(tmp_path):
    nested = tmp_path / "nested"
    nested.write_text('<doc id="1" title="A">\nA\ntext\n<doc id="2" title="B">\n</doc>\n')
    with pytest.raises(DataError, match=r"nested, line 4: <doc> opened inside the <doc> of line 1"):
        list(read_documents(nested))
    truncated = tmp_path / "truncated"
    truncated.write_text('<doc id="1" title="A">\nA\ntext\n')
    with pytest.raises(DataError, match="line 1 is never closed"):
        list(read_documents(truncated))
    not_gzip = tmp_path / "corpus.gz"
    not_gzip.write_text("plain text, not gzip\n")
    with pytest.raises(DataError, match=r"corpus\.gz: cannot read it as \.gz \(BadGzipFile"):
        list(read_documents(not_gzip))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.txt: not UTF-8 text"):
        list(read_documents(latin))


def test_real_wikipedia_sample(shared_data):
    f = shared_data / "wikipedia-sample" / "text" / "AA" / "wiki_15"
    raw = f.read_text(encoding="utf-8")
    docs = list(read_documents(f))
    assert 0 < len(docs) <= raw.count("<doc ")
    assert not any("<doc" in d or "</doc>" in d or "&amp;" in d or "[[" in d for d in docs)
    # the title line is gone: the first document starts with its text, not "History of agriculture in Chile"
    assert not docs[0].startswith("History of agriculture in Chile\n")


# --------------------------------------------------------------------------- held-out split


def test_heldout_last_file_is_disjoint_from_training(tmp_path):
    for i in range(3):
        write_wiki(tmp_path / "text" / "AA" / f"wiki_0{i}", [f"Doc{i}x{j}" for j in range(4)])
    (tmp_path / "text" / ".hidden").write_text("ignored")
    files = corpus_files(tmp_path / "text")
    assert [f.name for f in files] == ["wiki_00", "wiki_01", "wiki_02"]
    train, heldout = split_corpus_files(files)
    assert [f.name for f in heldout] == ["wiki_02"] and not set(train) & set(heldout)
    from sparsebert.tasks.mlm import _local_corpus

    corpus = _local_corpus(tmp_path / "text", None)
    train_docs, heldout_docs = list(corpus.train()), list(corpus.heldout())
    assert len(train_docs) == 8 and len(heldout_docs) == 4
    assert not set(train_docs) & set(heldout_docs)


def test_single_file_is_split_by_document(tmp_path):
    f = write_wiki(tmp_path / "one", [f"D{j}" for j in range(2 * HELDOUT_EVERY)])
    from sparsebert.tasks.mlm import _local_corpus

    corpus = _local_corpus(f, None)
    train, heldout = list(corpus.train()), list(corpus.heldout())
    assert len(heldout) == 2 and len(train) == 2 * HELDOUT_EVERY - 2
    assert not set(train) & set(heldout) and set(train) | set(heldout) == set(read_documents(f))
    assert [i for i in range(50) if is_heldout_document(i)] == [HELDOUT_EVERY - 1, 2 * HELDOUT_EVERY - 1]


def test_shared_corpus_holds_out_wiki_15(shared_data):
    train, heldout = split_corpus_files(corpus_files(shared_data / "wikipedia-sample" / "text"))
    assert [f.name for f in heldout] == ["wiki_15"] and len(train) == 15 and "wiki_15" not in {f.name for f in train}


# --------------------------------------------------------------------------- packing and masking


def test_blocks_are_packed_with_document_separators(tokenizer):
    docs = ["the cat sat on the mat", "", "a dog barked at the moon last night", "short"]
    blocks = list(iter_blocks(docs, tokenizer, max_seq_length=8))
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert blocks and all(len(b) == 8 and b[0] == cls and b[-1] == sep for b in blocks)
    stream = [t for b in blocks for t in b[1:-1]]
    expected = []
    for d in docs:
        ids = tokenizer(d, add_special_tokens=False)["input_ids"]
        if ids:
            expected += ids + [sep]  # [SEP] marks each document's end
    assert stream == expected[: len(stream)] and len(expected) - len(stream) < 6  # only the remainder dropped
    with pytest.raises(ValueError, match="at least 3"):
        list(iter_blocks(docs, tokenizer, 2))


def test_collator_masks_15_percent_80_10_10(tokenizer):
    torch.manual_seed(0)
    n, length = 400, 128
    body = torch.randint(1000, tokenizer.vocab_size, (n, length - 2))
    features = [{"input_ids": [tokenizer.cls_token_id, *row.tolist(), tokenizer.sep_token_id]} for row in body]
    batch = MaskedLmCollator(tokenizer)(features)
    original = torch.tensor([f["input_ids"] for f in features])
    ids, labels = batch["input_ids"], batch["labels"]
    masked = labels != -100
    assert not masked[:, 0].any() and not masked[:, -1].any()  # [CLS]/[SEP] are never masked
    assert torch.equal(labels[masked], original[masked])
    assert torch.equal(ids[~masked], original[~masked])  # unmasked tokens untouched
    rate = masked.float().mean().item() * length / (length - 2)
    assert rate == pytest.approx(0.15, abs=0.01)
    n_masked = int(masked.sum())
    to_mask = int((ids[masked] == tokenizer.mask_token_id).sum()) / n_masked
    unchanged = int((ids[masked] == original[masked]).sum()) / n_masked
    random = 1 - to_mask - unchanged
    assert to_mask == pytest.approx(0.8, abs=0.02)
    assert random == pytest.approx(0.1, abs=0.02) and unchanged == pytest.approx(0.1, abs=0.02)
    assert batch["attention_mask"].all()


def test_premasked_eval_blocks_are_deterministic_and_only_padded(tokenizer):
    blocks = [[tokenizer.cls_token_id, *range(2000, 2030), tokenizer.sep_token_id]] * 20
    a, b = mask_blocks(blocks, tokenizer), mask_blocks(blocks, tokenizer)
    assert a == b and any(x != -100 for row in a["labels"] for x in row)
    assert mask_blocks(blocks, tokenizer, seed=7) != a
    features = [{"input_ids": a["input_ids"][0], "labels": a["labels"][0]}, {"input_ids": a["input_ids"][1][:10], "labels": a["labels"][1][:10]}]
    batch = MaskedLmCollator(tokenizer)(features)
    assert batch["input_ids"][0].tolist() == a["input_ids"][0]  # not re-masked
    assert batch["labels"][1, 10:].eq(-100).all() and batch["attention_mask"][1, 10:].eq(0).all()


def test_masked_token_stats_match_cross_entropy():
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 11)
    labels = torch.full((3, 5), -100)
    labels[0, 1], labels[0, 3], labels[2, 4] = 4, 7, 0
    stats = masked_token_stats(logits, labels)
    assert stats.shape == (3, 3)
    expected = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100, reduction="sum")
    assert stats[:, 0].sum().item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats[:, 2].tolist() == [2.0, 0.0, 1.0]
    assert stats[1].tolist() == [0.0, 0.0, 0.0]
    # correct argmax counts only scored positions: row 0 gets one right (position 1) and one wrong (position 3);
    # row 1 has only unscored positions, every one with argmax 0 (the value unscored labels are filled with inside)
    logits = torch.zeros(2, 4, 11)
    logits[0, 1, 4] = logits[0, 3, 2] = 5.0
    logits[1, :, 0] = 5.0
    labels = torch.full((2, 4), -100)
    labels[0, 1], labels[0, 3] = 4, 7
    assert masked_token_stats(logits, labels)[:, 1:].tolist() == [[1.0, 2.0], [0.0, 0.0]]


# --------------------------------------------------------------------------- data loading and model


def test_load_data_in_memory_and_streaming(tmp_path, tokenizer):
    for i in range(2):
        write_wiki(tmp_path / "AA" / f"wiki_0{i}", [f"Topic{i}x{j}" for j in range(6)])
    task = get_task("mlm")
    args = DataArgs(data_dir=str(tmp_path), max_seq_length=32, max_train_samples=5, max_eval_samples=3)
    data = task.load_data(tokenizer, args)
    assert len(data.train) == 5 and all(len(x) == 32 for x in data.train["input_ids"])
    assert len(data.evals["heldout"]) == 3 and "wiki_01" in data.note
    assert set(data.evals["heldout"].column_names) == {"input_ids", "labels"}

    with pytest.raises(DataError, match="--max-train-samples"):
        task.load_data(tokenizer, DataArgs(data_dir=str(tmp_path), max_seq_length=32, streaming=True))
    n_blocks = len(list(iter_blocks(read_documents(tmp_path / "AA" / "wiki_00"), tokenizer, 32)))
    stream = task.load_data(tokenizer, DataArgs(data_dir=str(tmp_path), max_seq_length=32, streaming=True,
                                                max_train_samples=n_blocks + 7, max_eval_samples=2)).train
    assert len(stream) == n_blocks + 7
    rows = list(stream)  # more blocks than the corpus holds: it is read again from the start
    assert len(rows) == n_blocks + 7 and all(len(r["input_ids"]) == 32 for r in rows)
    stream.set_epoch(1)
    assert len(list(stream)) == n_blocks + 7


def test_load_data_logs_blocks_and_shows_tokenize_progress(tmp_path, tokenizer, caplog, capsys, monkeypatch):
    import logging

    monkeypatch.setattr("sparsebert.tasks.mlm.default_shared_data_dir", lambda: None)  # no WikiText-2 split: two lines only
    for i in range(2):
        write_wiki(tmp_path / "AA" / f"wiki_0{i}", [f"Topic{i}x{j}" for j in range(6)])
    n_train = len(list(iter_blocks(read_documents(tmp_path / "AA" / "wiki_00"), tokenizer, 32)))
    caplog.set_level(logging.INFO, logger="sparsebert.tasks.mlm")
    get_task("mlm").load_data(tokenizer, DataArgs(data_dir=str(tmp_path), max_seq_length=32, max_train_samples=5, max_eval_samples=3))
    # the train set is packed whole (before the max_train_samples subset); the eval split stops at 3 blocks
    assert [r.getMessage() for r in caplog.records] == [
        "MLM: held-out text: 3 blocks of 32 tokens (96 tokens) from 6 documents read",
        f"MLM: training text: {n_train} blocks of 32 tokens ({n_train * 32} tokens) from 6 documents read",
    ]
    assert n_train > 5
    assert "MLM tokenize:" in capsys.readouterr().err


def test_load_data_errors(tmp_path, tokenizer):
    task = get_task("mlm")
    with pytest.raises(DataError, match="does not exist"):
        task.load_data(tokenizer, DataArgs(data_dir=str(tmp_path / "missing")))
    write_wiki(tmp_path / "c" / "one", ["A"])
    with pytest.raises(DataError, match="held-out text yields no block"):
        task.load_data(tokenizer, DataArgs(data_dir=str(tmp_path / "c"), max_seq_length=4096))


def test_mlm_head_is_tied_and_checkpoint_loads_as_classifier(tmp_path, minilm_path):
    from transformers import AutoModelForSequenceClassification

    from tests_helpers import save_tiny_model

    model = get_task("mlm").build_model(minilm_path)  # MiniLM has no MLM head: a new one, tied
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight

    path = save_tiny_model(tmp_path / "mlm", head="mlm", prune=0.5)
    cls, info = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, output_loading_info=True)
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in info["missing_keys"]} <= {"bert.pooler", "classifier.weight", "classifier.bias"}
    assert not [k for k in info["missing_keys"] if "encoder" in k or "embeddings" in k]
    from sparsebert.sparsity import load_checkpoint_tensors

    saved = load_checkpoint_tensors(path)
    for name, p in cls.named_parameters():
        if name in saved:
            assert torch.equal(p.detach(), saved[name]), name
