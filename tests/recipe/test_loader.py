import pytest

from sparsebert.modifiers import DistillationModifier, GMPruningModifier, LearningRateFunctionModifier
from sparsebert.recipe import RecipeError, load_recipe

RECIPE = """
num_epochs: 10
init_lr: 1e-4
prune_end: eval(num_epochs - 2)
warm: eval(min(2, num_epochs / 4))
training_modifiers:
  - !EpochRangeModifier
    end_epoch: num_epochs
  - !LearningRateFunctionModifier
    start_epoch: warm
    end_epoch: num_epochs
    lr_func: cyclic_linear
    cycle_epochs: 2.0
    init_lr: init_lr
    final_lr: eval(init_lr / 10)
pruning_modifiers:
  - !GMPruningModifier
    params: ["re:bert.encoder.layer.*.attention.self.query.weight"]
    init_sparsity: 0.05
    final_sparsity: 0.8
    start_epoch: warm
    end_epoch: prune_end
    update_frequency: 0.5
    mask_type: block4
    log_types: __ALL__
distillation_modifiers:
  - !DistillationModifier
    hardness: 1.0
    temperature: 5.5
    distill_output_keys: [start_logits, end_logits]
"""


def test_variables_eval_and_tags():
    r = load_recipe(RECIPE)
    assert r.variables["prune_end"] == 8 and r.variables["warm"] == 2
    assert r.variables["init_lr"] == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string
    assert [type(m).__name__ for m in r.modifiers] == [
        "EpochRangeModifier", "LearningRateFunctionModifier", "GMPruningModifier", "DistillationModifier"]
    lr = r.modifiers[1]
    assert isinstance(lr, LearningRateFunctionModifier) and lr.final_lr == pytest.approx(1e-5) and lr.start_epoch == 2
    gmp = r.modifiers[2]
    assert isinstance(gmp, GMPruningModifier) and gmp.end_epoch == 8 and gmp.mask_type == "block4"
    kd = r.modifiers[3]
    assert isinstance(kd, DistillationModifier) and kd.distill_output_keys == ["start_logits", "end_logits"]
    assert r.num_epochs == 10


def test_overrides_and_round_trip():
    r = load_recipe(RECIPE, {"num_epochs": 4})
    assert r.num_epochs == 4 and r.modifiers[2].end_epoch == 2 and r.variables["warm"] == 1
    again = load_recipe(r.to_yaml())
    assert [m.model_dump() for m in again.modifiers] == [m.model_dump() for m in r.modifiers]


def test_markdown_front_matter(tmp_path):
    path = tmp_path / "recipe.md"
    path.write_text("---\n" + RECIPE + "\n---\n# Title\nSome prose.\n")
    assert len(load_recipe(path).modifiers) == 4


@pytest.mark.parametrize(
    "patch, key, value, words",
    [
        (("!DistillationModifier", "!DistilationModifier"), None, None, ["unknown modifier", "DistilationModifier"]),
        (("    hardness: 1.0", "    hardnes: 1.0"), "hardnes", 1.0, ["unknown key"]),
        (("final_sparsity: 0.8", "final_sparsity: 1.2"), "final_sparsity", 1.2, ["[0, 1)"]),
        (("init_sparsity: 0.05", "init_sparsity: -0.1"), "init_sparsity", -0.1, ["[0, 1)"]),
        (("end_epoch: prune_end", "end_epoch: 1.0"), "end_epoch", 1.0, ["before start_epoch"]),
        (("    mask_type: block4", "    mask_type: block4\n    inter_func: quadratic"), "inter_func", "quadratic", ["unknown inter_func"]),
        (("mask_type: block4", "mask_type: block5"), "mask_type", "block5", ["block4"]),
        (("lr_func: cyclic_linear", "lr_func: cyclic"), "lr_func", "cyclic", ["unknown lr_func"]),
        (("eval(num_epochs - 2)", "eval(num_epoch - 2)"), "prune_end", None, ["unknown variable 'num_epoch'"]),
    ],
)
def test_errors_name_file_modifier_key_value(tmp_path, patch, key, value, words):
    path = tmp_path / "bad.yaml"
    path.write_text(RECIPE.replace(*patch))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert str(path) in msg
    for w in words:
        assert w in msg
    if key:
        assert f"'{key}'" in msg
    if value is not None:
        assert repr(value) in msg or str(value) in msg


def test_error_names_modifier_position(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(RECIPE.replace("final_sparsity: 0.8", "final_sparsity: 1.0"))
    with pytest.raises(RecipeError, match=r"pruning_modifiers\[0\] !GMPruningModifier"):
        load_recipe(path)


def test_common_yaml_slips_get_a_fix_in_the_message(tmp_path):
    no_dash = tmp_path / "no_dash.yaml"
    no_dash.write_text("pruning_modifiers: !GMPruningModifier\n  params: __ALL_PRUNABLE__\n  final_sparsity: 0.5\n")
    with pytest.raises(RecipeError, match=r"no_dash\.yaml.*'pruning_modifiers'.*must be an item of a '\*_modifiers' list"):
        load_recipe(no_dash)
    unquoted = tmp_path / "nm.yaml"
    unquoted.write_text(RECIPE.replace("mask_type: block4", "mask_type: 2:4"))
    with pytest.raises(RecipeError, match=r"nm\.yaml.*'mask_type.*124.*quote an N:M pattern"):
        load_recipe(unquoted)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("# caf\xe9\n".encode("latin-1") + RECIPE.encode())
    with pytest.raises(RecipeError, match=r"latin\.yaml.*not UTF-8"):
        load_recipe(latin)


def test_missing_file_and_unknown_override(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="unknown variable"):
        load_recipe(RECIPE, {"num_epoch": 3})


def test_eval_is_sandboxed():
    with pytest.raises(RecipeError, match="unsupported expression"):
        load_recipe(RECIPE.replace("eval(num_epochs - 2)", "eval(__import__('os').getcwd())"))


def test_shipped_recipes_load():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[2] / "recipes").rglob("*.yaml"))
    assert len(recipes) >= 7
    for path in recipes:
        load_recipe(path)


def test_shipped_recipes_apply_to_their_task_model():
    """Every shipped recipe validates against a 6-layer BERT with its task head: `params` resolve,
    layers exist, block4 shapes divide; the recipe's structure changes (layer dropping) take effect."""
    from pathlib import Path

    import torch
    from transformers import BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification

    from sparsebert import RecipeSession
    from tests_helpers import tiny_config

    for path in sorted((Path(__file__).resolve().parents[2] / "recipes").rglob("*.yaml")):
        if path.parent.name == "squad":
            cls = BertForQuestionAnswering
        elif path.parent.name == "prune_ofa" and path.name.startswith(("teacher", "student")):
            cls = BertForMaskedLM
        else:
            cls = BertForSequenceClassification
        torch.manual_seed(0)
        model = cls(tiny_config(num_hidden_layers=6))
        teacher = cls(tiny_config(num_hidden_layers=6))
        session = RecipeSession(path, model, teacher=teacher)
        assert session.modifiers, path
        if "layerdrop3" in path.name:
            assert model.config.num_hidden_layers == 3 and len(model.bert.encoder.layer) == 3
