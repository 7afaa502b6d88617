"""SQuAD windows padded to max_seq_length vs per batch (``--no-pad-to-max-length``): tokens, time, F1.

``run_qa.py`` pads every SQuAD window to ``max_seq_length`` (384), but on the 36 training articles of
the 36:12 split a window averages ~173 tokens, so most of each padded batch is padding. This
measures, side by side in one run:

1. padded / real tokens over one epoch of the training windows at batch 32, through the trainer's
   own dataloader (no model): padded to 384; per batch with random batches; per batch with
   length-grouped batches (``--group-by-length``);
2. the dense QA fine-tune (``recipes/squad/dense.yaml``, one epoch; ``--steps N``: on the windows of
   32 * N seeded training questions), padded vs per-batch + grouped: the training-loop time (the
   Trainer's ``train_runtime``) and the EM/F1 each run reaches;
3. EM/F1 and eval time of one trained model on the 12 held-out articles, padded vs per batch:
   the answers must be identical (only the padding differs).

    python benchmarks/squad_padding.py --steps 30 --eval-samples 500 --model runs/squad-dense-dyn
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

from _report import ROOT, run_logged, train_padding_ratio, write_section


def padding_ratios(batch_size: int) -> dict[str, float]:
    """Padded / real tokens of one epoch of the 36:12 split's training windows, by padding mode."""
    from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

    from sparsebert.models import resolve_model
    from sparsebert.tasks import DataArgs, get_task

    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    tiny = BertForQuestionAnswering(BertConfig(vocab_size=tok.vocab_size, hidden_size=8, num_hidden_layers=1,
                                               num_attention_heads=1, intermediate_size=8, max_position_embeddings=512))
    task = get_task("squad")
    windows = {pad: task.load_data(tok, DataArgs(max_seq_length=384, split_by_article="36:12", pad_to_max_length=pad)).train
               for pad in (True, False)}
    return {name: train_padding_ratio(task, tok, tiny, windows[pad], batch_size, group)
            for name, pad, group in (("padded to 384", True, False), ("per batch, random batches", False, False),
                                     ("per batch, length-grouped (`--group-by-length`)", False, True))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=0, help="train on 32 * steps questions (0: all 36 articles)")
    ap.add_argument("--model", default="runs/squad-dense-dyn", help="a trained QA model to evaluate both ways")
    ap.add_argument("--eval-samples", type=int, default=500, help="held-out questions scored (0: all 2,890)")
    ap.add_argument("--output", default="BENCHMARKS.md")
    args = ap.parse_args()
    logs = ROOT / "runs" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ratios = padding_ratios(32)
    base = ["sparsebert", "train", "--task", "squad", "--seed", "42", "--split-by-article", "36:12",
            "--logging-steps", "25", "--recipe", "recipes/squad/dense.yaml", "--recipe-args", json.dumps({"num_epochs": 1.0})]
    base += ["--max-train-samples", str(32 * args.steps)] if args.steps else []
    few = ["--max-eval-samples", str(args.eval_samples)] if args.eval_samples else []
    base += few
    train_time, cmds = {}, []
    for pad in (True, False):
        out = ROOT / "runs" / "squad_padding" / ("padded" if pad else "dynamic")
        cmd = base + ["--output-dir", str(out.relative_to(ROOT)), "--overwrite"]
        cmd += [] if pad else ["--no-pad-to-max-length", "--group-by-length"]
        run_logged(cmd, logs / f"squad_padding-{out.name}.log")
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        train_time[pad] = (next(r["train_runtime"] for r in log if "train_runtime" in r),
                           json.loads((out / "metrics.json").read_text())["validation"])
        cmds.append(shlex.join(cmd))
    scores = {}
    for pad in (True, False):
        out = ROOT / "runs" / "squad_padding" / f"eval-{'padded' if pad else 'dynamic'}.json"
        cmd = ["sparsebert", "evaluate", "--task", "squad", "--model", args.model, "--split-by-article", "36:12",
               "--json", str(out.relative_to(ROOT)), "--overwrite"] + few + ([] if pad else ["--no-pad-to-max-length"])
        start = time.perf_counter()
        run_logged(cmd, logs / f"squad_padding-{out.stem}.log")
        scores[pad] = (json.loads(out.read_text())["validation"], time.perf_counter() - start)
        cmds.append(shlex.join(cmd))
    (pt, pf), (dt, df) = train_time[True], train_time[False]
    (pm, pe), (dm, de) = scores[True], scores[False]
    lines = [
        "SQuAD v1.1, 36:12 article split (**training used dev articles**), packaged tokenizer, max_seq_length 384, "
        "doc_stride 128, batch 32, 2 CPU cores. Tokens: one epoch of all training windows through the trainer's "
        "dataloader. Training: the dense QA fine-tune from the packaged MiniLM, one epoch (LR 1e-4 linear to 0) over "
        + (f"the windows of {32 * args.steps} seeded training questions" if args.steps else "all 36 training articles")
        + ", the two runs back to back; time is the training loop (`train_runtime`), EM/F1 on "
        + (f"the first {args.eval_samples} questions" if args.eval_samples else "all 2,890 questions")
        + f" of the 12 held-out articles. Eval: `{args.model}` scored both ways on the same questions, wall time of the "
        "whole command (load and tokenize included).",
        "",
        "| windows | padded / real tokens |",
        "|---|---|",
        *[f"| {name} | {ratio:.2f} |" for name, ratio in ratios.items()],
        "",
        "| run | padded to 384 | per batch (+ grouped for training) | ratio |",
        "|---|---|---|---|",
        f"| training loop, dense QA, 1 epoch | {pt / 60:.1f} min | {dt / 60:.1f} min | {pt / dt:.2f}x faster |",
        f"| EM / F1 after it | {pf['exact_match']:.2f} / {pf['f1']:.2f} | {df['exact_match']:.2f} / {df['f1']:.2f} | "
        f"F1 {df['f1'] - pf['f1']:+.2f} |",
        f"| `{args.model}`: EM / F1 | {pm['exact_match']:.2f} / {pm['f1']:.2f} | {dm['exact_match']:.2f} / {dm['f1']:.2f} | "
        f"{'identical' if pm == dm else 'DIFFER'} |",
        f"| eval wall time | {pe:.0f} s | {de:.0f} s | {pe / de:.2f}x faster |",
        "",
        "```", *cmds, "```",
        f"Reproduce: `python benchmarks/squad_padding.py --steps {args.steps} --eval-samples {args.eval_samples} --model {args.model}`",
    ]
    print(write_section(ROOT / args.output, "squad_padding",
                        "SQuAD: windows padded to 384 vs per batch (session 15)", "\n".join(lines)))


if __name__ == "__main__":
    sys.exit(main())
