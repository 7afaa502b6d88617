import math

import pytest
import torch

from sparsebert import RecipeSession
from sparsebert.modifiers import kd_loss


def test_kd_loss_hand_computed():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 2.0]])
    T = 2.0
    ps = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    pt = [1 / (1 + math.e), math.e / (1 + math.e)]
    kl = sum(q * math.log(q / p) for p, q in zip(ps, pt))
    assert kd_loss(s, t, T).item() == pytest.approx(kl * T * T, rel=1e-5)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-6)
    # rows are averaged (batchmean), QA-shaped logits [B, L] too
    two = kd_loss(torch.cat([s, t]), torch.cat([t, t]), T)
    assert two.item() == pytest.approx(kl * T * T / 2, rel=1e-5)
    # regression (STS-B): MSE
    assert kd_loss(torch.tensor([[1.0]]), torch.tensor([[3.0]]), T).item() == pytest.approx(4.0)


def test_distillation_modifier_combines_losses(tiny_model):
    torch.manual_seed(3)
    from transformers import BertForSequenceClassification

    teacher = BertForSequenceClassification(tiny_model.config)
    session = RecipeSession("modifiers:\n  - !DistillationModifier\n    hardness: 0.25\n    temperature: 3.0\n", tiny_model, teacher=teacher)
    session.start(10)
    x = {"input_ids": torch.randint(0, 120, (3, 7)), "labels": torch.tensor([0, 1, 1])}
    out = tiny_model(**x)
    with torch.no_grad():
        t_logits = teacher(input_ids=x["input_ids"]).logits
    expected = 0.75 * out.loss + 0.25 * kd_loss(out.logits, t_logits, 3.0)
    got = session.modify_loss(out.loss, out, x)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters())
