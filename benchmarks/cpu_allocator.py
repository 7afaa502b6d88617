"""CPU training under glibc malloc, jemalloc and tcmalloc: step time, system time, page faults.

A CPU training step allocates and frees activation and gradient buffers of tens of MB. glibc's
malloc serves blocks above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and gives them
back with ``munmap`` on free, so every step faults the same memory in again, page by page; the
kernel time that costs shows up as system time. PyTorch's CPU performance tuning guide
(https://docs.pytorch.org/tutorials/recipes/recipes/tuning_guide.html, "Switch Memory allocator")
recommends preloading jemalloc or tcmalloc instead. This runs the same short ``sparsebert train``
job -- SQuAD GMP 80% block4 + KD (``recipes/squad/gmp80-block4-kd.yaml``), per-batch padding,
length-grouped batches, the windows of ``32 * steps`` seeded training questions, one epoch -- once
per allocator setting, ``rounds`` times in turn (so drift in the machine hits every setting), and
reports per setting the training-loop time (the Trainer's ``train_runtime``) and, for the whole
process (from ``os.wait4``), user and system CPU time, minor page faults and peak RSS.

Settings (a preloaded library that is not installed is skipped and said so):

- ``glibc``: the default.
- ``jemalloc``: ``LD_PRELOAD`` libjemalloc.so.2, its default ``MALLOC_CONF``.
- ``jemalloc-tuned``: the same with the ``MALLOC_CONF`` of PyTorch's guide
  (``oversize_threshold:1,background_thread:true,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1``:
  freed pages are kept for reuse, never given back).
- ``tcmalloc``: ``LD_PRELOAD`` libtcmalloc_minimal.so.4 (Debian ``libtcmalloc-minimal4``).

    python benchmarks/cpu_allocator.py --steps 8 --rounds 2 --model runs/squad-dense-dyn
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from _report import ROOT, write_section

from sparsebert.allocator import JEMALLOC_CONF as JEMALLOC_TUNED
from sparsebert.allocator import JEMALLOC_LIBS, TCMALLOC_LIBS, find_library

def settings() -> tuple[dict[str, dict[str, str]], list[str]]:
    """Allocator name -> extra environment, and the names skipped because their library is missing."""
    out, skipped = {"glibc": {}}, []
    jemalloc, tcmalloc = find_library(JEMALLOC_LIBS), find_library(TCMALLOC_LIBS)
    if jemalloc:
        out["jemalloc"] = {"LD_PRELOAD": jemalloc}
        out["jemalloc-tuned"] = {"LD_PRELOAD": jemalloc, "MALLOC_CONF": JEMALLOC_TUNED}
    else:
        skipped += ["jemalloc", "jemalloc-tuned"]
    if tcmalloc:
        out["tcmalloc"] = {"LD_PRELOAD": tcmalloc}
    else:
        skipped.append("tcmalloc")
    return out, skipped


def run_once(cmd: list[str], env_extra: dict[str, str], log: Path) -> dict[str, float]:
    """Run ``cmd`` with ``env_extra`` added to the environment; the process's resource usage.

    Raises:
        subprocess.CalledProcessError: the command failed (its output is in ``log``).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")} | env_extra
    print("$", " ".join(f"{k}={shlex.quote(v)}" for k, v in env_extra.items()), shlex.join(cmd), flush=True)
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # per-process rusage (getrusage(CHILDREN) would sum all runs)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return {"user": usage.ru_utime, "sys": usage.ru_stime, "minflt": usage.ru_minflt, "maxrss_gib": usage.ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="train on the windows of 32 * steps questions, one epoch")
    ap.add_argument("--rounds", type=int, default=2, help="runs per allocator, taken in turn")
    ap.add_argument("--model", default="runs/squad-dense-dyn", help="dense QA model: student start and teacher")
    ap.add_argument("--output", default="BENCHMARKS.md")
    args = ap.parse_args()
    logs = ROOT / "runs" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    envs, skipped = settings()
    out = ROOT / "runs" / "cpu_allocator"
    cmd = ["sparsebert", "train", "--task", "squad", "--seed", "42", "--model", args.model, "--teacher", args.model,
           "--split-by-article", "36:12", "--recipe", "recipes/squad/gmp80-block4-kd.yaml",
           "--recipe-args", json.dumps({"num_epochs": 1.0, "init_lr": 4e-4}), "--no-pad-to-max-length",
           "--group-by-length", "--max-train-samples", str(32 * args.steps), "--max-eval-samples", "32",
           "--logging-steps", "1", "--output-dir", str(out.relative_to(ROOT)), "--overwrite"]
    results: dict[str, list[dict[str, float]]] = {name: [] for name in envs}
    for r in range(args.rounds):
        for name, extra in envs.items():
            usage = run_once(cmd, extra, logs / f"cpu_allocator-{name}-{r}.log")
            log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
            usage["train"] = next(x["train_runtime"] for x in log if "train_runtime" in x)
            usage["steps"] = max(x["step"] for x in log)
            results[name].append(usage)
            print(name, r, usage, flush=True)

    def mean(name: str, key: str) -> float:
        return sum(u[key] for u in results[name]) / len(results[name])

    base = mean("glibc", "train")
    rows = [f"| {name} | {mean(name, 'train'):.1f} s ({', '.join(format(u['train'], '.0f') for u in results[name])}) | "
            f"{base / mean(name, 'train'):.2f}x | {mean(name, 'user'):.0f} s | {mean(name, 'sys'):.0f} s "
            f"({100 * mean(name, 'sys') / (mean(name, 'user') + mean(name, 'sys')):.0f}%) | "
            f"{mean(name, 'minflt') / 1e6:.1f} M | {mean(name, 'maxrss_gib'):.2f} GiB |" for name in envs]
    steps = int(results["glibc"][0]["steps"])
    lines = [
        f"SQuAD GMP 80% block4 + KD (hardness 1.0, T 5.5), `{args.model}` as student start and teacher, one epoch of "
        f"{steps} steps (the windows of {32 * args.steps} seeded training questions from the 36:12 article split; "
        "**training used dev articles**), batch 32, per-batch padding, length-grouped batches; 2 CPU cores, "
        f"{args.rounds} round(s) of all settings in turn. Time: the training loop (`train_runtime`, the runs' values in "
        "brackets); CPU time, minor page faults and peak RSS: the whole process (model load, tokenisation and a "
        "32-question eval included), from `os.wait4`.",
        "",
        "| allocator | training loop | speed vs glibc | user CPU | system CPU | minor page faults | peak RSS |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"`jemalloc-tuned` is `MALLOC_CONF={JEMALLOC_TUNED}`."
        + (f" Not installed, so not run: {', '.join(skipped)}." if skipped else ""),
        "",
        "```", shlex.join(cmd), "```",
        f"Reproduce: `python benchmarks/cpu_allocator.py --steps {args.steps} --rounds {args.rounds} --model {args.model}`",
    ]
    print(write_section(ROOT / args.output, "cpu_allocator", "CPU training: glibc malloc vs jemalloc vs tcmalloc (session 17)",
                        "\n".join(lines)))


if __name__ == "__main__":
    sys.exit(main())
