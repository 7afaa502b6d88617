"""Deployment acceptance on SST-2: pruned model -> QAT (mask locked) -> ONNX FP32/INT8 -> accuracy,
sparsity, ``sparsebert benchmark --compare`` and ``sparsebert serve`` under 1,000 requests.

Every step runs the public CLI (the commands are printed and written to BENCHMARKS.md):

1. ``sparsebert train`` with ``recipes/glue/qat-constant.yaml`` from the pruned model (stage 2 of
   seed 002: QAT with a constant mask, KD from the dense teacher);
2. ``sparsebert export`` of dense FP32 (the teacher), sparse FP32 (the pruned model) and sparse INT8
   (the QAT model);
3. ``sparsebert evaluate`` of the three deployment folders on the full SST-2 dev set (ONNX Runtime);
4. ``sparsebert benchmark`` interleaving the three, batch 1 and 32, seq 128;
5. ``sparsebert serve`` of the INT8 folder, hit by 1,000 requests, 100 of them malformed.

    python benchmarks/deploy_sst2.py --pruned runs/sst2-gmp80-block4-kd-full --teacher runs/sst2-dense \\
        --qat-train-samples 8000 --qat-epochs 1
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from _report import write_section

ROOT = Path(__file__).resolve().parents[1]
SBT = [sys.executable, "-m", "sparsebert"]


def run(cmd: list[str], log: list[str], capture: bool = False) -> str:
    """Run a CLI command from the repo root (echoed; recorded for the report)."""
    shown = "sparsebert " + " ".join(shlex.quote(c) for c in cmd[3:]) if cmd[:3] == SBT else shlex.join(cmd)
    print("$", shown, flush=True)
    log.append(shown)
    res = subprocess.run(cmd, cwd=ROOT, check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return res.stdout if capture else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_load(deploy: Path, n: int, n_bad: int, log: list[str], seed: int = 0) -> dict:
    """Start ``sparsebert serve`` on a free port, send ``n`` requests (``n_bad`` malformed) one by one.

    Returns counts of status codes for good/bad requests, latency percentiles (ms) of the good
    ones, and whether the server was still healthy at the end.
    """
    import httpx
    import numpy as np

    port = free_port()
    cmd = [*SBT, "serve", str(deploy), "--port", str(port), "--num-threads", "2"]
    log.append("sparsebert " + " ".join(shlex.quote(c) for c in cmd[3:]))
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            raise RuntimeError("server did not come up")
        rng = random.Random(seed)
        sentences = [line.split("\t")[0] for line in (ROOT.parent / "shared/data/glue/SST-2/dev.tsv").read_text().splitlines()[1:]]
        malformed = [b"{not json", b'{"txt": "typo in field"}', b'{"text": ""}', b'{"text": 5}', b"[]", b'{"text": "a", "extra": 1}',
                     b'{"question": "q", "context": "c"}', b'[{"text": "a"}, {"bad": 1}]', b'"just a string"', b"null"]
        plan = [True] * (n - n_bad) + [False] * n_bad
        rng.shuffle(plan)
        good_codes: dict[int, int] = {}
        bad_codes: dict[int, int] = {}
        latencies = []
        with httpx.Client(base_url=url, timeout=30) as client:
            for i, ok in enumerate(plan):
                if ok:
                    body = json.dumps({"text": rng.choice(sentences)}).encode()
                else:
                    body = malformed[i % len(malformed)]
                t0 = time.perf_counter()
                r = client.post("/predict", content=body, headers={"content-type": "application/json"})
                dt = (time.perf_counter() - t0) * 1000
                codes = good_codes if ok else bad_codes
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
                if ok and r.status_code == 200:
                    latencies.append(dt)
            healthy = client.get("/health").status_code == 200
        lat = np.array(latencies)
        return {"requests": n, "malformed": n_bad, "good_status": good_codes, "malformed_status": bad_codes,
                "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)), "mean": float(lat.mean())},
                "healthy_after": healthy}
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pruned", default="runs/sst2-gmp80-block4-kd-full", help="Stage-1 pruned SST-2 model folder.")
    ap.add_argument("--teacher", default="runs/sst2-dense", help="Dense fine-tuned SST-2 model (teacher, dense baseline).")
    ap.add_argument("--qat-dir", default=None, help="QAT output folder (default: <pruned>-qat); reused if it has metrics.json.")
    ap.add_argument("--qat-train-samples", type=int, default=8000)
    ap.add_argument("--qat-epochs", type=float, default=1.0)
    ap.add_argument("--deploy-dir", default="deploy")
    ap.add_argument("--bench-time", type=float, default=20.0, help="Seconds per benchmark run (all targets together).")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--malformed", type=int, default=100)
    ap.add_argument("--output", default="BENCHMARKS.md")
    a = ap.parse_args()
    log: list[str] = []
    pruned, teacher = Path(a.pruned), Path(a.teacher)
    qat = Path(a.qat_dir or f"{a.pruned}-qat")

    # 1. QAT with the pattern locked (reuse a finished run: it is the slow step)
    if not (ROOT / qat / "metrics.json").is_file():
        run([*SBT, "train", "--task", "sst2", "--model", str(pruned), "--teacher", str(teacher),
             "--recipe", "recipes/glue/qat-constant.yaml", "--recipe-args", json.dumps({"num_epochs": a.qat_epochs}),
             "--max-train-samples", str(a.qat_train_samples), "--seed", "42", "--logging-steps", "50", "--overwrite",
             "--output-dir", str(qat)], log)
    else:
        log.append(f"# reused {qat} (QAT run already finished; its command is in {qat}/metrics.json's recipe)")
    qat_metrics = json.loads((ROOT / qat / "metrics.json").read_text())

    # 2. exports
    dep = Path(a.deploy_dir)
    targets = {"dense FP32": (teacher, dep / "sst2-dense-fp32", "fp32"),
               "sparse FP32": (pruned, dep / "sst2-sparse-fp32", "fp32"),
               "sparse INT8": (qat, dep / "sst2-sparse-int8", "int8")}
    for src, out, prec in targets.values():
        run([*SBT, "export", str(src), "--output-dir", str(out), "--precision", prec, "--overwrite"], log)

    # 3. dev accuracy of each deployment folder (ORT), plus the PyTorch references
    rows = []
    for name, (src, out, prec) in targets.items():
        mfile = out / "eval.json"
        run([*SBT, "evaluate", "--task", "sst2", "--model", str(out), "--json", str(mfile)], log)
        acc = json.loads((ROOT / mfile).read_text())["validation"]["accuracy"]
        manifest = json.loads((ROOT / out / "manifest.json").read_text())
        torch_acc = json.loads((ROOT / src / "metrics.json").read_text())["validation"]["accuracy"]
        rows.append((name, prec, acc, torch_acc, manifest["sparsity"]["encoder_linear"], manifest["validation"]["max_abs_diff"]))

    # 4. speed, interleaved, ratios to dense FP32
    bench = {}
    for bs in (1, 32):
        d, s, q = (str(t[1]) for t in targets.values())
        out = run([*SBT, "benchmark", d, "--compare", s, "--compare", q, "--batch-size", str(bs), "--sequence-length", "128",
                   "--num-threads", "2", "--time", str(a.bench_time), "--json"], log, capture=True)
        bench[bs] = json.loads(out)

    # 5. serving
    srv = serve_load(targets["sparse INT8"][1], a.requests, a.malformed, log)

    # report
    lines = [f"Pruned model `{pruned}` (stage 1), QAT `{qat}` ({qat_metrics['train_samples']} sentences, "
             f"{qat_metrics['epochs']:g} epoch(s), constant mask, KD from `{teacher}`), full SST-2 dev (872), ONNX Runtime, 2 threads.", "",
             "| model | precision | dev accuracy (ORT) | dev accuracy (PyTorch) | encoder sparsity (ONNX) | max abs logit diff ORT vs torch at export |",
             "|---|---|---|---|---|---|"]
    for name, prec, acc, tacc, sp, diff in rows:
        ref = "fake-quant" if prec == "int8" else "fp32"
        lines.append(f"| {name} | {prec} | {acc * 100:.2f} | {tacc * 100:.2f} ({ref}) | {sp * 100:.2f}% | {diff:.1e} |")
    fp32_acc, int8_acc = rows[1][2], rows[2][2]
    lines += ["", f"INT8-sparse vs FP32-sparse dev accuracy: {(int8_acc - fp32_acc) * 100:+.2f} points (target: within 1).", "",
              "| batch | target | p50 ms | p99 ms | items/s | speedup vs dense FP32 |", "|---|---|---|---|---|---|"]
    for bs, rep in bench.items():
        for r, name in zip(rep["results"], targets):
            lat = r["latency_ms"]
            lines.append(f"| {bs} | {name} | {lat['p50']:.2f} | {lat['p99']:.2f} | {r['items_per_second']:.1f} | {r['speedup_vs_first']:.2f}x |")
    lines += ["", f"`sparsebert serve` (sparse INT8): {srv['requests']} sequential requests, {srv['malformed']} malformed. "
              f"Valid requests: status {srv['good_status']}; malformed: status {srv['malformed_status']}; "
              f"server healthy after: {srv['healthy_after']}. Latency of valid requests (client side, one text each): "
              f"p50 {srv['latency_ms']['p50']:.1f} ms, p99 {srv['latency_ms']['p99']:.1f} ms.", "",
              "Commands:", "", "```", *log, "```",
              "Reproduce: `python benchmarks/deploy_sst2.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]) + "`"]
    body = "\n".join(lines)
    print(body)
    write_section(ROOT / a.output, "deploy_sst2", "Deployment: QAT, ONNX FP32/INT8, benchmark, serve (SST-2)", body)
    (ROOT / dep / "deploy_sst2.json").write_text(json.dumps({"rows": rows, "bench": bench, "serve": srv}, indent=1))


if __name__ == "__main__":
    main()
