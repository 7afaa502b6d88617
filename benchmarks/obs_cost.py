"""Cost of one oBERT (OBS) pruning step: wall time and peak memory, MiniLM-L6 and a BERT-base shape.

One step = sample ``num_grads`` mini-batch gradients (batch 16 x seq 128, random tokens: cost does
not depend on the data), build the block-diagonal Fisher inverse of every encoder Linear weight by
Woodbury updates, rank by OBS saliency, prune to the target and apply the OBS weight update. It is
what one scheduled step of ``OBSPruningModifier`` does during training, run here through
:func:`sparsebert.oneshot.oneshot`. Each configuration runs in its own process, so its peak resident
memory (``ru_maxrss``) is its own. Memory of the Fisher inverses is ``d * B * 4`` bytes (``d``
pruned weights, ``B`` = fisher_block_size); the table shows that figure next to the measured peak.

    python benchmarks/obs_cost.py                          # MiniLM B=50; BERT-base B=50 (needs ~18 GiB)
    python benchmarks/obs_cost.py --models minilm --num-grads 32
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

from _report import write_section

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """
pruning_modifiers:
  - !OBSPruningModifier
    params: ["re:bert.encoder.layer.*.(query|key|value|dense).weight"]
    init_sparsity: 0.0
    final_sparsity: {sparsity}
    start_epoch: 0.0
    end_epoch: 1.0
    update_frequency: 1.0
    mask_type: {mask_type}
    global_sparsity: true
    num_grads: {num_grads}
    damp: 1e-7
    fisher_block_size: {block}
"""


def measure(model_name: str, block: int, num_grads: int, mask_type: str, sparsity: float, threads: int) -> dict:
    """Run one OBS step in this process; returns time, peak RSS and sizes."""
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    from sparsebert.oneshot import oneshot

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if model_name == "minilm":
        from sparsebert.models import default_model_path

        model = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
    else:  # BERT-base shape, random weights
        model = BertForSequenceClassification(BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, num_labels=2))
    n_batches = num_grads
    rows = [{"input_ids": torch.randint(1000, 20000, (128,)), "attention_mask": torch.ones(128, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(16 * min(n_batches, 8))]  # gradients cycle through 8 batches
    d = sum(p.numel() for n, p in model.named_parameters() if ".encoder.layer." in n and n.endswith("weight") and p.dim() == 2)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.time()
    oneshot(model, RECIPE.format(sparsity=sparsity, mask_type=mask_type, num_grads=num_grads, block=block), rows,
            num_calibration_samples=len(rows), batch_size=16)
    seconds = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"model": model_name, "pruned_weights": d, "fisher_block_size": block, "num_grads": num_grads, "mask_type": mask_type,
            "seconds": round(seconds, 1), "peak_rss_gib": round(peak, 2), "rss_before_gib": round(rss_before, 2),
            "finv_gib": round(d * block * 4 / 2**30, 2), "threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,bert-base")
    ap.add_argument("--block", type=int, default=50)
    ap.add_argument("--num-grads", type=int, default=64)
    ap.add_argument("--mask-type", default="unstructured")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one model in this process
    ap.add_argument("--output", default="BENCHMARKS.md")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(a.one, a.block, a.num_grads, a.mask_type, a.sparsity, a.threads)))
        return
    rows = []
    for name in a.models.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--block", str(a.block), "--num-grads", str(a.num_grads),
               "--mask-type", a.mask_type, "--sparsity", str(a.sparsity), "--threads", str(a.threads)]
        print("$", shlex.join(cmd), flush=True)
        out = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE, cwd=ROOT).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = [f"One OBS pruning step to {a.sparsity:.0%} ({a.mask_type}, global), {a.num_grads} gradients of batch 16 x seq 128, "
             f"{a.threads} threads, CPU. Peak = the process's peak resident memory (model, activations and the Fisher inverses).", "",
             "| model | pruned weights d | B | F^-1 size d*B*4 | peak RSS | time of the step |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['pruned_weights'] / 1e6:.1f}M | {r['fisher_block_size']} | {r['finv_gib']:.2f} GiB | "
                     f"{r['peak_rss_gib']:.2f} GiB | {r['seconds']:.0f} s |")
    lines += ["", "Reproduce: `python benchmarks/obs_cost.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]) + "`"]
    print(write_section(ROOT / a.output, "obs_cost", "oBERT: cost of one OBS pruning step", "\n".join(lines)))


if __name__ == "__main__":
    sys.exit(main())
