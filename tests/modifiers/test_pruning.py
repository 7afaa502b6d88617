"""Pruning modifiers on tiny models: masks kept through optimizer steps, save/load, resume."""

import pytest
import torch
from transformers import BertForSequenceClassification

from sparsebert import RecipeSession
from sparsebert.recipe import RecipeError

ENC = '["re:bert.encoder.layer.*.(query|key|value|dense).weight"]'


def gmp(final=0.8, mask="unstructured", extra=""):
    return f"""
pruning_modifiers:
  - !GMPruningModifier
    params: {ENC}
    init_sparsity: 0.0
    final_sparsity: {final}
    start_epoch: 0.0
    end_epoch: 2.0
    update_frequency: 0.5
    mask_type: {mask}
{extra}"""


def encoder_weights(model):
    return {n: p for n, p in model.named_parameters() if "encoder" in n and n.endswith("weight") and "LayerNorm" not in n}


def sparsity(model):
    ws = encoder_weights(model).values()
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def train_steps(model, session, n, spe=4, lr=1e-2, start=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    if not session._started:
        session.start(spe, optimizer=opt, step=start)
    for step in range(start + 1, start + n + 1):
        x = torch.randint(0, 120, (4, 8))
        loss = model(input_ids=x, labels=torch.randint(0, 2, (4,))).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        session.update(step)
    return opt


def test_gmp_schedule_reaches_target_and_masks_stay(tiny_model):
    session = RecipeSession(gmp(), tiny_model)
    train_steps(tiny_model, session, 2)  # epoch 0.5: cubic 0.8 * (1 - 0.75^3)
    assert sparsity(tiny_model) == pytest.approx(0.8 * (1 - 0.75**3), abs=0.01)
    train_steps(tiny_model, session, 10, start=2)  # past end_epoch 2 (steps_per_epoch 4)
    assert sparsity(tiny_model) == pytest.approx(0.8, abs=0.002)
    masks = session.masks()
    assert len(masks) == 12  # 6 Linear weights x 2 layers
    for name, w in encoder_weights(tiny_model).items():
        assert bool((w[~masks[name]] == 0).all()), name  # optimizer steps did not revive pruned weights
    per_layer = [float((w == 0).float().mean()) for w in encoder_weights(tiny_model).values()]
    assert all(abs(s - 0.8) < 0.01 for s in per_layer)


def test_block4_and_nm_patterns(tiny_model):
    from sparsebert.modifiers.masks import detect_pattern

    s = RecipeSession(gmp(0.5, "block4"), tiny_model)
    train_steps(tiny_model, s, 9)
    for w in encoder_weights(tiny_model).values():
        assert detect_pattern(w) == "block4"
    torch.manual_seed(1)
    model = BertForSequenceClassification(tiny_model.config)
    s = RecipeSession(gmp(0.5, '"2:4"'), model)
    train_steps(model, s, 9)
    for w in encoder_weights(model).values():
        assert detect_pattern(w) == "2:4"


def test_masks_survive_save_and_load(tiny_model, tmp_path):
    session = RecipeSession(gmp(0.9), tiny_model)
    train_steps(tiny_model, session, 9)
    tiny_model.save_pretrained(tmp_path / "m")
    loaded = BertForSequenceClassification.from_pretrained(tmp_path / "m")
    assert sparsity(loaded) == pytest.approx(0.9, abs=0.002)
    # pattern lock: constant pruning on the loaded model keeps exactly those zeros while training
    zeros_before = {n: (p == 0).clone() for n, p in encoder_weights(loaded).items()}
    lock = RecipeSession(f"modifiers:\n  - !ConstantPruningModifier\n    params: {ENC}\n", loaded)
    train_steps(loaded, lock, 5)
    for n, p in encoder_weights(loaded).items():
        assert torch.equal(p == 0, zeros_before[n]), n


def test_session_state_resume(tiny_model, tmp_path):
    session = RecipeSession(gmp(0.8), tiny_model)
    train_steps(tiny_model, session, 3)
    session.save(tmp_path)
    torch.manual_seed(2)
    other = BertForSequenceClassification(tiny_model.config)
    other.load_state_dict(tiny_model.state_dict())
    resumed = RecipeSession(gmp(0.8), other)
    assert resumed.load(tmp_path)
    for name, m in session.masks().items():
        assert torch.equal(resumed.masks()[name], m)
    train_steps(other, resumed, 9, start=3)
    assert sparsity(other) == pytest.approx(0.8, abs=0.002)


def test_leave_enabled_false_stops_masking(tiny_model):
    session = RecipeSession(gmp(0.5, extra="    leave_enabled: false\n"), tiny_model)
    train_steps(tiny_model, session, 8)
    assert sparsity(tiny_model) == pytest.approx(0.5, abs=0.01)
    train_steps(tiny_model, session, 4, start=8)
    assert sparsity(tiny_model) < 0.1  # weights regrow once masks are off


def test_validation_against_model(tiny_model, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(gmp().replace(ENC, '["re:bert.encoder.layer.*.attention.selfie.query.weight"]'))
    with pytest.raises(RecipeError) as e:
        RecipeSession(path, tiny_model)
    msg = str(e.value)
    assert str(path) in msg and "GMPruningModifier" in msg and "'params'" in msg and "selfie" in msg and "matches no parameter" in msg
    cfg = tiny_model.config
    cfg.intermediate_size = 66  # output.dense has in_features 66: not divisible by 4
    odd = BertForSequenceClassification(cfg)
    with pytest.raises(RecipeError, match="divisible by 4"):
        RecipeSession(gmp(0.5, "block4"), odd)
    with pytest.raises(RecipeError, match="at most 0.500"):
        RecipeSession(gmp(0.6, '"2:4"'), tiny_model)


def test_layer_pruning_and_trainable_params(tiny_model, tmp_path):
    recipe = """
modifiers:
  - !LayerPruningModifier
    layers: ['bert.encoder.layer.1']
  - !TrainableParamsModifier
    params: ['bert.embeddings.word_embeddings.weight']
    trainable: false
    params_strict: true
"""
    emb = tiny_model.bert.embeddings.word_embeddings.weight.detach().clone()
    session = RecipeSession(recipe, tiny_model)
    assert len(tiny_model.bert.encoder.layer) == 1 and tiny_model.config.num_hidden_layers == 1
    train_steps(tiny_model, session, 3)
    assert torch.equal(tiny_model.bert.embeddings.word_embeddings.weight, emb)
    tiny_model.save_pretrained(tmp_path)
    assert len(BertForSequenceClassification.from_pretrained(tmp_path).bert.encoder.layer) == 1
    with pytest.raises(RecipeError, match="layers"):
        RecipeSession("modifiers:\n  - !LayerPruningModifier\n    layers: ['bert.encoder.layer.7']\n", tiny_model)


def test_distillation_needs_teacher(tiny_model):
    with pytest.raises(RecipeError, match="no teacher"):
        RecipeSession("modifiers:\n  - !DistillationModifier\n    hardness: 0.5\n", tiny_model)


def test_sparseml_6layer_recipe_semantics(tmp_path):
    """SparseML's bert-base-6layers recipes list GMP params by *original* layer index and the
    LayerPruningModifier after them; both refer to the original names."""
    from tests_helpers import tiny_config

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(num_hidden_layers=4))
    recipe = """
pruning_modifiers:
  - !GMPruningModifier
    params:
      - re:bert.encoder.layer.(0|2).attention.self.query.weight
      - re:bert.encoder.layer.(0|2).intermediate.dense.weight
    start_epoch: 0.0
    end_epoch: 1.0
    init_sparsity: 0.0
    final_sparsity: 0.5
    inter_func: cubic
    update_frequency: 0.25
    leave_enabled: True
    mask_type: unstructured
    log_types: __ALL__
  - !LayerPruningModifier
    layers:
      - bert.encoder.layer.1
      - bert.encoder.layer.3
"""
    kept_query = [model.bert.encoder.layer[i].attention.self.query.weight for i in (0, 2)]
    session = RecipeSession(recipe, model)
    assert len(model.bert.encoder.layer) == 2 and model.config.num_hidden_layers == 2
    assert model.bert.encoder.layer[1].attention.self.query.weight is kept_query[1]
    train_steps(model, session, 6)
    assert sorted(session.masks()) == [
        "bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.intermediate.dense.weight",
        "bert.encoder.layer.1.attention.self.query.weight", "bert.encoder.layer.1.intermediate.dense.weight"]
    for w in kept_query:
        assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    model.save_pretrained(tmp_path)
    assert BertForSequenceClassification.from_pretrained(tmp_path).config.num_hidden_layers == 2
