"""torch.distributed (gloo, 2 CPU processes): the masked-LM task (Prune OFA student pruning) under torchrun.

Marked slow: two torchrun processes load transformers and the corpus (over a minute on a shared 2-core machine).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests_helpers import save_tiny_model

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "prune_ofa" / "student-gmp80-unstructured.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_mlm_student_pruning_under_torchrun(tmp_path, shared_data, streaming):
    """32 blocks, 2 processes x 4 per step -> 4 global steps per epoch (one checkpoint-4), with KD and GMP."""
    corpus = tmp_path / "corpus" / "AA"
    corpus.mkdir(parents=True)
    for name in ("wiki_00", "wiki_15"):
        text = (shared_data / "wikipedia-sample" / "text" / "AA" / name).read_text(encoding="utf-8")[:20000]
        (corpus / name).write_text(text[: text.rfind("</doc>") + 7], encoding="utf-8")
    tiny = save_tiny_model(tmp_path / "tiny", head="mlm")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
           "-m", "sparsebert", "train", "--task", "mlm", "--model", str(tiny), "--teacher", str(tiny), "--data-dir", str(corpus.parent),
           "--recipe", str(RECIPE), "--recipe-args", '{"num_epochs": 1}', "--max-seq-length", "32", "--max-train-samples", "32",
           "--max-eval-samples", "4", "--batch-size", "4", "--output-dir", str(out), *(["--streaming"] if streaming else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-4"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["encoder_sparsity"] == pytest.approx(0.8, abs=0.01) and metrics["heldout"]["blocks"] == 4
    assert r.stdout.count("metrics.json") == 1  # only rank 0 reports
