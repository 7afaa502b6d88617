"""``sparsebert.engine.compile``: full-model parity with PyTorch (FP32, INT8 vs fake-quant), loading of
checkpoint / deployment folders, threads, and the ``sparsebert`` engine in benchmark and serve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

from sparsebert.engine import CompiledBert, EngineError, SparseLinear, SparseLinearInt8, compile, int8_reference_model
from tests_helpers import save_tiny_model

# hidden 48 / FFN 100 (not multiples of the SIMD width), 3 heads of 16 dims
CONFIG = dict(hidden_size=48, num_attention_heads=3, intermediate_size=100)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    return {head: save_tiny_model(root / head, head=head, prune=0.8, seed=1, **CONFIG) for head in ("cls", "qa")}


def _inputs(batch: int = 3, seq: int = 13, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, max(1, seq // 2):] = 0  # a padded row (never all padding)
    types = torch.zeros_like(ids)
    types[:, seq // 2:] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


def _max_diff(a, b, keys) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in keys)


@pytest.mark.parametrize("head,auto,keys", [("cls", AutoModelForSequenceClassification, ["logits"]),
                                            ("qa", AutoModelForQuestionAnswering, ["start_logits", "end_logits"])])
def test_fp32_parity_with_pytorch(folders, head, auto, keys):
    ref = auto.from_pretrained(folders[head]).eval()
    model = compile(folders[head], num_threads=2)
    assert isinstance(model, CompiledBert) and model.task_kind == ("text-classification" if head == "cls" else "question-answering")
    formats = {row["format"] for row in model.summary()}
    assert formats <= {"csr", "block4", "dense"} and formats & {"csr", "block4"}  # sparse kernels really used
    for batch, seq in ((3, 13), (1, 1), (2, 70)):
        feeds = _inputs(batch, seq)
        with torch.no_grad():
            expected = ref(**feeds)
        got = model(**feeds)
        assert got[keys[0]].dtype == torch.float32 and got[keys[0]].shape == expected[keys[0]].shape
        assert _max_diff(got, expected, keys) < 1e-4
    # no mask / no token types, numpy inputs, tuple output
    ids = _inputs()["input_ids"]
    with torch.no_grad():
        expected = ref(input_ids=ids)
    got = model(ids.numpy(), return_dict=False)
    assert isinstance(got, tuple) and float((got[0] - expected[keys[0]]).abs().max()) < 1e-4


@pytest.mark.parametrize("pattern", ["dense", "unstructured"])
def test_fp32_parity_dense_model_and_forced_pattern(tmp_path, pattern):
    folder = save_tiny_model(tmp_path / "dense", head="cls", prune=0.0, **CONFIG)
    ref = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    model = compile(ref, pattern=pattern)  # a model object: not modified
    assert {row["format"] for row in model.summary()} == {"dense" if pattern == "dense" else "csr"}
    feeds = _inputs()
    with torch.no_grad():
        expected = ref(**feeds)
    assert _max_diff(model(**feeds), expected, ["logits"]) < 1e-4


@pytest.mark.parametrize("head,keys", [("cls", ["logits"]), ("qa", ["start_logits", "end_logits"])])
def test_int8_parity_with_fake_quant_reference(folders, head, keys):
    model = compile(folders[head], precision="int8", num_threads=2)
    assert all(isinstance(m, SparseLinearInt8) for layer in model.layers for m in layer.values())
    auto = AutoModelForSequenceClassification if head == "cls" else AutoModelForQuestionAnswering
    fp32 = auto.from_pretrained(folders[head]).eval()
    ref = int8_reference_model(fp32)
    for batch in (3, 2):  # 2 sequences on 2 threads: the fused attention block (AVX-512 CPUs)
        feeds = _inputs(batch, 21)
        with torch.no_grad():
            expected, exact = ref(**feeds), fp32(**feeds)
        got = model(**feeds)
        scale = max(float(exact[k].abs().max()) for k in keys)
        # Same integers as the reference; a float rounding difference can move a value across a
        # quantization boundary, so allow a small fraction of the output range.
        assert _max_diff(got, expected, keys) < 1e-3 * scale
        assert _max_diff(got, exact, keys) < 0.1 * scale  # and INT8 stays close to FP32


def test_int8_uses_qat_scales(folders, tmp_path):
    import shutil

    folder = tmp_path / "qat"
    shutil.copytree(folders["cls"], folder)
    name = "bert.encoder.layer.0.intermediate.dense"
    w = AutoModelForSequenceClassification.from_pretrained(folder).get_submodule(name).weight.detach()
    scales = (w.abs().amax(1) / 64).clamp_min(1e-8)
    qstate = {"format_version": 1, "modules": {name: {"type": "linear", "weight_bits": 8, "per_channel": True,
                                                      "weight_scale": scales.tolist(), "activation": None}}}
    (folder / "quantization.json").write_text(json.dumps(qstate))
    model = compile(folder, precision="int8")
    layer = model.layers[0]["intermediate"]
    assert torch.allclose(layer.wscale, scales) and int(layer.int_weight().abs().max()) == 64
    ref = int8_reference_model(AutoModelForSequenceClassification.from_pretrained(folder).eval(), qstate)
    feeds = _inputs()
    with torch.no_grad():
        expected = ref(**feeds)
    assert _max_diff(model(**feeds), expected, ["logits"]) < 1e-3 * float(expected["logits"].abs().max())


def test_threads_honoured(folders, monkeypatch):
    seen = []
    original = SparseLinear.run

    def spy(self, *a, **k):
        seen.append((torch.get_num_threads(), self.num_threads))
        return original(self, *a, **k)

    monkeypatch.setattr(SparseLinear, "run", spy)
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    model = compile(folders["cls"], num_threads=target)
    model(**_inputs())
    assert seen and all(s == (target, target) for s in seen)
    assert torch.get_num_threads() == before  # restored


def test_loading_errors(tmp_path, folders):
    with pytest.raises(EngineError, match="not found"):
        compile(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineError, match="config.json"):
        compile(tmp_path / "empty")
    with pytest.raises(EngineError, match="precision"):
        compile(folders["cls"], precision="fp16")
    with pytest.raises(EngineError, match="task"):
        compile(folders["cls"], task="translation")


@pytest.fixture(scope="module")
def deployment(folders, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from sparsebert.export import export_onnx

    return export_onnx(folders["cls"], tmp_path_factory.mktemp("deploy") / "d", task="sst2")


def test_deployment_folder_engine_matches_onnxruntime(deployment):
    from sparsebert.deployment import create_engine, random_inputs

    feeds = random_inputs(deployment, 2, 16)
    ort = create_engine("onnxruntime", deployment, 1)(feeds)
    for name in ("sparsebert", "sparsebert-int8"):
        out = create_engine(name, deployment, 2)(feeds)
        assert out[0].dtype == np.float32 and out[0].shape == ort[0].shape
        tol = 1e-4 if name == "sparsebert" else 0.1 * float(np.abs(ort[0]).max())
        assert float(np.abs(out[0] - ort[0]).max()) < tol


def test_deployment_without_weights_uses_source(deployment, tmp_path):
    import shutil

    copy = tmp_path / "d"
    shutil.copytree(deployment, copy)
    for f in copy.glob("*.safetensors"):
        f.unlink()
    assert compile(copy).source == Path(json.loads((copy / "manifest.json").read_text())["source"])
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["source"] = str(tmp_path / "gone")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="source"):
        compile(copy)


def test_cli_benchmark_and_serve_with_sparsebert_engine(deployment):
    from typer.testing import CliRunner

    from sparsebert.cli import app

    result = CliRunner().invoke(app, ["benchmark", str(deployment), "--engine", "sparsebert", "--compare", "onnxruntime",
                                      "--iterations", "3", "--warmup", "1", "--sequence-length", "16", "--num-threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert [r["engine"] for r in rows] == ["sparsebert", "onnxruntime"]

    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from sparsebert.serve import create_app

    client = TestClient(create_app(deployment, engine="sparsebert", num_threads=1))
    assert client.get("/health").json()["engine"] == "sparsebert"
    pred = client.post("/predict", json={"text": "a fine film"}).json()
    assert pred["label"] in ("negative", "positive") and 0 <= pred["score"] <= 1


def test_parity_without_compiled_kernels(folders, monkeypatch):
    """The pure-torch fallback (no compiler, or SPARSEBERT_DISABLE_KERNELS=1) computes the same model."""
    import warnings

    from sparsebert.engine import quantized_linear, sparse_linear

    monkeypatch.setattr(sparse_linear._kernels, "load", lambda *a, **k: None)
    monkeypatch.setattr(SparseLinear, "_warned_fallback", True)
    monkeypatch.setattr(SparseLinearInt8, "_warned_fallback", True)
    ref = AutoModelForSequenceClassification.from_pretrained(folders["cls"]).eval()
    feeds = _inputs()
    with torch.no_grad():
        expected, expected8 = ref(**feeds), int8_reference_model(ref)(**feeds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert _max_diff(compile(folders["cls"])(**feeds), expected, ["logits"]) < 1e-4
        got8 = compile(folders["cls"], precision="int8")(**feeds)
    assert quantized_linear._kernels.load() is None
    assert _max_diff(got8, expected8, ["logits"]) < 1e-3 * float(expected["logits"].abs().max())


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_reused_buffers_leave_earlier_outputs_alone(tmp_path, precision):
    """Intermediates live in per-thread buffers reused between calls: repeated calls give the same
    outputs, an output returned earlier is not overwritten by a later call, and a call with another
    shape (or from another thread) gets its own buffers."""
    import gc
    import threading

    from transformers import BertModel

    folder = save_tiny_model(tmp_path / "m", head="cls", prune=0.8, seed=5, **CONFIG)
    ref = BertModel.from_pretrained(folder).eval()
    model = compile(ref, num_threads=2, precision=precision)
    assert model.task_kind == "feature-extraction"
    a, b = _inputs(2, 70, seed=1), _inputs(3, 13, seed=2)
    first = model(**a).last_hidden_state
    kept = first.clone()
    second = model(**_inputs(2, 70, seed=3)).last_hidden_state  # same shape: the same buffers, new values
    assert not torch.equal(second, kept)
    assert torch.equal(first, kept)
    assert torch.equal(model(**a).last_hidden_state, kept)
    other = model(**b).last_hidden_state  # another shape
    results = {}
    thread = threading.Thread(target=lambda: results.update(t=model(**a).last_hidden_state))
    thread.start()
    thread.join()
    assert torch.equal(results["t"], kept) and torch.equal(model(**b).last_hidden_state, other)
    del thread
    gc.collect()
    assert len(model._workspaces) == 1  # a finished thread's buffers go with it
    if precision == "fp32":
        with torch.no_grad():
            expected = ref(**a).last_hidden_state
        assert float((kept - expected).abs().max()) < 1e-4


@pytest.mark.parametrize("prune", [0.0, 0.7])
def test_dead_heads_and_neurons_are_sliced_away(tmp_path, prune, monkeypatch, caplog):
    """Structured zeros (L0 pruning) compile to smaller layers with the unsliced model's outputs, FP32 and INT8,
    on every attention path (fused block: 2 sequences on 2 threads; feature-major; SDPA without kernels)."""
    import random
    import warnings

    from sparsebert.engine import sparse_linear

    dead_neurons = {0: sorted(random.Random(0).sample(range(100), 37)), 1: list(range(1, 100))}
    folder = save_tiny_model(tmp_path / "l0", head="qa", prune=prune, seed=3, dead_heads={0: [1], 1: [0, 2]},
                             dead_neurons=dead_neurons, **CONFIG)
    ref = AutoModelForQuestionAnswering.from_pretrained(folder).eval()
    keys = ["start_logits", "end_logits"]
    with caplog.at_level("WARNING", logger="sparsebert.engine.bert"):
        model = compile(ref, num_threads=2)
    assert ("every encoder Linear is dense" in caplog.text) == (prune == 0.0)  # fully dense once sliced: ORT is faster
    assert model.slicing.heads_removed == [[1], [0, 2]] and model.slicing.neurons_removed == [37, 99]
    shapes = {(row["layer"], row["name"]): row["shape"] for row in model.summary()}
    assert shapes[(0, "qkv")] == [3 * 32, 48] and shapes[(1, "qkv")] == [3 * 16, 48]
    assert shapes[(0, "attention_output")] == [48, 32] and shapes[(1, "intermediate")] == [1, 48]
    assert shapes[(0, "output")] == [48, 63]
    assert ref.bert.encoder.layer[0].attention.self.query.out_features == 48  # the caller's model is not modified
    full = compile(ref, num_threads=2, slice_structures=False)
    assert full.slicing is None and full.summary()[0]["shape"] == [3 * 48, 48]
    int8 = compile(ref, num_threads=2, precision="int8")
    int8_ref = int8_reference_model(ref)
    for batch, seq in ((2, 21), (3, 13), (1, 1)):
        feeds = _inputs(batch, seq)
        with torch.no_grad():
            expected, expected8 = ref(**feeds), int8_ref(**feeds)
        assert _max_diff(model(**feeds), expected, keys) < 1e-4
        scale = max(float(expected[k].abs().max()) for k in keys)
        assert _max_diff(int8(**feeds), expected8, keys) < 1e-3 * scale
    # the pure-torch path (SDPA attention, no fused kernels)
    monkeypatch.setattr(sparse_linear._kernels, "load", lambda *a, **k: None)
    monkeypatch.setattr(SparseLinear, "_warned_fallback", True)
    feeds = _inputs(3, 13)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert _max_diff(compile(ref)(**feeds), ref(**feeds), keys) < 1e-4
