"""Swin Transformer (timm v1): masks, exact compression, family and save/load on tiny Swins."""
import pytest
import torch

import spp
from spp.models.swin import PrunedWindowAttention

from helpers import random_pair_masks, tiny_swin
from test_family import fake_path


def _x(seed=1):
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_tiny_swin_has_shifted_windows_and_patch_merging():
    model = tiny_swin()
    blocks = spp.models.find_blocks(model)
    assert len(blocks) == 4 and any(any(b.shift_size) for b in blocks)
    assert model.layers[1].downsample is not None


@pytest.mark.parametrize("granularity", ["dim", "head"])
def test_swin_mask_sizes_follow_each_stage(granularity):
    """(That masks at 1 change nothing, and compressed == masked, is the conformance suite's: test_families.py.)"""
    shapes = {n: p.shape[0] for n, p in spp.mask_parameters(spp.add_masks(tiny_swin(), granularity))}
    assert shapes["layers.1.blocks.1.attn.v_mask"] == (16 if granularity == "dim" else 4)
    assert shapes["layers.0.blocks.0.attn.v_mask"] == (16 if granularity == "dim" else 2)
    assert shapes["layers.1.blocks.0.mlp.mask"] == 256


def _check_exact(masks, granularity, seed=0):
    model = spp.add_masks(tiny_swin(seed=seed), granularity)
    spp.set_masks(model, masks)
    pruned = spp.compress(model)
    with torch.no_grad():
        diff = (model(_x()) - pruned(_x())).abs().max().item()
    assert diff <= 1e-5, diff
    return model, pruned


@pytest.mark.parametrize("granularity", ["dim", "head"])
def test_swin_compressed_equals_masked_for_non_binary_masks(granularity):
    """A member read with the search's mask values (``values="path"``) folds them into the weights."""
    _check_exact(random_pair_masks(tiny_swin(), granularity, keep=0.6, seed=5, binary=False), granularity, 5)


EDGES = {
    "qk_removed": ["layers.0.blocks.1.attn.qk_mask"],
    "v_removed": ["layers.1.blocks.0.attn.v_mask"],
    "mlp_removed": ["layers.0.blocks.0.mlp.mask"],
    "attention_removed": ["layers.1.blocks.1.attn.qk_mask", "layers.1.blocks.1.attn.v_mask"],
}


@pytest.mark.parametrize("case", list(EDGES))
@pytest.mark.parametrize("granularity", ["dim", "head"])
def test_swin_edge_cases(case, granularity):
    masks = random_pair_masks(tiny_swin(), granularity, keep=0.7, seed=4)
    for name in EDGES[case]:
        masks[name].zero_()
    _check_exact(masks, granularity)


def test_swin_head_removal_slices_the_relative_position_bias():
    model = tiny_swin()
    masks = random_pair_masks(model, "head", keep=1.0)
    masks["layers.1.blocks.1.attn.v_mask"][1] = 0    # head 1 removed
    masks["layers.1.blocks.1.attn.qk_mask"][3] = 0   # head 3 attends by its bias alone
    original = model.layers[1].blocks[1].attn.relative_position_bias_table.detach().clone()
    _, pruned = _check_exact(masks, "head")
    attn = pruned.layers[1].blocks[1].attn
    assert isinstance(attn, PrunedWindowAttention)
    assert (attn.num_heads, attn.num_qk_heads) == (3, 2)
    # kept heads, qk heads first: 0, 2, then the bias-only head 3
    torch.testing.assert_close(attn.relative_position_bias_table, original[:, [0, 2, 3]])


@pytest.mark.parametrize("granularity", ["dim", "head"])
def test_swin_family_predicts_compressed_params_and_flops(granularity):
    model = spp.add_masks(tiny_swin(), granularity)
    family = spp.WeightFamily(model, fake_path(model))
    for keep in (0.0, 0.2, 0.5, 0.8, 1.0):
        member = family.select(keep=keep)
        pruned = spp.compress(model, member.masks)
        assert spp.count_params(pruned) == member.summary.params_after
        assert spp.count_flops(pruned) == member.summary.flops_after


def test_unsupported_models_name_the_supported_families():
    import timm
    with pytest.raises(TypeError, match="VisionTransformer.*SwinTransformer"):
        spp.add_masks(timm.create_model("resnet18", num_classes=2))


def test_swin_search_export_retrain_through_the_commands(tmp_path, capsys):
    import json
    import os

    from spp.cli import main
    from test_pipeline import SMOKE

    swin = ["model.name=swin_tiny_patch4_window7_224", "model.granularity=head",
            "model.kwargs={patch_size: 2, window_size: 4, embed_dim: 32, depths: [2, 2], num_heads: [2, 4]}"]
    out = str(tmp_path / "search")
    assert main(["search", SMOKE, f"output={out}", "search.steps=8", *swin]) == 0
    assert "search.nu_calibration=pair" in capsys.readouterr().out   # the hint for whole-head masks under one nu
    assert main(["export", SMOKE, f"output={out}", "export.remove=0.5", *swin]) == 0
    summary = json.load(open(os.path.join(out, "pruned", "summary.json")))
    pruned = spp.load_pruned(os.path.join(out, "pruned"))
    assert spp.count_params(pruned) == summary["params_after"] < summary["params_before"]
    train_out = str(tmp_path / "retrain")
    assert main(["retrain", SMOKE, f"output={train_out}", f"train.source={out}/pruned", "train.steps=4", *swin]) == 0
    assert os.path.isfile(os.path.join(train_out, "best", "model.safetensors"))
