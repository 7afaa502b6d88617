"""SQuAD v1.1 extractive question answering (Rajpurkar et al. 2016).

Data come from SQuAD-format JSON files (``{"version": ..., "data": [article, ...]}``), the
shared data folder (``dev-v1.1.json`` only) or the ``rajpurkar/squad`` hub dataset. Without
a train file one file is split *by article* (default ``"36:12"``, i.e. 3:1), so that no
paragraph of an evaluation article is seen in training; the note then says that training used
dev articles. Pre- and post-processing follow Hugging Face's ``run_qa.py``/``utils_qa.py``
(sliding windows of ``max_seq_length`` tokens overlapping by ``doc_stride``; best span over all
windows, n-best 20, at most 30 tokens). Scores: the official v1.1 EM/F1 (``squad_metrics``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..atomic import write_json_atomic, write_text_atomic
from .base import DataArgs, DataError, Task, TaskData, default_shared_data_dir
from .squad_metrics import compute_squad_metrics

__all__ = [
    "SquadTask", "load_squad_json", "validate_squad_json", "split_articles", "flatten_squad",
    "prepare_train_features", "prepare_eval_features", "postprocess_qa_predictions",
    "write_predictions",
]

DEV_FILE, TRAIN_FILE, HUB_ID = "dev-v1.1.json", "train-v1.1.json", "rajpurkar/squad"
DEFAULT_SPLIT = "36:12"  # of the 48 dev articles; files with other article counts split 3:1
N_BEST_SIZE, MAX_ANSWER_LENGTH = 20, 30


def validate_squad_json(squad_json: Any, source: str = "<memory>") -> None:
    """Check the SQuAD v1.1 layout and that every answer lies in its context.

    Raises:
        DataError: no top-level ``data`` list (message names ``source``); an article,
            paragraph, question or answer is not a JSON object, or a field of it is missing; a question has no answer; an
            ``answer_start`` is outside the context, or ``context[answer_start:][:len(text)]``
            differs from the answer text (message names ``source`` and the question id).
    """
    if not isinstance(squad_json, dict) or not isinstance(squad_json.get("data"), list):
        raise DataError(f"{source}: no top-level 'data' list; not a SQuAD-format JSON file")
    def expect_object(node: Any, where: str) -> None:
        if not isinstance(node, dict):
            raise DataError(f"{where} must be a JSON object, got {type(node).__name__}: {str(node)[:60]!r}")

    for ai, article in enumerate(squad_json["data"]):
        expect_object(article, f"{source}: data[{ai}] (an article)")
        where = f"{source}: article {ai} ({article.get('title', '?')!r})"
        if not isinstance(article.get("paragraphs"), list):
            raise DataError(f"{where} has no 'paragraphs' list")
        for pi, paragraph in enumerate(article["paragraphs"]):
            expect_object(paragraph, f"{where}: paragraphs[{pi}]")
            context = paragraph.get("context")
            if not isinstance(context, str) or not isinstance(paragraph.get("qas"), list):
                raise DataError(f"{where}: a paragraph lacks 'context' (str) or 'qas' (list)")
            for qi, qa in enumerate(paragraph["qas"]):
                expect_object(qa, f"{where}: paragraphs[{pi}].qas[{qi}] (a question)")
                qid = qa.get("id")
                if qid is None or not isinstance(qa.get("question"), str):
                    raise DataError(f"{where}: a question lacks 'id' or 'question' (id={qid!r})")
                if not qa.get("answers"):
                    raise DataError(f"{source}: question id {qid!r} has no answers "
                                    "(SQuAD v2 unanswerable questions are not supported)")
                if not isinstance(qa["answers"], list):
                    raise DataError(f"{source}: question id {qid!r}: 'answers' must be a list, "
                                    f"got {type(qa['answers']).__name__}")
                for ans in qa["answers"]:
                    expect_object(ans, f"{source}: question id {qid!r}: an answer")
                    text, start = ans.get("text"), ans.get("answer_start")
                    if not isinstance(text, str) or not isinstance(start, int):
                        raise DataError(f"{source}: question id {qid!r}: an answer lacks "
                                        "'text' (str) or 'answer_start' (int)")
                    if not 0 <= start < len(context):
                        raise DataError(f"{source}: question id {qid!r}: answer_start {start} is "
                                        f"outside the context (length {len(context)})")
                    found = context[start:start + len(text)]
                    if found != text:
                        raise DataError(f"{source}: question id {qid!r}: answer text {text!r} "
                                        f"does not match the context at {start}: {found!r}")


def load_squad_json(path: str | Path) -> dict:
    """Read and validate (:func:`validate_squad_json`) a SQuAD-format JSON file.

    Raises:
        DataError: the file is missing or not valid JSON, or fails validation.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"SQuAD file not found: {path}")
    try:
        squad_json = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    validate_squad_json(squad_json, str(path))
    return squad_json


def split_articles(squad_json: dict | list, spec: str, seed: int) -> tuple[list[dict], list[dict]]:
    """Split the articles of one SQuAD file into train and eval articles.

    The article list is shuffled with ``random.Random(seed)``; the first ``TRAIN`` articles are
    the train part, the next ``EVAL`` the eval part (the rest, if any, is unused). Whole
    articles are assigned, so no paragraph of an eval article is seen in training.

    Args:
        squad_json: a parsed SQuAD file (dict with ``data``) or its list of articles.
        spec: ``"TRAIN:EVAL"`` article counts, e.g. ``"36:12"`` (``"0:48"``: all for eval).
        seed: shuffle seed; the same seed gives the same split.

    Returns:
        ``(train_articles, eval_articles)``: lists of the article dicts, in shuffled order.

    Raises:
        ValueError: a malformed ``spec``, or more articles asked for than the file holds.
    """
    articles = squad_json["data"] if isinstance(squad_json, dict) else squad_json
    try:
        n_train, n_eval = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"split_by_article must look like 'TRAIN:EVAL', e.g. '36:12'; got {spec!r}")
    if n_train < 0 or n_eval < 1:
        raise ValueError(f"split_by_article {spec!r}: need TRAIN >= 0 and EVAL >= 1 articles")
    if n_train + n_eval > len(articles):
        raise ValueError(f"split_by_article {spec!r} needs {n_train + n_eval} articles; "
                         f"the file has {len(articles)}")
    order = list(range(len(articles)))
    random.Random(seed).shuffle(order)
    return ([articles[i] for i in order[:n_train]],
            [articles[i] for i in order[n_train:n_train + n_eval]])


def flatten_squad(articles: list[dict]):
    """Flatten SQuAD articles to a ``datasets.Dataset``, one row per question (hub layout).

    Returns:
        A ``Dataset`` with string columns ``id``, ``title``, ``context``, ``question`` and
        ``answers`` = ``{"text": list[str], "answer_start": list[int32]}``.
    """
    from datasets import Dataset, Features, Sequence, Value

    rows: dict[str, list] = {k: [] for k in ("id", "title", "context", "question", "answers")}
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                rows["id"].append(str(qa["id"]))
                rows["title"].append(article.get("title", ""))
                rows["context"].append(paragraph["context"])
                rows["question"].append(qa["question"])
                rows["answers"].append({"text": [a["text"] for a in qa["answers"]],
                                        "answer_start": [a["answer_start"] for a in qa["answers"]]})
    features = Features({"id": Value("string"), "title": Value("string"),
                         "context": Value("string"), "question": Value("string"),
                         "answers": Sequence({"text": Value("string"),
                                              "answer_start": Value("int32")})})
    return Dataset.from_dict(rows, features=features)


def _tokenize_windows(examples: dict, tokenizer, max_seq_length: int, doc_stride: int, pad_to_max_length: bool = True):
    """Tokenize question/context pairs into overlapping windows (``run_qa.py`` settings)."""
    pad_on_right = tokenizer.padding_side == "right"
    questions = [q.lstrip() for q in examples["question"]]
    contexts = examples["context"]
    return tokenizer(
        questions if pad_on_right else contexts,
        contexts if pad_on_right else questions,
        truncation="only_second" if pad_on_right else "only_first",
        max_length=max_seq_length, stride=doc_stride, return_overflowing_tokens=True,
        return_offsets_mapping=True, padding="max_length" if pad_to_max_length else False,
    ), (1 if pad_on_right else 0)


def prepare_train_features(examples: dict, tokenizer, max_seq_length: int, doc_stride: int,
                           pad_to_max_length: bool = True) -> dict:
    """Batched ``Dataset.map`` function: windows with answer token positions.

    Each example becomes one or more windows of at most ``max_seq_length`` tokens (padded to it
    when ``pad_to_max_length``, else left for the collator to pad), whose
    contexts overlap by ``doc_stride`` tokens. ``start_positions``/``end_positions`` are the
    token indices of the first answer's first/last token; a window that does not contain
    the whole answer points both at the CLS token (index 0 for BERT).

    ``examples``: a batch with ``question``, ``context`` and ``answers`` columns;
    ``tokenizer``: a fast tokenizer (offsets and overflow mapping are needed). Returns the
    tokenizer outputs (``input_ids``, ``attention_mask``, ``token_type_ids`` if the tokenizer
    makes them) plus ``start_positions`` and ``end_positions`` (int token indices).
    """
    enc, context_id = _tokenize_windows(examples, tokenizer, max_seq_length, doc_stride, pad_to_max_length)
    sample_map = enc.pop("overflow_to_sample_mapping")
    offset_mapping = enc.pop("offset_mapping")
    enc["start_positions"], enc["end_positions"] = [], []
    for i, offsets in enumerate(offset_mapping):
        input_ids = enc["input_ids"][i]
        cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        answers = examples["answers"][sample_map[i]]
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        ctx = [j for j, s in enumerate(enc.sequence_ids(i)) if s == context_id]
        if not ctx or offsets[ctx[0]][0] > start_char or offsets[ctx[-1]][1] < end_char:
            start_tok = end_tok = cls_index  # answer not (fully) inside this window
        else:
            start_tok = max(j for j in ctx if offsets[j][0] <= start_char)
            end_tok = min(j for j in ctx if offsets[j][1] >= end_char)
        enc["start_positions"].append(start_tok)
        enc["end_positions"].append(end_tok)
    return enc


def prepare_eval_features(examples: dict, tokenizer, max_seq_length: int, doc_stride: int,
                          pad_to_max_length: bool = True) -> dict:
    """Batched ``Dataset.map`` function: windows that remember their example and offsets.

    Windows as in :func:`prepare_train_features` (padded to ``max_seq_length`` or not).
    Returns the tokenizer outputs plus ``example_id`` (the question id, str) and
    ``offset_mapping``: per token a ``(char_start, char_end)`` pair into the context, or
    ``None`` for question, special and padding tokens.
    """
    enc, context_id = _tokenize_windows(examples, tokenizer, max_seq_length, doc_stride, pad_to_max_length)
    sample_map = enc.pop("overflow_to_sample_mapping")
    enc["example_id"] = []
    for i in range(len(enc["input_ids"])):
        seq_ids = enc.sequence_ids(i)
        enc["example_id"].append(examples["id"][sample_map[i]])
        enc["offset_mapping"][i] = [tuple(o) if seq_ids[k] == context_id else None
                                    for k, o in enumerate(enc["offset_mapping"][i])]
    return enc


def postprocess_qa_predictions(examples, features, start_logits: np.ndarray, end_logits: np.ndarray,
                               n_best_size: int = N_BEST_SIZE,
                               max_answer_length: int = MAX_ANSWER_LENGTH) -> dict[str, str]:
    """Turn window logits into one answer text per example (``utils_qa.py``, SQuAD v1.1).

    For every window of an example the ``n_best_size`` highest start and end logits are
    paired; spans outside the context, with end < start, or longer than
    ``max_answer_length`` tokens are skipped; the span with the highest
    ``start_logit + end_logit`` over all windows wins and is cut from the context via the
    offsets. An example without any valid span gets ``""``.

    Args:
        examples: the raw eval examples (``id``, ``context`` columns).
        features: their eval features (``example_id``, ``offset_mapping``), in logit order.
        start_logits / end_logits: float arrays of shape ``(n_features, seq_len)``.

    Returns ``{question id: answer text}``. Raises ``ValueError`` when the logits and the
    features differ in number.
    """
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    if len(start_logits) != len(features) or len(end_logits) != len(features):
        raise ValueError(f"{len(start_logits)}/{len(end_logits)} logit rows for {len(features)} features")
    by_example: dict[str, list[int]] = {}
    for fi, eid in enumerate(list(features["example_id"])):
        by_example.setdefault(eid, []).append(fi)
    all_offsets = list(features["offset_mapping"])
    predictions = {}
    ids, contexts = list(examples["id"]), list(examples["context"])
    for eid, context in tqdm(zip(ids, contexts), total=len(ids), desc="SQuAD post-processing", unit="question", leave=False):
        best_score, best_text = -np.inf, ""
        for fi in by_example.get(eid, []):
            offsets, s_log, e_log = all_offsets[fi], start_logits[fi], end_logits[fi]
            n = min(len(offsets), len(s_log))
            top_starts = np.argsort(s_log[:n])[::-1][:n_best_size]
            top_ends = np.argsort(e_log[:n])[::-1][:n_best_size]
            for s in top_starts:
                for e in top_ends:
                    if offsets[s] is None or offsets[e] is None or not 0 <= e - s < max_answer_length:
                        continue  # outside the context, end before start, or too long
                    score = float(s_log[s] + e_log[e])
                    if score > best_score:
                        best_score, best_text = score, context[offsets[s][0]:offsets[e][1]]
        predictions[eid] = best_text
    return predictions


def write_predictions(predictions: dict[str, str], path: str | Path) -> Path:
    """Write ``predictions.json`` in the official layout: ``{question id: answer text}``.

    Returns the path written (parent folders are created; the file is replaced atomically).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(predictions, ensure_ascii=False, indent=1))


class SquadTask(Task):
    """SQuAD v1.1 extractive QA: ``AutoModelForQuestionAnswering``, official EM/F1.

    After :meth:`load_data`, ``article_split`` holds the by-article split used (``None``
    without one): ``{"file", "spec", "seed", "train_titles", "eval_titles"}``. After
    :meth:`evaluate`, ``last_predictions[split]`` holds ``{id: answer text}`` (for
    :func:`write_predictions`).
    """

    name = "squad"

    def __init__(self) -> None:
        self.article_split: dict | None = None
        self.last_predictions: dict[str, dict[str, str]] = {}

    @property
    def distill_output_keys(self) -> tuple[str, ...]:
        """Distillation compares the start and end logits."""
        return ("start_logits", "end_logits")

    def build_model(self, model_name_or_path: str, **kwargs: Any):
        """``AutoModelForQuestionAnswering.from_pretrained(model_name_or_path, **kwargs)``."""
        from transformers import AutoModelForQuestionAnswering

        return AutoModelForQuestionAnswering.from_pretrained(model_name_or_path, **kwargs)

    def data_collator(self, tokenizer):
        """``DataCollatorWithPadding``: pads a batch to its longest window (a no-op on windows
        already padded to ``max_seq_length``, see ``DataArgs.pad_to_max_length``)."""
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def load_data(self, tokenizer, args: DataArgs, need_train: bool = True) -> TaskData:
        """Load, split, sub-sample and tokenize SQuAD.

        Files: ``args.train_file``/``args.validation_file``, else ``train-v1.1.json`` and
        ``dev-v1.1.json`` in ``args.data_dir`` or ``<shared data>/squad``, else the hub.
        With ``args.split_by_article`` (or by default when there is no train file) one file
        is split by article (:func:`split_articles`); evaluate-only runs use the same split,
        so the held-out articles match training (``"0:N"`` evaluates all ``N`` articles).
        Returns ``TaskData`` with ``train`` (or ``None``), ``evals["validation"]`` (features),
        ``raw_evals["validation"]`` (examples) and a ``note`` on the data's origin.

        Raises:
            DataError: missing/malformed files, or no data found anywhere.
            ValueError: a slow tokenizer, ``doc_stride >= max_seq_length``, a bad split spec.
        """
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("SQuAD pre-processing needs a fast tokenizer (offset mappings)")
        max_len = min(args.max_seq_length, tokenizer.model_max_length)
        if args.doc_stride >= max_len:
            raise ValueError(f"doc_stride ({args.doc_stride}) must be < max_seq_length ({max_len})")
        raw_train, raw_eval, note = self._load_raw(args, need_train)
        train = None
        if need_train and raw_train is not None:
            if args.max_train_samples is not None:
                raw_train = raw_train.shuffle(seed=args.seed)
                raw_train = raw_train.select(range(min(args.max_train_samples, len(raw_train))))
            train = raw_train.map(prepare_train_features, batched=True,
                                  remove_columns=raw_train.column_names,
                                  fn_kwargs=dict(tokenizer=tokenizer, max_seq_length=max_len,
                                                 doc_stride=args.doc_stride,
                                                 pad_to_max_length=args.pad_to_max_length))
        if args.max_eval_samples is not None:
            raw_eval = raw_eval.select(range(min(args.max_eval_samples, len(raw_eval))))
        evals = raw_eval.map(prepare_eval_features, batched=True,
                             remove_columns=raw_eval.column_names,
                             fn_kwargs=dict(tokenizer=tokenizer, max_seq_length=max_len,
                                            doc_stride=args.doc_stride,
                                            pad_to_max_length=args.pad_to_max_length))
        return TaskData(train=train, evals={"validation": evals},
                        raw_evals={"validation": raw_eval}, note=note)

    def _load_raw(self, args: DataArgs, need_train: bool):
        """Return ``(raw_train or None, raw_eval, note)`` as flat example datasets."""
        self.article_split = None
        squad_dir = Path(args.data_dir) if args.data_dir else None
        if squad_dir is None and default_shared_data_dir() is not None:
            squad_dir = default_shared_data_dir() / "squad"
        train_path = Path(args.train_file) if args.train_file else None
        dev_path = Path(args.validation_file) if args.validation_file else None
        looked = [str(p) for p in (train_path, dev_path) if p is not None]
        for p in (train_path, dev_path):
            if p is not None and not p.is_file():
                raise DataError(f"SQuAD file not found: {p}")
        if squad_dir is not None:
            if train_path is None and dev_path is None:  # with explicit files, data_dir is unused
                looked += [str(squad_dir / TRAIN_FILE), str(squad_dir / DEV_FILE)]
                train_path = squad_dir / TRAIN_FILE if (squad_dir / TRAIN_FILE).is_file() else None
            if dev_path is None and (squad_dir / DEV_FILE).is_file():
                dev_path = squad_dir / DEV_FILE
        if train_path is None and dev_path is None:
            return self._load_hub(args, need_train, looked)

        spec = args.split_by_article
        if spec and args.train_file and args.validation_file:
            raise ValueError("split_by_article splits ONE file; got both train_file and validation_file")
        if not spec and dev_path is None:
            raise DataError(f"no SQuAD evaluation file: looked for validation_file and {DEV_FILE} "
                            f"in {squad_dir}; or pass split_by_article to split {train_path}")
        if not spec and train_path is not None:
            train = flatten_squad(load_squad_json(train_path)["data"]) if need_train else None
            evals = flatten_squad(load_squad_json(dev_path)["data"])
            return train, evals, f"SQuAD train = {train_path}, eval = {dev_path}"

        # split ONE file: an explicit train_file, else the eval file, else a found train file
        source = Path(args.train_file) if args.train_file else (dev_path or train_path)
        squad_json = load_squad_json(source)
        n_articles = len(squad_json["data"])
        defaulted = not spec
        if defaulted:
            n_train = round(0.75 * n_articles)
            spec = DEFAULT_SPLIT if n_articles == 48 else f"{n_train}:{n_articles - n_train}"
        train_arts, eval_arts = split_articles(squad_json, spec, args.seed)
        eval_titles = [a.get("title", "") for a in eval_arts]
        self.article_split = {"file": str(source), "spec": spec, "seed": args.seed,
                              "train_titles": [a.get("title", "") for a in train_arts],
                              "eval_titles": eval_titles}
        why = "No SQuAD train file found, so by default " if defaulted else ""
        note = (f"{why}{source.name} was split by article ({spec}, seed {args.seed}): "
                f"train = {len(train_arts)} articles, eval = {len(eval_arts)} held-out articles "
                f"({', '.join(eval_titles)}).")
        if train_arts:
            note += (f" Training used {'dev' if source.name == DEV_FILE else source.name} articles: "
                     "scores are on held-out articles only and are NOT comparable with official "
                     "SQuAD v1.1 dev results.")
        train = flatten_squad(train_arts) if need_train and train_arts else None
        if need_train and train is None:
            raise DataError(f"split_by_article {spec!r} leaves no training articles")
        return train, flatten_squad(eval_arts), note

    def _load_hub(self, args: DataArgs, need_train: bool, looked: list[str]):
        """Load ``rajpurkar/squad`` through ``datasets`` (needs internet)."""
        if args.split_by_article:
            raise DataError("split_by_article needs a local SQuAD JSON file; none found in: "
                            + ", ".join(looked))
        try:
            import datasets

            train = datasets.load_dataset(HUB_ID, split="train") if need_train else None
            evals = datasets.load_dataset(HUB_ID, split="validation")
        except Exception as e:  # offline, hub errors: report what was looked for
            raise DataError(f"no SQuAD data: looked for {', '.join(looked) or '(no local paths)'} "
                            f"and the hub dataset {HUB_ID!r} ({type(e).__name__}: {e})") from e
        return train, evals, f"SQuAD v1.1 from the hub ({HUB_ID}): train / validation"

    def evaluate(self, trainer, split: str, data: TaskData) -> dict[str, float]:
        """Predict on ``data.evals[split]``, post-process, and score with the official EM/F1.

        ``example_id`` and ``offset_mapping`` are dropped before ``trainer.predict`` (the
        model never sees them, whatever ``remove_unused_columns`` says).

        Returns:
            ``{"exact_match": float, "f1": float}``, both in ``[0, 100]``.

        Raises:
            KeyError: ``split`` is not in ``data.evals`` / ``data.raw_evals``.
        """
        features, examples = data.evals[split], data.raw_evals[split]
        extra = [c for c in ("example_id", "offset_mapping") if c in features.column_names]
        output = trainer.predict(features.remove_columns(extra))
        preds = output.predictions
        if isinstance(preds, dict):
            start_logits, end_logits = preds["start_logits"], preds["end_logits"]
        else:
            start_logits, end_logits = preds[0], preds[1]
        predictions = postprocess_qa_predictions(examples, features, start_logits, end_logits)
        self.last_predictions[split] = predictions
        references = {qid: ans["text"] for qid, ans in zip(examples["id"], examples["answers"])}
        return compute_squad_metrics(predictions, references)

    def save_predictions(self, output_dir: Path) -> list[Path]:
        """Write ``predictions.json`` (official format, id -> answer text) for each evaluated split.

        The ``validation`` split goes to ``predictions.json``; other splits to ``predictions_<split>.json``.
        A split by article is saved as ``article_split.json`` (file, spec, seed, train/eval titles), so the
        evaluation articles of a run can be checked and reused. Every file is written atomically.

        Returns:
            The paths written.
        """
        written = []
        if getattr(self, "article_split", None):
            written.append(write_json_atomic(Path(output_dir) / "article_split.json", self.article_split))
        for split, preds in self.last_predictions.items():
            name = "predictions.json" if split == "validation" else f"predictions_{split}.json"
            written.append(write_predictions(preds, Path(output_dir) / name))
        return written
