"""Does per-layer (hidden-state) distillation help the GMP 80% block4 student? A paired CPU run.

The GMP + KD students on a GPU fit the teacher's training-set logits almost exactly (KD loss 0.03 by
epoch 9) while their dev accuracy falls over the last recovery epochs. Per-layer distillation gives
each example a richer target (every encoder layer's output), the usual remedy for a student that
over-fits the teacher's logits (TinyBERT, CoFi). Two students, identical but for that term, from the
same CPU teacher (``runs/sst2-dense``, the main job's (a)) on the same train subset and seed:

  logits KD           recipes/glue/gmp80-block4-kd.yaml            (session 7's best GMP overrides)
  + per-layer KD      recipes/glue/gmp80-block4-kd-layerwise.yaml  (same overrides, layer_gain)

Finished runs (metrics.json present) are reused. Writes the table and per-epoch dev curves into
BENCHMARKS.md between this benchmark's markers.

    python benchmarks/sst2_layerwise.py --train-samples 16000 --epochs 6
    python benchmarks/sst2_layerwise.py --epochs 3 --seed 1 --runs-dir runs/s10-seed1 --layer-gain 0.3 1 3   # a gain sweep
    python benchmarks/sst2_layerwise.py --train-samples 0 --epochs 4 --no-logits-baseline \
        --runs-dir runs/s12-full --section sst2_layerwise_full    # issue 3's (b) on all 67,349 sentences
    python benchmarks/sst2_layerwise.py --train-samples 0 --epochs 8 --no-logits-baseline --group-by-length \
        --runs-dir runs/s13-grouped --section sst2_layerwise_grouped --title "..."   # 3x faster steps, twice the epochs
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from _report import ROOT, run_logged, write_section


def dev_curve(out: Path) -> list[float]:
    """Dev accuracy (%) at each epoch end, from the run's ``train_log.jsonl``."""
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [100 * r["eval_validation_accuracy"] for r in rows if "eval_validation_accuracy" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-samples", type=int, default=16000, help="0: the whole training set (67,349)")
    ap.add_argument("--epochs", type=float, default=6.0)
    ap.add_argument("--layer-gain", type=float, nargs="+", default=[1.0],
                    help="one per-layer student per gain (gain 1 writes gmp-layerwise, others gmp-layerwise-gGAIN)")
    ap.add_argument("--runs-dir", default="runs/s10")
    ap.add_argument("--teacher", default="runs/sst2-dense")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-logits-baseline", action="store_true",
                    help="run only the per-layer students (the logits-KD pair costs as much again)")
    ap.add_argument("--group-by-length", action="store_true",
                    help="train on length-grouped batches (HF LengthGroupedSampler): about 3x less padding on SST-2")
    ap.add_argument("--title", help="BENCHMARKS.md section title (default: by train-set size)")
    ap.add_argument("--output", default="BENCHMARKS.md")
    ap.add_argument("--section", default="sst2_layerwise", help="BENCHMARKS.md marker name (one per configuration)")
    args = ap.parse_args()
    runs = Path(args.runs_dir)
    (ROOT / "runs" / "logs").mkdir(parents=True, exist_ok=True)
    best = {"num_epochs": args.epochs, "prune_end": args.epochs / 2, "init_lr": 4e-4, "temperature": 5.5, "global_sparsity": True}
    subset = ["--max-train-samples", str(args.train_samples)] if args.train_samples else []
    base = ["sparsebert", "train", "--task", "sst2", *subset, "--seed", str(args.seed),
            "--logging-steps", "25", "--eval-each-epoch", "--batch-size", "128", "--model", args.teacher, "--teacher", args.teacher]
    base += ["--group-by-length"] if args.group_by_length else []
    plan = [] if args.no_logits_baseline else [("GMP 80% block4 + KD (logits)", runs / "gmp-logits", "recipes/glue/gmp80-block4-kd.yaml", best)]
    plan += [(f"GMP 80% block4 + KD (logits) + per-layer KD, gain {g:g}", runs / ("gmp-layerwise" if g == 1 else f"gmp-layerwise-g{g:g}"),
              "recipes/glue/gmp80-block4-kd-layerwise.yaml", {**best, "layer_gain": g}) for g in args.layer_gain]
    rows = []
    for label, out, recipe, kw in plan:
        cmd = base + ["--recipe", recipe, "--recipe-args", json.dumps(kw), "--output-dir", str(out)]
        if not (ROOT / out / "metrics.json").is_file():
            run_logged(cmd + (["--overwrite"] if (ROOT / out).exists() else []), ROOT / "runs" / "logs" / f"{runs.name}-{out.name}.log")
        rows.append((label, json.loads((ROOT / out / "metrics.json").read_text()), dev_curve(ROOT / out), shlex.join(cmd)))

    teacher = json.loads((ROOT / args.teacher / "metrics.json").read_text())["validation"]["accuracy"] * 100
    data = (f"train subset {args.train_samples} of 67,349 drawn with the run's seed ({args.seed}; the teacher's was drawn with seed 42)"
            if args.train_samples else f"all 67,349 training sentences (seed {args.seed}; the teacher saw a 16,000 subset)")
    students = "Every student" if len(plan) > 1 else "The student"
    batches = " (length-grouped: HF's LengthGroupedSampler)" if args.group_by_length else ""
    layerwise = "plus" if args.no_logits_baseline else "all but the first add"
    lines = [
        f"SST-2, {data}, full dev (872), seq 128, batch 128{batches}, 2 CPU cores, one run at a time. Teacher and starting point: (a) of the "
        f"main job (`{args.teacher}`, {teacher:.2f}). {students}: 80% block4, global ranking, cubic pruning to epoch "
        f"{args.epochs / 2:g} of {args.epochs:g}, init_lr 4e-4 linear to 0, logits KD at T 5.5 (hardness 1.0); {layerwise} the "
        "per-layer term (normalized MSE of each encoder layer's output, summed over the 6 layers, times the gain).",
        "",
        "| run | dev | Δ vs (a) | encoder Linear sparsity | epochs | train wall time |",
        "|---|---|---|---|---|---|",
    ]
    for label, m, _, _ in rows:
        acc = 100 * m["validation"]["accuracy"]
        if m.get("stopped_early"):  # SIGTERM before the end: a mid-schedule number
            label += f" (**stopped at epoch {m['stopped_early']['epoch']:g}** of {m['epochs']:g})"
        lines.append(f"| {label} | {acc:.2f} | {acc - teacher:+.2f} | {100 * m['encoder_sparsity']:.2f}% | {m['epochs']:g} | "
                     f"{m['train_wall_seconds'] / 60:.1f} min |")
    lines += ["", "Dev accuracy at each epoch end: " + "; ".join(f"{label}: " + ", ".join(f"{a:.2f}" for a in curve)
                                                            for label, _, curve, _ in rows)]
    lines += ["", "```"] + [c for _, _, _, c in rows] + ["```",
              f"Reproduce: `python benchmarks/sst2_layerwise.py --train-samples {args.train_samples} --epochs {args.epochs:g} "
              f"--layer-gain {' '.join(f'{g:g}' for g in args.layer_gain)} --seed {args.seed} --runs-dir {args.runs_dir} --section {args.section}"
              + (" --no-logits-baseline" if args.no_logits_baseline else "")
              + (" --group-by-length" if args.group_by_length else "")
              + (f" --title {shlex.quote(args.title)}" if args.title else "") + "`"]
    title = args.title or ("SST-2 on a CPU: per-layer distillation for the GMP student (session 10)" if args.train_samples else
             "SST-2 on a CPU, full train set: GMP 80% block4 + KD + per-layer KD (session 12)")
    print(write_section(ROOT / args.output, args.section, title, "\n".join(lines)))


if __name__ == "__main__":
    sys.exit(main())
