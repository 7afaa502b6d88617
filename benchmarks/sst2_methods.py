"""Pruning methods compared on SST-2 (issue: oBERT, movement, one-shot): GMP vs movement vs oBERT.

Part 1, gradual pruning during fine-tuning, the SAME budget for every method: start from the dense
fine-tuned model (a), distill from it, same train subset, epochs, cubic schedule, update frequency,
LR, KD and seed; only the pruning modifier differs (recipes/glue/{gmp,movement,obs}*-kd.yaml):
  targets: 90% unstructured and 80% block4 (per-layer sparsity).
Part 2, one-shot pruning of (a) without any training: magnitude vs OBS at 50% and 70% unstructured,
from the same calibration samples.
Dev accuracy on all 872 SST-2 dev sentences. Finished runs (metrics.json present) are reused.

    python benchmarks/sst2_methods.py --train-samples 8000 --epochs 2 --update-frequency 0.1
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from _report import ROOT, run_logged, write_section
METHODS = {"GMP": "gmp", "movement": "movement", "oBERT": "obs"}
TARGETS = {"90% unstructured": "90-unstructured-kd", "80% block4": "80-block4-kd"}



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default="runs/sst2-dense", help="Dense fine-tuned SST-2 model (start point and teacher).")
    ap.add_argument("--train-samples", type=int, default=8000)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--update-frequency", type=float, default=0.1, help="Epochs between pruning steps (all methods).")
    ap.add_argument("--num-grads", type=int, default=64, help="oBERT gradients per Fisher.")
    ap.add_argument("--calibration-samples", type=int, default=1024, help="One-shot calibration sentences.")
    ap.add_argument("--only", choices=["gradual", "oneshot"], default=None)
    ap.add_argument("--runs-dir", default="runs/methods")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--output", default="BENCHMARKS.md")
    a = ap.parse_args()
    runs = Path(a.runs_dir)
    (ROOT / runs / "logs").mkdir(parents=True, exist_ok=True)

    def do(cmd: list[str], out: Path) -> dict:
        if not (ROOT / out / "metrics.json").is_file():
            run_logged(cmd + ["--output-dir", str(out), "--overwrite"], ROOT / runs / "logs" / f"{out.name}.log")
        return json.loads((ROOT / out / "metrics.json").read_text())

    dense_acc = json.loads((ROOT / a.dense / "metrics.json").read_text())["validation"]["accuracy"]
    lines = [f"SST-2, packaged all-MiniLM-L6-v2 fine-tuned dense = (a) `{a.dense}` (dev {100 * dense_acc:.2f}); full dev (872), seed {a.seed}, 2 CPU cores.", ""]
    commands: list[str] = []
    if a.only in (None, "gradual"):
        lines += [f"**Gradual pruning + KD from (a)**, identical budget: {a.train_samples} training sentences, {a.epochs:g} epochs "
                  f"(cubic schedule over the first half, update every {a.update_frequency:g} epoch), LR 1e-4 linear to 0, KD hardness 1.0, "
                  f"T 2.0, per-layer sparsity; oBERT with {a.num_grads} gradients per Fisher.", "",
                  "| target | " + " | ".join(METHODS) + " | oBERT - GMP |", "|---|" + "---|" * (len(METHODS) + 1)]
        for target, suffix in TARGETS.items():
            accs = {}
            for method, prefix in METHODS.items():
                args = {"num_epochs": a.epochs, "update_frequency": a.update_frequency}
                if prefix == "obs":
                    args["num_grads"] = a.num_grads
                cmd = ["sparsebert", "train", "--task", "sst2", "--model", a.dense, "--teacher", a.dense, "--recipe", f"recipes/glue/{prefix}{suffix}.yaml",
                       "--recipe-args", json.dumps(args), "--max-train-samples", str(a.train_samples), "--seed", str(a.seed), "--logging-steps", "50"]
                out = runs / f"{prefix}{suffix}"
                m = do(cmd, out)
                commands.append(shlex.join(cmd + ["--output-dir", str(out)]))
                accs[method] = m
            cells = [f"{100 * m['validation']['accuracy']:.2f} ({100 * m['encoder_sparsity']:.1f}%, {m['train_wall_seconds'] / 60:.0f} min)" for m in accs.values()]
            gap = 100 * (accs["oBERT"]["validation"]["accuracy"] - accs["GMP"]["validation"]["accuracy"])
            lines.append(f"| {target} | " + " | ".join(cells) + f" | {gap:+.2f} |")
        lines += ["", "Cells: dev accuracy (measured encoder sparsity, train wall time).", ""]
    if a.only in (None, "oneshot"):
        lines += [f"**One-shot pruning of (a), no training** ({a.calibration_samples} calibration sentences, batch 16; per-layer, unstructured):", "",
                  "| sparsity | magnitude | OBS | OBS - magnitude | OBS prune time |", "|---|---|---|---|---|"]
        for sparsity in (0.5, 0.7):
            accs = {}
            for method, prefix in (("magnitude", "gmp"), ("OBS", "obs")):
                args = {"final_sparsity": sparsity, **({"num_grads": a.calibration_samples // 16} if prefix == "obs" else {})}
                cmd = ["sparsebert", "oneshot", "--task", "sst2", "--model", a.dense, "--recipe", f"recipes/glue/{prefix}90-unstructured-kd.yaml",
                       "--recipe-args", json.dumps(args), "--num-calibration-samples", str(a.calibration_samples), "--batch-size", "16", "--seed", str(a.seed)]
                out = runs / f"oneshot-{prefix}{int(sparsity * 100)}"
                accs[method] = do(cmd, out)
                commands.append(shlex.join(cmd + ["--output-dir", str(out)]))
            mag, obs = (100 * accs[k]["validation"]["accuracy"] for k in ("magnitude", "OBS"))
            lines.append(f"| {int(sparsity * 100)}% | {mag:.2f} | {obs:.2f} | {obs - mag:+.2f} | {accs['OBS']['prune_wall_seconds']:.0f} s |")
        lines.append("")
    lines += ["Commands (logs in `" + str(runs / "logs") + "`):", "", "```", *commands, "```",
              "Reproduce: `python benchmarks/sst2_methods.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]) + "`"]
    name = "sst2_methods" + (f"_{a.only}" if a.only else "")
    title = {None: "SST-2: GMP vs movement vs oBERT; one-shot magnitude vs OBS", "gradual": "SST-2: GMP vs movement vs oBERT (same budget)",
             "oneshot": "SST-2: one-shot pruning, magnitude vs OBS"}[a.only]
    print(write_section(ROOT / a.output, name, title, "\n".join(lines)))


if __name__ == "__main__":
    sys.exit(main())
