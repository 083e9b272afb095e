"""CLIP (transformers CLIPModel and its single towers): masks, exact compression, costs, save/load, per-tower budgets.

Every model is a tiny random config built here (no download): 2 layers per tower, width 32 (vision) and 48
(text), 4 heads, 32x32 images in 8x8 patches, captions of up to 16 tokens.
"""
import json

import pytest
import torch

import spp
from helpers import check_costs
from spp.models import model_geometry

transformers = pytest.importorskip("transformers", reason="CLIP needs transformers: pip install -e '.[llm]'")
from helpers import clip_inputs as inputs, random_masks, tiny_clip  # noqa: E402


def embeddings(model, x):
    """Every output the model gives for ``x`` that a pruned model must reproduce."""
    out = model(**x)
    names = ("image_embeds", "text_embeds", "logits_per_image", "last_hidden_state", "pooler_output")
    return {n: getattr(out, n) for n in names if getattr(out, n, None) is not None}


def check_exact(masked, small, x, tol=1e-5):
    with torch.no_grad():
        a, b = embeddings(masked, x), embeddings(small, x)
    assert a.keys() == b.keys() and a
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= tol, name


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("granularity", ["dim", "head"])
@pytest.mark.parametrize("kind", ["both", "vision", "text"])
def test_masked_then_compressed_is_exact(kind, granularity, attn):
    model = tiny_clip(kind, attn=attn)
    x = inputs(kind)
    with torch.no_grad():
        dense = embeddings(model, x)
    spp.add_masks(model, granularity=granularity)
    with torch.no_grad():
        assert all(torch.equal(dense[n], v) for n, v in embeddings(model, x).items())   # masks at one: no change
    spp.set_masks(model, random_masks(model, seed=1))
    with torch.no_grad():
        assert any(not torch.allclose(dense[n], v) for n, v in embeddings(model, x).items())
    small = spp.compress(model)
    assert type(small) is type(model)
    assert spp.count_params(small) < spp.count_params(model)
    check_exact(model, small, x)
    check_costs(model, small)


def test_towers_parts_and_token_counts():
    model = tiny_clip()
    geoms = model_geometry(model)
    assert [g.part for g in geoms] == ["vision", "vision", "text", "text"]
    assert [g.tokens for g in geoms] == [17, 17, 16, 16]      # 4x4 patches + class token; max_position_embeddings
    assert [g.name for g in geoms][::2] == ["vision_model.encoder.layers.0", "text_model.encoder.layers.0"]
    assert [g.part for g in model_geometry(tiny_clip("text"))] == ["text", "text"]
    with pytest.raises(ValueError, match="image size and caption"):
        model_geometry(model, (3, 64, 64))


def test_text_tower_stays_causal_and_vision_tower_bidirectional():
    """Changing a later caption token leaves earlier hidden states as they were (causal) in the compressed text
    tower; changing a late patch changes the class token's (bidirectional) in the compressed vision tower."""
    model = tiny_clip()
    spp.add_masks(model)
    small = spp.compress(model, random_masks(model, seed=2))
    x = inputs()
    y = {k: v.clone() for k, v in x.items()}
    y["input_ids"][0, 10] = 5
    y["pixel_values"][:, :, 24:, 24:] += 1.0
    with torch.no_grad():
        tx, ty = (small.text_model(input_ids=z["input_ids"]).last_hidden_state for z in (x, y))
        vx, vy = (small.vision_model(pixel_values=z["pixel_values"]).last_hidden_state for z in (x, y))
    assert torch.equal(tx[0, :10], ty[0, :10]) and not torch.equal(tx[0, 10:], ty[0, 10:])
    assert not torch.allclose(vx[:, 0], vy[:, 0])


def test_edge_cases_no_query_keys_no_values_no_mlp():
    for granularity in ("dim", "head"):
        model = tiny_clip()
        spp.add_masks(model, granularity=granularity)
        masks = random_masks(model, seed=3, zero=0.2)
        g = model_geometry(model)
        masks[g[0].mask_names()["qk"]].zero_()                        # vision layer 0: uniform attention
        masks[g[3].mask_names()["v"]].zero_()                         # text layer 1: no values, no MLP
        masks[g[3].mask_names()["mlp"]].zero_()
        spp.set_masks(model, masks)
        small = spp.compress(model)
        assert small.spp_widths[3].num_heads == 0 and small.spp_widths[3].mlp_hidden == 0
        assert small.spp_widths[0].num_qk_heads == 0
        check_exact(model, small, inputs())
        check_costs(model, small)


@pytest.mark.parametrize("kind", ["both", "vision"])
def test_save_and_load_safetensors(tmp_path, kind):
    model = tiny_clip(kind)
    spp.add_masks(model)
    small = spp.compress(model, random_masks(model, seed=5))
    spp.save_pruned(small, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["family"] == "hf-clip" and "spp" not in config     # uneven widths: spp's own config only
    loaded = spp.load_pruned(str(tmp_path))
    assert type(loaded) is type(model)
    check_exact(small, loaded, inputs(kind), tol=0)


def test_mlp_only_member_loads_with_plain_transformers(tmp_path):
    """Whole heads kept and one MLP width per tower: config.json is CLIP's own (spp's entry inside), so
    ``CLIPModel.from_pretrained`` loads the compressed model with no spp."""
    model = tiny_clip()
    spp.add_masks(model)
    masks = {n: torch.ones(p.shape) for n, p in spp.mask_parameters(model)}
    for g, kept in zip(model_geometry(model), (40, 40, 30, 30)):
        masks[g.mask_names()["mlp"]][kept:] = 0
    small = spp.compress(model, masks)
    spp.save_pruned(small, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["vision_config"]["intermediate_size"] == 40 and config["text_config"]["intermediate_size"] == 30
    plain = transformers.CLIPModel.from_pretrained(str(tmp_path)).eval()
    check_exact(small, plain, inputs())


def test_family_scope_part_meets_the_budget_in_each_tower():
    """scope="part" removes the fraction from each tower; "global" may take it unevenly."""
    model = tiny_clip()
    spp.add_masks(model)
    sizes = {n: p.numel() for n, p in spp.mask_parameters(model)}
    g = torch.Generator().manual_seed(0)
    entries = {n: {"entry_step": torch.randint(1, 100, (k,), generator=g).float(), "z": torch.randn(k, generator=g),
                   "gamma": torch.zeros(k), "mask": torch.rand(k, generator=g)} for n, k in sizes.items()}
    for n in entries:   # the text tower's elements enter first: a global walk keeps text before vision
        if n.startswith("text"):
            entries[n]["entry_step"] -= 100
    path = spp.SolutionPath(entries, spp.mask_pairs(model), granularity="dim", steps=100)
    family = spp.WeightFamily(model, path)
    assert family.parts() == ["vision", "text"]
    geoms = model_geometry(model)

    def kept_by_part(member):
        out = {}
        for part in ("vision", "text"):
            mine = [(geom, w) for geom, w in zip(geoms, member.summary.widths) if geom.part == part]
            full = sum(geom.params(geom.full) - geom.params(geom.empty) for geom, _ in mine)
            out[part] = sum(geom.params(w) - geom.params(geom.empty) for geom, w in mine) / full
        return out

    per_part = kept_by_part(family.select(keep=0.5, scope="part", values="binary"))
    assert all(abs(v - 0.5) < 0.03 for v in per_part.values()), per_part
    overall = kept_by_part(family.select(keep=0.5, values="binary"))
    assert overall["text"] > 0.6 and overall["vision"] < 0.1, overall   # the text tower fills the budget first
