"""The first use of the C++ kernels logs the build (folder, seconds); a cached build logs nothing."""

from __future__ import annotations

import logging
import types

import torch.utils.cpp_extension as cpp_extension

from sparsebert.engine import kernels


def test_build_is_logged_only_when_it_happens(tmp_path, monkeypatch, caplog):
    calls = []

    def fake_jit_load(name, build_directory, **kw):  # stands in for the minutes-long compile
        calls.append(name)
        return types.ModuleType(name)

    monkeypatch.setattr(cpp_extension, "load", fake_jit_load)
    monkeypatch.setenv("SPARSEBERT_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("SPARSEBERT_DISABLE_KERNELS", raising=False)
    for attr, value in (("_module", None), ("_tried", False), ("_error", None)):  # restored after the test
        monkeypatch.setattr(kernels, attr, value)
    key = kernels._build_key()

    caplog.set_level(logging.INFO, logger="sparsebert.engine.kernels")
    assert kernels.load() is not None and calls == [f"sparsebert_kernels_{key}"]
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == (f"building the sparse CPU kernels (first use; cached in {tmp_path / key}); "
                           "this takes a few minutes")
    assert messages[1].startswith("built the sparse CPU kernels in ") and messages[1].endswith(" s")

    # the library is in the cache: loading it is no build, so nothing is announced
    (tmp_path / key / f"sparsebert_kernels_{key}{cpp_extension.LIB_EXT}").write_bytes(b"")
    monkeypatch.setattr(kernels, "_tried", False)
    caplog.clear()
    assert kernels.load() is not None and len(calls) == 2
    assert caplog.records == []
