import copy
import math
import warnings

import pytest
import torch

import spp
from spp.optim import LBI


def reference_lbi(m0, grads, lr, kappa, nu, lam, shrink="two_sided"):
    """The LBI equations of docs/method.md, written out in float64."""
    m, z, gamma = m0.clone().double(), torch.zeros_like(m0).double(), torch.zeros_like(m0).double()
    entry = torch.full_like(m, float("inf"))
    for k, g in enumerate(grads, start=1):
        d = m - gamma
        z = z + lr / nu * d
        m = m - kappa * lr * (g.double() + d / nu)
        if shrink == "two_sided":
            gamma = kappa * torch.sign(z) * torch.clamp(z.abs() - lam, min=0)
        else:
            gamma = kappa * torch.clamp(z - lam, min=0)
        entry = torch.where((gamma != 0) & torch.isinf(entry), torch.full_like(entry, k), entry)
    return m, z, gamma, entry


def run_lbi(m0, grads, foreach, **kw):
    p = torch.nn.Parameter(m0.clone())
    opt = LBI([p], foreach=foreach, **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p, opt


@pytest.mark.parametrize("shrink", ["two_sided", "one_sided"])
@pytest.mark.parametrize("foreach", [False, True])
def test_matches_float64_reference(shrink, foreach):
    torch.manual_seed(0)
    m0 = torch.ones(50, dtype=torch.float64)
    grads = [torch.randn(50, dtype=torch.float64) * 0.05 for _ in range(30)]
    hp = dict(lr=0.5, kappa=4.0, nu=2.0, lam=0.3)
    p, opt = run_lbi(m0, grads, foreach, shrink=shrink, **hp)
    m, z, gamma, entry = reference_lbi(m0, grads, shrink=shrink, **hp)
    state = opt.state[p]
    torch.testing.assert_close(p.detach(), m)
    torch.testing.assert_close(state["z"], z)
    torch.testing.assert_close(state["gamma"], gamma)
    assert torch.equal(state["entry_step"], entry)
    assert torch.isfinite(entry).any() and torch.isinf(entry).any(), "test must see entries and non-entries"


@pytest.mark.parametrize("preconditioner", ["none", "adam"])
def test_foreach_equals_for_loop(preconditioner):
    torch.manual_seed(1)
    shapes = [(7,), (3, 4), (16,)]
    params = {f: [torch.nn.Parameter(torch.ones(s, dtype=torch.float64)) for s in shapes] for f in (False, True)}
    opts = {f: LBI(params[f], lr=0.3, kappa=5.0, nu=1.0, lam=0.2, preconditioner=preconditioner, foreach=f)
            for f in (False, True)}
    for _ in range(12):
        grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
        for f in (False, True):
            for p, g in zip(params[f], grads):
                p.grad = g.clone()
            opts[f].step()
    for a, b in zip(params[False], params[True]):
        torch.testing.assert_close(a, b)
        for key in ("z", "gamma", "entry_step"):
            torch.testing.assert_close(opts[False].state[a][key], opts[True].state[b][key])
        if preconditioner == "adam":
            torch.testing.assert_close(opts[False].state[a]["exp_avg_sq"], opts[True].state[b]["exp_avg_sq"])


def test_adam_preconditioner_uses_adam_direction():
    g = torch.tensor([0.001, -2.0], dtype=torch.float64)
    p, _ = run_lbi(torch.ones(2, dtype=torch.float64), [g], False, lr=0.1, kappa=1.0, nu=1e9, lam=1.0,
                   preconditioner="adam", eps=0.0)
    # first Adam step: m̂/√v̂ = sign(g); the coupling is zero at step one (M - Γ = 1, ν huge)
    torch.testing.assert_close(p.detach(), torch.ones(2, dtype=torch.float64) - 0.1 * torch.sign(g), atol=1e-8, rtol=0)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(2)
    grads = [torch.randn(20) for _ in range(10)]
    p, opt = run_lbi(torch.ones(20), grads[:5], True, lr=1.0, kappa=3.0, nu=1.0, lam=0.5, preconditioner="adam")
    saved_p, saved_state = p.detach().clone(), copy.deepcopy(opt.state_dict())
    for g in grads[5:]:
        p.grad = g.clone()
        opt.step()
    q = torch.nn.Parameter(saved_p)
    opt2 = LBI([q], lr=99.0)  # hyperparameters come back from the state dict
    opt2.load_state_dict(saved_state)
    for g in grads[5:]:
        q.grad = g.clone()
        opt2.step()
    torch.testing.assert_close(p, q)
    for key in ("z", "gamma", "entry_step", "exp_avg"):
        torch.testing.assert_close(opt.state[p][key], opt2.state[q][key])


def _snapshots(opt, p):
    return {s: opt.state[p][f"mask@{s}"] for s in spp.optim.snapshot_steps(opt.state[p])}


@pytest.mark.parametrize("foreach", [False, True])
def test_snapshots_hold_the_mask_at_their_steps_and_thin_to_their_limit(foreach):
    """A snapshot every ``snapshot_every`` steps, each the mask after its step; past ``snapshots`` of them the
    interval doubles and the snapshots off the new grid go, so a run of any length keeps at most that many."""
    torch.manual_seed(3)
    p = torch.nn.Parameter(torch.ones(6))
    opt = LBI([p], lr=1.0, kappa=2.0, nu=5.0, lam=0.2, snapshots=4, snapshot_every=3, foreach=foreach)
    after = {}
    for step in range(1, 31):
        p.grad = torch.randn(6)
        opt.step()
        after[step] = p.detach().clone()
        if step == 12:
            assert sorted(_snapshots(opt, p)) == [3, 6, 9, 12]
        if step == 15:   # 5 multiples of 3: the interval doubles to 6
            assert sorted(_snapshots(opt, p)) == [6, 12]
    snaps = _snapshots(opt, p)
    assert sorted(snaps) == [12, 24]   # 30 steps: 10 multiples of 3, 5 of 6, 2 of 12
    for step, mask in snaps.items():
        assert torch.equal(mask, after[step]) and not torch.equal(mask, after[30])
    none = LBI([torch.nn.Parameter(torch.ones(2))], snapshots=0)
    none.param_groups[0]["params"][0].grad = torch.ones(2)
    none.step()
    assert spp.optim.snapshot_steps(next(iter(none.state.values()))) == []


def test_snapshot_interval_defaults_to_a_fifth_of_the_masks_time_constant():
    """Default interval 0.2/ρ steps with ρ = κα/ν: 10 at spp search's ρ = 0.02; settle_steps is 3/ρ."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = LBI([p], lr=0.6, kappa=10.0, nu=300.0)    # ρ = 0.02
    assert LBI.settle_steps(opt.param_groups[0]) == pytest.approx(150.0)
    for _ in range(25):
        p.grad = torch.ones(3)
        opt.step()
    assert sorted(_snapshots(opt, p)) == [10, 20]


def test_snapshots_survive_a_state_dict_round_trip():
    """A run stopped at step 14 and resumed from its state dict keeps the snapshots the whole run keeps."""
    torch.manual_seed(4)
    grads = [torch.randn(8) for _ in range(30)]
    whole_run, opt = run_lbi(torch.ones(8), grads, True, lr=1.0, kappa=2.0, nu=5.0, snapshots=4, snapshot_every=3)
    p, first = run_lbi(torch.ones(8), grads[:14], True, lr=1.0, kappa=2.0, nu=5.0, snapshots=4, snapshot_every=3)
    q = torch.nn.Parameter(p.detach().clone())
    second = LBI([q])
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    for g in grads[14:]:
        q.grad = g.clone()
        second.step()
    expected, resumed = _snapshots(opt, whole_run), _snapshots(second, q)
    assert sorted(resumed) == sorted(expected) == [12, 24]
    assert all(torch.equal(resumed[s], expected[s]) for s in expected)


@pytest.mark.parametrize("kwargs,word", [
    (dict(lr=0.0), "lr"), (dict(lr=-1.0), "lr"), (dict(kappa=0.0), "kappa"), (dict(nu=-2.0), "nu"),
    (dict(lam=-0.1), "lam"), (dict(preconditioner="sgd"), "preconditioner"), (dict(shrink="soft"), "shrink"),
    (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=-1.0), "eps"), (dict(snapshots=-1), "snapshots"),
    (dict(snapshot_every=0), "snapshot_every"),
])
def test_bad_hyperparameters_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        LBI([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_bad_param_group_value_raises():
    with pytest.raises(ValueError, match="nu"):
        LBI([{"params": [torch.nn.Parameter(torch.ones(2))], "nu": 0.0}])


def test_per_group_hyperparameters():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = LBI([{"params": [a]}, {"params": [b], "lam": 100.0}], lr=1.0, kappa=1.0, nu=0.5, lam=0.01)
    for _ in range(5):
        a.grad, b.grad = -torch.ones(3), -torch.ones(3)
        opt.step()
    assert torch.isfinite(opt.state[a]["entry_step"]).all()
    assert torch.isinf(opt.state[b]["entry_step"]).all()


def test_sparse_regression_true_support_enters_first():
    """y = X β with a sparse β: the true features enter the path before the noise ones."""
    torch.manual_seed(0)
    n, d, support = 400, 40, [3, 11, 25, 31]
    X = torch.randn(n, d)
    beta = torch.zeros(d)
    beta[support] = torch.tensor([1.5, -2.0, 1.0, 2.5])
    y = X @ beta + 0.1 * torch.randn(n)
    w = torch.nn.Parameter(torch.zeros(d))
    opt = LBI([w], lr=0.01, kappa=10.0, nu=1.0, lam=1.0)
    for _ in range(3000):
        opt.zero_grad()
        loss = 0.5 * ((X @ w - y) ** 2).mean()
        loss.backward()
        opt.step()
    entry = opt.state[w]["entry_step"]
    first = set(torch.argsort(entry)[:len(support)].tolist())
    assert first == set(support)
    assert entry[support].max() < entry[[i for i in range(d) if i not in support]].min()
    torch.testing.assert_close(w.detach()[support], beta[support], atol=0.1, rtol=0)


def test_skips_params_without_grad_and_lbi_is_exported():
    assert spp.LBI is LBI
    a = torch.nn.Parameter(torch.ones(2))
    opt = LBI([a])
    opt.step()
    assert len(opt.state) == 0


def test_closure_step_returns_the_loss_and_steps_as_without_one():
    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), torch.randn(16)
    w1, w2 = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt1, opt2 = LBI([w1], lr=0.1, nu=10), LBI([w2], lr=0.1, nu=10)

    def closure():
        opt2.zero_grad()
        loss = ((x @ w2 - y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        opt1.zero_grad()
        expected = ((x @ w1 - y) ** 2).mean()
        expected.backward()
        opt1.step()
        assert opt2.step(closure).item() == expected.item()
    assert torch.equal(w1, w2) and torch.equal(opt1.state[w1]["gamma"], opt2.state[w2]["gamma"])


def test_nu_calibration_shares_nu_within_its_groups():
    from spp.calibrate import lbi_groups, nu_from_rms

    # two blocks; gradient RMS and element counts per mask
    rms = {"b0.qk": (2.0, 8), "b0.v": (1.0, 8), "b0.mlp": (0.1, 32), "b1.qk": (4.0, 8), "b1.v": (1.0, 8), "b1.mlp": (0.1, 32)}
    pairs = {n: (n.split(".")[1], int(n[1])) for n in rms}
    pooled = nu_from_rms(rms, 3.0, lambda n: "all")
    rms_all = math.sqrt(sum(r * r * k for r, k in rms.values()) / sum(k for _, k in rms.values()))
    assert list(pooled.values()) == pytest.approx([3.0 / rms_all] * 6)
    per_pair = nu_from_rms(rms, 3.0, lambda n: pairs[n][0])
    assert per_pair["b0.qk"] == per_pair["b1.qk"] == pytest.approx(3.0 / math.sqrt((4 + 16) / 2))
    assert per_pair["b0.mlp"] == pytest.approx(30.0) and per_pair["b0.v"] == pytest.approx(3.0)
    per_mask = nu_from_rms(rms, 3.0, lambda n: n)
    assert per_mask["b1.qk"] == pytest.approx(0.75)

    masks = [(n, torch.nn.Parameter(torch.ones(k))) for n, (_, k) in rms.items()]
    for calibration, count in (("pooled", 1), ("pair", 3), ("mask", 6)):
        groups = lbi_groups(masks, calibration, pairs, lr=1.0)
        assert len(groups) == count and sum(len(g["params"]) for g in groups) == 6
        assert all(g["lr"] == 1.0 for g in groups)
    pair_groups = lbi_groups(masks, "pair", pairs, per_pair)
    assert [g["nu"] for g in pair_groups] == [per_pair["b0.qk"], per_pair["b0.v"], per_pair["b0.mlp"]]
    with pytest.raises(ValueError, match="nu differs between masks that per='pooled' puts in one group"):
        lbi_groups(masks, "pooled", pairs, per_pair)
    with pytest.raises(ValueError, match="choose one of pooled, pair, mask"):
        lbi_groups(masks, "type", pairs)


def tiny_masked_vit():
    torch.manual_seed(0)
    model = spp.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2,
                             num_heads=4, num_classes=10)
    return spp.add_masks(model)


def test_calibrate_nu_by_hand_and_search_optimizer_groups():
    model = tiny_masked_vit()
    batches = [(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))) for _ in range(3)]
    named = spp.mask_parameters(model)
    squares, count = 0.0, sum(p.numel() for _, p in named)
    for x, y in batches:
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), [p for _, p in named])
        squares += sum(float(g.pow(2).sum()) for g in grads)
    rms = math.sqrt(squares / (3 * count))
    nu = spp.calibrate_nu(model, batches, scale=1.5, reference_batch=128)
    # sampling noise: the per-batch RMS at batch 32 is twice what it would be at 128; taken as at 128 it halves, ν doubles
    assert list(nu.values()) == [pytest.approx(1.5 / rms * 2.0, rel=1e-5)] * len(named)
    assert spp.calibrate_nu(model, batches[:1], batches=5, reference_batch=None)  # fewer batches than asked: fine
    assert set(spp.calibrate_nu(model, batches, preconditioner="adam", scale=2.0).values()) == {2.0}
    per_pair = spp.calibrate_nu(model, batches, per="pair")
    assert len(set(per_pair.values())) == 3

    optimizer = spp.search_optimizer(model, nu)
    (group,) = optimizer.param_groups
    assert group["lr"] == pytest.approx(0.02 * group["nu"] / 10.0) and (group["kappa"], group["lam"]) == (10.0, 0.4)
    groups = spp.search_optimizer(model, per_pair, per="pair", rho=0.05, lam=0.1).param_groups
    assert len(groups) == 3 and all(g["lr"] == pytest.approx(0.05 * g["nu"] / 10.0) for g in groups)
    assert spp.search_optimizer(model, 100.0, lr=0.5).param_groups[0]["lr"] == 0.5
    with pytest.raises(ValueError, match="pass the per= that calibrate_nu was given"):
        spp.search_optimizer(model, per_pair)               # ν per pair type, grouped as one
    with pytest.raises(ValueError, match="no value for 1 of the model's masks"):
        spp.search_optimizer(model, {n: v for n, v in list(nu.items())[1:]})
    with pytest.raises(TypeError, match=r"data must yield \(images, targets\) pairs; batch 0 is a dict"):
        spp.calibrate_nu(model, [{"image": x, "label": y} for x, y in batches])
    with pytest.raises(ValueError, match="call spp.add_masks"):
        spp.calibrate_nu(spp.remove_masks(model), batches)


def test_dense_start_adds_one_over_kappa_to_z():
    """With no loss gradient, the decay from M = 1 brings z to 1/κ (why the default κλ is above 1)."""
    kappa, rho, nu = 10.0, 0.01, 3000.0
    p = torch.nn.Parameter(torch.ones(3))
    opt = spp.LBI([p], lr=rho * nu / kappa, kappa=kappa, nu=nu, lam=1.0 / kappa)
    for step in range(1000):
        p.grad = torch.tensor([0.0, 0.0, -1e-4])   # the third mask is held up by the loss (M ≈ -ν g = 0.3)
        opt.step()
        if step == 137:
            assert torch.allclose(opt.state[p]["z"][0], torch.tensor(0.075), atol=1e-3)   # 3/4 of λ by step 138
    z, entry = opt.state[p]["z"], opt.state[p]["entry_step"]
    assert torch.allclose(z[:2], torch.full((2,), 1.0 / kappa), atol=1e-4) and torch.isinf(entry[:2]).all()
    assert entry[2] < 200   # gradient support on top of the transient crosses κλ = 1 early


def test_calibrating_on_batches_the_model_fits_exactly_warns_with_the_fix():
    model = tiny_masked_vit()
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")    # held-out-like batches (loss ~2.3): no warning
        held_out = spp.calibrate_nu(model, batches)
    fitted = lambda out, y: 1e-3 * torch.nn.functional.cross_entropy(out, y)   # the loss of memorised data
    with pytest.warns(UserWarning, match=r"mean loss on the calibration batches is 0\.00\d+.*search\.nu_data=val"):
        memorised = spp.calibrate_nu(model, batches, fitted)
    assert all(memorised[k] > 100 * held_out[k] for k in held_out)   # the ν it warns of: 1000 times too large


@pytest.mark.parametrize("foreach", [False, True])
def test_clip_bounds_the_loss_gradients_step_and_leaves_small_gradients_alone(foreach):
    nu, lr, kappa = 100.0, 0.2, 10.0        # ρ = κα/ν = 0.02
    mask = torch.nn.Parameter(torch.ones(4))
    opt = spp.LBI([mask], lr=lr, kappa=kappa, nu=nu, lam=0.4, clip=3.0, foreach=foreach, snapshots=0)
    mask.grad = torch.tensor([1e3, -1e3, 1e-3, 0.0])        # two far beyond clip/ν = 0.03, two within it
    opt.step()
    rho = kappa * lr / nu
    coupling = rho * 1.0                                     # M - Γ = 1 at the first step
    expected = torch.tensor([1 - rho * 3.0, 1 + rho * 3.0, 1 - kappa * lr * 1e-3, 1.0]) - coupling
    torch.testing.assert_close(mask.detach(), expected)
    with pytest.raises(ValueError, match="Invalid clip=0"):
        spp.LBI([mask], clip=0)


def test_auto_settings_take_the_model_familys():
    """search_optimizer's clip="auto" and calibrate_nu's scale="auto" (spp search's defaults) take the decoder LLMs'
    bound 10 and nu_scale 4, and leave the ViT and CLIP unbounded at nu_scale 1.5; a value given explicitly wins."""
    transformers = pytest.importorskip("transformers", reason="the decoder family needs transformers")
    from helpers import tiny_clip, tiny_vit

    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32))
    vit, clip = tiny_vit(), tiny_clip()
    for model in (llama, vit, clip):
        spp.add_masks(model)
    assert spp.calibrate.DEFAULTS["clip"] == spp.calibrate.DEFAULTS["nu_scale"] == "auto"
    assert {g["clip"] for g in spp.search_optimizer(llama, 100.0).param_groups} == {10.0}
    for model in (vit, clip):
        assert {g["clip"] for g in spp.search_optimizer(model, 100.0).param_groups} == {None}
    assert [spp.calibrate.search_nu_scale(m) for m in (llama, vit, clip)] == [4.0, 1.5, 1.5]
    # with the Adam direction nu is nu_scale itself: what "auto" resolves to, read without a gradient pass
    assert set(spp.calibrate_nu(llama, [], preconditioner="adam").values()) == {4.0}
    assert set(spp.calibrate_nu(vit, [], preconditioner="adam", scale=2.0).values()) == {2.0}
    assert {g["clip"] for g in spp.search_optimizer(llama, 100.0, clip=None).param_groups} == {None}
    assert {g["clip"] for g in spp.search_optimizer(vit, 100.0, clip=3.0).param_groups} == {3.0}
