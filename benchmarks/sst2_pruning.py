"""SST-2 acceptance benchmark of the main job (issue: recipe-driven pruning + KD on GLUE).

Runs, one after the other on this machine, with the same train subset and seed:
  (a) dense fine-tune of the packaged all-MiniLM-L6-v2          recipes/glue/dense.yaml
  (b) GMP 80% block4 + KD from (a), starting from (a)            recipes/glue/gmp80-block4-kd.yaml
  (c) GMP 90% unstructured + KD from (a), starting from (a)      recipes/glue/gmp90-unstructured-kd.yaml
then writes a table (dev accuracy on all 872 dev rows, measured encoder sparsity, train wall time)
into BENCHMARKS.md between the markers of this benchmark. Finished runs (metrics.json present)
are reused, so the script can be re-run after an interruption.

    python benchmarks/sst2_pruning.py --train-samples 16000 --runs-dir runs
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from _report import ROOT, run_logged, write_section



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-samples", type=int, default=16000)
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--output", default="BENCHMARKS.md")
    args = ap.parse_args()
    runs = Path(args.runs_dir)  # relative to the repo root, so the printed commands are too
    (ROOT / runs / "logs").mkdir(parents=True, exist_ok=True)
    dense = runs / "sst2-dense"
    base = ["sparsebert", "train", "--task", "sst2", "--max-train-samples", str(args.train_samples), "--seed", str(args.seed), "--logging-steps", "50"]
    plan = [
        ("(a) dense fine-tune", dense, ["--recipe", "recipes/glue/dense.yaml"]),
        ("(b) GMP 80% block4 + KD", runs / "sst2-gmp80-block4-kd",
         ["--model", str(dense), "--teacher", str(dense), "--recipe", "recipes/glue/gmp80-block4-kd.yaml"]),
        ("(c) GMP 90% unstructured + KD", runs / "sst2-gmp90-unstructured-kd",
         ["--model", str(dense), "--teacher", str(dense), "--recipe", "recipes/glue/gmp90-unstructured-kd.yaml"]),
    ]
    rows = []
    for label, out, extra in plan:
        cmd = base + extra + ["--output-dir", str(out)]
        if not (ROOT / out / "metrics.json").is_file():
            run_logged(cmd + (["--overwrite"] if (ROOT / out).exists() else []), ROOT / runs / "logs" / f"{out.name}.log")
        m = json.loads((ROOT / out / "metrics.json").read_text())
        rows.append((label, m, shlex.join(cmd)))

    dense_acc = rows[0][1]["validation"]["accuracy"]
    lines = [
        f"SST-2, packaged all-MiniLM-L6-v2, train subset {args.train_samples} of 67,349 (seeded), full dev (872), "
        f"seq 128, batch 32, seed {args.seed}, 2 CPU cores. (b) and (c) start from (a) and distill from it.",
        "",
        "| run | dev accuracy | Δ vs (a) | encoder Linear sparsity | epochs | train wall time |",
        "|---|---|---|---|---|---|",
    ]
    for label, m, _ in rows:
        acc = m["validation"]["accuracy"]
        lines.append(
            f"| {label} | {100 * acc:.2f} | {100 * (acc - dense_acc):+.2f} | {100 * m['encoder_sparsity']:.2f}% | "
            f"{m['epochs']:g} | {m['train_wall_seconds'] / 60:.1f} min |"
        )
    lines += ["", "Commands (each run's log is in `runs/logs/`):", "", "```"]
    lines += [c for _, _, c in rows] + ["```", f"Reproduce all: `python benchmarks/sst2_pruning.py --train-samples {args.train_samples}`"]
    block = write_section(ROOT / args.output, "sst2_pruning", "SST-2: dense vs GMP + KD (main job)", "\n".join(lines))
    print(block)


if __name__ == "__main__":
    sys.exit(main())
