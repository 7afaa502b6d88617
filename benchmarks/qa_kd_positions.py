"""Where a QA teacher's softened start/end distribution puts its mass: context, CLS, question, padding.

Distillation for QA (seed 002: hardness 1.0, temperature 5.5) matches the student's
``softmax(logits / T)`` over all positions of a window to the teacher's. With windows padded to
max_seq_length 384, ~55% of the positions of a SQuAD window are padding. This measures, for a
trained QA model on the 36:12 split's held-out windows padded to 384, the mean share of the
teacher's softened probability (start and end averaged) on each kind of position, at several
temperatures: the part of the KD target that is about positions an answer can never occupy.

    python benchmarks/qa_kd_positions.py --model runs/squad-dense-dyn --windows 256
"""

from __future__ import annotations

import argparse
import sys

from _report import ROOT, write_section

KINDS = ("context", "CLS", "question + SEP", "padding")


def position_shares(model_dir: str, windows: int, temperatures: list[float]) -> dict[float, dict[str, float]]:
    """Mean softened probability mass per position kind, keyed by temperature (kinds: ``KINDS``)."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer, DataCollatorWithPadding

    from sparsebert.tasks import DataArgs, get_task

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir).eval()
    data = get_task("squad").load_data(tok, DataArgs(max_seq_length=384, split_by_article="36:12"), need_train=False)
    feats = data.evals["validation"].select(range(windows)).remove_columns(["example_id", "offset_mapping"])
    collate = DataCollatorWithPadding(tok)
    sums = {t: dict.fromkeys(KINDS, 0.0) for t in temperatures}
    for start in range(0, windows, 32):
        batch = collate([feats[i] for i in range(start, min(start + 32, windows))])
        with torch.no_grad():
            out = model(**batch)
        real = batch["attention_mask"].bool()
        context = (batch["token_type_ids"] == 1) & real
        kinds = {"context": context, "CLS": torch.zeros_like(real).index_fill_(1, torch.tensor([0]), True),
                 "padding": ~real}
        kinds["question + SEP"] = real & ~context & ~kinds["CLS"]
        for t in temperatures:
            for logits in (out.start_logits, out.end_logits):
                p = torch.softmax(logits / t, dim=-1)
                for kind in KINDS:
                    sums[t][kind] += float((p * kinds[kind]).sum()) / 2
    return {t: {k: v / windows for k, v in s.items()} for t, s in sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/squad-dense-dyn")
    ap.add_argument("--windows", type=int, default=256)
    ap.add_argument("--output", default="BENCHMARKS.md")
    args = ap.parse_args()
    temperatures = [1.0, 2.0, 5.5]
    shares = position_shares(args.model, args.windows, temperatures)
    lines = [f"Teacher `{args.model}`, the first {args.windows} held-out windows of the 36:12 split, padded to 384 "
             "(as `run_qa.py` and the default `--pad-to-max-length` train). Mean share of softmax(logits / T), start "
             "and end averaged, by position kind.", "",
             "| T | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    lines += [f"| {t} | " + " | ".join(f"{100 * shares[t][k]:.1f}%" for k in KINDS) + " |" for t in temperatures]
    lines += ["", f"Reproduce: `python benchmarks/qa_kd_positions.py --model {args.model} --windows {args.windows}`"]
    print(write_section(ROOT / args.output, "qa_kd_positions",
                        "SQuAD: where the teacher's softened span distribution puts its mass (session 15)", "\n".join(lines)))


if __name__ == "__main__":
    sys.exit(main())
