"""Element masks (unstructured and N:M): the block-by-block walk, the Gram matrices, the search, the members, the
one-shot baselines and the export."""
import copy

import pytest
import torch

from helpers import tiny_decoder
from spp import elements as el
from spp import element_criteria as ec

transformers = pytest.importorskip("transformers")


def _batches(seed=0, count=3, shape=(2, 16)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 101, shape, generator=g) for _ in range(count)]


@pytest.mark.parametrize("name", ["llama-gqa-bias", "opt", "qwen3-gqa", "gemma3-mqa", "phi3-partial"])
def test_block_walk_reads_the_dense_models_block_inputs_and_grams(name):
    model = tiny_decoder(name)
    batches = _batches()
    hidden = [model(b, use_cache=False, output_hidden_states=True).hidden_states for b in batches]
    direct = {}
    layers = el.element_layers(model)
    handles = [layer.register_forward_pre_hook(
        lambda mod, inp, n=n: direct.setdefault(n, []).append(inp[0].reshape(-1, inp[0].shape[-1])))
        for n, layer in layers.items()]
    with torch.no_grad():
        for b in batches:
            model(b, use_cache=False)
    for h in handles:
        h.remove()
    walk = el.BlockInputs(model, batches)
    assert len(walk.blocks) == 2 and len(layers) == {"opt": 12, "phi3-partial": 8}.get(name, 14)
    grams = {}
    for i, block in enumerate(walk.blocks):
        for got, want in zip(walk.hidden, hidden):
            torch.testing.assert_close(got, want[i])   # block i reads the dense model's input to block i
        outputs = []
        grams.update(el.input_grams(el.element_layers(model, [block]), lambda: outputs.extend(walk.run(i))))
        walk.advance(i, outputs)
    for n in layers:
        x = torch.cat(direct[n])
        torch.testing.assert_close(grams[n].xtx, x.T @ x, rtol=1e-4, atol=1e-3)
        assert grams[n].tokens == x.shape[0]
    attention = [n for n in layers if n.startswith("model.layers.0.self_attn.") and n[-6:] in ("q_proj", "k_proj")]
    if attention:   # q and k read the same tensor: one Gram
        assert grams[attention[0]] is grams[attention[1]]


def test_members_keep_the_highest_scores_per_row_layer_and_group():
    torch.manual_seed(0)
    scores = {"a": torch.randn(6, 16), "b": torch.randn(3, 8)}
    rows = el.element_masks(scores, sparsity=0.75)
    for n, s in scores.items():
        assert (rows[n].sum(1) == s.shape[1] // 4).all()
        kept_min = s.masked_fill(~rows[n], float("inf")).min(1).values
        dropped_max = s.masked_fill(rows[n], float("-inf")).max(1).values
        assert (kept_min > dropped_max).all()
    layer = el.element_masks(scores, sparsity=0.5, scope="layer")
    assert int(layer["a"].sum()) == 48 and layer["a"].sum(1).float().std() > 0    # rows differ, the layer keeps half
    nm = el.element_masks(scores, pattern="2:4")
    for n, s in scores.items():
        groups = nm[n].reshape(s.shape[0], -1, 4)
        assert (groups.sum(-1) == 2).all()
        top = s.reshape(s.shape[0], -1, 4).topk(2, -1).indices
        assert groups.gather(-1, top).all()
    assert not el.element_masks(scores, sparsity=0.0)["a"].logical_not().any()


@pytest.mark.parametrize("pattern, message", [("3:5", "M values that divide them all: [2, 4, 8]"),
                                              ("4:2", "0 < N < M"), ("two:four", "whole numbers")])
def test_bad_patterns_say_what_would_fit(pattern, message):
    scores = {"q": torch.randn(4, 16), "down": torch.randn(4, 24)}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        el.element_masks(scores, pattern=pattern)
    with pytest.raises(ValueError, match="sparsity"):
        el.element_masks(scores, sparsity=1.0)
    with pytest.raises(ValueError, match="not both"):
        el.element_masks(scores, sparsity=0.5, pattern="2:4")


def _layer_problem(seed=0, rows=5, cols=12, tokens=200, correlated=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) * torch.linspace(0.2, 3.0, cols)
    if correlated:
        x[:, -1] = x[:, -2]
    return torch.randn(rows, cols, generator=g), el.Gram(x.T @ x, tokens), x


def test_the_path_on_uncorrelated_inputs_ranks_by_weight_times_activation():
    w, gram, x = _layer_problem()
    gram = el.Gram(torch.diag(gram.xtx.diagonal()), gram.tokens)     # uncorrelated inputs: a diagonal Gram
    entry, z, error = el._search_layer(w, gram.mean(), 100, 0.25, 10.0, 1.0)
    path = el.ElementPath({"l": entry}, {"l": z}, el.SCALE)
    order = path.scores("l").argsort(dim=1, descending=True)
    wanda = ec.wanda(w, gram).argsort(dim=1, descending=True)
    assert torch.equal(order[:, :6], wanda[:, :6])    # the top half in Wanda's order
    assert 0 < path.reach() < 1 and 0 < error < 1


def test_the_path_sees_weights_that_cancel():
    w, gram, x = _layer_problem(correlated=True)
    w[:, -2], w[:, -1] = 3.0, -3.0        # the two strongest inputs are one signal: these weights cancel exactly
    entry, z, _ = el._search_layer(w, gram.mean(), 100, 0.25, 10.0, 1.0, damp=0.0)
    scores = el.ElementPath({"l": entry}, {"l": z}, el.SCALE).scores("l")
    ranks = scores.argsort(dim=1, descending=True).argsort(dim=1)
    wanda_ranks = ec.wanda(w, gram).argsort(dim=1, descending=True).argsort(dim=1)
    assert (wanda_ranks[:, -2:] < 2).all()    # Wanda keeps the pair first: large weights on the strongest input
    assert (ranks[:, -2:] >= 10).all()        # the path removes them first: together they cost nothing


def test_sparsegpt_reconstructs_the_kept_weights():
    w, gram, x = _layer_problem(seed=1)
    y = x @ w.T
    keep = el.element_masks({"l": torch.randn(w.shape)}, sparsity=0.5)["l"]
    new = ec.sparsegpt_update(w, gram, keep=keep)
    assert (new[~keep] == 0).all()
    assert (x @ new.T - y).pow(2).sum() < (x @ (w * keep).T - y).pow(2).sum()
    # with every pruned column before every kept one, each pruned weight's error reaches all kept weights: the
    # result is the least-squares fit of the dense outputs on the kept inputs
    first = torch.arange(w.shape[1]) >= 6
    new = ec.sparsegpt_update(w, gram, keep=first.expand_as(w), damp=1e-9)
    best = torch.linalg.lstsq(x[:, first].double(), y.double()).solution.T
    torch.testing.assert_close(new[:, first].double(), best, rtol=1e-3, atol=1e-3)
    for kwargs, check in ((dict(sparsity=0.5), lambda z: z.float().mean() == 0.5),
                          (dict(pattern="2:4"), lambda z: (z.reshape(5, -1, 4).sum(-1) >= 2).all())):
        assert check(ec.sparsegpt_update(w, gram, **kwargs) == 0)


def test_refit_is_each_rows_least_squares_fit_on_its_kept_inputs():
    w, gram, x = _layer_problem(seed=1)
    y = x @ w.T
    keep = el.element_masks({"l": torch.randn(w.shape)}, sparsity=0.5)["l"].bool()
    keep[0] = torch.arange(w.shape[1]) < 3                 # rows with different kept counts are solved apart
    new = ec.refit(w, gram, keep, damp=1e-9)
    assert (new[~keep] == 0).all()
    for r in range(w.shape[0]):
        best = torch.linalg.lstsq(x[:, keep[r]].double(), y[:, r].double().unsqueeze(1)).solution.flatten()
        torch.testing.assert_close(new[r, keep[r]].double(), best, rtol=1e-4, atol=1e-4)
    obs = ec.sparsegpt_update(w, gram, keep=keep)
    assert (x @ new.T - y).pow(2).sum() < (x @ obs.T - y).pow(2).sum()   # OBS compensates only later columns
    torch.testing.assert_close(ec.refit(w, gram, torch.ones_like(keep)), w, rtol=0, atol=1e-5)   # nothing pruned
    chunked = ec.refit(w, gram, keep, damp=1e-9, memory=1)     # one row at a time: the same solution
    torch.testing.assert_close(chunked, new)


def test_one_shot_updates_any_methods_masks():
    """update='refit' keeps a method's masks and fits the kept weights (given masks too); the block's outputs on
    the calibration inputs are nearer the dense ones than with the weights kept as they are."""
    model = tiny_decoder("llama-gqa-bias")
    plain = ec.prune_one_shot(copy.deepcopy(model), _batches(), "wanda", sparsity=0.5)
    fitted = ec.prune_one_shot(copy.deepcopy(model), _batches(), "wanda", sparsity=0.5, update="refit")
    masks = {n: layer.weight != 0 for n, layer in el.element_layers(plain).items()}
    for name, layer in el.element_layers(fitted).items():   # block 0: Wanda's masks (block 1 reads other inputs)
        assert ".layers.1." in name or torch.equal(layer.weight != 0, masks[name]), name
    assert abs(el.sparsity_of(fitted) - 0.5) < 0.01
    fitted_masks = {n: layer.weight != 0 for n, layer in el.element_layers(fitted).items()}
    given = ec.prune_one_shot(copy.deepcopy(model), _batches(), keep=fitted_masks, update="refit")
    for name, layer in el.element_layers(given).items():   # the same masks and inputs: the same weights
        torch.testing.assert_close(layer.weight, fitted.get_submodule(name).weight)
    x = torch.cat(_batches())
    with torch.no_grad():
        dense = model(x).logits
        assert (fitted(x).logits - dense).pow(2).mean() < (plain(x).logits - dense).pow(2).mean()


@pytest.mark.parametrize("method", ec.METHODS)
def test_one_shot_pruners_reach_the_sparsity_block_by_block(method):
    model = tiny_decoder("llama-gqa-bias")
    pruned = ec.prune_one_shot(copy.deepcopy(model), _batches(), method, pattern="2:4")
    for name, layer in el.element_layers(pruned).items():
        groups = (layer.weight != 0).reshape(layer.weight.shape[0], -1, 4).sum(-1)
        assert (groups <= 2).all(), name
    dense_inputs = ec.prune_one_shot(copy.deepcopy(model), _batches(), method, sparsity=0.5, sequential=False)
    sequential = ec.prune_one_shot(copy.deepcopy(model), _batches(), method, sparsity=0.5)
    assert abs(el.sparsity_of(sequential) - 0.5) < 0.01
    last = list(el.element_layers(model))[-1]
    same = torch.equal(dense_inputs.get_submodule(last).weight, sequential.get_submodule(last).weight)
    assert same == (method == "magnitude")    # the second block reads the pruned first block's outputs


def test_one_shot_refuses_what_it_cannot_do():
    model = tiny_decoder("llama-mha")
    with pytest.raises(ValueError, match="unknown method 'obs'.*sparsegpt"):
        ec.prune_one_shot(model, _batches(), "obs", sparsity=0.5)
    with pytest.raises(ValueError, match="keep= .*needs a weight update: update='obs' or 'refit'"):
        ec.prune_one_shot(model, _batches(), "wanda", keep={})
    with pytest.raises(ValueError, match=r"unknown method None.*\(or give the masks: keep=\)"):
        ec.prune_one_shot(model, _batches(), sparsity=0.5, update="refit")
    with pytest.raises(ValueError, match="unknown update 'lsq'.*obs, refit"):
        ec.prune_one_shot(model, _batches(), "wanda", sparsity=0.5, update="lsq")


def test_one_search_gives_every_member_and_they_load_in_plain_transformers(tmp_path):
    model = tiny_decoder("llama-gqa-bias")
    path = el.element_search(model, _batches(), progress=None)
    assert set(path.entry) == set(el.element_layers(model))
    path.save(str(tmp_path / "path.safetensors"))
    again = el.ElementPath.load(str(tmp_path / "path.safetensors"))
    assert all(torch.equal(again.scores(n), path.scores(n)) for n in path.entry)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    members = {s: el.element_masks(path, sparsity=s) for s in (0.3, 0.5, 0.7)}
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())   # the search changed nothing
    for n in path.entry:   # nested: a sparser member keeps a subset of a denser one's weights
        assert not (members[0.7][n] & ~members[0.5][n]).any() and not (members[0.5][n] & ~members[0.3][n]).any()
    member = el.prune_weights(copy.deepcopy(model), el.element_masks(path, pattern="2:4"))
    assert el.sparsity_of(member) == 0.5
    member.save_pretrained(tmp_path / "member")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "member").eval()
    ids = _batches()[0]
    torch.testing.assert_close(loaded(ids).logits, member(ids).logits)
    assert el.sparsity_of(loaded) == 0.5
    with pytest.raises(ValueError, match=r"has shape \(3, 3\), its weight \(64, 64\)"):
        el.prune_weights(member, {"model.layers.0.self_attn.q_proj": torch.ones(3, 3, dtype=torch.bool)})
