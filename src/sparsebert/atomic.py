"""Atomic file and folder writes: a kill mid-write never leaves a truncated file in place of a good one.

Every artifact a command writes (metrics, predictions, manifests, recipes, JSON reports, whole model or
deployment folders) goes through these helpers: the content is written next to its target under a
temporary name and moved in with ``os.replace``, which POSIX and Windows make atomic within one file
system. A process killed mid-write leaves the old file (or nothing) plus a stray ``*.tmp``, never half
a file. There is no ``fsync``: this protects against a killed process, not against power loss.
:func:`path_overlap` is the one check every command runs so that an output folder never wipes an input.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["write_text_atomic", "write_json_atomic", "replace_dir", "remove_path", "path_overlap"]


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through ``path.tmp`` + ``os.replace``; returns the path.

    Raises:
        OSError: the folder does not exist or is not writable.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON (trailing newline) atomically; returns the path.

    Raises:
        TypeError: ``data`` is not JSON-serialisable (nothing is written then).
        OSError: the folder does not exist or is not writable.
    """
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Move the finished folder ``src`` to ``dst``, replacing an existing ``dst`` only at the end.

    ``src`` must be a sibling of ``dst`` (same file system). An existing ``dst`` is first renamed to
    ``dst.old`` and deleted only after ``src`` is in place, so at every instant either the old or
    the new folder exists under a known name. ``dst`` (or a stale ``dst.old``) may also be a file,
    which is replaced the same way. Returns ``dst``.

    Raises:
        FileNotFoundError: ``src`` does not exist.
        OSError: a rename fails (e.g. ``src`` on another file system).
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder to move into {dst}")
    old = dst.with_name(dst.name + ".old")
    remove_path(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    remove_path(old)
    return dst


def path_overlap(out: str | os.PathLike, src: str | os.PathLike) -> str | None:
    """How the output path ``out`` relates to the existing input path ``src``: ``"is"``, ``"contains"``
    (``src`` lies inside ``out``), ``"is inside"`` (``out`` lies inside ``src``), or ``None`` (disjoint).
    Both are resolved (symlinks, ``..``) first."""
    o, s = Path(out).resolve(), Path(src).resolve()
    return "is" if o == s else "contains" if o in s.parents else "is inside" if s in o.parents else None


def remove_path(path: str | os.PathLike) -> None:
    """Delete a file, symlink or folder tree if it exists (a stale ``.tmp`` / ``.old`` may be any)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
