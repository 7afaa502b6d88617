"""Which INT8 ONNX format does ONNX Runtime run fastest here: QDQ or QOperator (MatMulInteger)?

Builds the packaged all-MiniLM-L6-v2 with a 2-label head, 50 % magnitude-pruned encoder Linears,
wraps it with the QuantizationModifier (seed 002 settings + Linear input quantization), calibrates
the observers on a few random batches (no training: speed does not depend on the weights' values),
saves it, exports FP32 / INT8-QDQ / INT8-QOperator deployment folders, and measures them interleaved.

    python benchmarks/int8_formats.py --workdir /tmp/int8_formats --threads 2 --time 20
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def build(workdir: Path) -> Path:
    """Save the calibrated fake-quant model (plain weights + quantization.json) to ``workdir/qat``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sparsebert import RecipeSession
    from sparsebert.models import default_model_path

    src = default_model_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".encoder." in name and p.dim() == 2:
                p.view(-1)[p.abs().flatten().argsort()[: p.numel() // 2]] = 0.0
    recipe = """
quantization_modifiers:
  - !QuantizationModifier
    submodules: [bert.embeddings, bert.encoder, classifier]
    quantize_embedding_activations: false
    quantize_linear_activations: true
"""
    RecipeSession(recipe, model)
    model.train()
    with torch.no_grad():
        for i in range(8):  # calibrate the activation observers
            ids = torch.randint(1000, 30000, (8, 128))
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    out = workdir / "qat"
    model.save_pretrained(out)
    from sparsebert.modifiers.quantization import QUANT_FILE, quantization_state

    (out / QUANT_FILE).write_text(json.dumps(quantization_state(model)))
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps({"task": "sst2"}))
    return out


def main() -> None:
    """Export the three variants and print the interleaved benchmark as JSON lines."""
    from sparsebert.benchmark import run_benchmark
    from sparsebert.export import export_onnx

    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/int8_formats")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time", type=float, default=20.0)
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()
    work = Path(args.workdir)
    src = build(work)
    dirs = {}
    for name, precision, fmt in (("fp32", "fp32", "qdq"), ("int8_qdq", "int8", "qdq"), ("int8_qop", "int8", "qoperator")):
        dirs[name] = export_onnx(src, work / name, precision=precision, int8_format=fmt, sequence_length=128, overwrite=True)
        print(json.dumps({"export": name, "max_abs_diff": json.loads((dirs[name] / "manifest.json").read_text())["validation"]["max_abs_diff"]}))
    for batch in (int(b) for b in args.batches.split(",")):
        report = run_benchmark(dirs["fp32"], compare=[str(dirs["int8_qdq"]), str(dirs["int8_qop"])], batch_size=batch,
                               num_threads=args.threads, time_s=args.time, warmup=3)
        for r in report["results"]:
            print(json.dumps({"batch": batch, "target": r["target"], "p50_ms": round(r["latency_ms"]["p50"], 2),
                              "items_per_s": round(r["items_per_second"], 1), "speedup": round(r["speedup_vs_first"], 3), "runs": r["iterations"]}))


if __name__ == "__main__":
    main()
