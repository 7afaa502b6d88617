"""Which malloc serves this process, and a hint when CPU training runs on glibc's.

A CPU training step frees and re-allocates activation and gradient buffers of tens of MB. glibc
malloc returns blocks above its mmap threshold (at most 32 MiB) to the kernel on free, so each step
page-faults the same memory in again. On 2 cores that made a third of a SQuAD KD job's CPU time
system time; preloading tcmalloc, or jemalloc with PyTorch's ``MALLOC_CONF``, ran its training loop
1.5x faster (BENCHMARKS.md, "CPU training: glibc malloc vs jemalloc vs tcmalloc";
``benchmarks/cpu_allocator.py``). jemalloc's default settings were slower than glibc there (they
also give freed pages back). The advice is PyTorch's CPU tuning guide's ("Switch Memory
allocator"). The library has to be preloaded before Python starts, so this module can only say how.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["JEMALLOC_CONF", "JEMALLOC_LIBS", "TCMALLOC_LIBS", "allocator_hint", "find_library", "loaded_allocator"]

#: PyTorch's tuning guide's jemalloc settings: keep freed pages for reuse (never decay them back to the OS).
JEMALLOC_CONF = "oversize_threshold:1,background_thread:true,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
TCMALLOC_LIBS, JEMALLOC_LIBS = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"), ("libjemalloc.so.2",)


def loaded_allocator(maps: str | None = None) -> str:
    """Name of the malloc mapped into this process: ``"tcmalloc"``, ``"jemalloc"`` or ``"glibc"``.

    Args:
        maps: text of ``/proc/self/maps`` (read when None; on a system without it the answer is ``"glibc"``).
    """
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return "glibc"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc"


def find_library(names: tuple[str, ...], lib_dirs: tuple[str, ...] = _LIB_DIRS) -> str | None:
    """Path of the first of ``names`` (shared-library file names) found in ``lib_dirs``, or None."""
    for d in lib_dirs:
        for n in names:
            if (Path(d) / n).exists():
                return str(Path(d) / n)
    return None


def allocator_hint(maps: str | None = None, environ: dict[str, str] | None = None,
                   lib_dirs: tuple[str, ...] = _LIB_DIRS) -> str | None:
    """A one-paragraph hint for CPU training, or None when tcmalloc or tuned jemalloc already serves malloc.

    Args:
        maps: text of ``/proc/self/maps`` (None: this process's).
        environ: the environment (None: ``os.environ``); only ``MALLOC_CONF`` is read.
        lib_dirs: folders searched for an installed tcmalloc / jemalloc to name in the hint.

    Returns:
        The hint with a ready ``LD_PRELOAD=...`` prefix (tcmalloc first, then jemalloc with
        :data:`JEMALLOC_CONF`), or the Debian package to install when neither is found.
    """
    environ = os.environ if environ is None else environ
    which = loaded_allocator(maps)
    if which == "tcmalloc":
        return None
    if which == "jemalloc":
        if "dirty_decay_ms" in environ.get("MALLOC_CONF", ""):
            return None
        return (f"jemalloc with its default MALLOC_CONF gives freed pages back to the OS and ran CPU training slower than glibc; "
                f"set MALLOC_CONF={JEMALLOC_CONF} (PyTorch's CPU tuning guide; 1.5x faster than glibc in BENCHMARKS.md)")
    why = ("CPU training under glibc malloc: the kernel pages freed activations in again every step; preloading "
           "tcmalloc or tuned jemalloc ran the training loop 1.5x faster on 2 cores (BENCHMARKS.md, "
           "'CPU training: glibc malloc vs jemalloc vs tcmalloc'). ")
    tcmalloc, jemalloc = find_library(TCMALLOC_LIBS, lib_dirs), find_library(JEMALLOC_LIBS, lib_dirs)
    if tcmalloc:
        return why + f"Run: LD_PRELOAD={tcmalloc} sparsebert train ..."
    if jemalloc:
        return why + f"Run: LD_PRELOAD={jemalloc} MALLOC_CONF={JEMALLOC_CONF} sparsebert train ..."
    return why + "Install one (Debian/Ubuntu: apt install libtcmalloc-minimal4) and preload it with LD_PRELOAD."
