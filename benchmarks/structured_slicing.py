"""Structured pruning -> speed: a model with removed heads / FFN neurons, exported with and without slicing.

Structured pruning (``L0StructuredPruningModifier``) leaves removed attention heads and FFN neurons as
zero rows and columns; ``sparsebert export`` slices them out by default (``sparsebert.slicing``), so
the ONNX graph has smaller dense layers, and ``sparsebert.engine.compile`` does the same. This
exports the structured model twice (``--no-slice`` and sliced) next to its dense teacher, checks
that both give the same dev metrics (ONNX Runtime), and measures them interleaved:

1. ONNX Runtime: dense, structured with zeros kept, structured sliced (ratios to dense);
2. the sliced structured model on the sparsebert engine vs ONNX Runtime, and the dense model on the engine.

Batch 1 and 32, seq 128. ``--pause-pid`` stops a background job (e.g. a long training run on the
same cores) with SIGSTOP while this runs and resumes it with SIGCONT afterwards, whatever happens.

    python benchmarks/structured_slicing.py --model runs/l0/sst2-l0-50-4k --dense runs/sst2-dense --task sst2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from _report import ROOT, write_section

from sparsebert.benchmark import run_benchmark
from sparsebert.export.evaluate import evaluate_onnx


@contextlib.contextmanager
def paused(pid: int | None):
    """SIGSTOP ``pid`` for the block, SIGCONT after (also on errors)."""
    if pid:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if pid:
            os.kill(pid, signal.SIGCONT)


def export(model: str, out: Path, slice_: bool) -> tuple[str, dict]:
    """Export ``model`` to ``out`` with the CLI (replacing an older folder); the command and the manifest."""
    cmd = ["sparsebert", "export", model, "--output-dir", str(out), "--overwrite"] + ([] if slice_ else ["--no-slice"])
    print("$", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, "-m", "sparsebert", *cmd[1:]], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return " ".join(cmd), json.loads((ROOT / out / "manifest.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="trained folder of the structured (L0) model")
    ap.add_argument("--dense", required=True, help="trained folder of the dense model (the teacher)")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--out", default="runs/slicing", help="folder for the three deployment folders")
    ap.add_argument("--time", type=float, default=20.0, help="seconds per benchmark run")
    ap.add_argument("--pause-pid", type=int, default=None, help="a background job to SIGSTOP while measuring")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update BENCHMARKS.md")
    args = ap.parse_args()

    out = Path(args.out)
    folders = {"dense": out / "dense", "zeros kept": out / "structured-no-slice", "sliced": out / "structured-sliced"}
    with paused(args.pause_pid):
        commands, manifests = [], {}
        for name, model, slice_ in (("dense", args.dense, True), ("zeros kept", args.model, False), ("sliced", args.model, True)):
            cmd, manifests[name] = export(model, folders[name], slice_)
            commands.append(cmd)
        metrics = {name: evaluate_onnx(ROOT / f, task=args.task) for name, f in folders.items()}
        runs = {}
        for batch in (1, 32):
            runs[("ort", batch)] = run_benchmark(ROOT / folders["dense"], "onnxruntime",
                                                 [str(ROOT / folders["zeros kept"]), str(ROOT / folders["sliced"])],
                                                 batch_size=batch, sequence_length=128, time_s=args.time)
            runs[("engine", batch)] = run_benchmark(ROOT / folders["sliced"], "sparsebert",
                                                    [str(ROOT / folders["dense"]), "onnxruntime"],
                                                    batch_size=batch, sequence_length=128, time_s=args.time)

    split = next(k for k in metrics["dense"] if isinstance(metrics["dense"][k], dict))
    metric = next(iter(metrics["dense"][split]))
    s = manifests["sliced"]["slicing"]
    lines = [
        f"`{args.model}` ({s['heads_total'] - s['heads_removed']}/{s['heads_total']} heads and "
        f"{s['neurons_total'] - s['neurons_removed']:,}/{s['neurons_total']:,} FFN neurons kept; "
        f"{s['params_before']:,} -> {s['params_after']:,} parameters once sliced) against `{args.dense}`.",
        "",
        f"| deployment | {split} {metric} (ONNX Runtime) | encoder Linear sparsity | max abs diff ORT vs PyTorch |",
        "|---|---|---|---|",
    ]
    for name in folders:
        m = manifests[name]
        lines.append(f"| {name} | {metrics[name][split][metric]:.4f} | {m['sparsity']['encoder_linear']:.4f} | "
                     f"{m['validation']['max_abs_diff']:.2e} |")
    labels = {str(ROOT / f): n for n, f in folders.items()}
    lines += ["", "| run | batch x seq | target | engine | mean latency (ms) | p50 (ms) | items/s | speedup vs run's first row (p50) |",
              "|---|---|---|---|---|---|---|---|"]
    for (kind, batch), res in runs.items():
        for row in res["results"]:
            lines.append(f"| {kind} | {batch} x 128 | {labels[str(row['deployment_dir'])]} | {row['engine']} | "
                         f"{row['latency_ms']['mean']:.1f} | {row['latency_ms']['p50']:.1f} | {row['items_per_second']:.1f} | "
                         f"{row['speedup_vs_first']:.2f}x |")
    lines += ["", "```", *commands, "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "```"]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", "structured_slicing", "Structured pruning: sliced heads and neurons at export",
                      body)


if __name__ == "__main__":
    main()
