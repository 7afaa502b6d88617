import pytest
import torch

from sparsebert.modifiers.masks import compute_masks, detect_pattern, mask_sparsity, parse_mask_type


def test_unstructured_exact_count_and_lowest_pruned():
    torch.manual_seed(0)
    w = torch.randn(16, 24)
    m = compute_masks({"w": w.abs()}, 0.75, parse_mask_type("unstructured"))["w"]
    assert m.dtype == torch.bool and int((~m).sum()) == 288
    assert w.abs()[~m].max() <= w.abs()[m].min()


def test_block4_structure():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    m = compute_masks({"w": w.abs()}, 0.5, parse_mask_type("block4"))["w"]
    blocks = m.reshape(8, 8, 4)
    assert bool((blocks.all(-1) | (~blocks).all(-1)).all())  # every block all-kept or all-pruned
    assert mask_sparsity({"w": m}) == pytest.approx(0.5)
    # the pruned blocks have the smallest mean |w|
    score = w.abs().reshape(8, 8, 4).mean(-1)
    kept = blocks.all(-1)
    assert score[~kept].max() <= score[kept].min()
    assert detect_pattern(w * m) == "block4"


def test_nm_final_and_gradual():
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    m = compute_masks({"w": w.abs()}, 0.5, parse_mask_type("2:4"))["w"]
    assert bool(((m.reshape(6, 4, 4).sum(-1)) == 2).all())  # exactly 2 of every 4 kept
    assert detect_pattern(w * m) == "2:4"
    # the kept ones are each group's two largest
    groups = w.abs().reshape(6, 4, 4)
    top2 = groups.topk(2, dim=-1).indices
    assert bool(torch.gather(m.reshape(6, 4, 4), -1, top2).all())
    g = compute_masks({"w": w.abs()}, 0.25, parse_mask_type("2:4"))["w"]
    assert int((~g).sum()) == 24 and bool((g.reshape(6, 4, 4).sum(-1) >= 2).all())
    with pytest.raises(ValueError, match=r"sparsity 0.6 outside \[0, 0.5\] for 2:4"):
        compute_masks({"w": w.abs()}, 0.6, parse_mask_type("2:4"))


def test_global_vs_per_layer():
    a = torch.full((4, 8), 10.0)
    b = torch.full((4, 8), 1.0)
    per_layer = compute_masks({"a": a, "b": b}, 0.5, parse_mask_type("unstructured"))
    assert mask_sparsity({"a": per_layer["a"]}) == pytest.approx(0.5)
    glob = compute_masks({"a": a, "b": b}, 0.5, parse_mask_type("unstructured"), global_sparsity=True)
    assert bool(glob["a"].all()) and not bool(glob["b"].any())


def test_bad_inputs():
    with pytest.raises(ValueError, match="divisible by 4"):
        compute_masks({"w": torch.rand(4, 6)}, 0.5, parse_mask_type("block4"))
    with pytest.raises(ValueError, match=r"sparsity 1.0 outside \[0, 1\) for unstructured"):
        compute_masks({"w": torch.rand(4, 8)}, 1.0, parse_mask_type("unstructured"))
    for bad, why in (("block5", "expected unstructured, block4"), ("4:2", "1 <= N < M"), ("0:4", "1 <= N < M"),
                     ("random", "expected unstructured, block4")):
        with pytest.raises(ValueError, match=rf"mask_type '{bad}': .*{why}"):
            parse_mask_type(bad)
    assert str(parse_mask_type([1, 4])) == "block4"
