"""``python -m sparsebert`` (also what ``torchrun -m sparsebert`` runs)."""

from .cli import app

app()
