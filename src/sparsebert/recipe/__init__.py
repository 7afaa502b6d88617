"""Recipes: SparseML-format YAML -> modifier objects."""

from .errors import RecipeError
from .loader import Recipe, load_recipe

__all__ = ["Recipe", "RecipeError", "load_recipe"]
