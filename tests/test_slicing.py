"""Physical slicing of dead heads / FFN neurons: exact outputs, shapes, keep-one rule, quantization scales."""

import copy

import pytest
import torch
from transformers import BertForQuestionAnswering, BertForSequenceClassification

from sparsebert.slicing import find_dead_structures, slice_quantization_state, slice_structures
from tests_helpers import tiny_config, zero_structures


def _model(cls=BertForSequenceClassification, **kw):
    torch.manual_seed(0)
    return cls(tiny_config(num_attention_heads=4, intermediate_size=37, num_hidden_layers=3, **kw)).eval()


def _inputs(seed=0, batch=3, seq=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 120, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_find_dead_structures_reads_output_columns_only():
    model = _model()
    zero_structures(model, heads={0: [1, 3]}, neurons={2: [0, 5, 36]})
    # A head whose Q/K/V rows are zero but whose output columns are not is alive (its bias-only context reaches the output).
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.self.value.weight[0:8] = 0
    heads, neurons = find_dead_structures(model)
    assert heads == [[1, 3], [], []]
    assert neurons == [[], [], [0, 5, 36]]


@pytest.mark.parametrize("cls", [BertForSequenceClassification, BertForQuestionAnswering])
def test_slice_is_exact_and_shrinks_the_layers(cls):
    model = _model(cls)
    zero_structures(model, heads={0: [1, 3], 2: [0]}, neurons={1: list(range(0, 37, 2)), 2: [4]})
    x = _inputs()
    with torch.no_grad():
        before = model(**x)
    report = slice_structures(model)
    with torch.no_grad():
        after = model(**x)
    for key in ("logits",) if cls is BertForSequenceClassification else ("start_logits", "end_logits"):
        torch.testing.assert_close(after[key], before[key], atol=1e-5, rtol=1e-5)
    layers = model.bert.encoder.layer
    d = layers[0].attention.self.attention_head_size
    assert layers[0].attention.self.query.weight.shape == (2 * d, 32)
    assert layers[0].attention.output.dense.weight.shape == (32, 2 * d)
    assert layers[0].attention.self.num_attention_heads == 2 and layers[0].attention.self.all_head_size == 2 * d
    assert layers[1].attention.self.query.weight.shape == (4 * d, 32)  # untouched layer
    assert layers[1].intermediate.dense.weight.shape == (18, 32) and layers[1].output.dense.weight.shape == (32, 18)
    assert report.heads_removed == [[1, 3], [], [0]]
    assert report.neurons_removed == [0, 19, 1]
    summary = report.to_dict()
    assert summary["heads_removed"] == 3 and summary["heads_total"] == 12
    assert summary["heads_kept_per_layer"] == [2, 4, 3] and summary["neurons_kept_per_layer"] == [37, 18, 36]
    removed = 3 * 3 * (d * 32 + d) + 3 * 32 * d + 20 * (32 + 1 + 32)
    assert report.params_before - report.params_after == removed
    assert sorted(report.kept_rows) == sorted(["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.key",
                                               "bert.encoder.layer.0.attention.self.value", "bert.encoder.layer.2.attention.self.query",
                                               "bert.encoder.layer.2.attention.self.key", "bert.encoder.layer.2.attention.self.value",
                                               "bert.encoder.layer.1.intermediate.dense", "bert.encoder.layer.2.intermediate.dense"])


def test_a_layer_keeps_one_head_and_one_neuron():
    model = _model()
    zero_structures(model, heads={1: [0, 1, 2, 3]}, neurons={1: list(range(37))})
    x = _inputs(1)
    with torch.no_grad():
        before = model(**x).logits
    report = slice_structures(model)
    with torch.no_grad():
        after = model(**x).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    layer = model.bert.encoder.layer[1]
    assert layer.attention.self.num_attention_heads == 1
    assert layer.intermediate.dense.out_features == 1
    assert report.heads_removed[1] == [1, 2, 3] and report.neurons_removed[1] == 36


def test_nothing_dead_leaves_the_model_untouched():
    model = _model()
    ref = copy.deepcopy(model)
    report = slice_structures(model)
    assert report.empty and report.params_after == report.params_before and not report.kept_rows
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n


def test_unstructured_zeros_are_not_structures():
    model = _model()
    with torch.no_grad():  # 90% zeros but no all-zero column
        for layer in model.bert.encoder.layer:
            w = layer.output.dense.weight
            w[1:] = 0
    assert find_dead_structures(model)[1] == [[], [], []]
    assert slice_structures(model).empty


def test_non_bert_model_is_refused():
    with pytest.raises(ValueError, match="BERT-layout"):
        slice_structures(torch.nn.Linear(3, 3))


def test_quantization_scales_follow_the_kept_rows():
    model = _model()
    zero_structures(model, heads={0: [0]}, neurons={0: [1, 2]})
    report = slice_structures(model)
    d = model.bert.encoder.layer[0].attention.self.attention_head_size
    q = "bert.encoder.layer.0.attention.self.query"
    qstate = {"modules": {q: {"weight_scale": [float(i) for i in range(4 * d)]},
                          "bert.encoder.layer.0.intermediate.dense": {"weight_scale": [float(i) for i in range(37)]},
                          "bert.encoder.layer.0.attention.output.dense": {"weight_scale": [1.0] * 32},
                          "bert.encoder.layer.0.attention.self.key": {"weight_scale": [0.5]}}}
    out = slice_quantization_state(qstate, report)
    assert out["modules"][q]["weight_scale"] == [float(i) for i in range(d, 4 * d)]
    assert out["modules"]["bert.encoder.layer.0.intermediate.dense"]["weight_scale"] == [0.0] + [float(i) for i in range(3, 37)]
    assert out["modules"]["bert.encoder.layer.0.attention.output.dense"]["weight_scale"] == [1.0] * 32  # columns: unchanged
    assert out["modules"]["bert.encoder.layer.0.attention.self.key"]["weight_scale"] == [0.5]  # per tensor
    assert len(qstate["modules"][q]["weight_scale"]) == 4 * d  # the input is not modified
    qstate["modules"][q]["weight_scale"] = [1.0] * d
    with pytest.raises(ValueError, match="attention.self.query"):
        slice_quantization_state(qstate, report)


def test_dead_structures_from_checkpoint_tensors_and_sparsity_cli(tmp_path):
    import json

    from typer.testing import CliRunner

    from sparsebert.cli import app
    from sparsebert.slicing import dead_structures_from_tensors
    from sparsebert.sparsity import load_checkpoint_tensors
    from tests_helpers import save_tiny_model

    src = save_tiny_model(tmp_path / "m", dead_heads={0: [0, 1]}, dead_neurons={1: [5, 6, 7]})
    dead = dead_structures_from_tensors(load_checkpoint_tensors(src), head_size=16)
    assert dead == {"heads_dead": 2, "heads_total": 4, "neurons_dead": 3, "neurons_total": 128,
                    "heads_dead_per_layer": [2, 0], "neurons_dead_per_layer": [0, 3]}
    res = CliRunner().invoke(app, ["sparsity", str(src)])
    assert res.exit_code == 0, res.output
    assert "2/4 attention heads and 3/128 FFN neurons have all-zero output weights" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["sparsity", str(src), "--json"])
    assert json.loads(res.output)["dead_structures"]["neurons_dead"] == 3
    dense = save_tiny_model(tmp_path / "d")
    res = CliRunner().invoke(app, ["sparsity", str(dense)])
    assert res.exit_code == 0 and "structure:" not in res.output


def test_sliced_copy_leaves_the_model_alone():
    from sparsebert.slicing import sliced_copy

    model = _model()
    same, report = sliced_copy(model)
    assert same is model and report.empty  # nothing dead: no copy
    zero_structures(model, heads={0: [2]})
    sliced, report = sliced_copy(model)
    assert sliced is not model and report.heads_removed == [[2], [], []]
    assert model.bert.encoder.layer[0].attention.self.num_attention_heads == 4  # the original keeps its shapes
    assert sliced.bert.encoder.layer[0].attention.self.num_attention_heads == 3
