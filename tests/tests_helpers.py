"""Importable helpers for tests (conftest fixtures cannot be imported by name)."""

from transformers import BertConfig


def tiny_config(**kw) -> BertConfig:
    """A 2-layer BERT with hidden 32 (divisible by 4 for block4), FFN 64."""
    base = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, num_labels=2)
    base.update(kw)
    return BertConfig(**base)
