"""Just-in-time build and loading of the C++ sparse kernels.

The extension is compiled once per (sources, torch version, python version) with
``torch.utils.cpp_extension.load`` into ``$SPARSEBERT_KERNEL_CACHE`` (default
``~/.cache/sparsebert/kernels/<hash>``). It is built with portable flags (``-O3``, no
``-march=native``): the AVX2/FMA code paths carry their own ``target`` attribute and are
selected at run time from cpuid, so a cached build can be shared between machines.

``load()`` never raises: it returns the module, or ``None`` after warning once when the
build fails (no compiler, no OpenMP, ...). Set ``SPARSEBERT_DISABLE_KERNELS=1`` to force
the pure-torch fallback.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

__all__ = ["load", "build_error", "SOURCES"]

_HERE = Path(__file__).resolve().parent
SOURCES = [_HERE / "sparse_kernels.cpp", _HERE / "attention.cpp", _HERE / "layernorm.cpp"]
HEADERS = [_HERE / "simd_math.h"]  # part of the build key: a header change rebuilds
_CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno"]
_LDFLAGS = ["-fopenmp"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_module: ModuleType | None = None
_tried = False
_error: str | None = None


def _cache_dir(key: str) -> Path:
    root = os.environ.get("SPARSEBERT_KERNEL_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "sparsebert" / "kernels"
    return base / key


def _build_key() -> str:
    import torch

    h = hashlib.sha256()
    for src in SOURCES + HEADERS:
        h.update(src.read_bytes())
    h.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.split()[0].encode())
    return h.hexdigest()[:16]


def load(verbose: bool = False) -> ModuleType | None:
    """Return the compiled kernel module, building it on first use; ``None`` if unavailable.

    A build (minutes; none when the cache already holds this key's library) is logged at INFO
    with the cache folder and the seconds it took.
    """
    global _module, _tried, _error
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        if os.environ.get("SPARSEBERT_DISABLE_KERNELS", "") not in ("", "0"):
            _error = "disabled by SPARSEBERT_DISABLE_KERNELS"
        else:
            try:
                from torch.utils.cpp_extension import LIB_EXT, load as _jit_load

                key = _build_key()
                name = f"sparsebert_kernels_{key}"
                build_dir = _cache_dir(key)
                build_dir.mkdir(parents=True, exist_ok=True)
                # the key hashes the sources and flags, so an existing library is up to date: no compile
                building = not (build_dir / f"{name}{LIB_EXT}").is_file()
                if building:
                    logger.info("building the sparse CPU kernels (first use; cached in %s); this takes a few minutes", build_dir)
                start = time.perf_counter()
                _module = _jit_load(
                    name=name,
                    sources=[str(s) for s in SOURCES],
                    extra_cflags=_CFLAGS,
                    extra_ldflags=_LDFLAGS,
                    build_directory=str(build_dir),
                    verbose=verbose,
                )
                if building:
                    logger.info("built the sparse CPU kernels in %.0f s", time.perf_counter() - start)
            except Exception as exc:  # compiler missing, build error, ...
                _module = None
                _error = f"{type(exc).__name__}: {exc}"
        if _module is None:
            warnings.warn(
                f"sparsebert sparse kernels unavailable ({_error}); "
                "SparseLinear falls back to slow pure-torch code.",
                RuntimeWarning,
                stacklevel=2,
            )
        _tried = True
        return _module


def build_error() -> str | None:
    """Why ``load()`` returned ``None`` (``None`` when the kernels loaded or were not tried)."""
    return _error
