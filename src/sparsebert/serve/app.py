"""HTTP inference server for a deployment folder: FastAPI app + uvicorn (``sparsebert serve``).

Routes:
    ``POST /predict``  text classification: ``{"text": str, "text_pair": str?}`` -> ``{"label", "score"}``;
                       extractive QA: ``{"question": str, "context": str}`` -> ``{"answer", "start",
                       "end", "score"}`` (``start``/``end``: character offsets into ``context``);
                       a JSON list of inputs (at most ``max_batch``) returns a list, in order.
    ``GET /health``    ``{"status": "ok", "task", "task_kind", "precision", "engine", ...}``.
    ``GET /docs``      OpenAPI docs (FastAPI default).

Inputs longer than the manifest's ``max_seq_length`` are truncated (QA: the context only) or, with
``truncate=False``, refused with 422. Malformed bodies get FastAPI's 422 with the field at fault.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from ..deployment import DeploymentError, create_engine, load_manifest, run_padded

__all__ = ["create_app", "serve", "TextInput", "QAInput", "Prediction", "Answer"]

MAX_ANSWER_TOKENS = 30  # longest answer span, as in the SQuAD post-processing


class TextInput(BaseModel):
    """One text (or text pair) to classify."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1)
    text_pair: str | None = Field(None, min_length=1)


class QAInput(BaseModel):
    """One question about one context."""

    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1)
    context: str = Field(min_length=1)


class Prediction(BaseModel):
    """Classification result: the arg-max label and its softmax probability (regression: the value)."""

    label: str | None
    score: float


class Answer(BaseModel):
    """QA result: the answer text, its character span in the context, and P(start) * P(end)."""

    answer: str
    start: int
    end: int
    score: float


def create_app(deployment_dir: str | Path, engine: str = "onnxruntime", truncate: bool = True,
               num_threads: int | None = None, max_batch: int = 64) -> FastAPI:
    """Build the FastAPI app serving ``deployment_dir`` with ``engine`` (see ``deployment.ENGINES``).

    Raises:
        DeploymentError: missing manifest/model, unknown engine.
    """
    from transformers import AutoTokenizer

    manifest = load_manifest(deployment_dir)
    run = create_engine(engine, deployment_dir, num_threads)
    tokenizer = AutoTokenizer.from_pretrained(str(deployment_dir))
    max_len = int(manifest["max_seq_length"])
    qa = manifest["task_kind"] == "question-answering"
    labels = manifest.get("labels") or {}
    app = FastAPI(title="sparsebert", description=f"{manifest['task']} ({manifest['precision']}) served from {deployment_dir}")

    def check_batch(items: list) -> None:
        if not items:
            raise HTTPException(422, "empty list: send one input object or a non-empty list")
        if len(items) > max_batch:
            raise HTTPException(422, f"{len(items)} inputs in one request; at most {max_batch}")

    def encode(first: list[str], second: list[str | None] | None, offsets: bool = False):
        if not truncate:
            for i, (a, b) in enumerate(zip(first, second or [None] * len(first))):
                n = len(tokenizer(a, b)["input_ids"])
                if n > max_len:
                    raise HTTPException(422, f"input {i} has {n} tokens; max_seq_length is {max_len} (server runs with --no-truncate)")
        kwargs = dict(padding=True, truncation=("only_second" if qa else True) if truncate else False, max_length=max_len,
                      return_tensors="np", return_offsets_mapping=offsets)
        try:
            enc = tokenizer(first, second, **kwargs) if second is not None else tokenizer(first, **kwargs)
        except Exception as e:  # e.g. a question longer than max_seq_length with only_second truncation
            raise HTTPException(422, f"cannot tokenize the input: {e}") from None
        feeds = {k: enc[k].astype(np.int64) if k in enc else np.zeros_like(enc["input_ids"], dtype=np.int64) for k in manifest["inputs"]}
        return enc, feeds

    def infer(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return run_padded(run, manifest, feeds, tokenizer.pad_token_id or 0)
        except DeploymentError as e:
            raise HTTPException(422, str(e)) from None

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness and what is served."""
        return {"status": "ok", "task": manifest["task"], "task_kind": manifest["task_kind"], "precision": manifest["precision"],
                "engine": engine, "max_seq_length": max_len, "truncate": truncate}

    if qa:
        @app.post("/predict", response_model=Union[Answer, list[Answer]])
        def predict_qa(body: Union[QAInput, list[QAInput]]):
            """Extractive QA on one input or a list of inputs."""
            items = body if isinstance(body, list) else [body]
            check_batch(items)
            enc, feeds = encode([x.question.lstrip() for x in items], [x.context for x in items], offsets=True)
            start_logits, end_logits = infer(feeds)
            answers = [_best_span(x.context, enc, i, start_logits[i], end_logits[i]) for i, x in enumerate(items)]
            return answers if isinstance(body, list) else answers[0]
    else:
        @app.post("/predict", response_model=Union[Prediction, list[Prediction]])
        def predict_cls(body: Union[TextInput, list[TextInput]]):
            """Classify one input or a list of inputs."""
            items = body if isinstance(body, list) else [body]
            check_batch(items)
            pairs = [x.text_pair for x in items]
            if any(p is not None for p in pairs) and any(p is None for p in pairs):
                raise HTTPException(422, "mix of single texts and text pairs in one batch; send them separately")
            _, feeds = encode([x.text for x in items], pairs if pairs[0] is not None else None)
            (logits,) = infer(feeds)
            preds = [_classify(row, labels) for row in logits]
            return preds if isinstance(body, list) else preds[0]

    return app


def _classify(logits: np.ndarray, labels: dict[str, str]) -> Prediction:
    """Softmax arg-max (one output: regression value, ``label=None``)."""
    if logits.shape[-1] == 1:
        return Prediction(label=None, score=float(logits[0]))
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    k = int(probs.argmax())
    return Prediction(label=labels.get(str(k), str(k)), score=float(probs[k]))


def _best_span(context: str, enc, row: int, start: np.ndarray, end: np.ndarray) -> Answer:
    """Highest ``start + end`` logit span inside the context, at most ``MAX_ANSWER_TOKENS`` long."""
    seq_ids = enc.sequence_ids(row)
    offsets = enc["offset_mapping"][row]
    ctx = [j for j, s in enumerate(seq_ids) if s == 1]
    if not ctx:
        return Answer(answer="", start=0, end=0, score=0.0)
    mask = np.full(len(seq_ids), -np.inf)
    mask[ctx] = 0.0
    s_log, e_log = start[: len(seq_ids)] + mask, end[: len(seq_ids)] + mask
    best, best_score = (ctx[0], ctx[0]), -np.inf
    for s in ctx:
        e_range = e_log[s: s + MAX_ANSWER_TOKENS]
        e = s + int(e_range.argmax())
        if s_log[s] + e_log[e] > best_score:
            best, best_score = (s, e), s_log[s] + e_log[e]
    p_start = np.exp(s_log - s_log[ctx].max())
    p_end = np.exp(e_log - e_log[ctx].max())
    score = float(p_start[best[0]] / p_start.sum() * p_end[best[1]] / p_end.sum())
    char_start, char_end = int(offsets[best[0]][0]), int(offsets[best[1]][1])
    return Answer(answer=context[char_start:char_end], start=char_start, end=char_end, score=score)


def serve(deployment_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, engine: str = "onnxruntime",
          truncate: bool = True, num_threads: int | None = None) -> None:
    """Run the app with uvicorn until interrupted (binds ``host:port``; 127.0.0.1 by default)."""
    import uvicorn

    uvicorn.run(create_app(deployment_dir, engine, truncate, num_threads), host=host, port=port, log_level="info")
