"""Whole-model CPU speed: sparsebert's engine vs ONNX Runtime (and DeepSparse 1.8), FP32 and INT8.

Models: MiniLM-L6 (the packaged all-MiniLM-L6-v2, random 2-label head) and a BERT-base-shaped
model (random weights: 12 layers x 768, FFN 3072), magnitude-pruned in place (every encoder
Linear to the sparsity; accuracy does not matter for speed): 0/80/90/95% unstructured and 80%
block4. Each is exported with ``sparsebert export`` (dynamic axes) and run at seq 128, batch 1
and 32, with ``--threads`` threads by:

* ``ORT FP32``: ONNX Runtime on the dense export (the reference: every ratio is to it);
* ``ORT INT8``: ``onnxruntime.quantization.quantize_dynamic`` of the dense export (defaults:
  QInt8 weights per tensor, dynamic UINT8 activations);
* ``ours FP32`` / ``ours INT8``: the ``sparsebert`` / ``sparsebert-int8`` engines
  (:func:`sparsebert.engine.compile`) on each export;
* ``DeepSparse FP32`` / ``INT8``: DeepSparse 1.8 in its own virtualenv (``--deepsparse-python``,
  default ``$SPARSEBERT_DEEPSPARSE_PYTHON`` or ``~/.venvs/deepsparse/bin/python``; rows skipped
  when absent; ``python -m venv ~/.venvs/deepsparse && ~/.venvs/deepsparse/bin/pip install
  deepsparse==1.8.0 "numpy<2"``), on the export and on an ONNX Runtime static-QDQ INT8 model of
  it (calibrated on random inputs), timed inside its own process; by default FP32 at 0%, 90%,
  80% block4 and INT8 at 90% (the issue's rows; ``--deepsparse-all`` for every cell).

Per (model, batch) every engine x sparsity is measured *interleaved* (each round runs all of them,
order rotated) so machine noise hits all alike; cells give the median latency and the ratio
median(ORT FP32 dense) / median(this). Results go to BENCHMARKS.md (section ``engine``).

    python benchmarks/engine.py                 # full run (~10-20 min on 2 cores), writes BENCHMARKS.md
    python benchmarks/engine.py --quick         # MiniLM, b1 + b32, 0/90%, few rounds; prints only
    python benchmarks/engine.py --models bert-base --batch 32 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

SPARSITIES = {"0%": (0.0, "unstructured"), "80%": (0.8, "unstructured"), "90%": (0.9, "unstructured"),
              "95%": (0.95, "unstructured"), "80% block4": (0.8, "block4")}
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
SETTLE_S = 0.25  # seconds of untimed calls before each timed one (see _measure)
DEFAULT_DEEPSPARSE = Path.home() / ".venvs" / "deepsparse" / "bin" / "python"
# DeepSparse compiles each (model, batch) for tens of seconds: by default only the rows.
DEEPSPARSE_CONFIGS = {("fp32", "0%"), ("fp32", "90%"), ("fp32", "80% block4"), ("int8", "90%")}

# Runs inside the DeepSparse virtualenv: one JSON command per stdin line, one JSON reply per line.
DEEPSPARSE_WORKER = r"""
import json, sys, time
import numpy as np
from deepsparse import Engine
engines = {}
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "load":
            feeds = [np.asarray(f, dtype=np.int64) for f in cmd["feeds"]]
            eng = Engine(cmd["model"], batch_size=cmd["batch"], num_cores=cmd["threads"],
                         input_shapes=[list(f.shape) for f in feeds])
            engines[cmd["id"]] = (eng, feeds)
            reply = {"ok": True}
        else:
            eng, feeds = engines[cmd["id"]]
            t0 = time.perf_counter()
            eng.run(feeds)
            reply = {"s": time.perf_counter() - t0}
    except Exception as e:
        reply = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(reply), flush=True)
"""


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["minilm", "bert-base"], choices=["minilm", "bert-base"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sparsities", nargs="+", default=list(SPARSITIES), choices=list(SPARSITIES))
    p.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"])
    p.add_argument("--time", type=float, default=None, help="seconds per (model, batch) group (default: by size)")
    p.add_argument("--min-rounds", type=int, default=None, help="rounds per group at least (default 3 at b32, 10 at b1)")
    p.add_argument("--deepsparse-python", default=os.environ.get("SPARSEBERT_DEEPSPARSE_PYTHON", str(DEFAULT_DEEPSPARSE)),
                   help="python of a virtualenv with deepsparse==1.8.0 (skipped if missing)")
    p.add_argument("--deepsparse-all", action="store_true",
                   help="DeepSparse on every sparsity and precision (default: FP32 0/90%%/80%% block4, INT8 90%%)")
    p.add_argument("--workdir", default=None, help="where exports go (default: a temporary folder, removed)")
    p.add_argument("--quick", action="store_true", help="MiniLM, 0/90%%, few rounds; does not write BENCHMARKS.md")
    p.add_argument("--write", action=argparse.BooleanOptionalAction, default=None,
                   help="write BENCHMARKS.md (default: yes, except with --quick)")
    args = p.parse_args()
    if args.quick:
        args.models = ["minilm"] if args.models == ["minilm", "bert-base"] else args.models
        args.sparsities = [s for s in args.sparsities if s in ("0%", "90%")] or args.sparsities
        args.time = args.time or 2.0
        args.min_rounds = args.min_rounds or 3
    if args.write is None:
        args.write = not args.quick
    return args


# ------------------------------------------------------------------------------------------
# Models and deployment folders
# ------------------------------------------------------------------------------------------


def _base_model(name: str):
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    from sparsebert.models import default_model_path

    torch.manual_seed(0)
    if name == "minilm":
        return AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
    return BertForSequenceClassification(BertConfig(**BERT_BASE, num_labels=2))


def _prune(model, sparsity: float, pattern: str) -> None:
    """Magnitude-prune every encoder Linear weight of ``model`` in place (per layer)."""
    import re

    import torch

    from sparsebert.modifiers.masks import compute_masks, parse_mask_type
    from sparsebert.sparsity import ENCODER_LINEAR_RE

    if sparsity == 0:
        return
    params = {n: p for n, p in model.named_parameters() if re.match(ENCODER_LINEAR_RE, n)}
    masks = compute_masks({n: p.detach().abs() for n, p in params.items()}, sparsity, parse_mask_type(pattern))
    with torch.no_grad():
        for n, p in params.items():
            p.mul_(masks[n])


def _make_deployments(model_name: str, labels: list[str], work: Path) -> dict[str, Path]:
    """label -> deployment folder (``sparsebert export``), plus ``"ort-int8"`` (dynamic INT8 of the dense one)."""
    import copy

    from transformers import AutoTokenizer

    from sparsebert.export import export_onnx
    from sparsebert.models import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    base = _base_model(model_name)
    out = {}
    for label in labels:
        sparsity, pattern = SPARSITIES[label]
        model = copy.deepcopy(base)
        _prune(model, sparsity, pattern)
        src = work / f"{model_name}-{label.replace(' ', '-').replace('%', '')}-src"
        model.save_pretrained(src)
        tok.save_pretrained(src)
        out[label] = export_onnx(src, work / src.name.replace("-src", ""), task="text-classification")
        shutil.rmtree(src)  # the deployment folder keeps a copy of the weights
        print(f"  exported {model_name} {label}", flush=True)
    if "0%" in out:
        out["ort-int8"] = _ort_dynamic_int8(out["0%"], work / f"{model_name}-ort-int8")
    return out


def _ort_dynamic_int8(dense: Path, dest: Path) -> Path:
    """A deployment folder whose model.onnx is ``quantize_dynamic(dense model.onnx)`` (ORT defaults)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dest.mkdir()
    for f in ("manifest.json", "config.json"):
        shutil.copy2(dense / f, dest / f)
    quantize_dynamic(str(dense / "model.onnx"), str(dest / "model.onnx"), weight_type=QuantType.QInt8)
    return dest


def _ort_static_qdq(dep: Path, batch: int, seq: int) -> Path:
    """An ORT static QDQ INT8 model of ``dep`` (per-channel weights), calibrated on random inputs (for DeepSparse)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from sparsebert.deployment import random_inputs

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([random_inputs(dep, 1, seq, seed=s) for s in range(4)])

        def get_next(self):
            return next(self.items, None)

    path = dep / "model-qdq-int8.onnx"
    if not path.exists():
        quantize_static(str(dep / "model.onnx"), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return path


# ------------------------------------------------------------------------------------------
# Runners: each returns a callable that runs once and returns the seconds it took
# ------------------------------------------------------------------------------------------


def _in_process(engine: str, dep: Path, feeds, threads: int):
    from sparsebert.deployment import create_engine

    run = create_engine(engine, dep, threads)

    def timed() -> float:
        t0 = time.perf_counter()
        run(feeds)
        return time.perf_counter() - t0

    return timed, run


class DeepSparse:
    """DeepSparse engines in a worker process of its virtualenv (timed there: no IPC in the figures)."""

    def __init__(self, python: str):
        self.script = Path(tempfile.mkdtemp(prefix="sb-deepsparse-")) / "worker.py"
        self.script.write_text(DEEPSPARSE_WORKER)
        self.proc = subprocess.Popen([python, str(self.script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.next_id = 0

    def _call(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("DeepSparse worker exited")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def runner(self, model: Path, feeds: dict, threads: int, manifest_inputs: list[str]):
        self.next_id += 1
        eid = self.next_id
        arrays = [feeds[n].tolist() for n in manifest_inputs]
        # DeepSparse writes the fixed input shapes into the file it is given: hand it a copy.
        copy = model.with_name(f"{model.stem}-deepsparse-b{len(arrays[0])}.onnx")
        if not copy.exists():
            shutil.copy2(model, copy)
        self._call({"op": "load", "id": eid, "model": str(copy), "batch": len(arrays[0]), "threads": threads, "feeds": arrays})
        return lambda: self._call({"op": "run", "id": eid})["s"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        shutil.rmtree(self.script.parent, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------


def _measure(targets: dict, time_s: float, min_rounds: int, settle_s: float = SETTLE_S) -> dict[tuple, list[float]]:
    """Interleaved rounds (order rotated) until ``time_s`` seconds of timed calls and ``min_rounds``
    rounds. In each round every target first makes untimed calls for ``settle_s`` seconds (at least
    one), then one timed call. Why: an engine's thread pool keeps busy-waiting after its call (ONNX
    Runtime's spinning workers, OpenMP, DeepSparse) and steals the 2 cores from whatever runs next;
    measured here, our MiniLM b1 call right after an ORT call took 44 ms instead of its steady 24 ms,
    even after one untimed call of its own. The timed call is thus each engine's steady state, as
    under a stream of requests."""
    keys = list(targets)
    times = {k: [] for k in keys}
    spent, rnd = 0.0, 0
    while rnd < min_rounds or spent < time_s:
        order = keys[rnd % len(keys):] + keys[:rnd % len(keys)]
        for k in order:
            settle = 0.0
            while settle < settle_s or settle == 0.0:  # untimed: the previous engine's threads go idle
                settle += targets[k]()
            times[k].append(targets[k]())
            spent += times[k][-1]
        rnd += 1
    return times


def _machine() -> str:
    import onnxruntime
    import torch

    from sparsebert.engine import kernel_isa

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    avx512 = "avx512f" in flags
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    return (f"{cpu}, {os.cpu_count()} logical CPUs; AVX-512: {'yes' if avx512 else 'no'}, VNNI: {'yes' if vnni else 'no'}; "
            f"torch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()}), onnxruntime "
            f"{onnxruntime.__version__}; sparsebert kernels: {kernel_isa()} (hot loops on that ISA, the rest AVX2)")


def _cell(ms: float | None, ref_ms: float) -> str:
    return "-" if ms is None else f"{ms:.1f} ({ref_ms / ms:.2f}x)"


def main() -> None:
    args = _parse()
    import numpy as np
    import torch

    from sparsebert.deployment import load_manifest, random_inputs

    torch.set_num_threads(args.threads)
    ds_python = args.deepsparse_python if Path(args.deepsparse_python).is_file() else None
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sb-engine-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    print(_machine(), flush=True)
    print(f"DeepSparse: {ds_python or 'not found (' + args.deepsparse_python + '): rows skipped'}", flush=True)
    labels = list(dict.fromkeys(["0%", *args.sparsities]))  # the dense export is the reference
    sections, notes = [], []
    deepsparse = DeepSparse(ds_python) if ds_python else None
    try:
        for model_name in args.models:
            print(f"[{model_name}] exporting {labels} ...", flush=True)
            deps = _make_deployments(model_name, labels, work)
            inputs = load_manifest(deps["0%"])["inputs"]
            for batch in args.batch:
                feeds = random_inputs(deps["0%"], batch, args.seq, seed=1)
                targets, rows = {}, {}
                run, ort_run = _in_process("onnxruntime", deps["0%"], feeds, args.threads)
                targets[("ORT FP32", "0%")] = run
                if "int8" in args.precisions:
                    targets[("ORT INT8 (dynamic)", "0%")] = _in_process("onnxruntime", deps["ort-int8"], feeds, args.threads)[0]
                one = {k: v[:1] for k, v in feeds.items()}  # parity checks on one row: cheap at any batch
                for label in labels:
                    for prec, engine in (("fp32", "sparsebert"), ("int8", "sparsebert-int8")):
                        if prec not in args.precisions:
                            continue
                        timed, ours = _in_process(engine, deps[label], feeds, args.threads)
                        targets[(f"ours {prec.upper()}", label)] = timed
                        if prec == "fp32":  # parity with ONNX Runtime on the same export
                            ort_same = ort_run if label == "0%" else _in_process("onnxruntime", deps[label], one, args.threads)[1]
                            diff = float(np.abs(ours(one)[0] - ort_same(one)[0]).max())
                            rows.setdefault("max abs diff, ours FP32 vs ORT (logits)", {})[label] = diff
                    if deepsparse:
                        for prec in args.precisions:
                            if not args.deepsparse_all and (prec, label) not in DEEPSPARSE_CONFIGS:
                                continue
                            try:
                                onnx = deps[label] / "model.onnx" if prec == "fp32" else _ort_static_qdq(deps[label], batch, args.seq)
                                targets[(f"DeepSparse {prec.upper()}", label)] = deepsparse.runner(onnx, feeds, args.threads, inputs)
                            except Exception as e:  # an unsupported graph: note it, keep going
                                notes.append(f"DeepSparse {prec} {model_name} {label}: {e}")
                big = batch >= 8 or model_name == "bert-base"
                time_s = args.time if args.time is not None else (60.0 if big else 20.0)
                min_rounds = args.min_rounds if args.min_rounds is not None else (3 if batch >= 8 else 10)
                print(f"[{model_name} b{batch}] {len(targets)} targets, >= {min_rounds} rounds / {time_s:.0f} s "
                      f"({(time.time() - t_start) / 60:.1f} min elapsed) ...", flush=True)
                times = _measure(targets, time_s, min_rounds)
                med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                ref = med[("ORT FP32", "0%")]
                engines = list(dict.fromkeys(k[0] for k in med))
                head = f"| {model_name} b{batch} (ms, x ORT FP32 dense) | " + " | ".join(labels) + " |"
                lines = [head, "|" + "---|" * (len(labels) + 1)]
                for eng in engines:
                    lines.append(f"| {eng} | " + " | ".join(_cell(med.get((eng, lb)), ref) for lb in labels) + " |")
                for name, vals in rows.items():
                    lines.append(f"| {name} | " + " | ".join(f"{vals[lb]:.1e}" if lb in vals else "-" for lb in labels) + " |")
                rounds = len(times[("ORT FP32", "0%")])
                lines.append(f"\n{rounds} rounds; median latency per call (seq {args.seq}, {args.threads} threads).")
                table = "\n".join(lines)
                print(table, flush=True)
                sections.append(table)
            if not args.workdir:
                for d in deps.values():
                    shutil.rmtree(d, ignore_errors=True)
    finally:
        if deepsparse:
            deepsparse.close()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    minutes = (time.time() - t_start) / 60
    cmd = "python benchmarks/engine.py " + " ".join(sys.argv[1:])
    body = "\n".join([
        f"Command: `{cmd.strip()}` ({minutes:.1f} min, {time.strftime('%Y-%m-%d')}, commit "
        f"{subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()}).",
        f"Machine: {_machine()}.",
        "ORT = ONNX Runtime (its kernels, like ours, use AVX-512/VNNI when the CPU has them), ratios = "
        "median(ORT FP32 on the dense export) / median(this); ours = `sparsebert.engine.compile` "
        "(`--engine sparsebert` / `sparsebert-int8`).",
        "", *[s + "\n" for s in sections], *(["Notes: " + "; ".join(notes)] if notes else []),
    ])
    if args.write:
        from _report import write_section

        write_section(ROOT / "BENCHMARKS.md", "engine", "Sparse CPU engine vs ONNX Runtime (and DeepSparse)", body)
        print("written to BENCHMARKS.md (section engine)")
    else:
        print(f"\n(not written; {minutes:.1f} min)")


if __name__ == "__main__":
    main()
