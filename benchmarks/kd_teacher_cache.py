"""KD with and without the teacher output cache (``cache_teacher_outputs``): time and equality.

A SQuAD KD student runs the frozen teacher's forward pass on every batch, ~a quarter of a step's
compute, although the teacher's outputs for a window never change. ``DistillationModifier``'s
``cache_teacher_outputs: true`` keeps them from epoch 1 on. This runs the same student twice, back
to back -- GMP 80% block4 + KD (``recipes/squad/gmp80-block4-kd.yaml``, init_lr 4e-4) from a dense
QA model, per-batch padding, length-grouped batches, the windows of ``32 * steps`` seeded training
questions, ``epochs`` epochs -- once without and once with the cache, and reports:

1. the training-loop time of each (the Trainer's ``train_runtime``) and, assuming the cached run's
   first epoch costs what an uncached epoch does, the time of one later epoch with the cache;
2. how far apart the two runs' per-step training losses are (they should agree to float noise:
   the cached teacher outputs were computed in other batches) and their EM/F1.

``--task sst2`` does the same for SST-2 sentences (``recipes/glue/gmp80-block4-kd.yaml``, logits KD
at T 2, from a dense SST-2 model; dev accuracy on the first ``eval-samples`` sentences).

    python benchmarks/kd_teacher_cache.py --steps 12 --epochs 3 --eval-samples 200 --model runs/squad-dense-dyn
    python benchmarks/kd_teacher_cache.py --task sst2 --steps 64 --epochs 3 --eval-samples 872 --model runs/sst2-dense
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from _report import ROOT, run_logged, write_section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=("squad", "sst2"), default="squad")
    ap.add_argument("--steps", type=int, default=12, help="train on 32 * steps questions (their windows) or sentences")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--model", default="runs/squad-dense-dyn", help="dense task model: student start and teacher")
    ap.add_argument("--eval-samples", type=int, default=200, help="held-out questions / dev sentences scored")
    ap.add_argument("--output", default="BENCHMARKS.md")
    args = ap.parse_args()
    if args.epochs < 2:
        ap.error("--epochs must be >= 2 (the cache serves epochs 2 on)")
    logs = ROOT / "runs" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    squad = args.task == "squad"
    task_args = (["--split-by-article", "36:12", "--recipe", "recipes/squad/gmp80-block4-kd.yaml", "--no-pad-to-max-length"]
                 if squad else ["--recipe", "recipes/glue/gmp80-block4-kd.yaml"])
    runs, cmds = {}, []
    for cache in (False, True):
        out = ROOT / "runs" / "kd_cache" / (("" if squad else "sst2-") + ("cached" if cache else "plain"))
        recipe_args = {"num_epochs": float(args.epochs), "init_lr": 4e-4, "cache_teacher_outputs": cache}
        cmd = ["sparsebert", "train", "--task", args.task, "--seed", "42", "--model", args.model, "--teacher", args.model,
               *task_args, "--recipe-args", json.dumps(recipe_args), "--group-by-length",
               "--max-train-samples", str(32 * args.steps), "--max-eval-samples", str(args.eval_samples),
               "--logging-steps", "1", "--output-dir", str(out.relative_to(ROOT)), "--overwrite"]
        run_logged(cmd, logs / f"kd_cache-{out.name}.log")
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        runs[cache] = {"time": next(r["train_runtime"] for r in log if "train_runtime" in r),
                       "losses": [r["loss"] for r in log if "loss" in r],
                       "metrics": json.loads((out / "metrics.json").read_text())}
        cmds.append(shlex.join(cmd))
    plain, cached = runs[False], runs[True]
    epoch_plain = plain["time"] / args.epochs
    epoch_cached = (cached["time"] - epoch_plain) / (args.epochs - 1)
    diffs = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(plain["losses"], cached["losses"])]
    (pm, cm) = plain["metrics"]["validation"], cached["metrics"]["validation"]
    if squad:
        setup = ("SQuAD v1.1, 36:12 article split (**training used dev articles**), 2 CPU cores, the two runs back to back. "
                 f"Student and teacher: `{args.model}`; GMP 80% block4 + KD (hardness 1.0, T 5.5, padding left out of the KD "
                 f"softmax), init_lr 4e-4, {args.epochs} epochs over the windows of {32 * args.steps} seeded training questions, "
                 f"batch 32, per-batch padding, length-grouped batches; EM/F1 on the first {args.eval_samples} held-out questions.")
        score = ("EM / F1", lambda m: f"{m['exact_match']:.2f} / {m['f1']:.2f}", f"F1 {cm['f1'] - pm['f1']:+.2f}")
    else:
        setup = ("SST-2, 2 CPU cores, the two runs back to back. "
                 f"Student and teacher: `{args.model}`; GMP 80% block4 + KD (hardness 1.0, T 2), init_lr 4e-4, {args.epochs} "
                 f"epochs over {32 * args.steps} seeded training sentences, batch 32, per-batch padding, length-grouped "
                 f"batches; accuracy on {args.eval_samples} dev sentences.")
        score = ("dev accuracy", lambda m: f"{100 * m['accuracy']:.2f}", f"{100 * (cm['accuracy'] - pm['accuracy']):+.2f}")
    lines = [
        setup + " Time: the training loop (`train_runtime`); a later cached epoch is estimated as (cached run - one "
        "uncached epoch) / (epochs - 1).",
        "",
        "| | without cache | with `cache_teacher_outputs` | ratio |",
        "|---|---|---|---|",
        f"| training loop, {args.epochs} epochs | {plain['time']:.0f} s | {cached['time']:.0f} s | "
        f"{plain['time'] / cached['time']:.2f}x faster |",
        f"| one epoch after the first (estimate) | {epoch_plain:.0f} s | {epoch_cached:.0f} s | {epoch_plain / epoch_cached:.2f}x faster |",
        f"| per-step training loss, largest relative difference over {len(diffs)} steps | | | {max(diffs):.1e} |",
        f"| {score[0]} | {score[1](pm)} | {score[1](cm)} | {score[2]} |",
        "",
        "```", *cmds, "```",
        f"Reproduce: `python benchmarks/kd_teacher_cache.py --task {args.task} --steps {args.steps} --epochs {args.epochs} "
        f"--eval-samples {args.eval_samples} --model {args.model}`",
    ]
    name = "kd_teacher_cache" if squad else "kd_teacher_cache_sst2"
    title = "KD: teacher outputs cached vs recomputed every epoch" + ("" if squad else ", SST-2") + " (session 16)"
    print(write_section(ROOT / args.output, name, title, "\n".join(lines)))


if __name__ == "__main__":
    sys.exit(main())
