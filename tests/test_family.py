import json

import numpy as np
import pytest
import torch

import spp

from helpers import tiny_vit


def fake_path(model, seed=0, never=0.1):
    """A path with random entry steps (some never entering) and random z."""
    g = torch.Generator().manual_seed(seed)
    entry, z = {}, {}
    for name, p in spp.mask_parameters(model):
        entry[name] = torch.randint(1, 500, p.shape, generator=g).float()
        entry[name][torch.rand(p.shape, generator=g) < never] = float("inf")
        z[name] = torch.randn(p.shape, generator=g)
    return spp.SolutionPath.from_entries(model, entry, z, steps=500)


@pytest.fixture(params=["dim", "head"])
def family(request):
    model = spp.add_masks(tiny_vit(), request.param)
    return spp.WeightFamily(model, fake_path(model))


def _kept_set(masks):
    return {(n, i) for n, m in masks.items() for i in torch.nonzero(m).flatten().tolist()}


def _max_step(family, by):
    """The most one element can add: a value entry that revives its head's query-keys."""
    units = [g.unit_costs(by, family.granularity) for g in family.geoms]
    scale = [g.head_dim if family.granularity == "dim" else 1 for g in family.geoms]
    return max(max(u["mlp"], u["v"] + s * u["qk"]) for u, s in zip(units, scale))


@pytest.mark.parametrize("by", ["params", "flops", "elements"])
def test_select_hits_target_within_one_element(family, by):
    prunable = family.prunable(by)
    for keep in np.linspace(0.05, 0.95, 10):
        s = family.select(keep=float(keep), by=by).summary
        assert s.kept <= keep + 1e-9
        assert (keep - s.kept) * prunable <= _max_step(family, by) * (1 + 1e-9), (keep, s.kept)


@pytest.mark.parametrize("rank", ["entry", "z"])
def test_members_are_nested_and_monotone(family, rank):
    previous_set, previous_params = None, -1
    for keep in np.linspace(0.0, 1.0, 15):
        m = family.select(keep=float(keep), rank=rank)
        kept = _kept_set(m.masks)
        assert m.summary.params_after >= previous_params
        if previous_set is not None:
            assert previous_set <= kept
        previous_set, previous_params = kept, m.summary.params_after
    assert m.summary.params_after == m.summary.params_before


def test_remove_and_budget_agree_with_keep(family):
    a = family.select(keep=0.4)
    b = family.select(remove=0.6)
    assert _kept_set(a.masks) == _kept_set(b.masks)
    target = a.summary.params_after
    c = family.select(budget=target)
    assert c.summary.params_after == target
    with pytest.raises(ValueError, match="unprunable"):
        family.select(budget=10)


def test_entry_order_puts_early_elements_first(family):
    m = family.select(keep=0.3)
    kept_entries, dropped_entries = [], []
    for name, mask in m.masks.items():
        entry = family.path.entries[name]["entry_step"]
        kept_entries += entry[mask != 0].tolist()
        if not name.endswith("qk_mask"):  # dead-head query-keys are dropped whatever their rank
            dropped_entries += entry[mask == 0].tolist()
    assert max(kept_entries) <= min(dropped_entries)


def test_pair_scope_meets_each_pair_target(family):
    m = family.select(keep=0.5, scope="pair", by="elements")
    for pair, (kept, total) in m.summary.elements.items():
        if pair == "qk":
            assert kept <= total * 0.5 + 1
        else:
            assert abs(kept - total * 0.5) <= 1, (pair, kept, total)


def test_uniform_scope_keeps_the_same_widths_and_each_blocks_own_best(family):
    """scope="uniform": every block the same widths, near the target (units that do not fit are left out, the smaller
    ones fill the rest), each block keeping its own best-ranked elements of each pair type (whole heads: each with
    its query-keys)."""
    order = family.ranking("entry")
    position = np.empty(order.size, int)
    position[order] = np.arange(order.size)
    for keep in (0.8, 0.5, 0.2):
        m = family.select(keep=keep, scope="uniform")
        assert len(set(m.summary.widths)) == 1, m.summary.widths
        assert keep - 0.02 <= m.summary.kept <= keep + 1e-9, (keep, m.summary.kept)   # MLP units fill the rest
        for g in family.geoms:
            for pair, name in spp.structure.mask_names(g).items():
                start = family._offset[(g.index, pair)]
                kept = (m.masks[name] != 0).numpy()
                places = position[start:start + kept.size]
                if kept.any() and not kept.all() and (pair == "mlp" or family.granularity == "dim"):
                    assert places[kept].max() < places[~kept].min(), (name, keep)
            if family.granularity == "head":
                names = spp.structure.mask_names(g)
                assert torch.equal(m.masks[names["qk"]] != 0, m.masks[names["v"]] != 0)
    with pytest.raises(ValueError, match="floor= does not apply to scope='uniform'"):
        family.select(keep=0.5, scope="uniform", floor=1)


def test_uniform_whole_heads_member_of_a_gqa_llama_is_a_plain_transformers_model(tmp_path):
    """On a Llama with grouped key/value heads, a uniform whole-head member keeps the same number of query heads in
    every group of every layer: its config.json is transformers' own, and AutoModelForCausalLM loads it."""
    transformers = pytest.importorskip("transformers", reason="the Llama family needs transformers")
    from helpers import tiny_decoder

    model = spp.add_masks(tiny_decoder("llama-gqa-bias"), "head")
    family = spp.WeightFamily(model, fake_path(model, never=0.0), input_size=(16,))
    member = family.select(remove=0.4, scope="uniform")
    small = spp.compress(model, member.masks)
    spp.save_pruned(small, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    w = member.summary.widths[0]
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (
        w.num_heads, w.num_kv_heads, w.mlp_hidden) and w.num_heads in (2, 4) and w.num_kv_heads == 2
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(3, 100, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, small(ids).logits, rtol=0, atol=1e-5)


def test_floor_keeps_entries_in_every_block(family):
    m = family.select(keep=0.0, floor=2)
    for name, mask in m.masks.items():
        assert (mask != 0).sum() >= 2, name


def test_round_to_multiples():
    model = spp.add_masks(tiny_vit(), "dim")
    family = spp.WeightFamily(model, fake_path(model))
    m = family.select(keep=0.37, round_to=8)
    for w in m.summary.widths:
        assert w.mlp_hidden % 8 == 0 and w.v_dim % 8 == 0 and w.qk_dim % 8 == 0
        assert w.mlp_hidden > 0


def test_bad_select_arguments(family):
    whole = family.params_before
    for kwargs, word in [(dict(keep=0.5, remove=0.5), "exactly one"), (dict(keep=1.5), r"keep=1.5: .* in \[0, 1\]"),
                         (dict(remove=-0.1), r"remove=-0.1: .* in \[0, 1\]"),
                         (dict(budget=whole + 1), f"to {whole:,} \\(the whole model\\)"),
                         (dict(keep=0.5, floor=-1), "floor=-1"), (dict(keep=0.5, round_to=0), "round_to=0"),
                         (dict(keep=0.5, by="bytes"), "by="), (dict(keep=0.5, scope="layer"), "scope="),
                         (dict(keep=0.5, rank="random"), "rank="), (dict(budget=1e5, scope="pair"), "budget"),
                         (dict(keep=0.5, values="scaled"), r"values='scaled': choose one of \('auto', 'binary'")]:
        with pytest.raises(ValueError, match=word):
            family.select(**kwargs)


def test_path_from_another_model_is_rejected():
    model = spp.add_masks(tiny_vit(), "dim")
    other = tiny_vit(embed_dim=96, num_heads=4)
    with pytest.raises(ValueError, match="does not fit this model"):
        spp.WeightFamily(other, fake_path(model))


def test_path_save_load_gives_the_same_family(tmp_path):
    model = spp.add_masks(tiny_vit(), "dim")
    path = fake_path(model)
    path.support = [(10, {"qk": 1, "v": 0, "mlp": 3})]
    path.save(str(tmp_path))
    loaded = spp.SolutionPath.load(str(tmp_path))
    assert loaded.support == path.support and loaded.granularity == "dim"
    a = spp.WeightFamily(model, path).select(keep=0.5)
    b = spp.WeightFamily(model, loaded).select(keep=0.5)
    assert _kept_set(a.masks) == _kept_set(b.masks)
    (tmp_path / "path.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read the solution path"):
        spp.SolutionPath.load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="path.json"):
        spp.SolutionPath.load(str(tmp_path / "missing"))


def test_path_from_scores_enters_the_highest_scores_first():
    model = spp.add_masks(tiny_vit(), "dim")
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in spp.mask_parameters(model)}
    path = spp.SolutionPath.from_scores(model, scores, meta={"criterion": "random"})
    flat_scores = torch.cat([s.flatten() for s in scores.values()])
    flat_entry = torch.cat([path.entries[n]["entry_step"].flatten() for n in scores])
    assert torch.equal(flat_entry.argsort(), flat_scores.argsort(descending=True))
    assert sorted(flat_entry.tolist()) == list(range(1, flat_entry.numel() + 1))
    assert path.steps == flat_entry.numel() and path.meta == {"criterion": "random"}
    family = spp.WeightFamily(model, path)
    assert np.array_equal(family.ranking("entry"), family.ranking("z"))
    # per pair type, the member keeps the highest-scoring MLP neurons of all blocks
    member = family.select(keep=0.5, scope="pair", by="elements")
    mlp = [n for n in scores if path.pairs[n][0] == "mlp"]
    kept = torch.cat([scores[n][member.masks[n].bool()] for n in mlp])
    dropped = torch.cat([scores[n][~member.masks[n].bool()] for n in mlp])
    assert kept.numel() and dropped.numel() and kept.min() > dropped.max()


def test_path_from_entries_or_scores_checks_names_shapes_and_nan():
    model = spp.add_masks(tiny_vit(), "dim")
    masks = dict(spp.mask_parameters(model))
    ones = {n: torch.ones(p.shape) for n, p in masks.items()}
    first = next(iter(masks))
    with pytest.raises(ValueError, match=f"lacks {first}"):
        spp.SolutionPath.from_entries(model, {n: t for n, t in ones.items() if n != first})
    with pytest.raises(ValueError, match="not a mask of the model"):
        spp.SolutionPath.from_entries(model, {**ones, "blocks.9.mlp.mask": torch.ones(3)})
    with pytest.raises(ValueError, match=r"has shape \(3,\)"):
        spp.SolutionPath.from_entries(model, {**ones, first: torch.ones(3)})
    with pytest.raises(ValueError, match="use inf"):
        spp.SolutionPath.from_entries(model, {**ones, first: torch.full(masks[first].shape, float("nan"))})
    with pytest.raises(ValueError, match="scores lack"):
        spp.SolutionPath.from_scores(model, {first: ones[first]})
    with pytest.raises(ValueError, match="not a mask of the model"):
        spp.SolutionPath.from_scores(model, {**ones, "head.mask": torch.ones(3)})
    with pytest.raises(ValueError, match="NaN"):
        spp.SolutionPath.from_scores(model, {**ones, first: torch.full(masks[first].shape, float("nan"))})
    with pytest.raises(ValueError, match="add_masks"):
        spp.SolutionPath.from_scores(tiny_vit(), {})
    never = {**ones, first: torch.full(masks[first].shape, float("inf"))}
    path = spp.SolutionPath.from_entries(model, never)
    assert path.steps == 1 and path.entered_by(1)[path.pairs[first][0]] < path.sizes()[path.pairs[first][0]]


def test_family_works_on_a_dense_model_and_flops_at_other_input_size():
    masked = spp.add_masks(tiny_vit(), "dim")
    path = fake_path(masked)
    dense = tiny_vit(img_size=48)
    family = spp.WeightFamily(dense, path, input_size=(3, 48, 48))
    m = family.select(keep=0.5, by="flops")
    pruned = spp.compress(dense, m.masks)
    assert spp.count_flops(pruned, (3, 48, 48)) == m.summary.flops_after


def test_real_search_gives_a_path():
    """A few LBI steps on a tiny model: Γ's support grows and the path selects members."""
    torch.manual_seed(0)
    model = spp.add_masks(tiny_vit(), "dim")
    opt = spp.LBI([p for _, p in spp.mask_parameters(model)], lr=3.0, kappa=10.0, nu=30.0, lam=0.1)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    sizes = []
    for step in range(40):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sizes.append(sum(spp.support_sizes(opt, model).values()))
    assert sizes[0] < sizes[-1] and sizes[-1] > 0
    path = spp.SolutionPath.from_optimizer(opt, model)
    assert path.steps == 40
    steps, fraction = path.entry_curve()
    assert steps.numel() > 0 and fraction[-1] <= 1
    member = spp.WeightFamily(model, path).select(keep=0.5)
    assert 0.45 < member.summary.kept <= 0.5


def test_reprs_say_what_a_notebook_user_needs(family):
    path = family.path
    entered, sizes = path.entered_by(path.steps), path.sizes()
    assert repr(path).startswith(f"SolutionPath(500 steps, {len(path.entries)} masks ({family.granularity})")
    assert f"mlp {entered['mlp']}/{sizes['mlp']}" in repr(path) and entered["mlp"] < sizes["mlp"]  # 10% never enter
    assert f"params {family.params_before:,}" in repr(family) and repr(path) in repr(family)
    member = family.select(keep=0.5)
    text = repr(member)
    assert f"params {family.params_before:,} -> {member.summary.params_after:,}" in text
    assert "tensor(" not in text and len(text) < 300


@pytest.mark.parametrize("granularity", ["dim", "head"])
def test_member_values_binary_path_and_auto(granularity):
    """``values="path"`` keeps the path's mask values on the kept elements (and compresses exactly), "binary"
    keeps 1, and "auto" takes the path's values only while every element the walk keeps had entered (its settled
    values: on a path without snapshots, the values at the end, which the summary calls "path")."""
    model = spp.add_masks(tiny_vit(), granularity)
    base = fake_path(model, never=0.3)
    g = torch.Generator().manual_seed(1)
    values = {n: 0.2 + 2 * torch.rand(e["mask"].shape, generator=g) for n, e in base.entries.items()}
    path = spp.SolutionPath.from_entries(model, {n: e["entry_step"] for n, e in base.entries.items()},
                                         {n: e["z"] for n, e in base.entries.items()}, steps=500, values=values)
    family = spp.WeightFamily(model, path)
    entered = {n: torch.isfinite(e["entry_step"]) for n, e in path.entries.items()}
    for keep in (0.2, 0.5):  # inside the entered part (70% of the elements entered)
        binary, on_path, auto = (family.select(keep=keep, values=v) for v in ("binary", "path", "auto"))
        assert binary.summary.values == "binary" and on_path.summary.values == auto.summary.values == "path"
        assert _kept_set(binary.masks) == _kept_set(on_path.masks) and len(_kept_set(binary.masks)) > 0
        for n, m in on_path.masks.items():
            assert set(binary.masks[n].unique().tolist()) <= {0.0, 1.0}
            assert torch.equal(m, binary.masks[n] * values[n]) and torch.equal(auto.masks[n], m)
            assert bool(entered[n][m != 0].all())
        assert on_path.summary.params_after == binary.summary.params_after
        assert "the path's final mask values" in str(on_path.summary) and on_path.summary.to_dict()["values"] == "path"
        assert "kept elements hold 1" in str(binary.summary)
        spp.set_masks(model, on_path.masks)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(spp.compress(model, on_path.masks)(x), model(x), atol=1e-5)
    late = family.select(keep=0.95)   # past the entered part: binary, as the walk keeps elements that never entered
    assert late.summary.values == "binary" and all(set(m.unique().tolist()) <= {0.0, 1.0} for m in late.masks.values())
    assert family.select(keep=0.2, round_to=4).summary.values == "path"  # decided before rounding adds elements
    scored = spp.SolutionPath.from_scores(model, {n: v.clone() for n, v in values.items()}, values=values)
    member = spp.WeightFamily(model, scored).select(keep=0.95)   # a scored path has every element entered
    assert member.summary.values == "path" and all(torch.equal(m, (m != 0) * values[n]) for n, m in member.masks.items())


def _searched(model, steps, batch, nu, **settings):
    """The path of ``steps`` LBI steps (spp.search_optimizer with ``settings``) on one random batch."""
    optimizer = spp.search_optimizer(model, nu, **settings)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return spp.SolutionPath.from_optimizer(optimizer, model)


def test_path_keeps_its_mask_values_when_the_model_masks_change():
    """SolutionPath.from_optimizer copies the final masks: setting a member's masks into the model afterwards
    (as the library tour does) must not change what values="path" members read."""
    model = spp.add_masks(tiny_vit())
    path = _searched(model, 3, batch=8, nu=1.0, rho=0.5, lam=0.0)
    before = {n: e["mask"].clone() for n, e in path.entries.items()}
    spp.set_masks(model, {n: torch.zeros_like(p) for n, p in spp.mask_parameters(model)})
    assert all(torch.equal(path.entries[n]["mask"], m) for n, m in before.items())
    assert any((m != 1).any() for m in before.values())


@pytest.mark.parametrize("granularity", ["dim", "head"])
def test_reach_is_the_cost_of_what_entered_and_splits_members_on_and_past_the_path(granularity):
    """``reach``: the kept fraction of the member made of exactly the entered elements. Entry-ranked members up
    to it keep only entered elements; larger ones keep some that never entered. The family table says which."""
    model = spp.add_masks(tiny_vit(), granularity)
    path = fake_path(model, never=0.4)
    family = spp.WeightFamily(model, path)
    entered = {n: torch.isfinite(e["entry_step"]).float() for n, e in path.entries.items()}
    reach = family.reach("params")
    assert 0.3 < reach < 0.9 and reach == family.summarize(entered).kept
    assert family.reach("elements") == pytest.approx(
        sum(float(m.sum()) for m in entered.values()) / sum(m.numel() for m in entered.values()), abs=0.05)
    inside, past = family.select(keep=reach * 0.95), family.select(keep=min(1.0, reach * 1.05))
    assert all(bool(entered[n][m != 0].all()) for n, m in inside.masks.items())
    assert not all(bool(entered[n][m != 0].all()) for n, m in past.masks.items())
    assert inside.summary.on_path and not past.summary.on_path and inside.summary.to_dict()["on_path"]
    every = spp.SolutionPath.from_scores(model, {n: torch.rand(e.shape) for n, e in entered.items()})
    assert spp.WeightFamily(model, every).reach() == 1.0   # a scored path has every element entered
    with pytest.raises(ValueError, match="by='bytes'"):
        family.reach("bytes")


def _settled_path(model):
    """Four MLP neurons of block 0 entered (steps 5, 10, 20, 40); snapshots at steps 10..50 hold their step
    number, the end (step 100) holds 0.5; a member waits 10 steps."""
    entry = {n: torch.full(p.shape, float("inf")) for n, p in spp.mask_parameters(model)}
    entry["blocks.0.mlp.mask"][:4] = torch.tensor([5.0, 10.0, 20.0, 40.0])
    base = spp.SolutionPath.from_entries(model, entry, steps=100,
                                         values={n: torch.full(p.shape, 0.5) for n, p in spp.mask_parameters(model)})
    snapshots = {n: {s: torch.full(p.shape, float(s)) for s in (10, 20, 30, 40, 50)} for n, p in spp.mask_parameters(model)}
    return spp.SolutionPath(base.entries, base.pairs, base.granularity, base.steps, snapshots=snapshots, settle=10.0)


def test_settled_values_are_m_a_settle_time_after_the_members_last_entry(tmp_path):
    """values="settled": the kept elements hold M at the first snapshot at or after (the member's last entry +
    settle); the end's M when no snapshot is that late, for a member past the path's end, or on a path without
    snapshots (a version-1 file reads as one). "auto" takes it on the path; the path file keeps the snapshots."""
    model = spp.add_masks(tiny_vit(), "dim")
    name = "blocks.0.mlp.mask"
    path = _settled_path(model)
    family = spp.WeightFamily(model, path)
    small = family.reach() / 2   # the entry-ranked member that keeps the two earliest neurons
    binary = family.select(keep=small, values="binary")
    assert float(path.entries[name]["entry_step"][binary.masks[name] != 0].max()) == 10.0
    settled = family.select(keep=small, values="settled")
    assert torch.equal(settled.masks[name], binary.masks[name] * 20.0)   # the first snapshot at or after 10 + 10
    assert settled.summary.values == "settled" and "soon after their last element entered" in str(settled.summary)
    auto = family.select(keep=small)
    assert auto.summary.values == "settled" and torch.equal(auto.masks[name], settled.masks[name])
    whole = family.select(keep=family.reach(), values="settled")          # last entry 40: the snapshot at 50
    assert torch.equal(whole.masks[name], (whole.masks[name] != 0) * 50.0)
    late = spp.SolutionPath(path.entries, path.pairs, path.granularity, path.steps, snapshots=path.snapshots, settle=30.0)
    late_member = spp.WeightFamily(model, late).select(keep=family.reach(), values="settled")   # 40 + 30 > 50
    assert torch.equal(late_member.masks[name], (late_member.masks[name] != 0) * 0.5)
    assert late_member.summary.values == "path"                          # what it holds: the end's values
    past = family.select(keep=0.5, values="settled")                     # keeps elements that never entered
    assert all(torch.equal(m, family.select(keep=0.5, values="path").masks[n]) for n, m in past.masks.items())
    assert past.summary.values == "path"
    # the path file keeps snapshots and settle; a version-1 file (no snapshots) reads its settled values at the end
    path.save(str(tmp_path))
    loaded = spp.SolutionPath.load(str(tmp_path))
    assert loaded.settle == 10.0 and sorted(loaded.snapshots[name]) == [10, 20, 30, 40, 50]
    assert torch.equal(spp.WeightFamily(model, loaded).select(keep=small, values="settled").masks[name],
                       settled.masks[name])
    from safetensors.torch import load_file, save_file
    info = json.loads((tmp_path / "path.json").read_text())
    assert info["version"] == 2
    tensors = {k: v for k, v in load_file(str(tmp_path / "path.safetensors")).items() if "/mask@" not in k}
    save_file(tensors, str(tmp_path / "path.safetensors"))
    (tmp_path / "path.json").write_text(json.dumps({k: v for k, v in {**info, "version": 1}.items() if k != "settle"}))
    old = spp.SolutionPath.load(str(tmp_path))
    assert old.snapshots == {} and old.settle == 0.0
    assert torch.equal(spp.WeightFamily(model, old).select(keep=small, values="settled").masks[name],
                       binary.masks[name] * 0.5)
    (tmp_path / "path.json").write_text(json.dumps({**info, "version": 3}))
    with pytest.raises(ValueError, match="version 3 path; this spp reads up to version 2"):
        spp.SolutionPath.load(str(tmp_path))


def test_a_search_path_carries_the_optimizers_snapshots():
    """SolutionPath.from_optimizer reads the snapshots and the settle time 3/ρ off spp.LBI; a settled member of
    a real search holds the mask values of a snapshot, not the end's."""
    torch.manual_seed(0)
    model = spp.add_masks(tiny_vit(), "dim")
    path = _searched(model, 60, batch=16, nu=2.0, rho=0.1, lam=0.05)   # 3/ρ = 30 steps, a snapshot every 2
    assert path.settle == pytest.approx(30.0)
    assert "30 snapshots of the masks (settle 30 steps)" in repr(path)
    assert all(sorted(s) == list(range(2, 61, 2)) for s in path.snapshots.values())
    family = spp.WeightFamily(model, path)
    member = family.select(keep=family.reach() / 2, values="settled")
    last = max(float(path.entries[n]["entry_step"][m != 0].max()) for n, m in member.masks.items() if (m != 0).any())
    at = path.values_at(last + path.settle)
    assert last + path.settle < 60, "the tiny search should leave a settled member before its end"
    assert all(torch.equal(m, (m != 0) * at[n]) for n, m in member.masks.items())
    assert not all(torch.equal(m, family.select(keep=family.reach() / 2, values="path").masks[n])
                   for n, m in member.masks.items())
