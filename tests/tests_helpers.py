"""Importable helpers for tests (conftest fixtures cannot be imported by name)."""

from transformers import BertConfig


def tiny_config(**kw) -> BertConfig:
    """A 2-layer BERT with hidden 32 (divisible by 4 for block4), FFN 64."""
    base = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, num_labels=2)
    base.update(kw)
    return BertConfig(**base)


def zero_structures(model, heads: dict | None = None, neurons: dict | None = None) -> None:
    """Zero, as structured pruning leaves them, heads ``heads[layer]`` (Q/K/V rows + biases, output columns)
    and FFN neurons ``neurons[layer]`` (intermediate row + bias, output column) of a BERT model, in place."""
    import torch

    base = getattr(model, model.base_model_prefix, model)
    with torch.no_grad():
        for i, layer in enumerate(base.encoder.layer):
            d = layer.attention.self.attention_head_size
            for h in (heads or {}).get(i, []):
                s = slice(h * d, (h + 1) * d)
                for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
                    lin.weight[s] = 0
                    lin.bias[s] = 0
                layer.attention.output.dense.weight[:, s] = 0
            for j in (neurons or {}).get(i, []):
                layer.intermediate.dense.weight[j] = 0
                layer.intermediate.dense.bias[j] = 0
                layer.output.dense.weight[:, j] = 0


def save_tiny_model(path, head: str = "cls", prune: float = 0.0, seed: int = 0, dead_heads: dict | None = None,
                    dead_neurons: dict | None = None, **config):
    """Save a tiny random BERT (``head``: ``"cls"``, ``"qa"`` or ``"mlm"``) + the packaged MiniLM tokenizer to ``path``.

    ``prune``: zero that fraction of every encoder Linear weight (smallest magnitudes).
    ``dead_heads`` / ``dead_neurons``: layer -> indices zeroed as structured pruning does (:func:`zero_structures`).
    Returns ``path``.
    """
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification

    from sparsebert.models import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(seed)
    cls = {"qa": BertForQuestionAnswering, "mlm": BertForMaskedLM}.get(head, BertForSequenceClassification)
    kw = dict(vocab_size=tok.vocab_size, max_position_embeddings=128, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    kw.update(config)
    model = cls(tiny_config(**kw))
    if prune:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".encoder." in name and name.endswith("weight") and p.dim() == 2:
                    k = int(prune * p.numel())
                    p.view(-1)[p.abs().flatten().argsort()[:k]] = 0.0
    zero_structures(model, dead_heads, dead_neurons)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
