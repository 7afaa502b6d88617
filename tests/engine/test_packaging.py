"""A wheel (non-editable install) must carry the C++ kernel sources and headers: they are compiled at first use."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

from sparsebert.engine.kernels import HEADERS, SOURCES

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_sources_are_package_data():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = data["sparsebert.engine.kernels"]
    for src in SOURCES + HEADERS:
        assert src.is_file()
        assert any(fnmatch.fnmatch(src.name, p) for p in patterns), f"{src.name} would be missing from a wheel"
