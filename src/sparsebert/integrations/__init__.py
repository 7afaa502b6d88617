"""Integrations with training frameworks (Hugging Face Trainer)."""

from .hf_trainer import JsonlLoggerCallback, RecipeCallback, RecipeTrainerMixin, SparseTrainer, StopOnSignalCallback

__all__ = ["RecipeCallback", "RecipeTrainerMixin", "SparseTrainer", "JsonlLoggerCallback", "StopOnSignalCallback"]
