"""sparsebert: recipe-driven sparsification of BERT-family models, and fast sparse inference.

One-call verbs::

    from sparsebert import load_recipe, RecipeSession, SparseTrainer
"""

from .integrations import RecipeCallback, SparseTrainer
from .recipe import Recipe, RecipeError, load_recipe
from .session import RecipeSession

__all__ = ["Recipe", "RecipeError", "load_recipe", "RecipeSession", "SparseTrainer", "RecipeCallback"]
__version__ = "0.1.0"
