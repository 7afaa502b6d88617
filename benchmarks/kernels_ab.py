"""Single-layer A/B of the sparse kernels: this CPU's hot loops vs the AVX2 loops, or vs another revision.

Each (M, K, N, pattern) SparseLinear / SparseLinearInt8 (2 threads, weights pruned at random: speed does not
depend on the values) is timed

* default: in this process (the best ISA of the CPU) and in a child started with ``SPARSEBERT_NO_AVX512=1``
  (AVX2 loops);
* ``--against REV``: with this checkout's kernels and with the kernel sources of git revision REV, both
  built and loaded in this one process and timed in alternation (5 rounds, best of each), so machine noise
  hits both alike.

    python benchmarks/kernels_ab.py                    # prints a markdown table
    python benchmarks/kernels_ab.py --against HEAD~1
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

SHAPES = [(128, 384, 1536), (128, 1536, 384), (4096, 768, 3072), (4096, 3072, 768)]
CASES = [("fp32", 0.9, "unstructured"), ("fp32", 0.8, "block4"), ("int8", 0.9, "unstructured"), ("int8", 0.8, "block4")]


def _times(lin, x, seconds: float, at_least: int) -> list[float]:
    """Sorted wall times (s) of ``lin(x)`` calls over ``seconds`` (at least ``at_least`` calls), after a warm-up call."""
    lin(x)
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < at_least:
        t = time.perf_counter()
        lin(x)
        times.append(time.perf_counter() - t)
    return sorted(times)


def measure() -> dict:
    """Median latency (ms) of every (shape, case) with the kernels this process dispatches to."""
    from sparsebert.engine import kernel_isa

    out = {"isa": kernel_isa(), "ms": {}}
    for label, lin, x in _layers():
        times = _times(lin, x, 1.0, 5)
        out["ms"][label] = 1e3 * times[len(times) // 2]
    return out


def _layers():
    """(label, layer, input) for every shape x case."""
    import torch

    from sparsebert.engine import SparseLinear
    from sparsebert.engine.quantized_linear import SparseLinearInt8

    torch.manual_seed(0)
    for m, k, n in SHAPES:
        for precision, sp, pattern in CASES:
            w = torch.randn(n, k)
            keep = (torch.rand(n, k // 4) >= sp).repeat_interleave(4, 1) if pattern == "block4" else torch.rand(n, k) >= sp
            cls = SparseLinear if precision == "fp32" else SparseLinearInt8
            lin = cls.from_dense(w * keep, torch.randn(n), pattern=pattern if precision == "fp32" else "auto", num_threads=2)
            yield f"{m}x{k}x{n} {precision} {pattern} {sp:.0%}", lin, torch.randn(m, k)


def against(rev: str) -> None:
    """Print old (REV) vs new (this checkout) kernel latencies, measured in alternation in one process."""
    import tempfile
    from pathlib import Path

    from torch.utils.cpp_extension import load

    import sparsebert.engine.kernels as kernels

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout

    # Every kernel source and header of REV (sparse_kernels.cpp includes headers; it also calls the other units).
    build = Path(tempfile.mkdtemp(prefix="sparsebert_ab_"))
    folder = "src/sparsebert/engine/kernels/"
    for path in git("ls-tree", "--name-only", rev, folder).split():
        if path.endswith((".cpp", ".h")):
            (build / Path(path).name).write_text(git("show", f"{rev}:{path}"))
    new = kernels.load()
    old = load(name="sparsebert_kernels_ab_old", sources=sorted(str(f) for f in build.glob("*.cpp")),
               extra_cflags=kernels._CFLAGS, extra_ldflags=kernels._LDFLAGS, build_directory=str(build))

    print(f"| layer (M x K x N) | {rev} (ms) | this checkout (ms) | speedup |\n|---|---|---|---|")
    for label, lin, x in _layers():
        res = {"old": [], "new": []}
        for _ in range(5):
            for name, mod in (("old", old), ("new", new)):
                kernels._module = mod  # the loader's cached module: what SparseLinear calls
                res[name].append(_times(lin, x, 0.25, 3)[0])
        kernels._module = new
        o, n = min(res["old"]), min(res["new"])
        print(f"| {label} | {1e3 * o:.3f} | {1e3 * n:.3f} | {o / n:.2f}x |", flush=True)


if __name__ == "__main__":
    if "--against" in sys.argv:
        against(sys.argv[sys.argv.index("--against") + 1])
        sys.exit(0)
    if "--child" in sys.argv:
        print(json.dumps(measure()))
        sys.exit(0)
    best = measure()
    env = dict(os.environ, SPARSEBERT_NO_AVX512="1")
    avx2 = json.loads(subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True,
                                     check=True).stdout.strip().splitlines()[-1])
    print(f"| layer (M x K x N) | {avx2['isa']} (ms) | {best['isa']} (ms) | speedup |\n|---|---|---|---|")
    for key, ms in best["ms"].items():
        print(f"| {key} | {avx2['ms'][key]:.3f} | {ms:.3f} | {avx2['ms'][key] / ms:.2f}x |")
