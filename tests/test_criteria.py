import pytest
import torch

import spp
from spp.criteria import lasso_path, lasso_values, magnitude_scores, random_scores, taylor_scores

from helpers import tiny_vit


def _batches(n=3, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def test_magnitude_scores_follow_the_paired_weights():
    model = spp.add_masks(tiny_vit(), "dim")
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[5] *= 100      # neuron 5: a large fc1 row
        model.blocks[0].attn.proj.weight[:, 3::16] *= 100   # value dim 3 of every head: large proj columns
    scores = magnitude_scores(model)
    assert scores["blocks.1.mlp.mask"].argmax() == 5
    assert scores["blocks.0.attn.v_mask"].argmax() == 3
    assert set(scores) == {n for n, _ in spp.mask_parameters(model)}


def test_magnitude_scores_of_whole_heads():
    model = spp.add_masks(tiny_vit(), "head")
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[16:32] *= 100   # the query rows of head 1
    scores = magnitude_scores(model)
    assert scores["blocks.0.attn.qk_mask"].shape == (4,)
    assert scores["blocks.0.attn.qk_mask"].argmax() == 1
    spp.SolutionPath.from_scores(model, scores)   # the shapes a family needs


def test_lasso_shrinks_masks_and_restores_them():
    model = spp.add_masks(tiny_vit(), "dim")
    weak = lasso_values(model, _batches(), lam=1e-4, steps=6, lr=1e-2)
    seen = []
    strong = lasso_values(model, _batches(), lam=1.0, steps=6, lr=1e-2, progress=lambda *a: seen.append(a))
    assert [step for step, _ in seen] == [1, 2, 3, 4, 5, 6] and all(loss > 0 for _, loss in seen)   # progress lines
    assert all(torch.all(p == 1) for _, p in spp.mask_parameters(model))  # the model is left as it was
    assert all(not torch.equal(v, torch.ones_like(v)) for v in strong.values())  # the trained values, not a copy of 1
    mean = lambda s: torch.cat([v.abs().flatten() for v in s.values()]).mean()  # noqa: E731
    assert mean(strong) < mean(weak) < 1.0 + 1e-6
    member = spp.WeightFamily(tiny_vit(), lasso_path(model, strong)).select(remove=0.5, values="path")
    assert member.summary.values == "path"


def test_lasso_from_a_members_masks_trains_the_kept_scales_and_keeps_the_removed_at_zero():
    """lasso_values(start=, lam=0): the scale training the LLM benchmark gives a member (--finetunes scales)."""
    model = spp.add_masks(tiny_vit(), "dim")
    start = {n: (torch.arange(p.numel()).reshape(p.shape) % 2).float() for n, p in spp.mask_parameters(model)}
    values = lasso_values(model, _batches(), lam=0.0, steps=6, lr=1e-2, start=start)
    for name, v in values.items():
        assert torch.all(v[start[name] == 0] == 0), name                    # removed structures stay removed
        assert not torch.equal(v[start[name] != 0], start[name][start[name] != 0]), name   # kept ones trained
    assert all(torch.all(p == 1) for _, p in spp.mask_parameters(model))   # the model is left at 1
    assert all(p._backward_hooks is None or not p._backward_hooks for _, p in spp.mask_parameters(model))


def test_taylor_scores_are_zero_for_a_mask_that_does_nothing():
    model = spp.add_masks(tiny_vit(), "dim")
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight[:, 7] = 0      # neuron 7 cannot change the output
    model.train()
    scores = taylor_scores(model, _batches(), batches=2)
    assert scores["blocks.0.mlp.mask"][7] == 0
    assert scores["blocks.0.mlp.mask"].sum() > 0
    assert model.training                             # the mode it was given back in


def test_random_scores_repeat_with_their_seed():
    model = spp.add_masks(tiny_vit(), "dim")
    a, b, c = random_scores(model, 0), random_scores(model, 0), random_scores(model, 1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_criteria_need_masks():
    with pytest.raises(ValueError, match="add_masks"):
        magnitude_scores(tiny_vit())
