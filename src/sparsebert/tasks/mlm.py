"""Masked-language-model task (BERT's pre-training objective, Devlin et al. 2019, arXiv:1810.04805).

Used by Prune Once For All (Zafrir et al. 2021, arXiv:2111.05754): a dense MLM teacher is prepared on
a corpus, then a student is pruned on the same corpus with MLM loss + distillation.

Corpus: WikiExtractor ``<doc ...>`` files (the shared ``wikipedia-sample/text/AA/wiki_00..15``), plain
text files (documents separated by blank lines, Google BERT's pre-training format), or a ``datasets``
hub corpus with a ``text`` column. Documents are tokenised and packed into ``max_seq_length`` blocks
(``[CLS] tokens [SEP]``; documents inside a block are separated by ``[SEP]``; the remainder is
dropped, as Hugging Face ``run_mlm.py``'s ``group_texts``). Training masks 15% of the tokens of each
batch (80% ``[MASK]`` / 10% random / 10% unchanged) with ``transformers.DataCollatorForLanguageModeling``;
evaluation blocks are masked once with a fixed seed, so every model is scored on the same positions.

Held out (never trained on): an explicit ``--validation-file``; else the last corpus file (sorted
path order, e.g. ``wiki_15``) when there are several; else every 20th document. WikiText-2 valid
(``<shared data>/wikitext-2/valid.txt``, read as plain text) is a second eval split when present.
Metrics: MLM cross-entropy over the masked tokens (nats/token), its perplexity and masked-token accuracy.

Memory: by default the training blocks are built in memory (a 16 MB corpus is ~25k blocks of 128).
``--streaming`` reads, tokenises and packs the training corpus lazily (a shuffle buffer of
:data:`SHUFFLE_BUFFER` blocks), so a Wikipedia-size corpus never has to fit in memory; an epoch is
then ``--max-train-samples`` blocks (required). Eval sets are always materialised (use
``--max-eval-samples``).
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import html
import itertools
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from tqdm import tqdm

from .base import DataArgs, DataError, Task, TaskData, default_shared_data_dir

__all__ = [
    "MlmTask", "MaskedLmCollator", "StreamingBlocks", "read_documents", "clean_wiki_text", "corpus_files",
    "split_corpus_files", "is_heldout_document", "iter_blocks", "mask_blocks", "masked_token_stats",
    "MLM_PROBABILITY", "HELDOUT_EVERY", "SHUFFLE_BUFFER",
]

logger = logging.getLogger(__name__)

MLM_PROBABILITY = 0.15
HELDOUT_EVERY = 20  # one corpus of a single file: documents 19, 39, ... are held out (5%)
SHUFFLE_BUFFER = 10_000  # blocks (--streaming)
EVAL_MASK_SEED = 1234  # eval masking does not depend on --seed: runs with any seed are comparable
WIKI_SAMPLE = Path("wikipedia-sample") / "text"
WIKITEXT2_VALID = Path("wikitext-2") / "valid.txt"
IGNORE_INDEX = -100  # label of positions that are not predicted (transformers' CrossEntropy ignore_index)

# --------------------------------------------------------------------------- corpus reading

_TITLE_RE = re.compile(r'\btitle="([^"]*)"')
_WIKILINK_RE = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]")  # [[target|text]] -> text, [[text]] -> text
_TAG_RE = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")  # <br>, </ref>, <span class=..>; not "a < b > c"
_SPACES_RE = re.compile(r"[ \t]{2,}")


def clean_wiki_text(line: str) -> str:
    """Remove the markup WikiExtractor leaves in text: HTML entities (``&amp;`` -> ``&``), then HTML
    tags (``<br>``), and ``[[target|text]]`` / ``[[text]]`` links (-> ``text``); collapse spaces."""
    line = html.unescape(line)
    line = _WIKILINK_RE.sub(r"\1", line)
    line = _TAG_RE.sub(" ", line)
    return _SPACES_RE.sub(" ", line).strip()


def _open_text(path: Path):
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_documents(path: str | Path) -> Iterator[str]:
    """Yield the documents of one corpus file, lazily (``.bz2``/``.gz`` are decompressed).

    Format is detected from the first non-blank line:

    * WikiExtractor: ``<doc id=".." url=".." title="..">`` ... ``</doc>`` blocks. The first line of a
      document repeats its title and is dropped; every line goes through :func:`clean_wiki_text`;
      blank lines are dropped; lines are joined by ``"\\n"``. Documents left empty are skipped.
    * plain text: documents are separated by blank (or whitespace-only) lines, as in Google BERT's
      ``create_pretraining_data.py`` input; lines are kept as they are (stripped).

    Raises:
        DataError: a ``<doc>`` opened inside another or never closed (names the file and line);
            the file is not UTF-8; a compressed file is not what its suffix says or is truncated.
    """
    path = Path(path)
    try:
        with _open_text(path) as fh:
            lines = iter(fh)
            first = next((ln for ln in lines if ln.strip()), None)
            if first is None:
                return
            lines = itertools.chain([first], lines)
            if first.lstrip().startswith("<doc"):
                yield from _wiki_documents(lines, path)
            else:
                yield from _plain_documents(lines)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e
    except (OSError, EOFError) as e:  # gzip.BadGzipFile, a truncated .gz/.bz2, ...
        raise DataError(f"{path}: cannot read it as {path.suffix or 'text'} ({type(e).__name__}: {e})") from e


def _wiki_documents(lines: Iterable[str], path: Path) -> Iterator[str]:
    title, body, opened_at = None, None, 0
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if line.startswith("<doc") and line.endswith(">"):
            if body is not None:
                raise DataError(f"{path}, line {number}: <doc> opened inside the <doc> of line {opened_at} (missing </doc>)")
            m = _TITLE_RE.search(line)
            title, body, opened_at = html.unescape(m.group(1)) if m else None, [], number
        elif line == "</doc>":
            if body is not None:
                text = _wiki_text(body, title)
                if text:
                    yield text
            body = None
        elif body is not None and line:
            body.append(line)
    if body is not None:
        raise DataError(f"{path}: the <doc> of line {opened_at} is never closed (truncated file?)")


def _wiki_text(body: list[str], title: str | None) -> str:
    if body and title is not None and html.unescape(body[0]) == title:
        body = body[1:]  # WikiExtractor repeats the title as the first line
    cleaned = (clean_wiki_text(line) for line in body)
    return "\n".join(line for line in cleaned if line)


def _plain_documents(lines: Iterable[str]) -> Iterator[str]:
    doc: list[str] = []
    for raw in lines:
        line = raw.strip()
        if line:
            doc.append(line)
        elif doc:
            yield "\n".join(doc)
            doc = []
    if doc:
        yield "\n".join(doc)


def corpus_files(path: str | Path) -> list[Path]:
    """The corpus files of ``path``: the file itself, or every non-hidden file under a folder
    (recursively: WikiExtractor writes ``text/AA/wiki_00``), sorted by relative path.

    Raises:
        DataError: ``path`` does not exist, or a folder holds no file.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"MLM corpus {path} does not exist")
    files = sorted(
        (p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not files:
        raise DataError(f"MLM corpus folder {path} holds no file")
    return files


def split_corpus_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """``(train files, held-out files)``: the last file is held out when there are several;
    with one file both lists are ``[file]`` and :func:`is_heldout_document` splits it by document."""
    if len(files) >= 2:
        return files[:-1], files[-1:]
    return list(files), list(files)


def is_heldout_document(index: int) -> bool:
    """Document-level split of a single corpus: every :data:`HELDOUT_EVERY`-th document (index
    ``HELDOUT_EVERY - 1``, ``2 * HELDOUT_EVERY - 1``, ...) is held out. Deterministic."""
    return index % HELDOUT_EVERY == HELDOUT_EVERY - 1


@dataclasses.dataclass
class Corpus:
    """Where the train and held-out documents come from.

    Attributes:
        train / heldout: callables returning a fresh iterator over document strings.
        description: one line for ``TaskData.note`` (files, split rule).
    """

    train: Callable[[], Iterator[str]]
    heldout: Callable[[], Iterator[str]]
    description: str


def _files_documents(files: list[Path], keep: Callable[[int], bool] | None = None) -> Callable[[], Iterator[str]]:
    def documents() -> Iterator[str]:
        docs = (doc for f in files for doc in read_documents(f))
        for i, doc in enumerate(docs):
            if keep is None or keep(i):
                yield doc

    return documents


def _local_corpus(corpus: Path, validation_file: str | None) -> Corpus:
    files = corpus_files(corpus)
    if validation_file:
        heldout = corpus_files(validation_file)
        return Corpus(_files_documents(files), _files_documents(heldout),
                      f"MLM: train on {len(files)} file(s) under {corpus}, held out: {validation_file}")
    train, heldout = split_corpus_files(files)
    if len(files) >= 2:
        return Corpus(_files_documents(train), _files_documents(heldout),
                      f"MLM: train on {len(train)} file(s) under {corpus} ({train[0].name}..{train[-1].name}), "
                      f"held out: the last file {heldout[0]}")
    return Corpus(_files_documents(files, lambda i: not is_heldout_document(i)), _files_documents(files, is_heldout_document),
                  f"MLM: one corpus file {files[0]}; every {HELDOUT_EVERY}th document is held out, the rest trained on")


def _looks_like_path(spec: str) -> bool:
    """A missing local path, not a hub id (``owner/name[:config]`` has at most one ``/``)."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or spec.endswith((".txt", ".bz2", ".gz"))


def _hub_corpus(spec: str, streaming: bool) -> Corpus:
    import datasets

    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, streaming=streaming)
    except Exception as e:  # offline, unknown name, ...
        raise DataError(f"MLM corpus {spec!r} is not a local file or folder, and the hub dataset {name!r} "
                        f"(config {config or None!r}) could not be loaded: {type(e).__name__}: {e}") from e
    if "train" not in ds:
        raise DataError(f"hub dataset {spec!r} has no 'train' split (splits: {list(ds)})")
    columns = ds["train"].column_names
    if columns is not None and "text" not in columns:
        raise DataError(f"hub dataset {spec!r} has no 'text' column (columns: {columns})")

    def texts(split, keep=None):
        def documents():
            for i, row in enumerate(ds[split]):
                if keep is None or keep(i):
                    yield row["text"]
        return documents

    if "validation" in ds:
        return Corpus(texts("train"), texts("validation"), f"MLM: hub dataset {spec}, train split; held out: its validation split")
    return Corpus(texts("train", lambda i: not is_heldout_document(i)), texts("train", is_heldout_document),
                  f"MLM: hub dataset {spec}, train split; every {HELDOUT_EVERY}th document is held out")


# --------------------------------------------------------------------------- packing and masking


def _special_ids(tokenizer) -> tuple[int, int]:
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if start is None or end is None or tokenizer.mask_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} lacks a [CLS]/<s>, [SEP]/</s> or mask token; cannot build MLM blocks")
    return start, end


def iter_blocks(documents: Iterable[str], tokenizer, max_seq_length: int, batch_docs: int = 256) -> Iterator[list[int]]:
    """Pack documents into token blocks of exactly ``max_seq_length`` ids, lazily.

    The documents' tokens (no special tokens) are concatenated with ``[SEP]`` after each document, cut
    into pieces of ``max_seq_length - 2`` and wrapped as ``[CLS] piece [SEP]`` (``<s>``/``</s>`` for
    tokenizers without CLS/SEP). The last incomplete piece is dropped (``run_mlm.py``'s ``group_texts``).
    Documents are tokenised ``batch_docs`` at a time (fast tokenizers batch in Rust).

    Yields:
        ``list[int]`` of length ``max_seq_length``.

    Raises:
        ValueError: ``max_seq_length < 3``; a tokenizer without the needed special tokens.
    """
    if max_seq_length < 3:
        raise ValueError(f"max_seq_length={max_seq_length}: MLM blocks need at least 3 tokens")
    start, end = _special_ids(tokenizer)
    body = max_seq_length - 2
    buf: list[int] = []
    docs = iter(documents)
    while chunk := list(itertools.islice(docs, batch_docs)):
        for ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            if not ids:
                continue
            buf.extend(ids)
            buf.append(end)
            n_full = len(buf) // body
            for i in range(n_full):
                yield [start, *buf[i * body:(i + 1) * body], end]
            del buf[: n_full * body]


def _pack_blocks(documents: Iterable[str], what: str, tokenizer, max_seq_length: int,
                 limit: int | None = None) -> list[list[int]]:
    """:func:`iter_blocks` into a list (the first ``limit`` blocks), with a progress bar over the
    documents and a log line of the blocks and tokens produced; ``what`` names the text in the log."""
    with tqdm(documents, desc="MLM tokenize", unit="doc", leave=False) as docs:
        blocks = list(itertools.islice(iter_blocks(docs, tokenizer, max_seq_length), limit))
        n_docs = docs.n
    logger.info("MLM: %s: %d blocks of %d tokens (%d tokens) from %d documents read",
                what, len(blocks), max_seq_length, len(blocks) * max_seq_length, n_docs)
    return blocks


class MaskedLmCollator:
    """Batch collator of the MLM task.

    Features without ``labels`` (training blocks) are padded and masked by
    ``transformers.DataCollatorForLanguageModeling`` (``mlm_probability`` of the non-special tokens;
    of those 80% -> mask token, 10% -> random token, 10% unchanged; other labels ``-100``), drawing
    from torch's global RNG (seeded by the Trainer). Features that already carry ``labels``
    (pre-masked eval blocks, :func:`mask_blocks`) are only padded (labels with ``-100``).

    Returns:
        dict of ``torch.long`` tensors ``[batch, seq]``: ``input_ids``, ``attention_mask``, ``labels``.
    """

    def __init__(self, tokenizer, mlm_probability: float = MLM_PROBABILITY):
        from transformers import DataCollatorForLanguageModeling, DataCollatorForTokenClassification

        _special_ids(tokenizer)
        self.mask = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability)
        self.pad = DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE_INDEX)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "labels" in features[0]:
            return self.pad(features)
        return self.mask(features)


def mask_blocks(blocks: list[list[int]], tokenizer, seed: int = EVAL_MASK_SEED,
                mlm_probability: float = MLM_PROBABILITY) -> dict[str, list[list[int]]]:
    """Mask evaluation blocks once, reproducibly (a seeded ``DataCollatorForLanguageModeling``).

    Returns:
        ``{"input_ids": masked ids, "labels": original id at masked positions, -100 elsewhere}``;
        the same ``blocks`` and ``seed`` always give the same result.
    """
    from transformers import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, seed=seed)
    ids, labels = [], []
    for i in range(0, len(blocks), 256):
        batch = collator([{"input_ids": b} for b in blocks[i:i + 256]])
        ids += batch["input_ids"].tolist()
        labels += batch["labels"].tolist()
    return {"input_ids": ids, "labels": labels}


class StreamingBlocks(torch.utils.data.IterableDataset):
    """Training blocks read lazily from a corpus (``--streaming``); one epoch = ``num_blocks`` blocks.

    Wraps a ``datasets.IterableDataset`` of packed blocks shuffled with a buffer of ``buffer_size``
    blocks (reshuffled each epoch through ``set_epoch``, which the Trainer/accelerate call). If the
    corpus holds fewer than ``num_blocks`` blocks it is read again from the start, so every epoch
    has exactly ``num_blocks`` blocks and ``len()`` is right (the Trainer derives steps per epoch,
    and recipes their schedules, from it). Under DDP, accelerate lets rank 0 read and dispatches
    the batches.

    Raises (on iteration):
        DataError: the corpus yields no block at all.
    """

    def __init__(self, documents: Callable[[], Iterator[str]], tokenizer, max_seq_length: int, num_blocks: int,
                 seed: int = 42, buffer_size: int = SHUFFLE_BUFFER):
        import datasets

        def blocks():
            for ids in iter_blocks(documents(), tokenizer, max_seq_length):
                yield {"input_ids": ids}

        self.num_blocks = num_blocks
        self.stream = datasets.IterableDataset.from_generator(blocks).shuffle(seed=seed, buffer_size=buffer_size)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the buffer with ``seed + epoch``."""
        self.stream.set_epoch(epoch)

    def __len__(self) -> int:
        return self.num_blocks

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        produced = 0
        while produced < self.num_blocks:
            before = produced
            for example in self.stream:
                yield example
                produced += 1
                if produced >= self.num_blocks:
                    return
            if produced == before:
                raise DataError("--streaming: the MLM corpus yields no block (empty, or documents shorter than one block?)")


def masked_token_stats(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example sums for MLM metrics, small enough to gather (``preprocess_logits_for_metrics``).

    Args:
        logits: ``[batch, seq, vocab]``; labels: ``[batch, seq]`` with ``-100`` at unscored positions.

    Returns:
        float32 ``[batch, 3]``: summed cross-entropy (nats) over the scored positions, the number of
        correct argmax predictions among them, and their count.
    """
    if isinstance(logits, tuple):
        logits = logits[0]
    scored = labels != IGNORE_INDEX
    safe = labels.masked_fill(~scored, 0)
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), safe, reduction="none") * scored
    correct = (logits.argmax(-1) == labels) & scored
    return torch.stack([nll.sum(1), correct.sum(1).float(), scored.sum(1).float()], dim=1)


# --------------------------------------------------------------------------- the task


class MlmTask(Task):
    """Masked-LM on a text corpus: ``AutoModelForMaskedLM``, packed blocks, loss/perplexity metrics."""

    name = "mlm"

    def __init__(self, mlm_probability: float = MLM_PROBABILITY):
        self.mlm_probability = mlm_probability

    def build_model(self, model_name_or_path: str, **kwargs: Any):
        """``AutoModelForMaskedLM.from_pretrained``. A checkpoint without an MLM head (the packaged
        MiniLM, a ``BertModel``) gets a newly initialised one whose decoder is tied to the word
        embeddings (``BertForMaskedLM``; ``tie_word_embeddings``)."""
        from transformers import AutoModelForMaskedLM

        return AutoModelForMaskedLM.from_pretrained(model_name_or_path, **kwargs)

    def data_collator(self, tokenizer) -> MaskedLmCollator:
        """:class:`MaskedLmCollator` (dynamic masking for training, padding for pre-masked eval)."""
        return MaskedLmCollator(tokenizer, self.mlm_probability)

    def load_data(self, tokenizer, args: DataArgs, need_train: bool = True) -> TaskData:
        """Read the corpus, pack it into blocks and build the train set and eval splits.

        Corpus: ``args.train_file`` or ``args.data_dir`` (a file or folder of WikiExtractor/plain text
        files; a value that is not an existing path is loaded as a hub dataset ``NAME[:CONFIG]``
        with a ``text`` column), else ``<shared data>/wikipedia-sample/text``. Held-out documents:
        see the module docstring. ``args.max_train_samples`` takes a seeded random subset of the
        blocks (``--streaming``: the blocks per epoch, required); ``args.max_eval_samples`` the first
        N blocks of each eval split.

        Returns:
            ``TaskData``: ``train`` (``datasets.Dataset`` with ``input_ids``, or
            :class:`StreamingBlocks`; ``None`` if not ``need_train``); ``evals`` ``"heldout"`` and,
            when the file exists, ``"wikitext2"`` (``input_ids`` masked once, ``labels``); ``note``
            describes the split.

        Raises:
            DataError: no corpus, unreadable files, a split without one full block, ``--streaming``
                without ``--max-train-samples``.
        """
        import datasets

        if need_train and args.streaming and not args.max_train_samples:
            raise DataError("--streaming reads the corpus lazily and cannot count its blocks: "
                            "pass --max-train-samples (blocks per epoch)")
        corpus = self._corpus(args, need_train)
        evals = {"heldout": self._eval_set(corpus.heldout(), "held-out text", tokenizer, args)}
        shared = default_shared_data_dir()
        if shared is not None and (shared / WIKITEXT2_VALID).is_file():
            path = shared / WIKITEXT2_VALID
            evals["wikitext2"] = self._eval_set(read_documents(path), str(path), tokenizer, args)

        train = None
        if need_train:
            if args.streaming:
                train = StreamingBlocks(corpus.train, tokenizer, args.max_seq_length, args.max_train_samples, seed=args.seed)
            else:
                blocks = _pack_blocks(corpus.train(), "training text", tokenizer, args.max_seq_length)
                if not blocks:
                    raise DataError(f"{corpus.description}: the training text yields no block of {args.max_seq_length} tokens")
                train = datasets.Dataset.from_dict({"input_ids": blocks})
                if args.max_train_samples is not None:
                    train = train.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(train))))
        sizes = ", ".join(f"{k}: {len(v)} blocks" for k, v in evals.items())
        note = f"{corpus.description}; {sizes} of {args.max_seq_length} tokens" + (", wikitext2 = WikiText-2 valid" if "wikitext2" in evals else "")
        return TaskData(train=train, evals=evals, note=note)

    def _corpus(self, args: DataArgs, need_train: bool) -> Corpus:
        source = args.train_file or args.data_dir
        if source is None:
            shared = default_shared_data_dir()
            if shared is None or not (shared / WIKI_SAMPLE).is_dir():
                raise DataError("MLM: no corpus given (--data-dir or --train-file: a text file or folder, or a hub "
                                "dataset NAME[:CONFIG]) and no shared wikipedia-sample/text folder found")
            source = shared / WIKI_SAMPLE
        if Path(source).exists() or _looks_like_path(str(source)):
            return _local_corpus(Path(source), args.validation_file)  # DataError if it does not exist
        if args.validation_file:
            raise DataError(f"--validation-file is for local corpora; {source} is not a local file or folder")
        return _hub_corpus(str(source), streaming=args.streaming and need_train)

    def _eval_set(self, documents: Iterable[str], what: str, tokenizer, args: DataArgs):
        import datasets

        blocks = _pack_blocks(documents, what, tokenizer, args.max_seq_length, args.max_eval_samples)
        if not blocks:
            raise DataError(f"MLM: {what} yields no block of {args.max_seq_length} tokens")
        return datasets.Dataset.from_dict(mask_blocks(blocks, tokenizer, mlm_probability=self.mlm_probability))

    def evaluate(self, trainer, split: str, data: TaskData) -> dict[str, float]:
        """MLM metrics of ``trainer.model`` on the pre-masked ``data.evals[split]``.

        Returns:
            ``loss`` (mean cross-entropy per masked token, nats), ``perplexity`` (``exp(loss)``),
            ``accuracy`` (masked-token top-1), ``masked_tokens`` and ``blocks`` (counts).
        """
        previous = trainer.preprocess_logits_for_metrics
        trainer.preprocess_logits_for_metrics = masked_token_stats  # gathers [N, 3] sums, not [N, L, V] logits
        try:
            out = trainer.predict(data.evals[split])
        finally:
            trainer.preprocess_logits_for_metrics = previous
        stats = torch.as_tensor(out.predictions, dtype=torch.float64).reshape(-1, 3).sum(0)
        nll, correct, count = (float(x) for x in stats)
        loss = nll / max(count, 1.0)
        return {"loss": loss, "perplexity": math.exp(loss), "accuracy": correct / max(count, 1.0),
                "masked_tokens": int(count), "blocks": len(data.evals[split])}
