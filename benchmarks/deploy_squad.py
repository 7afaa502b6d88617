"""Deployment of the SQuAD students (issue 4): ONNX export -> EM/F1 through each CPU engine -> speed at seq 384.

Every step runs the public CLI (the commands are printed and written to BENCHMARKS.md):

1. ``sparsebert export`` (FP32, dynamic axes) of the dense (a) and of each sparse student;
2. ``sparsebert evaluate --task squad --split-by-article 36:12`` of every deployment folder on the 12 held-out
   articles (all 2,890 questions unless ``--max-eval-samples``), with ONNX Runtime and with sparsebert's engine
   (``sparsebert``: FP32 sparse kernels; ``sparsebert-int8``: weights quantized to INT8 at load, no calibration,
   no QAT), so the table shows what each engine's numerics do to EM/F1;
3. ``sparsebert benchmark`` at seq 384 (SQuAD's window), batch 1 and ``--batch``, all targets interleaved,
   ratios to ONNX Runtime on the dense export.

    python benchmarks/deploy_squad.py --dense runs/squad-dense-dyn --sparse runs/s15-cpu-squad-obs-masked \\
        --sparse runs/s16-cpu-squad-gmp-20ep
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from _report import ROOT, write_section
from deploy_sst2 import SBT, run

ENGINES = ("onnxruntime", "sparsebert", "sparsebert-int8")
DENSE = "dense (a)"  # the reference: evaluated on ORT only, first in every benchmark


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default="runs/squad-dense-dyn", help="Dense fine-tuned SQuAD model, (a).")
    ap.add_argument("--sparse", action="append", default=None, help="A sparse SQuAD student (repeatable).")
    ap.add_argument("--deploy-dir", default="deploy")
    ap.add_argument("--max-eval-samples", type=int, default=None, help="Questions evaluated (default: all 2,890).")
    ap.add_argument("--batch", type=int, default=8, help="The second benchmark batch size (the first is 1).")
    ap.add_argument("--bench-time", type=float, default=30.0, help="Seconds per benchmark run (all targets together).")
    ap.add_argument("--output", default="BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true", help="Print the section only.")
    a = ap.parse_args()
    sparse = a.sparse or ["runs/s15-cpu-squad-obs-masked"]
    log: list[str] = []
    dep = Path(a.deploy_dir)

    # 1. exports
    models = {DENSE: Path(a.dense), **{f"sparse: {Path(s).name}": Path(s) for s in sparse}}
    folders = {}
    for name, src in models.items():
        out = dep / f"squad-{src.name}-fp32"
        run([*SBT, "export", str(src), "--output-dir", str(out), "--precision", "fp32", "--overwrite"], log)
        folders[name] = out

    # 2. EM/F1 of every folder x engine on the held-out articles (the dense model on ORT only: it is the reference)
    few = ["--max-eval-samples", str(a.max_eval_samples)] if a.max_eval_samples else []
    scores: dict[tuple[str, str], dict] = {}
    for name, out in folders.items():
        for engine in ENGINES if name != DENSE else ENGINES[:1]:
            mfile = out / f"eval-{engine}.json"
            run([*SBT, "evaluate", "--task", "squad", "--model", str(out), "--engine", engine, "--split-by-article", "36:12",
                 "--no-pad-to-max-length", "--overwrite", "--json", str(mfile)] + few, log)
            scores[name, engine] = json.loads((ROOT / mfile).read_text())["validation"]

    # 3. speed at seq 384: ORT on the dense export first (the reference), then ORT and both of our engines per student
    bench = {}
    targets, labels = [str(folders[DENSE])], [f"{DENSE}, onnxruntime"]
    for name, out in folders.items():
        for engine in ENGINES if name != DENSE else ():
            targets.append(f"{out}:{engine}")
            labels.append(f"{name}, {engine}")
    for bs in (1, a.batch):
        cmd = [*SBT, "benchmark", targets[0]]
        for t in targets[1:]:
            cmd += ["--compare", t]
        out_json = run(cmd + ["--batch-size", str(bs), "--sequence-length", "384", "--num-threads", "2",
                              "--time", str(a.bench_time), "--json"], log, capture=True)
        bench[bs] = json.loads(out_json)

    # report
    ref = scores[DENSE, "onnxruntime"]["f1"]
    sparsity = {n: json.loads((ROOT / out / "manifest.json").read_text())["sparsity"]["encoder_linear"] for n, out in folders.items()}
    train_f1 = {n: _train_f1(src) for n, src in models.items()}
    lines = ["SQuAD v1.1, **training used dev articles** (36:12 article split, seed 42); EM/F1 on the 12 held-out articles"
             f" ({'all 2,890 questions' if not a.max_eval_samples else f'{a.max_eval_samples} questions'}), "
             "seq 384, doc_stride 128, windows padded per batch; 2 threads.", "",
             "| model | engine | encoder Linear sparsity | EM | F1 | Δ F1 vs (a) on ORT | F1 in training's metrics (PyTorch) |",
             "|---|---|---|---|---|---|---|"]
    for (name, engine), v in scores.items():
        lines.append(f"| {name} | {engine} | {sparsity[name] * 100:.2f}% | {v['exact_match']:.2f} "
                     f"| {v['f1']:.2f} | {v['f1'] - ref:+.2f} | {train_f1[name]} |")
    lines += ["", "| batch | target | p50 ms | p99 ms | windows/s | speedup vs dense ORT |", "|---|---|---|---|---|---|"]
    for bs, rep in bench.items():
        for r, label in zip(rep["results"], labels):
            lat = r["latency_ms"]
            lines.append(f"| {bs} | {label} | {lat['p50']:.1f} | {lat['p99']:.1f} | {r['items_per_second']:.1f} "
                         f"| {r['speedup_vs_first']:.2f}x |")
    lines += ["", "Commands:", "", "```", *log, "```",
              "Reproduce: `python benchmarks/deploy_squad.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]) + "`"]
    body = "\n".join(lines)
    print(body)
    if not a.no_write:
        write_section(ROOT / a.output, "deploy_squad", "Deployment: the SQuAD students through ONNX Runtime and the sparse engine",
                      body)
    (ROOT / dep / "deploy_squad.json").write_text(json.dumps(
        {"scores": {f"{n} | {e}": v for (n, e), v in scores.items()}, "bench": bench}, indent=1))


def _train_f1(run_dir: Path) -> str:
    """The F1 a run's own evaluation wrote (``eval-full.json`` over ``metrics.json``: see BENCHMARKS on the dense (a))."""
    for f in ("eval-full.json", "metrics.json"):
        p = ROOT / run_dir / f
        if p.is_file():
            m = json.loads(p.read_text())
            if not m.get("stopped_early"):
                return f"{m['validation']['f1']:.2f}"
    return "n/a"


if __name__ == "__main__":
    main()
