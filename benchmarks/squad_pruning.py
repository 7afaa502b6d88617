"""SQuAD v1.1 acceptance benchmark: dense QA fine-tune vs 80% block4 GMP + KD (issue: SQuAD).

SQuAD train-v1.1.json is not available offline, so both runs train on 36 articles of the official
dev file and evaluate on the other 12 (``--split-by-article 36:12``: a fixed, seeded split by
article, so no paragraph of an evaluation article is seen in training; the split is saved in each
run's folder). Runs, one after the other, with the same split and seed:
  (a) dense fine-tune of the packaged all-MiniLM-L6-v2          recipes/squad/dense.yaml
  (b) GMP 80% block4 + KD from (a), starting from (a)            recipes/squad/gmp80-block4-kd.yaml
  (c) optional (--with-layerdrop): drop 3 of 6 layers + 80% GMP + KD  recipes/squad/layerdrop3-gmp80-kd.yaml
then writes EM/F1 (official v1.1 definitions), measured encoder sparsity and train wall time into
BENCHMARKS.md between this benchmark's markers. Finished runs (metrics.json present) are reused.

    python benchmarks/squad_pruning.py --split 36:12 --runs-dir runs
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
    ap.add_argument("--split", default="36:12", help="TRAIN:EVAL article counts of dev-v1.1.json.")
    ap.add_argument("--max-seq-length", type=int, default=384)
    ap.add_argument("--doc-stride", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dense-epochs", type=float, default=None, help="Override the dense recipe's num_epochs.")
    ap.add_argument("--sparse-epochs", type=float, default=None, help="Override the pruning recipes' num_epochs.")
    ap.add_argument("--with-layerdrop", action="store_true", help="Also run (c), the layer-dropping recipe.")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--output", default="BENCHMARKS.md")
    args = ap.parse_args()
    runs = Path(args.runs_dir)
    (ROOT / runs / "logs").mkdir(parents=True, exist_ok=True)
    dense = runs / "squad-dense"
    base = ["sparsebert", "train", "--task", "squad", "--split-by-article", args.split, "--max-seq-length", str(args.max_seq_length),
            "--doc-stride", str(args.doc_stride), "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--logging-steps", "25"]

    def epochs(value):
        return ["--recipe-args", json.dumps({"num_epochs": value})] if value else []

    kd = ["--model", str(dense), "--teacher", str(dense)]
    plan = [
        ("(a) dense fine-tune", dense, ["--recipe", "recipes/squad/dense.yaml", *epochs(args.dense_epochs)]),
        ("(b) GMP 80% block4 + KD", runs / "squad-gmp80-block4-kd", [*kd, "--recipe", "recipes/squad/gmp80-block4-kd.yaml", *epochs(args.sparse_epochs)]),
    ]
    if args.with_layerdrop:
        plan.append(("(c) drop 3 layers + GMP 80% + KD", runs / "squad-layerdrop3-gmp80-kd",
                     [*kd, "--recipe", "recipes/squad/layerdrop3-gmp80-kd.yaml", *epochs(args.sparse_epochs)]))
    rows = []
    for label, out, extra in plan:
        cmd = base + extra + ["--output-dir", str(out)]
        if not (ROOT / out / "metrics.json").is_file():
            run_logged(cmd + (["--overwrite"] if (ROOT / out).exists() else []), ROOT / runs / "logs" / f"{out.name}.log")
        rows.append((label, json.loads((ROOT / out / "metrics.json").read_text()), shlex.join(cmd)))

    ref = rows[0][1]["validation"]
    note = rows[0][1].get("data_note") or "trained on dev articles"
    lines = [
        f"SQuAD v1.1, packaged all-MiniLM-L6-v2, **training used dev articles**: dev-v1.1.json split by article "
        f"{args.split} (train:eval; {note}). seq {args.max_seq_length}, doc_stride {args.doc_stride}, batch {args.batch_size}, "
        f"seed {args.seed}, 2 CPU cores. (b) starts from (a) and distills from it (start/end logits, hardness 1.0, temperature 5.5).",
        "",
        "| run | EM | F1 | ΔF1 vs (a) | encoder Linear sparsity | epochs | train wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, m, _ in rows:
        v = m["validation"]
        lines.append(f"| {label} | {v['exact_match']:.2f} | {v['f1']:.2f} | {v['f1'] - ref['f1']:+.2f} | "
                     f"{100 * m['encoder_sparsity']:.2f}% | {m['epochs']:g} | {m['train_wall_seconds'] / 60:.1f} min |")
    lines += ["", "Commands (logs in `runs/logs/`; each run's `predictions.json` is scored by the official script's rules):", "", "```"]
    lines += [c for _, _, c in rows] + ["```", "Reproduce: `python benchmarks/squad_pruning.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]) + "`"]
    print(write_section(ROOT / args.output, "squad_pruning", "SQuAD v1.1: dense vs GMP 80% block4 + KD", "\n".join(lines)))


if __name__ == "__main__":
    sys.exit(main())
