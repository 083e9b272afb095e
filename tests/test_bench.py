"""spp.bench, the harness the benchmark scripts share: batches over epochs, the finetune recipe, the loop over methods
and seeds, and the tables."""
import json

import torch

import spp
from spp.bench import MaskedBench, budget_section, finetune, run_methods, seed_cells, take
from spp.tasks import Classification

from helpers import tiny_vit


def test_take_runs_epoch_after_epoch_and_says_where_each_starts():
    starts = []

    def loader_at(done):
        starts.append(done)
        return [f"{done}+{i}" for i in range(3)]

    assert list(take(loader_at, 7)) == ["0+0", "0+1", "0+2", "3+0", "3+1", "3+2", "6+0"]
    assert starts == [0, 3, 6]


def _batches(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]


def test_masked_bench_members_meet_the_budget_and_finetune_leaves_the_member_alone():
    bench = MaskedBench(tiny_vit(), Classification())
    path = spp.SolutionPath.from_scores(bench.masked, spp.criteria.magnitude_scores(bench.masked))
    members = bench.members(path, [0.3, 0.6])
    dense = spp.count_params(bench.dense)
    for r, (model, info) in members.items():
        assert abs((dense - info["params"]) / bench.prunable - r) < 0.05 and info["params"] == spp.count_params(model)
    model = members[0.3][0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    out = finetune(bench, model, _batches(), 6, 1e-3, weight_decay=0.05, cosine=True, at=[2],
                   evaluate_at=lambda m: seen.append(m.training) or bench.loss(m, _batches(1, 1)[0]).item())
    assert sorted(out) == [2, 6] and all(isinstance(v, float) for v in out.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # a copy was trained


def test_run_methods_times_each_method_copies_one_rankings_and_writes_after_every_seed(tmp_path):
    calls = []

    def runner(bench, seed, removed):
        calls.append(seed)
        return {r: (None, {"params": int(100 * (1 - r))}) for r in removed}, {"shared seconds": 5.0}

    results = {"runs": {}}
    path = str(tmp_path / "r.json")
    run_methods(None, results, path, ["a", "once"], [0, 1], [0.5], {"a": runner, "once": runner},
                lambda method, seed, r, model, info: {**info, "test": seed + r}, one_ranking=("once",))
    assert calls == [0, 1, 0]                                       # "once" ran at the first seed only
    assert results["runs"]["once"]["1"] is results["runs"]["once"]["0"]
    assert results["runs"]["a"]["1"]["0.5"] == {"params": 50, "test": 1.5}
    assert results["runs"]["a"]["0"]["time"] >= 5.0                 # the shared seconds count for the method
    assert json.load(open(path))["runs"]["a"]["1"]["0.5"]["test"] == 1.5
    cells = seed_cells(results["runs"]["a"], [0, 1], [0.5], lambda row: row["test"])
    assert cells == ["1.00 ± 0.71"]
    lines = budget_section("no finetuning", [0, 1], [0.5], [("a", cells, [1.0, 3.0]), "| b | failed | |"])
    assert lines == ["**no finetuning** (seeds 0, 1)", "", "| method | −50% | time for all budgets (s) |", "|---|---|---|",
                     "| a | 1.00 ± 0.71 | 2 |", "| b | failed | |", ""]
