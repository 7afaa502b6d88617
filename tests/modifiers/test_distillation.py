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


def test_kd_loss_leaves_absent_classes_out():
    """``classes`` (QA: the real tokens of a window) drops padding from both softmaxes, row by row."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 6), torch.randn(2, 6)
    real = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    expected = (kd_loss(s[:1, :4], t[:1, :4], 5.5) + kd_loss(s[1:], t[1:], 5.5)) / 2
    assert kd_loss(s, t, 5.5, classes=real).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kd_loss(s, t, 5.5).item() != pytest.approx(expected.item(), rel=1e-3)  # padding counted
    wild = s.clone()
    wild[0, 4:] = 1e3  # whatever a student puts on padding costs nothing
    assert kd_loss(wild, t, 5.5, classes=real).item() == pytest.approx(expected.item(), rel=1e-5)
    # with rows selected too (mask), each kept row keeps its own classes
    assert kd_loss(s, t, 5.5, torch.tensor([True, False]), real).item() == pytest.approx(
        kd_loss(s[:1, :4], t[:1, :4], 5.5).item(), rel=1e-5)


@pytest.mark.parametrize("mask_padding", [True, False])
def test_qa_distillation_skips_padding_positions(mask_padding):
    """Start/end logits of the batch's shape: the attention mask's padding is left out (unless
    ``mask_padding: false``, SparseML's loss over every position)."""
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(1)
    config = BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    student, teacher = BertForQuestionAnswering(config), BertForQuestionAnswering(config)
    recipe = ("modifiers:\n  - !DistillationModifier\n    hardness: 1.0\n    temperature: 5.5\n"
              f"    distill_output_keys: [start_logits, end_logits]\n    mask_padding: {str(mask_padding).lower()}\n")
    session = RecipeSession(recipe, student, teacher=teacher)
    session.start(10)
    attention = torch.tensor([[1] * 9 + [0] * 3, [1] * 12])
    x = {"input_ids": torch.randint(1, 120, (2, 12)) * attention, "attention_mask": attention,
         "start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([3, 4])}
    out = student(**x)
    with torch.no_grad():
        t_out = teacher(input_ids=x["input_ids"], attention_mask=attention)
    classes = attention.bool() if mask_padding else None
    expected = (kd_loss(out.start_logits, t_out.start_logits, 5.5, classes=classes)
                + kd_loss(out.end_logits, t_out.end_logits, 5.5, classes=classes)) / 2
    assert session.modify_loss(out.loss, out, x).item() == pytest.approx(expected.item(), rel=1e-5)
    unmasked = (kd_loss(out.start_logits, t_out.start_logits, 5.5) + kd_loss(out.end_logits, t_out.end_logits, 5.5)) / 2
    assert (expected.item() == pytest.approx(unmasked.item(), rel=1e-4)) is not mask_padding


# -- per-layer (feature) distillation ---------------------------------------------------------

from sparsebert.modifiers import feature_distance  # noqa: E402
from sparsebert.recipe.errors import RecipeError  # noqa: E402

LAYERS = "student_layer_names: ['re:bert.encoder.layer.\\d+$']"


def _per_layer_recipe(body: str, kd: bool = False) -> str:
    text = "modifiers:\n  - !PerLayerDistillationModifier\n" + "".join(f"    {line}\n" for line in body.splitlines())
    if kd:
        text += "  - !DistillationModifier\n    hardness: 1.0\n    temperature: 2.0\n"
    return text


def test_feature_distance_hand_computed():
    s = torch.tensor([[[1.0, 2.0], [5.0, 5.0]]])  # [B=1, L=2, H=2]
    t = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 0]])  # the second token is padding
    # real token only: mse = (0 + 4) / 2 = 2; teacher energy = (1 + 0) / 2 = 0.5
    assert feature_distance(s, t, mask, normalize=False).item() == pytest.approx(2.0)
    assert feature_distance(s, t, mask, normalize=True, epsilon=0.0).item() == pytest.approx(4.0)
    # all tokens: mse = (0 + 4 + 25 + 25) / 4
    assert feature_distance(s, t, None, normalize=False).item() == pytest.approx(13.5)
    assert feature_distance(t, t, mask).item() == 0.0
    with pytest.raises(ValueError, match="differ"):
        feature_distance(s, t[:, :1], None)


def test_per_layer_distillation_adds_normalized_hidden_state_mse(tiny_model):
    from transformers import BertForSequenceClassification

    torch.manual_seed(4)
    teacher = BertForSequenceClassification(tiny_model.config)
    session = RecipeSession(_per_layer_recipe(f"gain: 0.5\n{LAYERS}"), tiny_model, teacher=teacher)
    session.start(10)
    tiny_model.eval()  # no dropout, so the reference forward below sees the same hidden states
    x = {"input_ids": torch.randint(0, 120, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long), "labels": torch.tensor([0, 1, 1])}
    x["attention_mask"][0, 5:] = 0
    out = tiny_model(**x)
    with torch.no_grad():
        hs_s = tiny_model(**x, output_hidden_states=True).hidden_states
        hs_t = teacher(input_ids=x["input_ids"], attention_mask=x["attention_mask"], output_hidden_states=True).hidden_states
    n_layers = tiny_model.config.num_hidden_layers
    expected = out.loss + 0.5 * sum(feature_distance(hs_s[i + 1], hs_t[i + 1], x["attention_mask"]) for i in range(n_layers))
    got = session.modify_loss(out.loss, out, x)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.item() > out.loss.item()  # random teacher != student: the term is not zero
    got.backward()  # the term reaches the student's encoder weights
    assert tiny_model.bert.encoder.layer[0].intermediate.dense.weight.grad.abs().sum() > 0


def test_per_layer_distillation_is_zero_for_an_identical_teacher_and_off_outside_its_epochs(tiny_model):
    import copy

    teacher = copy.deepcopy(tiny_model)
    session = RecipeSession(_per_layer_recipe(f"gain: 2.0\nstart_epoch: 1.0\n{LAYERS}"), tiny_model, teacher=teacher)
    session.start(10)
    tiny_model.eval()  # no dropout: the student's layers equal the teacher's
    x = {"input_ids": torch.randint(0, 120, (2, 6)), "labels": torch.tensor([0, 1])}
    out = tiny_model(**x)
    assert session.modify_loss(out.loss, out, x).item() == out.loss.item()  # epoch 0 < start_epoch
    session.update(10)  # epoch 1.0
    out = tiny_model(**x)
    assert session.modify_loss(out.loss, out, x).item() == pytest.approx(out.loss.item(), abs=1e-6)


def test_teacher_runs_once_per_batch_with_two_distillation_modifiers(tiny_model):
    from transformers import BertForSequenceClassification

    teacher = BertForSequenceClassification(tiny_model.config)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    session = RecipeSession(_per_layer_recipe(LAYERS, kd=True), tiny_model, teacher=teacher)
    session.start(10)
    for _ in range(2):
        x = {"input_ids": torch.randint(0, 120, (2, 6)), "labels": torch.tensor([0, 1])}
        out = tiny_model(**x)
        session.modify_loss(out.loss, out, x)
    assert len(calls) == 2


def test_per_layer_distillation_errors_name_the_key_and_value(tiny_model):
    from transformers import BertForSequenceClassification

    teacher = BertForSequenceClassification(tiny_model.config)
    with pytest.raises(RecipeError, match=r"student_layer_names.*bert\.encoder\.layer\.9"):
        RecipeSession(_per_layer_recipe("student_layer_names: [bert.encoder.layer.9]"), tiny_model, teacher=teacher).start(10)
    with pytest.raises(RecipeError, match="no teacher"):
        RecipeSession(_per_layer_recipe(LAYERS), tiny_model)
    with pytest.raises(RecipeError, match="has 1 names but teacher_layer_names has 2"):
        RecipeSession(_per_layer_recipe("student_layer_names: [bert.encoder.layer.0]\n"
                                        "teacher_layer_names: [bert.encoder.layer.0, bert.encoder.layer.1]"), tiny_model, teacher=teacher)
    # outputs of different shapes: a projection would be needed
    session = RecipeSession(_per_layer_recipe("student_layer_names: [bert.encoder.layer.0.intermediate]\n"
                                              "teacher_layer_names: [bert.encoder.layer.0.output]"), tiny_model, teacher=teacher)
    session.start(10)
    x = {"input_ids": torch.randint(0, 120, (2, 6)), "labels": torch.tensor([0, 1])}
    out = tiny_model(**x)
    with pytest.raises(RecipeError, match="project_features"):
        session.modify_loss(out.loss, out, x)


def test_loss_terms_are_logged_as_means_since_the_last_log(tiny_model):
    """``loss/task``, ``loss/distillation`` and ``loss/per_layer_distillation`` (before its gain) reach the
    training log as means over the batches since the previous log, then reset."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(5)
    teacher = BertForSequenceClassification(tiny_model.config)
    session = RecipeSession(_per_layer_recipe(f"gain: 0.5\n{LAYERS}", kd=True), tiny_model, teacher=teacher)
    session.start(10)
    tiny_model.eval()
    seen = {"task": [], "distillation": [], "per_layer_distillation": []}
    for _ in range(3):
        x = {"input_ids": torch.randint(0, 120, (2, 6)), "labels": torch.tensor([0, 1])}
        out = tiny_model(**x)
        with torch.no_grad():
            t = teacher(input_ids=x["input_ids"], output_hidden_states=True)
            hs_s = tiny_model(**x, output_hidden_states=True).hidden_states
        seen["task"].append(out.loss.item())
        seen["distillation"].append(kd_loss(out.logits, t.logits, 2.0).item())
        seen["per_layer_distillation"].append(sum(feature_distance(hs_s[i + 1], t.hidden_states[i + 1], None).item()
                                                  for i in range(tiny_model.config.num_hidden_layers)))
        session.modify_loss(out.loss, out, x)
    logs = session.log_values()
    for name, values in seen.items():
        assert logs[f"loss/{name}"] == pytest.approx(sum(values) / 3, rel=1e-4), name
    assert not any(k.startswith("loss/") for k in session.log_values())  # reset after each log


# -- teacher output cache ------------------------------------------------------------------

def _qa_pair():
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(4)
    config = BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    return BertForQuestionAnswering(config), BertForQuestionAnswering(config)


def _qa_recipe(cache: bool, mask_padding: bool = True) -> str:
    return ("modifiers:\n  - !DistillationModifier\n    hardness: 1.0\n    temperature: 5.5\n"
            "    distill_output_keys: [start_logits, end_logits]\n"
            f"    mask_padding: {str(mask_padding).lower()}\n    cache_teacher_outputs: {str(cache).lower()}\n")


def _batch(windows: list[torch.Tensor], length: int) -> dict:
    """Windows (1-D token ids) right-padded to ``length``, as DataCollatorWithPadding pads them."""
    ids = torch.zeros(len(windows), length, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, w in enumerate(windows):
        ids[i, :len(w)], attention[i, :len(w)] = w, 1
    return {"input_ids": ids, "attention_mask": attention, "token_type_ids": (ids % 2) * attention,
            "start_positions": torch.zeros(len(windows), dtype=torch.long),
            "end_positions": torch.ones(len(windows), dtype=torch.long)}


@pytest.mark.parametrize("mask_padding", [True, False])
def test_cached_teacher_outputs_give_the_same_kd_loss(mask_padding):
    """Epoch 2 regroups the windows into batches of other padded lengths: with ``mask_padding`` the
    teacher is not run again and the KD loss equals the uncached one; without it (padding positions
    count, and the cache has no teacher values there) only the unpadded batch comes from the cache."""
    student, teacher = _qa_pair()
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(5)
    windows = [torch.randint(1, 120, (n,)) for n in (5, 9, 12, 7)]
    epoch1 = [_batch(windows[:2], 9), _batch(windows[2:], 12)]
    epoch2 = [_batch([windows[3], windows[0]], 7), _batch([windows[1]], 9), _batch([windows[2]], 16)]
    cached = RecipeSession(_qa_recipe(True, mask_padding), student, teacher=teacher)
    plain = RecipeSession(_qa_recipe(False, mask_padding), student, teacher=teacher)
    for s in (cached, plain):
        s.start(10)
    for epoch, batches in enumerate((epoch1, epoch2)):
        for x in batches:
            out = student(**x)
            before = len(calls)
            got = cached.modify_loss(out.loss, out, x)
            teacher_ran = len(calls) > before
            assert got.item() == pytest.approx(plain.modify_loss(out.loss, out, x).item(), rel=1e-5, abs=1e-6)
            padded = not bool(x["attention_mask"].all())
            assert teacher_ran == (epoch == 0 or (padded and not mask_padding))


def test_cached_teacher_outputs_run_only_the_unseen_rows():
    """A batch mixing cached and unseen windows (shuffled, other padded lengths): only the unseen rows go
    through the teacher, and the loss still equals the uncached one."""
    student, teacher = _qa_pair()
    sizes = []
    teacher.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    torch.manual_seed(8)
    w = [torch.randint(1, 120, (n,)) for n in (5, 9, 12, 7, 10)]
    cached = RecipeSession(_qa_recipe(True), student, teacher=teacher)
    plain = RecipeSession(_qa_recipe(False), student, teacher=teacher)
    for s in (cached, plain):
        s.start(10)
    for windows, length, expected_rows in (([w[0], w[2]], 12, 2), ([w[3], w[2], w[4], w[0], w[1]], 14, 3),
                                           ([w[1], w[4], w[3]], 10, None)):
        x = _batch(windows, length)
        out = student(**x)
        sizes.clear()
        got = cached.modify_loss(out.loss, out, x)
        assert sizes == ([] if expected_rows is None else [expected_rows])
        assert got.item() == pytest.approx(plain.modify_loss(out.loss, out, x).item(), rel=1e-5, abs=1e-6)


def test_cached_teacher_outputs_for_sequence_classification(tiny_model):
    from transformers import BertForSequenceClassification

    teacher = BertForSequenceClassification(tiny_model.config)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    recipe = "modifiers:\n  - !DistillationModifier\n    hardness: 0.5\n    temperature: 2.0\n    cache_teacher_outputs: true\n"
    session = RecipeSession(recipe, tiny_model, teacher=teacher)
    session.start(10)
    torch.manual_seed(6)
    ids = torch.randint(1, 120, (4, 6))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1, 0])}
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=x["attention_mask"]).logits
    calls.clear()
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):  # epoch 2: another order, all from the cache
        xb = {k: v[order] for k, v in x.items()}
        out = tiny_model(**xb)
        expected = 0.5 * out.loss + 0.5 * kd_loss(out.logits, t_logits[order], 2.0)
        assert session.modify_loss(out.loss, out, xb).item() == pytest.approx(expected.item(), rel=1e-5)
    assert len(calls) == 1


def test_cached_teacher_outputs_refuse_masked_lm_inputs():
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    student, teacher = BertForMaskedLM(config), BertForMaskedLM(config)
    recipe = "modifiers:\n  - !DistillationModifier\n    hardness: 1.0\n    cache_teacher_outputs: true\n"
    session = RecipeSession(recipe, student, teacher=teacher)
    session.start(10)
    ids = torch.randint(1, 120, (2, 6))
    x = {"input_ids": ids, "labels": torch.full_like(ids, -100)}
    x["labels"][:, 2] = ids[:, 2]
    out = student(**x)
    with pytest.raises(RecipeError, match="cache_teacher_outputs"):
        session.modify_loss(out.loss, out, x)


def test_cached_teacher_outputs_in_the_trainer_loop(tmp_path, tiny_model):
    """Two epochs through SparseTrainer (length-grouped, per-batch padding): with the cache the teacher
    runs in epoch 1 only, and the training losses are those of the uncached run."""
    import copy

    from datasets import Dataset
    from transformers import AutoTokenizer, BertForSequenceClassification, DataCollatorWithPadding

    from sparsebert.integrations import SparseTrainer
    from sparsebert.models import default_model_path
    from sparsebert.train import TrainConfig, training_arguments

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(7)
    lengths = [4 + (5 * i) % 23 for i in range(40)]
    ds = Dataset.from_dict({"input_ids": [torch.randint(1, 120, (n,)).tolist() for n in lengths],  # tiny vocab
                            "labels": [i % 2 for i in range(40)]})
    teacher = BertForSequenceClassification(tiny_model.config)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    losses = {}
    for cache in (False, True):
        calls.clear()
        cfg = TrainConfig(task="sst2", output_dir=str(tmp_path / str(cache)), batch_size=8, group_by_length=True, logging_steps=1)
        recipe = ("modifiers:\n  - !DistillationModifier\n    hardness: 1.0\n    temperature: 2.0\n"
                  f"    cache_teacher_outputs: {str(cache).lower()}\n")
        trainer = SparseTrainer(recipe=recipe, teacher=teacher, model=copy.deepcopy(tiny_model),
                                args=training_arguments(cfg, tmp_path / str(cache), epochs=2.0), train_dataset=ds,
                                data_collator=DataCollatorWithPadding(tok), processing_class=tok)
        trainer.train()
        losses[cache] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        assert len(calls) == (5 if cache else 10)
    assert len(losses[True]) == 10 and losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_cached_teacher_outputs_need_the_attention_mask_in_the_teacher_inputs():
    """Keys are the real tokens; a teacher that attends to padding gives outputs that depend on it."""
    student, teacher = _qa_pair()
    recipe = _qa_recipe(True) + "    teacher_input_keys: [input_ids]\n"
    session = RecipeSession(recipe, student, teacher=teacher)
    session.start(10)
    x = _batch([torch.randint(1, 120, (5,)), torch.randint(1, 120, (8,))], 8)
    out = student(**x)
    with pytest.raises(RecipeError, match="attention_mask"):
        session.modify_loss(out.loss, out, x)
