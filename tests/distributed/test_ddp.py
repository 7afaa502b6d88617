"""torch.distributed (gloo, 2 processes on 127.0.0.1): masks equal across ranks and to one process.

These run `torchrun` subprocesses, so they take a while; they use tiny models and 16 steps.
"""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")

GMP = """
pruning_modifiers:
  - !GMPruningModifier
    params: ["re:bert.encoder.layer.*.(query|key|value|dense).weight"]
    init_sparsity: 0.0
    final_sparsity: 0.7
    start_epoch: 0.0
    end_epoch: 1.5
    update_frequency: 0.25
    global_sparsity: true
"""

MOVEMENT = GMP.replace("!GMPruningModifier", "!MovementPruningModifier")

# OBS: the empirical Fisher is sampled through the DDP-wrapped model, so every gradient is the
# all-reduced gradient of a global batch -- the same as one process with the global batch size.
OBS = GMP.replace("!GMPruningModifier", "!OBSPruningModifier") + """    num_grads: 4
    fisher_block_size: 8
    damp: 1e-4
    num_recomputations: 1
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out: Path, recipe: Path, nproc: int, batch: int, *extra) -> None:
    if nproc == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", str(WORKER)]
    cmd += ["--out", str(out), "--recipe", str(recipe), "--per-device-batch", str(batch), *extra]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def load(out: Path, rank: int) -> dict:
    return torch.load(out / f"masks_rank{rank}.pt", weights_only=True)


def assert_same_masks(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("recipe_text", [GMP, MOVEMENT, OBS], ids=["gmp-global", "movement-global", "obs-global"])
def test_two_ranks_match_each_other_and_one_process(tmp_path, recipe_text):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text)
    run(tmp_path / "ddp", recipe, 2, 4)
    run(tmp_path / "single", recipe, 1, 8)
    r0, r1, single = load(tmp_path / "ddp", 0), load(tmp_path / "ddp", 1), load(tmp_path / "single", 0)
    assert_same_masks(r0["masks"], r1["masks"])
    assert_same_masks(r0["masks"], single["masks"])
    sparsity = 1 - sum(int(m.sum()) for m in r0["masks"].values()) / sum(m.numel() for m in r0["masks"].values())
    assert sparsity == pytest.approx(0.7, abs=0.002)
    for name, w in r0["weights"].items():
        assert torch.allclose(w, single["weights"][name], atol=1e-4), name
    # only rank 0 wrote the final model, and it is rank 0's
    from transformers import BertForSequenceClassification

    saved = dict(BertForSequenceClassification.from_pretrained(tmp_path / "ddp" / "final").named_parameters())
    for name, w in r0["weights"].items():
        assert torch.equal(saved[name].detach(), w), name


def test_resume_with_a_different_world_size(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GMP)
    # 2 processes die right after the checkpoint of step 8 (epoch 1, mid-schedule); 1 process resumes
    run(tmp_path / "run", recipe, 2, 4, "--kill-after-save", "8")
    assert (tmp_path / "run" / "checkpoint-8" / "sparsebert_state.pt").is_file()
    assert not (tmp_path / "run" / "final").exists()
    run(tmp_path / "run", recipe, 1, 8, "--resume")
    run(tmp_path / "ref", recipe, 1, 8)
    assert_same_masks(load(tmp_path / "run", 0)["masks"], load(tmp_path / "ref", 0)["masks"])


LAUNCHERS = {
    "torchrun": lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={port}"],
    # accelerate's multi-process launcher (it wraps torch.distributed.run); its `--cpu` would start one process
    "accelerate": lambda port: [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_cli_under_launcher_shards_the_data(tmp_path, shared_data, launcher):
    """`torchrun`/`accelerate launch` `-m sparsebert train` on a CPU machine really runs DDP: 64 samples, 2 x 8 per step -> 4 steps."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    from sparsebert.models import default_model_path
    from tests_helpers import tiny_config

    tok = AutoTokenizer.from_pretrained(default_model_path())
    tiny = tmp_path / "tiny"
    BertForSequenceClassification(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=128)).save_pretrained(tiny)
    tok.save_pretrained(tiny)
    out = tmp_path / "out"
    cmd = [*LAUNCHERS[launcher](free_port()), "-m", "sparsebert", "train", "--task", "sst2", "--model", str(tiny), "--recipe", str(Path(__file__).parents[2] / "recipes/glue/gmp80-block4.yaml"),
           "--recipe-args", '{"num_epochs": 1}', "--max-train-samples", "64", "--max-eval-samples", "16", "--batch-size", "8", "--output-dir", str(out)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-4"]
    assert r.stdout.count("metrics.json") == 1  # only rank 0 reports


@pytest.mark.slow
@pytest.mark.parametrize("path", ["squad-kd", "qat-kd"])
def test_squad_and_qat_paths_under_torchrun(tmp_path, shared_data, path):
    """SQuAD with start/end-logit KD, and stage-2 QAT with a constant mask + KD, run under 2-process torchrun;
    the saved model keeps the pruned zeros (QAT) and reports once."""
    from tests_helpers import save_tiny_model

    root = Path(__file__).parents[2]
    if path == "squad-kd":
        tiny = save_tiny_model(tmp_path / "tiny", head="qa")
        task = ["--task", "squad", "--recipe", str(root / "recipes/squad/gmp80-block4-kd.yaml"), "--max-seq-length", "128", "--doc-stride", "64"]
    else:
        tiny = save_tiny_model(tmp_path / "tiny", prune=0.5)
        task = ["--task", "sst2", "--recipe", str(root / "recipes/glue/qat-constant.yaml")]
    out = tmp_path / "out"
    cmd = [*LAUNCHERS["torchrun"](free_port()), "-m", "sparsebert", "train", *task, "--model", str(tiny), "--teacher", str(tiny),
           "--recipe-args", '{"num_epochs": 1}', "--max-train-samples", "64", "--max-eval-samples", "16", "--batch-size", "8", "--output-dir", str(out)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("metrics.json") == 1
    metrics = __import__("json").loads((out / "metrics.json").read_text())
    expected = 0.8 if path == "squad-kd" else 0.5
    assert metrics["encoder_sparsity"] == pytest.approx(expected, abs=0.01)


def test_sigterm_to_one_rank_stops_every_rank_with_a_checkpoint(tmp_path, shared_data):
    """Preemption under torchrun: SIGTERM to one worker only. The ranks agree (every 10 steps), stop at the same
    step with a checkpoint, and rank 0 writes metrics marked ``stopped_early`` -- no hang, exit 0."""
    import json
    import os
    import signal
    import time

    import psutil  # accelerate's dependency
    from transformers import AutoTokenizer, BertForSequenceClassification

    from sparsebert.models import default_model_path
    from tests_helpers import tiny_config

    tok = AutoTokenizer.from_pretrained(default_model_path())
    tiny = tmp_path / "tiny"
    BertForSequenceClassification(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=128)).save_pretrained(tiny)
    tok.save_pretrained(tiny)
    out = tmp_path / "out"
    cmd = [*LAUNCHERS["torchrun"](free_port()), "-m", "sparsebert", "train", "--task", "sst2", "--model", str(tiny),
           "--epochs", "40", "--max-train-samples", "64", "--max-eval-samples", "16", "--batch-size", "8", "--logging-steps", "1",
           "--output-dir", str(out)]  # 4 steps an epoch, 160 in all
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = out / "train_log.jsonl"
    deadline = time.monotonic() + 300
    while not (log.is_file() and log.read_text().count('"loss"') >= 3):  # training is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:] if proc.poll() is not None else "timeout"
        time.sleep(0.2)
    workers = [p for p in psutil.Process(proc.pid).children() if "sparsebert" in " ".join(p.cmdline())]
    assert len(workers) == 2
    os.kill(workers[-1].pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    stopped = json.loads((out / "metrics.json").read_text())["stopped_early"]
    assert stopped["step"] % 10 == 0 and stopped["step"] < 160
    assert (out / f"checkpoint-{stopped['step']}").is_dir()
