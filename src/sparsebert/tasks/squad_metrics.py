"""SQuAD v1.1 exact match (EM) and F1, as the official evaluation script defines them.

Source: Rajpurkar et al. 2016, "SQuAD: 100,000+ Questions for Machine Comprehension of Text",
and the official ``evaluate-v1.1.py`` script shipped with the dataset. The definitions below
follow that script line by line:

* ``normalize_answer``: lower-case, drop every character of ``string.punctuation``, drop the
  articles ``a``/``an``/``the`` (whole words), collapse whitespace.
* exact match: the normalized strings are equal.
* F1: token-level F1 of the normalized, whitespace-split strings, with the overlap counted as
  a multiset (``collections.Counter`` intersection); 0 when nothing overlaps.
* per question, the maximum over all ground-truth answers; averaged over all questions of the
  reference set (an unanswered question scores 0) and multiplied by 100.

Written here rather than taken from the ``evaluate`` package, whose ``squad`` metric needs a
download.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable, Iterable, Mapping

__all__ = [
    "normalize_answer",
    "exact_match_score",
    "f1_score",
    "metric_max_over_ground_truths",
    "compute_squad_metrics",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Normalize an answer string as the official SQuAD v1.1 script does.

    Lower-case, remove punctuation (``string.punctuation``), remove the articles
    ``a``/``an``/``the`` and collapse runs of whitespace into single spaces.

    Args:
        s: a predicted or ground-truth answer.

    Returns:
        The normalized string, e.g. ``"The  Denver Broncos!"`` -> ``"denver broncos"``.
    """

    def remove_articles(text: str) -> str:
        return _ARTICLES.sub(" ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        return "".join(ch for ch in text if ch not in _PUNCTUATION)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    """Return whether ``prediction`` and ``ground_truth`` are equal after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 between two answers (official SQuAD v1.1 definition).

    Both strings are normalized and split on whitespace; the overlap is the size of the
    multiset intersection of the two token lists.

    Returns:
        ``2 * P * R / (P + R)`` with ``P = overlap / len(pred tokens)`` and
        ``R = overlap / len(truth tokens)``, a float in ``[0, 1]``; ``0.0`` when nothing
        overlaps (including when either side normalizes to the empty string).
    """
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def metric_max_over_ground_truths(
    metric_fn: Callable[[str, str], float], prediction: str, ground_truths: Iterable[str]
) -> float:
    """Return the best score of ``prediction`` against any of ``ground_truths``.

    Raises:
        ValueError: ``ground_truths`` is empty (the official script would fail as well).
    """
    scores = [metric_fn(prediction, gt) for gt in ground_truths]
    if not scores:
        raise ValueError("a question needs at least one ground-truth answer")
    return max(scores)


def compute_squad_metrics(
    predictions: Mapping[str, str], references: Mapping[str, Iterable[str]]
) -> dict[str, float]:
    """Official SQuAD v1.1 EM and F1 of ``predictions`` over the questions of ``references``.

    Args:
        predictions: question id -> predicted answer text (the ``predictions.json`` layout).
        references: question id -> the ground-truth answer texts of that question. Every
            question here counts; one missing from ``predictions`` scores 0 (as in the
            official script). Predictions for ids not in ``references`` are ignored.

    Returns:
        ``{"exact_match": EM, "f1": F1}``, both floats in ``[0, 100]`` (averages times 100).

    Raises:
        ValueError: ``references`` is empty, or a question has no ground truth.
    """
    if not references:
        raise ValueError("no reference questions to score")
    exact_match = f1 = 0.0
    for qid, ground_truths in references.items():
        ground_truths = list(ground_truths)
        if qid not in predictions:
            # Official script: "Unanswered question <id> will receive score 0."
            if not ground_truths:
                raise ValueError(f"question {qid!r} has no ground-truth answer")
            continue
        prediction = predictions[qid]
        exact_match += metric_max_over_ground_truths(exact_match_score, prediction, ground_truths)
        f1 += metric_max_over_ground_truths(f1_score, prediction, ground_truths)
    total = len(references)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}
