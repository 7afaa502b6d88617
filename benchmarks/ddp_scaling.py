"""Wall time of one SST-2 training epoch (subset) with 1 process vs N processes (torchrun, gloo).

Same global batch (32), data, recipe (GMP 80% unstructured, 1 epoch) and seed; the 1-process run
uses all cores as intra-op threads, the N-process run one thread per process. Writes a table into
BENCHMARKS.md between this benchmark's markers.

    python benchmarks/ddp_scaling.py --train-samples 4000 --nproc 2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from _report import write_section

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-samples", type=int, default=4000)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--runs-dir", default="runs/ddp")
    ap.add_argument("--output", default="BENCHMARKS.md")
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    train = ["-m", "sparsebert", "train", "--task", "sst2", "--recipe", "recipes/glue/gmp80-unstructured.yaml",
             "--recipe-args", '{"num_epochs": 1}', "--max-train-samples", str(a.train_samples), "--overwrite", "--logging-steps", "20"]
    plans = [
        ("1 process", [sys.executable, *train, "--batch-size", str(a.global_batch), "--output-dir", f"{a.runs_dir}/p1"], cores),
        (f"{a.nproc} processes (torchrun, gloo)",
         [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={a.nproc}", "--master-addr=127.0.0.1", "--master-port=29561",
          *train, "--batch-size", str(a.global_batch // a.nproc), "--output-dir", f"{a.runs_dir}/p{a.nproc}"], max(cores // a.nproc, 1)),
    ]
    rows = []
    for label, cmd, threads in plans:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        print("$", shlex.join(cmd), flush=True)
        log = ROOT / a.runs_dir / f"{label.split()[0]}proc.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        m = json.loads((ROOT / cmd[cmd.index("--output-dir") + 1] / "metrics.json").read_text())
        rows.append((label, threads, m, f"OMP_NUM_THREADS={threads} " + shlex.join(["python", *cmd[1:]])))
    base = rows[0][2]["train_wall_seconds"]
    lines = [f"SST-2 subset {a.train_samples}, 1 epoch, global batch {a.global_batch}, GMP 80% unstructured, "
             f"{cores}-core CPU (wall time includes data loading and the final evaluation).", "",
             "| setup | threads/process | train wall time | speedup | dev accuracy | encoder sparsity |", "|---|---|---|---|---|---|"]
    for label, threads, m, _ in rows:
        t = m["train_wall_seconds"]
        lines.append(f"| {label} | {threads} | {t:.0f} s | {base / t:.2f}x | {100 * m['validation']['accuracy']:.2f} | {100 * m['encoder_sparsity']:.2f}% |")
    lines += ["", "```"] + [c for *_, c in rows] + ["```", f"Reproduce: `python benchmarks/ddp_scaling.py --train-samples {a.train_samples} --nproc {a.nproc}`"]
    block = write_section(ROOT / a.output, "ddp_scaling", "Scale-out: 1 vs N processes (torchrun)", "\n".join(lines))
    print(block)


if __name__ == "__main__":
    main()
