"""GLUE sequence-classification tasks (CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI).

Data comes from a local folder in the GLUE-distribution TSV layout (``<root>/SST-2/dev.tsv``
...) when one exists, else from the Hugging Face hub dataset ``nyu-mll/glue``. Local rows are
turned into ``datasets.Dataset`` objects with the hub's column names and label ids, so both
sources go through the same tokenization. Metrics are GLUE's, computed with sklearn/scipy
(no ``evaluate.load``, which needs the network).

Source: Wang et al. 2018, "GLUE: A Multi-Task Benchmark and Analysis Platform for Natural Language
Understanding", arXiv:1804.07461 (tasks, splits and metrics).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from .base import DataArgs, DataError, Task, TaskData, default_shared_data_dir

__all__ = ["GlueTaskSpec", "GLUE_TASKS", "GlueTask", "glue_metrics", "read_glue_tsv"]

logger = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"
TRAIN_FRACTION_OF_DEV = 0.8


@dataclasses.dataclass(frozen=True)
class GlueTaskSpec:
    """Static description of one GLUE task.

    Attributes:
        name: hub config name (``"sst2"``), also the task name used on the CLI.
        dir_name: folder name in the GLUE distribution (``"SST-2"``).
        text_columns: one or two text columns, named as in ``nyu-mll/glue``.
        label_names: class names in label-id order (as on the hub); ``None`` for STS-B (regression).
        primary_metric: key of :func:`glue_metrics` used to pick/report the best model.
        eval_splits: eval split names (hub names); MNLI has matched and mismatched.
        eval_files: local file name of each eval split, same order as ``eval_splits``.
        tsv_text_columns: header names of the text columns in the local TSV, same order as
            ``text_columns``.
        tsv_label_column: header name of the label (or score) column in the local TSV.
        tsv_label_values: how the local file writes each label id (index = id); ``None``: a float score.
        tsv_header: column names for a file without a header line (CoLA); ``None``: first line is the header.
        encoding: text encoding of the local files (MRPC: ``utf-8-sig`` for its BOM).
    """

    name: str
    dir_name: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None
    primary_metric: str
    tsv_text_columns: tuple[str, ...]
    tsv_label_column: str = "label"
    tsv_label_values: tuple[str, ...] | None = ("0", "1")
    eval_splits: tuple[str, ...] = ("validation",)
    eval_files: tuple[str, ...] = ("dev.tsv",)
    tsv_header: tuple[str, ...] | None = None
    encoding: str = "utf-8"

    @property
    def num_labels(self) -> int:
        """Output size of the classifier head (1 for regression)."""
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_regression(self) -> bool:
        """True for STS-B."""
        return self.label_names is None


_ENTAIL = ("entailment", "not_entailment")
GLUE_TASKS: dict[str, GlueTaskSpec] = {
    s.name: s
    for s in [
        GlueTaskSpec("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"),
                     "matthews_correlation", ("sentence",),
                     tsv_header=("source", "label", "original_annotation", "sentence")),
        GlueTaskSpec("sst2", "SST-2", ("sentence",), ("negative", "positive"), "accuracy",
                     ("sentence",)),
        GlueTaskSpec("mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
                     "f1", ("#1 String", "#2 String"), tsv_label_column="Quality",
                     encoding="utf-8-sig"),
        GlueTaskSpec("stsb", "STS-B", ("sentence1", "sentence2"), None, "pearson",
                     ("sentence1", "sentence2"), tsv_label_column="score", tsv_label_values=None),
        GlueTaskSpec("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"),
                     "accuracy", ("question1", "question2"), tsv_label_column="is_duplicate"),
        GlueTaskSpec("mnli", "MNLI", ("premise", "hypothesis"),
                     ("entailment", "neutral", "contradiction"), "accuracy",
                     ("sentence1", "sentence2"), tsv_label_column="gold_label",
                     tsv_label_values=("entailment", "neutral", "contradiction"),
                     eval_splits=("validation_matched", "validation_mismatched"),
                     eval_files=("dev_matched.tsv", "dev_mismatched.tsv")),
        GlueTaskSpec("qnli", "QNLI", ("question", "sentence"), _ENTAIL, "accuracy",
                     ("question", "sentence"), tsv_label_values=_ENTAIL),
        GlueTaskSpec("rte", "RTE", ("sentence1", "sentence2"), _ENTAIL, "accuracy",
                     ("sentence1", "sentence2"), tsv_label_values=_ENTAIL),
        # WNLI files write 1 = entailment; the hub's label names are in that order too.
        GlueTaskSpec("wnli", "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment"),
                     "accuracy", ("sentence1", "sentence2")),
    ]
}


# --------------------------------------------------------------------------- metrics


def glue_metrics(task_name: str, predictions: Any, labels: Any) -> dict[str, float]:
    """GLUE metrics of one task, as fractions (like the Hugging Face ``glue`` metric).

    The per-task metrics are those of Wang et al. 2018 (arXiv:1804.07461); CoLA's is the Matthews
    correlation coefficient (Matthews 1975, "Comparison of the predicted and observed secondary
    structure of T4 phage lysozyme", Biochim. Biophys. Acta 405(2)).

    Args:
        task_name: a key of :data:`GLUE_TASKS`.
        predictions: ``np.ndarray`` of logits ``[N, num_labels]`` (argmax is taken), or of
            predicted class ids ``[N]``; for STS-B float scores ``[N]`` or ``[N, 1]``.
        labels: ``[N]`` gold class ids (int) or, for STS-B, gold scores (float).

    Returns:
        cola: ``matthews_correlation``; sst2/mnli/qnli/rte/wnli: ``accuracy``; mrpc/qqp:
        ``f1`` (positive class 1), ``accuracy`` and their mean ``combined_score``; stsb:
        ``pearson``, ``spearmanr`` and their mean ``combined_score``. All Python floats.

    Raises:
        ValueError: unknown task, or predictions and labels of different lengths.
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    spec = _get_spec(task_name)
    preds = np.asarray(predictions)
    labels = np.asarray(labels)
    if spec.is_regression:
        preds = preds.reshape(len(preds), -1)[:, 0].astype(np.float64)
        labels = labels.reshape(-1).astype(np.float64)
    else:
        preds = preds.argmax(axis=-1) if preds.ndim == 2 else preds.reshape(-1)
        labels = labels.reshape(-1).astype(np.int64)
    if len(preds) != len(labels):
        raise ValueError(f"{spec.name}: {len(preds)} predictions but {len(labels)} labels")

    if spec.is_regression:
        pearson = float(pearsonr(preds, labels)[0])
        spearman = float(spearmanr(preds, labels)[0])
        return {"pearson": pearson, "spearmanr": spearman,
                "combined_score": (pearson + spearman) / 2}
    accuracy = float((preds == labels).mean())
    if spec.name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(labels, preds))}
    if spec.name in ("mrpc", "qqp"):
        f1 = float(f1_score(labels, preds))
        return {"f1": f1, "accuracy": accuracy, "combined_score": (f1 + accuracy) / 2}
    return {"accuracy": accuracy}


# --------------------------------------------------------------------------- local TSV files


def read_glue_tsv(spec: GlueTaskSpec, path: str | Path):
    """Read one GLUE-distribution TSV file into a ``datasets.Dataset`` with hub column names.

    Parsed as the GLUE files are written: tab separated, no quoting (``csv.QUOTE_NONE``),
    ``spec.encoding`` (MRPC: ``utf-8-sig``), header line unless ``spec.tsv_header`` (CoLA).

    Returns:
        ``datasets.Dataset`` with the columns ``spec.text_columns`` (str) and ``label``
        (``ClassLabel`` int64 ids, or float32 score in [0, 5] for STS-B).

    Raises:
        DataError: the file is missing, not ``spec.encoding`` text or has no data rows; a needed
            column is absent (names file, column, header);
            a row is short or has a label outside ``spec.tsv_label_values`` / a score that is
            not a number in [0, 5] (names file, line number, value).
    """
    import datasets

    path = Path(path)
    if not path.is_file():
        raise DataError(f"GLUE {spec.name}: file not found: {path}")
    texts: list[list[str]] = [[] for _ in spec.text_columns]
    labels: list[Any] = []
    try:
        with open(path, encoding=spec.encoding, newline="") as fh:
            _read_rows(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE), spec, path, texts, labels)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not {spec.encoding} text ({e}); GLUE TSV files are {spec.encoding}") from None
    if not labels:
        raise DataError(f"{path}: no data rows (GLUE {spec.name})")

    features = {c: datasets.Value("string") for c in spec.text_columns}
    if spec.is_regression:
        features["label"] = datasets.Value("float32")
    else:
        features["label"] = datasets.ClassLabel(names=list(spec.label_names))
    data = dict(zip(spec.text_columns, texts), label=labels)
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


def _read_rows(reader, spec: GlueTaskSpec, path: Path, texts: list[list[str]], labels: list[Any]) -> None:
    """Append the text columns and labels of ``reader``'s rows (header checked first); DataError as in
    :func:`read_glue_tsv`."""
    header = list(spec.tsv_header) if spec.tsv_header else next(reader, [])
    needed = [*spec.tsv_text_columns, spec.tsv_label_column]
    for col in needed:
        if col not in header:
            raise DataError(
                f"{path}: missing column {col!r}; expected columns {needed} for GLUE "
                f"{spec.name}, found header {header}")
    idx = [header.index(c) for c in needed]
    for row in reader:
        line = reader.line_num
        if len(row) <= max(idx):
            raise DataError(f"{path}, line {line}: {len(row)} tab-separated fields, "
                            f"expected {len(header)} ({header})")
        for col_texts, i in zip(texts, idx[:-1]):
            col_texts.append(row[i])
        labels.append(_parse_label(spec, row[idx[-1]], path, line))


def _parse_label(spec: GlueTaskSpec, value: str, path: Path, line: int) -> int | float:
    """One label cell -> label id (or STS-B score); DataError naming file, line and value."""
    where = f"{path}, line {line}: bad {spec.tsv_label_column!r} value {value!r}"
    if spec.tsv_label_values is None:
        try:
            score = float(value)
        except ValueError:
            score = float("nan")
        if not 0.0 <= score <= 5.0:  # also false for nan
            raise DataError(f"{where}; expected a similarity score between 0 and 5")
        return score
    if value not in spec.tsv_label_values:
        raise DataError(f"{where}; expected one of {list(spec.tsv_label_values)}")
    return spec.tsv_label_values.index(value)


# --------------------------------------------------------------------------- the task


def _get_spec(name: str) -> GlueTaskSpec:
    key = name.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; valid names: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


class GlueTask(Task):
    """One GLUE task: sequence-classification head, GLUE data and GLUE metrics.

    Args:
        name: task name, one of :data:`GLUE_TASKS` (``"sst2"``; ``"SST-2"`` is accepted too).

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """

    def __init__(self, name: str):
        self.spec = _get_spec(name)
        self.name = self.spec.name

    @property
    def primary_metric(self) -> str:
        """Key of the metric used to select/report models (e.g. ``"accuracy"``, ``"pearson"``)."""
        return self.spec.primary_metric

    @property
    def num_labels(self) -> int:
        """Classifier output size (1 for STS-B)."""
        return self.spec.num_labels

    # ---------------------------------------------------------------- model

    def build_model(self, model_name_or_path: str, **kwargs: Any):
        """``AutoModelForSequenceClassification.from_pretrained`` with this task's head.

        Sets ``num_labels``, ``id2label``/``label2id`` from the label names and, for STS-B,
        ``problem_type="regression"``. ``kwargs`` go to ``from_pretrained`` and win.

        Raises:
            ValueError: ``model_name_or_path`` is a local checkpoint whose ``config.json`` has
                a ``*ForSequenceClassification`` architecture with a different label count.
        """
        from transformers import AutoModelForSequenceClassification

        self._check_checkpoint_head(model_name_or_path)
        spec = self.spec
        options: dict[str, Any] = {"num_labels": spec.num_labels}
        if spec.is_regression:
            options["problem_type"] = "regression"
        else:
            options["id2label"] = dict(enumerate(spec.label_names))
            options["label2id"] = {n: i for i, n in enumerate(spec.label_names)}
        options.update(kwargs)
        return AutoModelForSequenceClassification.from_pretrained(model_name_or_path, **options)

    def _check_checkpoint_head(self, model_name_or_path: str) -> None:
        config_file = Path(str(model_name_or_path)) / "config.json"
        if not config_file.is_file():
            return  # a hub id: from_pretrained reports any mismatch itself
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model_name_or_path))
        archs = getattr(config, "architectures", None) or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            if config.num_labels != self.spec.num_labels:
                raise ValueError(
                    f"checkpoint {model_name_or_path} has a trained classifier with "
                    f"num_labels={config.num_labels}, but GLUE {self.name} needs "
                    f"num_labels={self.spec.num_labels}")

    # ---------------------------------------------------------------- data

    def load_data(self, tokenizer, args: DataArgs, need_train: bool = True) -> TaskData:
        """Read, (sub-)sample and tokenize this task's data.

        Source: the local GLUE folder ``<root>/<dir_name>`` where ``root`` is
        ``args.data_dir`` (the GLUE root, or the task folder itself) or else
        ``default_shared_data_dir()/glue``; without such a folder the hub dataset
        ``nyu-mll/glue``. If the local folder has no ``train.tsv``, the first eval file is
        split by ``args.seed`` into 80% train / 20% eval (even with ``need_train=False``, so
        that evaluation uses the same held-out part) and ``TaskData.note`` says so.

        Returns:
            ``TaskData`` whose datasets have ``input_ids``, ``token_type_ids`` (if the tokenizer
            makes them), ``attention_mask`` (unpadded, at most ``args.max_seq_length``) and
            ``labels`` (int64 ids; float32 for STS-B). ``evals`` keys are ``spec.eval_splits``;
            ``raw_evals`` hold the same examples untokenized.

        Raises:
            DataError: a missing file/column or a bad row (see :func:`read_glue_tsv`); no local
                folder and the hub unreachable; an explicit ``args.data_dir`` that does not exist.
            ValueError: ``args.train_file``/``args.validation_file`` are set (not used by GLUE).
        """
        if args.train_file or args.validation_file:
            raise ValueError("GLUE tasks read --data-dir (GLUE TSV layout) or the hub; "
                             "--train-file/--validation-file are not supported for GLUE")
        folder, looked_at = self._local_folder(args)
        if folder is not None:
            train, evals, note = self._read_local(folder, args.seed, need_train)
        else:
            train, evals, note = self._read_hub(looked_at, need_train)
        if note:
            logger.warning(note)

        if train is not None and args.max_train_samples is not None:
            n = min(args.max_train_samples, len(train))
            train = train.shuffle(seed=args.seed).select(range(n))
        if args.max_eval_samples is not None:
            evals = {k: d.select(range(min(args.max_eval_samples, len(d)))) for k, d in evals.items()}

        return TaskData(
            train=self._tokenize(train, tokenizer, args) if train is not None else None,
            evals={k: self._tokenize(d, tokenizer, args) for k, d in evals.items()},
            raw_evals=evals,
            note=note,
        )

    def _local_folder(self, args: DataArgs) -> tuple[Path | None, Path | None]:
        """(task folder if it exists, the path looked for)."""
        if args.data_dir:
            root = Path(args.data_dir)
            if not root.is_dir():
                raise DataError(f"--data-dir {root} does not exist or is not a folder")
            if root.name.lower() == self.spec.dir_name.lower():
                return root, root
        else:
            shared = default_shared_data_dir()
            if shared is None:
                return None, None
            root = shared / "glue"
        folder = root / self.spec.dir_name
        return (folder if folder.is_dir() else None), folder

    def _read_local(self, folder: Path, seed: int, need_train: bool):
        spec = self.spec
        evals = {s: read_glue_tsv(spec, folder / f) for s, f in zip(spec.eval_splits, spec.eval_files)}
        train_file = folder / "train.tsv"
        logger.info("GLUE %s: reading local files from %s", spec.name, folder)
        if train_file.is_file():
            return (read_glue_tsv(spec, train_file) if need_train else None), evals, None

        first = spec.eval_splits[0]
        dev = evals[first]
        if len(dev) < 2:
            raise DataError(f"{folder / spec.eval_files[0]}: {len(dev)} rows, too few to split "
                            f"into train and eval ({train_file} is missing)")
        order = np.random.default_rng(seed).permutation(len(dev))
        n_train = min(int(round(TRAIN_FRACTION_OF_DEV * len(dev))), len(dev) - 1)
        train = dev.select(sorted(order[:n_train].tolist()))
        evals[first] = dev.select(sorted(order[n_train:].tolist()))
        note = (f"GLUE {spec.name}: no local train split ({train_file} is missing), so training "
                f"used {len(train)} of the {len(dev)} examples of the dev split "
                f"{folder / spec.eval_files[0]} and '{first}' is the remaining "
                f"{len(evals[first])} dev examples (seeded split, seed={seed}); "
                f"scores are not comparable to official GLUE dev scores.")
        return (train if need_train else None), evals, note

    def _read_hub(self, looked_at: Path | None, need_train: bool):
        import datasets

        try:
            ds = datasets.load_dataset(HUB_DATASET, self.name)
        except Exception as e:  # offline, no cache, ...
            where = f"no local folder {looked_at}" if looked_at else "no local GLUE data folder"
            raise DataError(
                f"GLUE {self.name}: {where} (expected {self.spec.dir_name}/"
                f"{{train,{','.join(f.removesuffix('.tsv') for f in self.spec.eval_files)}}}.tsv), "
                f"and the hub dataset {HUB_DATASET!r} could not be loaded "
                f"(hub unreachable?): {type(e).__name__}: {e}") from e
        logger.info("GLUE %s: loaded from the hub (%s)", self.name, HUB_DATASET)
        evals = {s: ds[s] for s in self.spec.eval_splits}
        return (ds["train"] if need_train else None), evals, None

    def _tokenize(self, dataset, tokenizer, args: DataArgs):
        columns = self.spec.text_columns

        def encode(batch):
            second = batch[columns[1]] if len(columns) > 1 else None
            return tokenizer(batch[columns[0]], second, truncation=True,
                             max_length=args.max_seq_length)

        drop = [c for c in dataset.column_names if c != "label"]
        out = dataset.map(encode, batched=True, remove_columns=drop,
                          desc=f"Tokenizing {self.name}")
        return out.rename_column("label", "labels")

    # ---------------------------------------------------------------- metrics

    def evaluate(self, trainer, split: str, data: TaskData) -> dict[str, float]:
        """``trainer.predict`` on ``data.evals[split]`` and :func:`glue_metrics` of the result.

        Raises:
            KeyError: ``split`` is not in ``data.evals``.
        """
        out = trainer.predict(data.evals[split])
        preds = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
        return glue_metrics(self.name, preds, out.label_ids)
