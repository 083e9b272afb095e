"""The search defaults on a model that has memorised its training data, and member values chosen on held-out data."""
import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

import spp
from spp.cli import main

from helpers import lbi_steps, tiny_vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke_synthetic.yaml")


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.fixture(scope="module")
def memorised():
    """A tiny ViT trained on 64 images with random labels until its training loss is near 0, and 64
    other images it never saw (on which its loss is that of a guess)."""
    torch.manual_seed(0)
    model = spp.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2,
                             num_heads=4, num_classes=10)
    x, y = _images(64, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(300):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 2e-3:
            break
    assert loss.item() < 1e-2, "the fixture must have memorised its images"
    return model.eval(), (x, y), _images(64, 1)


def _batches(data, batch=16):
    x, y = data
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]


def _search(model, nu, data, steps=40):
    masked = spp.add_masks(copy.deepcopy(model), "dim")
    lbi_steps(masked, spp.search_optimizer(masked, nu), _batches(data), steps, F.cross_entropy)
    return torch.cat([p.detach().flatten() for _, p in spp.mask_parameters(masked)])


@pytest.mark.slow
def test_nu_from_held_out_batches_does_not_blow_up_on_a_memorised_model(memorised):
    model, train, held_out = memorised
    masked = spp.add_masks(copy.deepcopy(model), "dim")
    nu_train = spp.calibrate_nu(masked, _batches(train), batches=4)
    nu_held_out = spp.calibrate_nu(masked, _batches(held_out), batches=4)
    (a,), (b,) = set(nu_train.values()), set(nu_held_out.values())
    # near-zero training loss: near-zero mask gradients, so ν from training batches is far too large
    assert a > 20 * b
    # ... and the step ρν·g it sets throws the masks far from [0, 1] once the loss moves; ν from
    # held-out batches keeps them in a mask's range
    assert _search(model, nu_train, train).abs().max() > 5
    assert _search(model, nu_held_out, train).abs().max() < 2


def test_spp_search_calibrates_nu_on_the_validation_split(tmp_path, capsys):
    nus = {}
    for nu_data in ("val", "train"):
        out = str(tmp_path / nu_data)
        assert main(["search", SMOKE, f"output={out}", "search.steps=2", f"search.nu_data={nu_data}"]) == 0
        nus[nu_data] = spp.SolutionPath.load(out).meta["hyperparameters"]["nu"]
        printed = capsys.readouterr().out
        assert ("nu: calibrated on 2 batches of the dataset's validation set (32 images)" in printed) == (nu_data == "val")
    assert nus["val"] != pytest.approx(nus["train"])
    out = str(tmp_path / "held_out")   # held out of the training images: said so
    assert main(["search", SMOKE, f"output={out}", "search.steps=2", "data.val_fraction=0.25"]) == 0
    assert "32 training images held out (data.val_fraction=0.25)" in capsys.readouterr().out


def test_a_validation_split_too_small_to_calibrate_on_is_an_error_line(tmp_path, capsys):
    assert main(["search", SMOKE, f"output={tmp_path}", "data.synthetic_size=20", "data.val_fraction=0.05"]) == 2
    err = capsys.readouterr().err
    assert "spp search: error: search.nu_data=val: the validation split has 1 images" in err
    assert "search.nu_data=train" in err and "Traceback" not in err


def test_bad_input_is_an_error_line_not_a_traceback(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("amp=fp16 is valid where CUDA is")
    assert main(["search", SMOKE, f"output={tmp_path}", "amp=fp16"]) == 2
    assert "spp search: error: amp=fp16 needs CUDA" in capsys.readouterr().err
    assert main(["retrain", SMOKE, f"output={tmp_path}", "train.opt=nope"]) == 2
    assert "spp retrain: error: " in capsys.readouterr().err
    assert main(["search", SMOKE, f"output={tmp_path}", "search.nu_data=test"]) == 2
    assert "search.nu_data='test': choose one of val, train" in capsys.readouterr().err


def _scored_family():
    """A family whose entry order and final-z order disagree, its path values all above 1."""
    model = spp.add_masks(tiny_vit(), "dim")
    g = torch.Generator().manual_seed(0)
    shapes = {n: p.shape for n, p in spp.mask_parameters(model)}
    entry = {n: torch.randint(1, 100, s, generator=g).float() for n, s in shapes.items()}
    z = {n: torch.rand(s, generator=g) for n, s in shapes.items()}
    values = {n: 1 + torch.rand(s, generator=g) for n, s in shapes.items()}
    return spp.WeightFamily(tiny_vit(), spp.SolutionPath.from_entries(model, entry, z, values=values))


def test_select_best_takes_the_reading_that_scores_highest_and_the_first_on_a_tie():
    family = _scored_family()
    mean_value = lambda m: float(torch.cat([v[v != 0] for v in m.masks.values()]).mean())  # noqa: E731
    path = family.select_best(mean_value, remove=0.5)               # path values all above 1: above binary
    # a path without snapshots reads its settled values at the end: the same masks as path, scored once, and the
    # member says what it holds (the end's values)
    assert path.summary.values == "path" and path.summary.scores["entry, path"] > path.summary.scores["entry, binary"] == 1.0
    assert path.summary.scores["entry, settled"] == path.summary.scores["entry, path"]
    assert set(path.summary.scores) == {f"{r}, {v}" for r in ("entry", "z") for v in ("binary", "settled", "path")}
    binary = family.select_best(lambda m: -mean_value(m), remove=0.5, ranks=("entry",))
    assert (binary.summary.rank, binary.summary.values) == ("entry", "binary") and len(binary.summary.scores) == 3
    tie = family.select_best(lambda m: 1.0, remove=0.5)
    assert (tie.summary.rank, tie.summary.values) == ("entry", "binary")
    same = family.select(remove=0.5, values="binary").masks
    assert all(torch.equal(same[n], tie.masks[n]) for n in same)      # the budget walk is select's
    # the z ranking, where a score prefers its members
    z_masks = family.select(remove=0.5, rank="z", values="binary").masks
    prefers_z = lambda m: float(sum((m.masks[n] != 0).eq(z_masks[n] != 0).sum() for n in z_masks))  # noqa: E731
    assert family.select_best(prefers_z, remove=0.5, values=("binary",)).summary.rank == "z"
    calls = []
    family.select_best(lambda m: calls.append(1) or 0.0, keep=1.0)   # every reading of the whole model: one member
    assert len(calls) == 2                                  # binary and path (= settled) masks differ; ranks do not
    assert json.dumps(tie.summary.to_dict())                          # scores are plain numbers
    assert family.select_best(lambda m: -mean_value(m), remove=0.5, values="path").summary.values == "path"
    with pytest.raises(ValueError, match="tries the rankings itself"):
        family.select_best(mean_value, remove=0.5, rank="z")


def test_family_and_export_choose_values_on_the_validation_split(tmp_path):
    out = str(tmp_path / "run")
    assert main(["search", SMOKE, f"output={out}"]) == 0
    assert main(["family", SMOKE, f"output={out}"]) == 0
    rows = json.load(open(os.path.join(out, "family_eval.json")))
    for row in rows:   # the row's top-1 is its chosen reading's, never below the plain reading's (entry, binary)
        assert row["top1"] == row[f"top1 {row['rank']}, {row['values']}"] >= row["top1 entry, binary"]
        assert row["top1"] == max(row[f"top1 {r}, {v}"] for r in ("entry", "z") for v in ("binary", "settled", "path"))
    assert main(["export", SMOKE, f"output={out}", "export.remove=0.6"]) == 0
    summary = json.load(open(os.path.join(out, "pruned", "summary.json")))
    assert len(summary["scores"]) == 6
    assert summary["scores"][f"{summary['rank']}, {summary['values']}"] == max(summary["scores"].values())
    assert main(["export", SMOKE, f"output={out}", "export.remove=0.6", "export.rank=entry", "export.values=path",
                 f"export.out={out}/plain"]) == 0
    plain = json.load(open(os.path.join(out, "plain", "summary.json")))
    assert (plain["rank"], plain["values"], plain["scores"]) == ("entry", "path", {})
