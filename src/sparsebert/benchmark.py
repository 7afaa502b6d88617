"""Latency/throughput of deployment folders on CPU engines (like ``deepsparse.benchmark``).

Several targets (deployment folder x engine) are measured *interleaved* in one process: every round
gives each target a turn (order rotated), so machine noise hits all of them alike, and ratios to the
first target are reported. Times are wall clock (``time.perf_counter``) per engine call.

A turn is a block of calls (about ``SLICE_S`` seconds, at least one call) after a ``SETTLE_S`` pause,
not a single call: engines keep their worker threads spin-waiting for a while after a call (ONNX
Runtime's intra-op pool by default, OpenMP's), and a call made right after another engine's call
shares the cores with those spinning threads. Measured in session 19 on the 2-core machine: the
sparsebert engine ran a model at 21.5 ms alone but 38 ms when each of its calls followed an ONNX
Runtime call (ONNX Runtime: 16 ms alone and 16.5 ms interleaved).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .deployment import ENGINES, DeploymentError, create_engine, load_manifest, random_inputs, register_engine

SETTLE_S = 0.05  # pause before each turn: the previous engine's idle threads stop spinning
SLICE_S = 0.25  # seconds of calls in one turn (at least one call)

__all__ = ["Target", "run_benchmark", "parse_targets", "ENGINES", "register_engine"]


@dataclasses.dataclass(frozen=True)
class Target:
    """One thing to measure: a deployment folder run by an engine of :data:`ENGINES`."""

    deployment_dir: Path
    engine: str

    @property
    def label(self) -> str:
        """``<folder name>:<engine>``."""
        return f"{self.deployment_dir.name}:{self.engine}"


def parse_targets(deployment_dir: str | Path, engine: str, compare: list[str] | None) -> list[Target]:
    """The first target is ``(deployment_dir, engine)``; each ``compare`` item is a deployment
    folder (run with ``engine``), an engine name (run on ``deployment_dir``) or ``FOLDER:ENGINE``
    (that folder with that engine, e.g. a sparse export on our engine against a dense one on ORT).

    Raises:
        DeploymentError: an item is none of these (names the item and the known engines).
    """
    targets = [Target(Path(deployment_dir), engine)]
    for item in compare or []:
        folder, _, item_engine = item.rpartition(":")
        if Path(item).is_dir():
            targets.append(Target(Path(item), engine))
        elif item in ENGINES:
            targets.append(Target(Path(deployment_dir), item))
        elif folder and Path(folder).is_dir() and item_engine in ENGINES:
            targets.append(Target(Path(folder), item_engine))
        else:
            raise DeploymentError(f"--compare {item!r}: not a deployment folder, an engine ({', '.join(ENGINES)}) "
                                  "nor FOLDER:ENGINE")
    return targets


def _shape(targets: list[Target], batch_size: int | None, sequence_length: int | None) -> tuple[int, int]:
    """Batch and sequence length valid for every target (static exports fix them)."""
    batch, seq = batch_size, sequence_length
    for t in targets:
        m = load_manifest(t.deployment_dir)
        for name, static, value in (("batch_size", m.get("batch_size"), batch), ("sequence_length", m.get("sequence_length"), seq)):
            if static and value is not None and value != static:
                raise DeploymentError(f"{t.deployment_dir}: exported with static {name} {static}, asked for {value}")
        batch = batch or m.get("batch_size")
        seq = seq or m.get("sequence_length")
    first = load_manifest(targets[0].deployment_dir)
    return batch or 1, seq or first["max_seq_length"]


def run_benchmark(
    deployment_dir: str | Path,
    engine: str = "onnxruntime",
    compare: list[str] | None = None,
    batch_size: int | None = None,
    sequence_length: int | None = None,
    num_threads: int | None = None,
    warmup: int = 3,
    time_s: float | None = None,
    iterations: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure ``deployment_dir`` with ``engine`` and every ``compare`` target, interleaved.

    Progress bars (warm-up, then measuring) go to stderr, never stdout (``--json`` prints there).

    Args:
        batch_size / sequence_length: input shape (default: the export's static shape, else batch 1
            and the manifest's ``max_seq_length``).
        num_threads: intra-op threads per engine (``None``: the engine's default).
        warmup: untimed calls per target before measuring.
        time_s: measure until this many seconds (all targets together, pauses included) have passed; or
        iterations: timed calls per target (default when neither is given: 10 s).

    Returns:
        ``{"config": {...}, "results": [row, ...]}``; each row has ``target``, ``deployment_dir``,
        ``engine``, ``precision``, ``iterations``, ``latency_ms`` (``mean``, ``p50``, ``p90``,
        ``p99``), ``items_per_second`` (batch / mean latency) and ``speedup_vs_first`` (p50 of the
        first target / p50 of this one; > 1 = faster).

    Raises:
        DeploymentError: missing manifest, unknown engine/target, incompatible static shapes,
            ``warmup < 0``, ``time_s <= 0`` or ``iterations < 1``.
    """
    if warmup < 0:
        raise DeploymentError(f"--warmup {warmup}: must be >= 0")
    if time_s is not None and not time_s > 0:
        raise DeploymentError(f"--time {time_s}: must be > 0 seconds")
    if iterations is not None and iterations < 1:
        raise DeploymentError(f"--iterations {iterations}: must be >= 1")
    targets = parse_targets(deployment_dir, engine, compare)
    batch, seq = _shape(targets, batch_size, sequence_length)
    runners = [(create_engine(t.engine, t.deployment_dir, num_threads), random_inputs(t.deployment_dir, batch, seq, seed)) for t in targets]
    last = [0.0] * len(runners)  # latest call time per target: sizes its next block of calls
    with tqdm(total=warmup * len(runners), desc="benchmark warm-up", unit="call", leave=False, file=sys.stderr) as bar:
        for i, (run, feeds) in enumerate(runners):
            for _ in range(warmup):
                t0 = time.perf_counter()
                run(feeds)
                last[i] = time.perf_counter() - t0
                bar.update(1)
    if time_s is None and iterations is None:
        time_s = 10.0
    times: list[list[float]] = [[] for _ in targets]
    # the bar counts timed calls of all targets when --iterations is given, else seconds of --time
    if iterations is not None:
        bar = tqdm(total=iterations * len(targets), desc="benchmark", unit="call", leave=False, file=sys.stderr)
    else:
        bar = tqdm(total=time_s, desc="benchmark", unit="s", leave=False, file=sys.stderr,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s")
    start, rnd = time.perf_counter(), 0
    with bar:
        while True:
            if iterations is not None and all(len(ts) >= iterations for ts in times):
                break
            if time_s is not None and rnd > 0 and time.perf_counter() - start >= time_s:
                break
            order = list(range(len(targets)))
            order = order[rnd % len(order):] + order[:rnd % len(order)]  # rotate who goes first
            for i in order:
                run, feeds = runners[i]
                block = max(1, int(SLICE_S / last[i])) if last[i] > 0 else 1
                if iterations is not None:
                    block = min(block, iterations - len(times[i]))
                if block <= 0:
                    continue
                time.sleep(SETTLE_S)
                for _ in range(block):
                    t0 = time.perf_counter()
                    run(feeds)
                    last[i] = time.perf_counter() - t0
                    times[i].append(last[i])
                bar.update(block if iterations is not None else min(time.perf_counter() - start, time_s) - bar.n)
            rnd += 1
    rows = []
    for t, ts in zip(targets, times):
        ms = np.asarray(ts) * 1e3
        manifest = load_manifest(t.deployment_dir)
        rows.append({
            "target": t.label, "deployment_dir": str(t.deployment_dir), "engine": t.engine, "precision": manifest.get("precision"),
            "iterations": len(ts),
            "latency_ms": {"mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)), "p99": float(np.percentile(ms, 99))},
            "items_per_second": batch * 1e3 / float(ms.mean()),
        })
    for row in rows:
        row["speedup_vs_first"] = rows[0]["latency_ms"]["p50"] / row["latency_ms"]["p50"]
    config = {"batch_size": batch, "sequence_length": seq, "num_threads": num_threads, "warmup": warmup, "time_s": time_s, "iterations": iterations, "interleaved": True,
              "turn": {"settle_s": SETTLE_S, "slice_s": SLICE_S}}
    return {"config": config, "results": rows}
