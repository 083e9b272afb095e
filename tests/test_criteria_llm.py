"""The activation- and gradient-based criteria (Wanda-sp, FLAP, LLM-Pruner's Taylor) and the channel
layout they read, on tiny random decoders and ViTs."""
import copy

import pytest
import torch

import spp
from spp.criteria import (activation_stats, add_biases, flap_biases, flap_scores, wanda_sp_scores,
                          weight_taylor_scores)
from spp.models import family_of
from spp.structure import mask_names

from helpers import tiny_swin, tiny_vit

transformers = pytest.importorskip("transformers", reason="the LLM families need transformers: pip install -e '.[llm]'")
from helpers import VOCAB, tiny_decoder as tiny  # noqa: E402


def _ids(n=3, batch=4, tokens=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(x, x) for x in (torch.randint(3, VOCAB, (batch, tokens), generator=g) for _ in range(n))]


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


def _channels(model):
    family, granularity = family_of(model), spp.masks.granularity_of(model)
    for geom, block in zip(family.geometry(model), family.blocks(model)):
        for pair, chans in family.channels(block, geom, granularity).items():
            yield mask_names(geom)[pair], chans


@pytest.mark.parametrize("name", ["llama-gqa-bias", "opt", "vit", "swin", "phi3-partial"])
def test_channels_are_the_weights_a_mask_element_removes(name):
    """Zeroing the rows / columns listed for one element computes what its mask at 0 computes (Phi-3: rows of the
    fused qkv_proj and gate_up_proj, a rotary pair's entry and, after it, plain dims' own)."""
    dense = {"vit": tiny_vit, "swin": tiny_swin}.get(name, lambda: tiny(name))()
    x = torch.randn(2, 3, 32, 32) if name in ("vit", "swin") else _ids(1)[0][0]
    masked = spp.add_masks(copy.deepcopy(dense), "dim").eval()
    for mask, chans in _channels(masked):
        size = masked.get_parameter(mask).numel()
        for element in sorted({1, size - 1}):   # (Phi-3: the last query-key entry is a plain dim)
            _check_element(masked, x, mask, chans, element)


def _check_element(masked, x, mask, chans, element):
    with torch.no_grad():
        masked.get_parameter(mask)[element] = 0
    reference = _logits(masked, x)
    with torch.no_grad():
        masked.get_parameter(mask)[element] = 1
    assert chans, mask
    for c in chans:
        zeroed = copy.deepcopy(masked)
        linear = zeroed.get_submodule(next(n for n, m in masked.named_modules() if m is c.linear))
        index = c.index[c.element == element]
        with torch.no_grad():
            if c.axis == 0:
                linear.weight[index] = 0
                if linear.bias is not None:
                    linear.bias[index] = 0
            else:
                linear.weight[:, index] = 0
        torch.testing.assert_close(_logits(zeroed, x), reference, atol=1e-5, rtol=1e-5, msg=f"{mask} {c.axis}")


def test_head_channels_of_a_shared_key_value_head():
    """With head masks, a query head lists its own query rows and o_proj columns, and its group's
    key/value rows (listed once per query head of the group)."""
    masked = spp.add_masks(tiny("qwen2-gqa"), "head")          # 4 query heads, 2 key/value heads, d = 16
    chans = dict(_channels(masked))
    q, k = chans["model.layers.0.self_attn.q_proj.qk_mask"]
    assert torch.equal(q.index[q.element == 3], torch.arange(48, 64))
    assert torch.equal(k.index[k.element == 3], torch.arange(16, 32))   # query head 3 reads key/value head 1
    assert torch.equal(k.index[k.element == 2], torch.arange(16, 32))
    v, o = chans["model.layers.0.self_attn.o_proj.v_mask"]
    assert (v.axis, o.axis) == (0, 1) and torch.equal(o.index[o.element == 1], torch.arange(16, 32))


def test_wanda_sp_scales_with_the_column_and_ignores_a_dead_one():
    masked = spp.add_masks(tiny("llama-gqa-bias"), "dim")
    down = masked.model.layers[1].mlp.down_proj
    with torch.no_grad():
        down.weight[:, 4] = 0            # neuron 4 feeds nothing
    stats = activation_stats(masked, _ids(), batches=2)
    before = wanda_sp_scores(masked, stats)["model.layers.1.mlp.down_proj.mlp_mask"]
    assert before[4] == 0 and (before[torch.arange(96) != 4] > 0).all()
    with torch.no_grad():
        down.weight[:, 7] *= 3
    after = wanda_sp_scores(masked, stats)["model.layers.1.mlp.down_proj.mlp_mask"]
    torch.testing.assert_close(after[7], 3 * before[7])
    torch.testing.assert_close(after[:7], before[:7])
    assert stats["model.layers.0.self_attn.q_proj"]["tokens"] == 2 * 4 * 24


def test_flap_standardises_and_its_biases_keep_the_mean_output():
    masked = spp.add_masks(tiny("llama-gqa-bias"), "dim")
    data = _ids()
    stats = activation_stats(masked, data, batches=3)
    scores = flap_scores(masked, stats)
    for s in scores.values():
        assert abs(float(s.mean())) < 1e-4 and abs(float(s.std()) - 1) < 1e-4
    raw = flap_scores(masked, stats, standardize=False)
    assert all((s >= 0).all() for s in raw.values())

    # remove half the last layer's neurons: its down_proj input is unchanged, so with FLAP's bias the mean of
    # its output over the calibration tokens is what it was
    name = "model.layers.1.mlp.down_proj"
    outputs = []
    hook = lambda m, a, y: outputs.append(y.detach().flatten(0, 1))  # noqa: E731
    handle = masked.get_submodule(name).register_forward_hook(hook)
    for x, _ in data:
        _logits(masked, x)
    dense_mean = torch.cat(outputs).mean(0)
    masks = {n: torch.ones_like(p) for n, p in spp.mask_parameters(masked)}
    masks[name + ".mlp_mask"][::2] = 0
    biases = flap_biases(masked, stats, masks)
    assert set(biases) == {name}
    spp.set_masks(masked, masks)
    bias_before = masked.get_submodule(name).bias.clone()
    add_biases(masked, biases)
    outputs.clear()
    for x, _ in data:
        _logits(masked, x)
    handle.remove()
    torch.testing.assert_close(torch.cat(outputs).mean(0), dense_mean, atol=1e-5, rtol=1e-4)
    # the same biases on the compressed member (a Llama without MLP biases gets one)
    plain = spp.add_masks(tiny("qwen2-gqa"), "dim")
    stats = activation_stats(plain, data, batches=3)
    masks = {n: torch.ones_like(p) for n, p in spp.mask_parameters(plain)}
    masks["model.layers.0.self_attn.o_proj.v_mask"][:5] = 0
    biases = flap_biases(plain, stats, masks)
    spp.set_masks(plain, masks)
    small = spp.compress(plain)
    add_biases(plain, biases)
    add_biases(small, biases)
    assert small.model.layers[0].self_attn.o_proj.bias is not None
    torch.testing.assert_close(_logits(small, data[0][0]), _logits(plain, data[0][0]), atol=1e-4, rtol=1e-4)
    assert not torch.equal(masked.get_submodule(name).bias, bias_before)


def test_weight_taylor_is_zero_for_a_structure_that_does_nothing_and_restores_grad_flags():
    masked = spp.add_masks(tiny("llama-mha"), "dim")
    for n, p in masked.named_parameters():
        if not n.endswith("_mask"):
            p.requires_grad_(False)
    with torch.no_grad():
        masked.model.layers[0].mlp.down_proj.weight[:, 9] = 0
    scores = weight_taylor_scores(masked, _ids(), batches=2, loss_fn=spp.next_token_loss)
    mlp = scores["model.layers.0.mlp.down_proj.mlp_mask"]
    assert mlp[9] == 0 and mlp.sum() > 0
    assert set(scores) == {n for n, _ in spp.mask_parameters(masked)}
    assert not masked.model.layers[0].mlp.down_proj.weight.requires_grad
    family = spp.WeightFamily(masked, spp.SolutionPath.from_scores(masked, scores))
    assert family.select(remove=0.5).summary.params_after < family.params_before


def test_vit_criteria_rank_the_same_masks():
    masked = spp.add_masks(tiny_vit(), "dim")
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    stats = activation_stats(masked, data, batches=2)
    names = {n for n, _ in spp.mask_parameters(masked)}
    for scores in (wanda_sp_scores(masked, stats), flap_scores(masked, stats),
                   weight_taylor_scores(masked, data, batches=2)):
        assert set(scores) == names
        assert all(torch.isfinite(s).all() and s.shape == masked.get_parameter(n).shape for n, s in scores.items())
