"""The malloc hint of ``sparsebert train`` on a CPU (src/sparsebert/allocator.py)."""

from __future__ import annotations

from sparsebert.allocator import JEMALLOC_CONF, allocator_hint, loaded_allocator

GLIBC_MAPS = "7f00-7f10 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
TCMALLOC_MAPS = GLIBC_MAPS + "7f20-7f30 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n"
JEMALLOC_MAPS = GLIBC_MAPS + "7f20-7f30 r-xp 00000000 08:01 3 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"


def test_loaded_allocator_reads_the_process_maps():
    assert loaded_allocator(GLIBC_MAPS) == "glibc"
    assert loaded_allocator(TCMALLOC_MAPS) == "tcmalloc"
    assert loaded_allocator(JEMALLOC_MAPS) == "jemalloc"
    assert loaded_allocator() in ("glibc", "tcmalloc", "jemalloc")  # this process


def test_no_hint_under_tcmalloc_or_tuned_jemalloc():
    assert allocator_hint(TCMALLOC_MAPS, environ={}) is None
    assert allocator_hint(JEMALLOC_MAPS, environ={"MALLOC_CONF": JEMALLOC_CONF}) is None


def test_default_jemalloc_gets_the_tuned_conf():
    hint = allocator_hint(JEMALLOC_MAPS, environ={})
    assert hint is not None and f"MALLOC_CONF={JEMALLOC_CONF}" in hint


def test_glibc_hint_names_the_installed_library(tmp_path):
    none = tmp_path / "none"
    none.mkdir()
    assert "apt install libtcmalloc-minimal4" in allocator_hint(GLIBC_MAPS, environ={}, lib_dirs=(str(none),))
    (tmp_path / "libjemalloc.so.2").touch()
    hint = allocator_hint(GLIBC_MAPS, environ={}, lib_dirs=(str(tmp_path),))
    assert f"LD_PRELOAD={tmp_path / 'libjemalloc.so.2'} MALLOC_CONF={JEMALLOC_CONF}" in hint
    (tmp_path / "libtcmalloc_minimal.so.4").touch()  # tcmalloc first: no MALLOC_CONF to get right
    hint = allocator_hint(GLIBC_MAPS, environ={}, lib_dirs=(str(tmp_path),))
    assert f"LD_PRELOAD={tmp_path / 'libtcmalloc_minimal.so.4'} sparsebert train" in hint
