"""Why hard movement pruning collapses in short runs: rank the weights of a fine-tuned SST-2 model by
movement scores accumulated over a few batches, prune one-shot, and compare with magnitude, random,
and the negated movement score, without any training.

Movement scores ``S = -sum_t w * dL/dw`` (Sanh et al. 2020, arXiv:2005.07683) over a few steps of a
converged model are mostly noise whose spread grows with ``|w|``: both tails of ``S`` (pruned first /
kept first) hold the largest weights. If ``movement`` and ``neg_movement`` both fall below ``random``,
the score -- not its sign or our implementation -- is what removes the important weights.

    python benchmarks/movement_diagnostic.py --model runs/sst2-dense --batches 30 --dev-samples 300
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from _report import ROOT, write_section
from sparsebert.tasks import DataArgs, get_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/sst2-dense")
    ap.add_argument("--batches", type=int, default=30, help="batches of 32 to accumulate movement scores over")
    ap.add_argument("--dev-samples", type=int, default=300)
    a = ap.parse_args()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForSequenceClassification.from_pretrained(a.model)
    data = get_task("sst2").load_data(tok, DataArgs(max_train_samples=32 * a.batches, max_eval_samples=a.dev_samples, seed=0))
    collate = DataCollatorWithPadding(tok)
    batch = lambda ds, lo, hi: collate([ds[i] for i in range(lo, hi)])  # noqa: E731  (dynamic padding)
    dev = batch(data.evals["validation"], 0, len(data.evals["validation"]))
    params = {n: p for n, p in model.named_parameters() if n.startswith("bert.encoder") and p.dim() == 2}
    scores = {n: torch.zeros_like(p) for n, p in params.items()}
    model.train()
    for i in range(a.batches):
        model.zero_grad()
        model(**batch(data.train, i * 32, (i + 1) * 32)).loss.backward()
        for n, p in params.items():
            scores[n] -= p.detach() * p.grad
    model.eval()
    dense = {n: p.detach().clone() for n, p in params.items()}

    def accuracy() -> float:
        with torch.no_grad():
            logits = model(**{k: v for k, v in dev.items() if k != "labels"}).logits
        return 100 * (logits.argmax(-1) == dev["labels"]).float().mean().item()

    rows = [f"| dense | {accuracy():.1f} | | | |"]
    for sparsity in (0.3, 0.5):
        cells = []
        for crit in ("magnitude", "random", "movement", "neg_movement"):
            for n, p in params.items():
                w = dense[n]
                s = {"magnitude": w.abs(), "random": torch.rand_like(w), "movement": scores[n], "neg_movement": -scores[n]}[crit]
                keep = s > s.flatten().kthvalue(int(sparsity * w.numel())).values  # per layer, unstructured
                p.data = w * keep
            cells.append(f"{accuracy():.1f}")
        rows.append(f"| {sparsity:.0%} | " + " | ".join(cells) + " |")
    body = (f"One-shot, per-layer unstructured pruning of `{a.model}` (encoder Linear weights), no training; movement "
            f"scores from {a.batches} batches of 32 SST-2 training sentences; accuracy on the first {a.dev_samples} dev "
            "sentences.\n\n| sparsity | magnitude | random | movement | -movement |\n|---|---|---|---|---|\n"
            + "\n".join(rows) + f"\n\n`python benchmarks/movement_diagnostic.py --model {a.model} --batches {a.batches} "
            f"--dev-samples {a.dev_samples}`")
    print(write_section(ROOT / "BENCHMARKS.md", "movement_diagnostic", "Movement pruning: why it collapses in short runs", body))


if __name__ == "__main__":
    main()
