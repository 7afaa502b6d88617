"""Where the engine's time goes: per-op wall time of one ``CompiledBert`` forward (a breakdown, not a race).

A BERT-shaped model with random weights (``--model bert-base``: 12 x 768, FFN 3072; ``minilm``: 6 x 384, FFN
1536), every encoder Linear magnitude-pruned to ``--sparsity``, compiled with ``sparsebert.engine.compile`` and
called at seq 128. The packed Linear layers' ``run``, the fused FFN and attention-block kernels, the attention kernel and the add +
LayerNorm kernel are wrapped with timers (``perf_counter`` around each call; their overhead is ~1 us a call);
"other" is the forward's wall time minus their sum (embeddings, pooler, head, Python glue).

    python benchmarks/engine_profile.py                          # bert-base, 90%, batch 32, fp32 and int8
    python benchmarks/engine_profile.py --model minilm --batch 1 --sparsity 0
    python benchmarks/engine_profile.py --folder runs/l0/sst2-l0-50-4k --batch 1   # a trained checkpoint (sliced if structured)

Prints a markdown table per precision. Nothing is written to BENCHMARKS.md: quote it with its command.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

SHAPES = {"bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
          "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)}


def _model(name: str, sparsity: float) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**SHAPES[name])).eval()
    if sparsity > 0:
        with torch.no_grad():
            for p in model.bert.encoder.parameters():
                if p.dim() == 2:
                    p[p.abs() <= p.abs().flatten().kthvalue(int(sparsity * p.numel())).values] = 0
    return model


def profile(model: torch.nn.Module, precision: str, batch: int, calls: int) -> tuple[float, dict[str, float]]:
    """(forward ms, {op: ms per forward}) of ``calls`` timed forwards after two warm-up calls."""
    from sparsebert.engine import bert, compile
    from sparsebert.engine import sparse_linear as sl
    from sparsebert.engine.quantized_linear import SparseLinearInt8

    compiled = compile(model, num_threads=2, precision=precision)
    totals: dict[str, float] = collections.defaultdict(float)
    saved = []

    def timed(owner, name: str, label):
        fn = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            totals[label(args)] += time.perf_counter() - t
            return out

        saved.append((owner, name, fn))
        setattr(owner, name, wrapper)

    names = {"qkv": "QKV", "attention_output": "attention output", "intermediate": "FFN1", "output": "FFN2"}
    role = {id(m): names[n] for layer in compiled.layers for n, m in layer.items()}
    timed(sl.SparseLinear, "run", lambda a: f"Linear {role[id(a[0])]} ({a[0].format})")
    timed(SparseLinearInt8, "run", lambda a: f"Linear {role[id(a[0])]} ({a[0].format})")
    # The fused kernels include the residual add + LayerNorm that follows them.
    timed(bert, "fused_ffn", lambda a: f"fused FFN1 + FFN2 + add & LayerNorm ({a[0].format})")
    timed(bert, "fused_ffn_int8", lambda a: f"fused FFN1 + FFN2 + add & LayerNorm ({a[0].format} / {a[1].format})")
    timed(bert, "_attention_block", lambda a: f"attention block: QKV + attention + output + add & LayerNorm "
                                              f"({a[0].format} / {a[1].format})")
    timed(bert, "_add_layernorm", lambda a: "residual add + LayerNorm")
    attention = bert._fused_attention()
    if attention is not None:
        bert._fused_attention.cache_clear()
        timed_attention = {"fn": attention}

        def att(*args):
            t = time.perf_counter()
            out = timed_attention["fn"](*args)
            totals["attention (fused kernel)"] += time.perf_counter() - t
            return out

        saved.append((bert, "_fused_attention", bert._fused_attention))
        bert._fused_attention = lambda: att
    ids = torch.randint(1000, 20000, (batch, 128), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    try:
        for _ in range(2):
            compiled(ids, attention_mask=mask)
        totals.clear()
        t0 = time.perf_counter()
        for _ in range(calls):
            compiled(ids, attention_mask=mask)
        total = (time.perf_counter() - t0) / calls
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)
    return 1e3 * total, {k: 1e3 * v / calls for k, v in totals.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="bert-base")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--folder", default=None, help="profile this trained sequence-classification folder instead of --model/--sparsity")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--precisions", nargs="+", choices=["fp32", "int8"], default=["fp32", "int8"])
    ap.add_argument("--calls", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.folder:
        from transformers import AutoModelForSequenceClassification

        model, what = AutoModelForSequenceClassification.from_pretrained(a.folder).eval(), a.folder
    else:
        model, what = _model(a.model, a.sparsity), f"{a.model} {a.sparsity:.0%}"
    for precision in a.precisions:
        total, ops = profile(model, precision, a.batch, a.calls)
        print(f"\n{what} {precision} batch {a.batch} seq 128, 2 threads: {total:.1f} ms a forward "
              f"(mean of {a.calls})\n")
        print("| op | ms a forward | share |\n|---|---|---|")
        for k, v in sorted(ops.items(), key=lambda kv: -kv[1]):
            print(f"| {k} | {v:.1f} | {v / total:.1%} |")
        other = total - sum(ops.values())
        print(f"| other (embeddings, pooler, head, glue) | {other:.1f} | {other / total:.1%} |")


if __name__ == "__main__":
    main()
