"""Length-grouped batches (``sparsebert train --group-by-length``): padding and step time on SST-2.

SST-2's training sentences are short and uneven (13.3 tokens on average, up to 66), and dynamic
padding pads every batch to its longest sentence. Hugging Face's ``LengthGroupedSampler`` (what
``--group-by-length`` selects) sorts each random mega-batch of 50 batches by length, so a batch
holds sentences of about one length. This measures, side by side in one run:

1. padded tokens / real tokens over one epoch of the whole train set at batch 128 (random vs
   grouped; the trainer's own dataloader, no model), and
2. the training-loop time (the Trainer's ``train_runtime``) of one job, issue 3's student (GMP 80%
   block4 + logits and per-layer KD, batch 128), on a seeded train subset, random vs grouped batches.

    python benchmarks/group_by_length.py --steps 30
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from _report import ROOT, run_logged, train_padding_ratio, write_section


def padding_ratios(batch_size: int) -> dict[bool, float]:
    """Padded / real tokens of one epoch of SST-2's whole train set (the packaged tokenizer), keyed by
    whether batches are length-grouped. The data is read and tokenized once for both."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from sparsebert.models import resolve_model
    from sparsebert.tasks import DataArgs, get_task

    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    task = get_task("sst2")
    data = task.load_data(tok, DataArgs(seed=42))
    tiny = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=8, num_hidden_layers=1,
                                                    num_attention_heads=1, intermediate_size=8))
    return {group: train_padding_ratio(task, tok, tiny, data.train, batch_size, group) for group in (False, True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="training steps per timed run (batch 128)")
    ap.add_argument("--teacher", default="runs/sst2-dense", help="(a) of the main job: student start and teacher")
    ap.add_argument("--output", default="BENCHMARKS.md")
    args = ap.parse_args()
    (ROOT / "runs" / "logs").mkdir(parents=True, exist_ok=True)
    ratios = padding_ratios(128)
    recipe_args = {"num_epochs": 1.0, "prune_end": 0.5, "init_lr": 4e-4, "temperature": 5.5, "global_sparsity": True, "layer_gain": 1.0}
    rows, cmds = {}, []
    for group in (False, True):
        out = ROOT / "runs" / "group_by_length" / ("grouped" if group else "random")
        cmd = ["sparsebert", "train", "--task", "sst2", "--seed", "42", "--max-train-samples", str(128 * args.steps),
               "--batch-size", "128", "--logging-steps", "10", "--model", args.teacher, "--teacher", args.teacher,
               "--recipe", "recipes/glue/gmp80-block4-kd-layerwise.yaml", "--recipe-args", json.dumps(recipe_args),
               "--output-dir", str(out.relative_to(ROOT)), "--overwrite"] + (["--group-by-length"] if group else [])
        run_logged(cmd, ROOT / "runs" / "logs" / f"group_by_length-{out.name}.log")
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        rows[group] = next(r["train_runtime"] for r in log if "train_runtime" in r)  # the training loop alone
        cmds.append(shlex.join(cmd))
    lines = [
        f"SST-2, packaged tokenizer, seq 128, batch 128, 2 CPU cores. Padding: one epoch of the whole train set (67,349) "
        f"through the trainer's dataloader. Time: {args.steps} training steps of issue 3's student (GMP 80% block4 + logits "
        f"and per-layer KD from `{args.teacher}`) on a seeded subset of {128 * args.steps}: the Trainer's `train_runtime` (the training loop, "
        "mask updates included; not load or eval), the two runs back to back.",
        "",
        "| batches | padded / real tokens | training loop | speed-up |",
        "|---|---|---|---|",
        f"| random (default) | {ratios[False]:.2f} | {rows[False]:.1f} s | 1.00x |",
        f"| length-grouped (`--group-by-length`) | {ratios[True]:.2f} | {rows[True]:.1f} s | {rows[False] / rows[True]:.2f}x |",
        "",
        "```", *cmds, "```",
        f"Reproduce: `python benchmarks/group_by_length.py --steps {args.steps}`",
    ]
    print(write_section(ROOT / args.output, "group_by_length", "Length-grouped batches: padding and step time (session 13)",
                        "\n".join(lines)))


if __name__ == "__main__":
    sys.exit(main())
