"""The benchmark scripts run end to end on a tiny model, and their rankings mean what they say."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

import spp

from helpers import TINY, fake_fashion_mnist, tiny_vit
from spp.criteria import magnitude_scores

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # a dataclass in the script looks its module up there
    spec.loader.exec_module(module)
    return module


def _batches(n=3, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["off", "bf16"])   # bf16: the autocast path that scripts/gpu_check.sh runs on CUDA
def test_speed_benchmark_runs_on_a_tiny_model(tmp_path, amp):
    out = tmp_path / "speed.json"
    model_args = [f"{k}={v}" for k, v in TINY.items() if k != "img_size"]
    command = [sys.executable, os.path.join(SCRIPTS, "benchmark_speed.py"), "--model", "vit_tiny_patch16_224",
               "--img-size", "32", "--model-args", *model_args, "--batch-sizes", "1", "4", "--train-batch", "4",
               "--repeats", "1", "--warmup", "0", "--amp", amp, "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["amp"] == amp
    assert report["run"]["torch"] == torch.__version__ and report["run"]["device"] == "cpu"   # what measured it
    assert report["cpu_allocator"] == ("keep" if sys.platform.startswith("linux") else "system")
    assert report["search_step_s"] > 0 and report["finetune_step_s"] > 0 and report["frozen_step_s"] > 0
    assert 0 < report["optimizer_share_of_search_step"] < 1
    assert report["memory"]["search_MiB"] is not None and report["memory"]["finetune_MiB"] is not None
    rows = {(r["batch"], r["model"]): r for r in report["latency"]}
    assert set(rows) == {(b, m) for b in (1, 4) for m in ("dense", "-30% params", "-50% params", "-70% params",
                                                           "-70% params, unpadded")}
    ratios = [rows[(4, f"-{p}% params")]["flops_ratio"] for p in (30, 50, 70)]
    assert 1 < ratios[0] < ratios[1] < ratios[2]  # more removed, fewer FLOPs
    assert all(isinstance(r["page_faults"], int) and r["page_faults"] >= 0 for r in rows.values())
    breakdown = report["breakdown"]
    assert breakdown["batch"] == 4 and set(breakdown["ms"]) == {"dense", "-30% params", "-50% params", "-70% params"}
    assert breakdown["ms"]["dense"]["linear layers"] > 0 and breakdown["ms"]["dense"]["attention"] > 0
    assert set(breakdown["realised_bound_from_fixed_work"]) == {"-30% params", "-50% params", "-70% params"}
    assert "where the time goes" in result.stdout
    assert (tmp_path / "speed.png").stat().st_size > 0
    # --plot-from draws saved runs without measuring; a file that is not there is named
    replot = subprocess.run([sys.executable, os.path.join(SCRIPTS, "benchmark_speed.py"), "--plot-from", str(out),
                             "--out", str(tmp_path / "again.json")], capture_output=True, text=True, timeout=120)
    assert replot.returncode == 0, replot.stderr[-2000:]
    assert (tmp_path / "again.png").stat().st_size > 0 and not (tmp_path / "again.json").exists()
    missing = subprocess.run([sys.executable, os.path.join(SCRIPTS, "benchmark_speed.py"), "--plot-from",
                              str(tmp_path / "nope.json")], capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "nope.json not found" in missing.stderr


def test_torch_pruning_member_meets_the_budget_and_keeps_the_residual_width():
    pytest.importorskip("torch_pruning", reason="Torch-Pruning is in the [test] and [bench] extras: pip install -e .[test]")
    bench = _script("benchmark_quality")
    dense = tiny_vit()
    target = int(0.6 * spp.count_params(dense))
    for kind, grads in (("magnitude", None), ("taylor", bench.taylor_gradients(dense, _batches(2)))):
        member = bench.tp_member(dense, torch.randn(2, 3, 32, 32), target, kind, True, grads)
        assert spp.count_params(member) <= target
        assert member.blocks[0].attn.proj.out_features == TINY["embed_dim"]
        assert member(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def _torch_pruning_llama(**sizes):
    """benchmark_llm's module, a tiny random 2-layer Llama of ``sizes`` and a 16-token input (Torch-Pruning's tests)."""
    pytest.importorskip("torch_pruning", reason="Torch-Pruning is in the [test] and [bench] extras: pip install -e .[test]")
    transformers = pytest.importorskip("transformers", reason="the LLM benchmark needs transformers")
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, num_hidden_layers=2, max_position_embeddings=64, **sizes)).eval()
    return _script("benchmark_llm"), dense, torch.randint(0, 64, (1, 16))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_torch_pruning_prunes_a_rope_llama(kv_heads):
    """benchmark_llm's Torch-Pruning run on a tiny Llama finishes (its dependency search alone does not through
    RoPE) and gives a working model, the hidden size kept: whole heads and MLP channels go with 4 key/value heads;
    with 2 shared by the 4 query heads, Torch-Pruning 1.6.1 keeps attention whole and prunes the MLP only."""
    import signal

    bench, dense, ids = _torch_pruning_llama(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                             num_key_value_heads=kv_heads)
    signal.signal(signal.SIGALRM, bench._alarm)
    signal.alarm(60)   # a TimeoutError, not a hung suite, if the dependency search stops finishing
    try:
        small = bench._torch_pruning(dense, 0.5, ids)
    finally:
        signal.alarm(0)
    for layer in small.model.layers:
        attn = layer.self_attn
        assert attn.o_proj.out_features == layer.mlp.down_proj.out_features == 64
        heads, kv = attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim
        assert (heads, kv) == ((2, 2) if kv_heads == 4 else (4, 2))
        assert attn.num_key_value_groups == heads // kv
        assert layer.mlp.up_proj.out_features == 48
    with torch.no_grad():
        assert torch.isfinite(small(ids).logits).all()
    out = small.generate(ids[:, :4], max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    assert out.shape == (1, 10)
    assert dense.model.layers[0].self_attn.q_proj.out_features == 64   # pruned a copy


def test_global_torch_pruning_reaches_budgets_its_one_shot_mode_cannot():
    pytest.importorskip("torch_pruning", reason="Torch-Pruning is in the [test] and [bench] extras: pip install -e .[test]")
    bench = _script("benchmark_quality")
    dense, x = tiny_vit().eval(), torch.randn(2, 3, 32, 32)
    masked = spp.add_masks(tiny_vit(), "dim")
    family = spp.WeightFamily(dense, spp.SolutionPath.from_scores(masked, magnitude_scores(masked)))
    targets = {r: family.select(remove=r).summary.params_after for r in (0.3, 0.85)}
    # one step at ratio 0.99 leaves whole attention blocks, far above the -85% budget
    one_shot = bench.tp_prune(dense, x, 0.99, bench.tp_importance("magnitude"), True)
    assert spp.count_params(one_shot) > 1.3 * targets[0.85]
    for kind, grads in (("magnitude", None), ("taylor", bench.taylor_gradients(dense, _batches(2)))):
        members = bench.tp_global_members(dense, x, targets, kind, grads, steps=50)
        assert set(members) == {0.3, 0.85}
        for removed, member in members.items():   # at or under the budget, by a step or two of 2% of the channels
            assert 0.75 * targets[removed] <= spp.count_params(member) <= targets[removed], (kind, removed)
            assert member.blocks[0].attn.proj.out_features == TINY["embed_dim"]
            assert member(x).shape == (2, 10) and all(p.grad is None for p in member.parameters())
        assert spp.count_params(members[0.85]) < spp.count_params(members[0.3])
    with pytest.raises(RuntimeError, match="above the budgets"):   # a budget it cannot reach is named, not missed
        bench.tp_global_members(dense, x, {0.99: 10}, "magnitude", None, steps=3)


def _summary(directory, methods, seeds=(0, 1, 2), epoch=(), run=None):
    args = {"removed": [0.5], "seeds": list(seeds), "finetune_steps": 100, "checkpoint": "c.safetensors",
            "epoch_removed": list(epoch)}
    results = []
    for method, accuracy in methods.items():
        row = {"method": method, "removed": 0.5, "params": 10, "budget_params": 10, "test_no_ft": accuracy,
               "test_no_ft_std": 0.0, "test_ft": accuracy, "test_ft_std": 0.0, "seconds_all_budgets": 1.0}
        if epoch:
            row.update(test_epoch=accuracy + 1, test_epoch_std=0.0)
        results.append(row)
    os.makedirs(directory)
    with open(os.path.join(directory, "benchmark_quality.json"), "w") as f:
        json.dump({"dense_val": 90.0, "dense_test": 89.0, "dense_ft": {"test_no_ft": 89.0}, "tuning_val": {},
                   "args": args, "results": results, **({"run": run} if run else {})}, f)


def test_quality_runs_merge_into_one_table(tmp_path, capsys):
    bench = _script("benchmark_quality")
    _summary(tmp_path / "a", {"spp-entry": 80.0, "random": 50.0})
    run = {"commit": "abc1234", "torch": "2.x", "timm": "1.x", "device": "cpu", "processor": "a CPU", "threads": 2,
           "started": "2026-11-30 09:58 UTC", "minutes": 74.5}
    _summary(tmp_path / "b", {"random": 55.0, "taylor": 70.0}, epoch=[0.5], run=run)   # reruns random with the epoch
    bench.merge([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path))
    merged = json.loads((tmp_path / "benchmark_quality.json").read_text())
    rows = {r["method"]: r for r in merged["results"]}
    assert list(rows) == ["spp-entry", "random", "taylor"]   # the benchmark's method order
    assert rows["random"]["test_no_ft"] == 55.0 and rows["random"]["test_epoch"] == 56.0
    assert "b changes random at -50%: test_no_ft 50.0 -> 55.0, test_ft 50.0 -> 55.0" in capsys.readouterr().out
    table = (tmp_path / "benchmark_quality.md").read_text()
    assert "| spp-entry | 80.00 ± 0.00 | 80.00 ± 0.00 | – |" in table   # no one-epoch figure: a dash
    # where each run was measured, where it recorded that (a run from before provenance did not)
    assert merged["merged_runs"] == {str(tmp_path / "a"): None, str(tmp_path / "b"): run}
    assert f"`{tmp_path / 'b'}` (commit abc1234, started 2026-11-30 09:58 UTC, 74.5 min on a CPU" in table
    assert (tmp_path / "benchmark_quality.png").stat().st_size > 0
    # a run that adds one-epoch figures to rows it measured the same: one row with both runs' figures
    _summary(tmp_path / "d", {"spp-entry": 80.0}, epoch=[0.5])
    bench.merge([str(tmp_path / "d"), str(tmp_path / "a")], str(tmp_path / "da"))
    row = json.loads((tmp_path / "da" / "benchmark_quality.json").read_text())["results"][0]
    assert (row["method"], row["test_no_ft"], row["test_epoch"]) == ("spp-entry", 80.0, 81.0)
    assert "changes" not in capsys.readouterr().out
    _summary(tmp_path / "c", {"lasso": 60.0}, seeds=(0,))
    with pytest.raises(SystemExit, match="--seeds"):
        bench.merge([str(tmp_path / "a"), str(tmp_path / "c")], str(tmp_path))


def _fake_inputs(tmp_path, train=1000):
    """Fake Fashion-MNIST files and an untrained checkpoint of the demo's architecture: what the benchmark
    scripts read. Returns ``(data folder, checkpoint file)``."""
    from safetensors.torch import save_file
    from spp.build import build_model
    from spp.config import load_config

    data = tmp_path / "fashion-mnist"
    data.mkdir()
    fake_fashion_mnist(str(data), train)
    checkpoint = str(tmp_path / "dense.safetensors")
    save_file(build_model(load_config(os.path.join(SCRIPTS, "..", "configs", "demo_search.yaml"),
                                      ["model.checkpoint=null"])).state_dict(), checkpoint)
    return data, checkpoint


@pytest.mark.slow
def test_quality_benchmark_runs_end_to_end(tmp_path):
    """The whole script (tuning on val, the methods, both finetunes, outputs), cut to a few steps.

    Three of the six Torch-Pruning variants stand for the others (uniform magnitude, global Taylor in one
    step and in steps: each code path once); global in one step may miss the -85% budget (the † rows).
    """
    data, checkpoint = _fake_inputs(tmp_path)
    out = tmp_path / "quality"
    methods = [m for m in _script("benchmark_quality").METHODS
               if m not in ("tp-magnitude-global", "tp-magnitude-global-iter", "tp-taylor-uniform")]
    command = [sys.executable, os.path.join(SCRIPTS, "benchmark_quality.py"), "--data-root", str(data),
               "--checkpoint", checkpoint, "--out", str(out), "--removed", "0.5", "0.85", "--seeds", "0", "1",
               "--search-steps", "20", "--search-batches", "64", "96", "--nu-scales", "3", "--lams", "0.1", "0.4", "--lasso-lams", "3e-4", "1e-3",
               "--lasso-steps", "10", "--taylor-batches", "2", "--tp-steps", "50", "--finetune-steps", "3",
               "--epoch-removed", "0.85", "--epoch-steps", "4", "--methods", *methods]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "benchmark_quality.json").read_text())
    rows = {(r["method"], r["removed"]): r for r in summary["results"]}
    assert set(rows) == {(m, r) for m in methods for r in (0.5, 0.85)}
    for (method, removed), row in rows.items():
        assert row["budget_params"] == rows[("random", removed)]["budget_params"]   # the same budgets for all
        if method != "tp-taylor-global":
            assert row["params"] <= 1.01 * row["budget_params"], (method, removed)
        assert ("test_epoch" in row) == (removed == 0.85)
        for key in ("test_no_ft", "test_ft") + (("test_epoch",) if removed == 0.85 else ()):
            assert 0 <= row[key] <= 100 and row[key + "_std"] >= 0
    assert rows[("spp-entry", 0.5)]["params"] > rows[("spp-entry", 0.85)]["params"]
    tuning = summary["tuning_val"]
    for removed in (0.5, 0.85):   # spp: per budget, the member of the rule and values that did better on val
        rule, values = tuning["spp rank and values per budget"][str(removed)]
        vals = {reading: tuning["spp val per budget"][reading][str(removed)]
                for reading in ("entry binary", "entry path", "z binary", "z path")}
        assert vals[f"{rule} {values}"] == max(vals.values())
        assert rows[("spp", removed)]["params"] == rows[(f"spp-{rule}", removed)]["params"]
    lasso_picks = tuning["lasso lam and values per budget"].values()
    assert {lam for lam, _ in lasso_picks} <= {3e-4, 1e-3} and {v for _, v in lasso_picks} <= {"binary", "path"}
    assert tuning["spp_nu_scale"] == 3.0 and tuning["spp_lam"] in (0.1, 0.4) and tuning["spp_batch"] in (64, 96)
    tried = {k.split(" batch=")[1].split()[0].rstrip(",") for k in tuning if k.startswith("spp nu_scale=")}
    assert tried == {"64", "96"}   # the second batch is tried at the nu and lam picked at the first
    # every setting is scored as the spp row reads it: per budget the best reading, then the mean over budgets
    scored = {k: v for k, v in tuning.items() if k.endswith(", each budget's best reading")}
    picked = next(k for k in scored if f" lam={tuning['spp_lam']} batch={tuning['spp_batch']}," in k)
    assert len(scored) == 3 and scored[picked] == max(scored.values())
    best_per_budget = tuning[f"{picked} per budget"]
    for removed in ("0.5", "0.85"):
        assert best_per_budget[removed] == max(v[removed] for v in tuning["spp val per budget"].values())
    assert abs(scored[picked] - sum(best_per_budget.values()) / 2) <= 0.011   # each figure rounded
    assert {"test_no_ft", "test_ft", "test_epoch"} <= set(summary["dense_ft"])
    table = (out / "benchmark_quality.md").read_text()
    assert all(f"| {m} |" in table for m in methods) and "1-epoch finetune: -85%" in table
    run = summary["run"]   # what produced the table, written into it
    assert run["minutes"] > 0 and run["threads"] >= 1 and run["torch"] == torch.__version__
    assert run["commit"] is None or re.search(r"[0-9a-f]{7}", run["commit"]), run["commit"]
    assert f"{run['minutes']} min on {run['processor']}" in table
    assert (out / "benchmark_quality.png").stat().st_size > 0
    head_picks = tuning["spp-head rank and values per budget"]
    for removed in (0.5, 0.85):   # spp-head: the same choice, on its own searches
        rule, values = head_picks[str(removed)]
        vals = tuning["spp-head val per budget"]
        assert vals[f"{rule} {values}"][str(removed)] == max(v[str(removed)] for v in vals.values())
    calibration = tuning["spp-head nu_calibration"]
    assert tuning[f"spp-head nu_calibration={calibration}"] == max(tuning[f"spp-head nu_calibration={c}"] for c in ("pooled", "pair"))
    searches = list((out / "searches").iterdir())
    # tuning on seed 0: two lams at batch 64, the better one at 96; then seed 1; then over whole heads: seed 0
    # with each nu calibration, seed 1 with the better one
    assert len(searches) == 7
    batch = tuning["spp_batch"]
    for search in searches:     # each at its batch, granularity and nu calibration, named for them
        config = yaml.safe_load((search / "config.yaml").read_text())
        size, granularity, pooling = config["data"]["batch_size"], config["model"]["granularity"], config["search"]["nu_calibration"]
        suffix = f"_b{size}" + ("_head" if granularity == "head" else "") + ("_pair" if pooling == "pair" else "")
        assert search.name.endswith(suffix) and size in (64, 96)
        assert granularity == "head" or pooling == "pooled"   # the dim searches keep spp's calibration
        assert not search.name.startswith("seed1") or (size == batch and (granularity == "dim" or pooling == calibration))
        assert json.loads((search / "path.json").read_text())["granularity"] == granularity


@pytest.mark.slow
def test_ablation_script_runs_and_keeps_earlier_rows(tmp_path):
    """scripts/ablate_search.py (the ablation commands of docs/log/quality.md) on fake Fashion-MNIST files and an untrained
    checkpoint, its searches cut to a few steps; a second run adds its variant to the first run's table."""
    data, checkpoint = _fake_inputs(tmp_path, train=600)
    out = tmp_path / "ablation"
    common = [sys.executable, os.path.join(SCRIPTS, "ablate_search.py"), "--data-root", str(data), "--checkpoint",
              checkpoint, "--out", str(out), "--removed", "0.5", "0.85", "--overrides", "search.steps=6",
              "search.log_every=2"]
    first = subprocess.run(common + ["--variants", "base", "lam0.4_long3", "--lasso-lams", "1e-3", "--lasso-steps", "3",
                                     "--swap"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(common + ["--variants", "nu5", "--lasso-lams", "--finetune-steps", "2"],
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    report = json.loads((out / "ablation.json").read_text())
    rows = report["rows"]
    swaps = lambda v: [f"{v} choice, lasso lam=0.001 counts", f"lasso lam=0.001 choice, {v} counts"]  # noqa: E731
    assert list(rows) == ["lasso lam=0.001", "base", *swaps("base"), "lam0.4_long3", *swaps("lam0.4_long3"), "nu5"]
    for v in ("base", "lam0.4_long3"):   # a swap keeps the other member's count in every pair type
        for b in ("entry@0.5", "entry@0.85"):
            assert rows[swaps(v)[0]][b]["kept"] == rows["lasso lam=0.001"][b]["kept"]
            assert rows[swaps(v)[1]][b]["kept"] == rows[v][b]["kept"]
    assert set(rows["lasso lam=0.001"]) == {"seconds", "entry@0.5", "entry@0.85"}
    for name in ("base", "lam0.4_long3", "nu5"):
        assert set(rows[name]) == {"seconds", "entered"} | {f"{r}@{b}" for r in ("entry", "z") for b in (0.5, 0.85)}
        assert 0 <= rows[name]["entered"] <= 1
        assert all(0 <= rows[name][k]["val"] <= 100 for k in rows[name] if "@" in k)
        assert spp.SolutionPath.load(str(out / name)).steps == 6   # --overrides came after the variant's 1800 steps
        assert all(("val_ft" in rows[name][k]) == (name == "nu5") for k in rows[name] if "@" in k)  # --finetune-steps
    assert all(0 <= rows["nu5"][k]["val_ft"] <= 100 for k in rows["nu5"] if "@" in k)
    assert report["variants"]["lam0.4_long3"] == ["search.lam=0.4", "search.steps=1800"]
    table = (out / "ablation.md").read_text().splitlines()
    assert table[2].startswith("| variant | entry@0.5 | entry@0.85 | z@0.5 | z@0.85 | entered | search s |")
    assert len(table) == 3 + 1 + len(rows)
    assert table[-1].startswith("| nu5 | ") and " → " in table[-1] and " → " not in table[4]


@pytest.mark.slow
def test_robustness_benchmark_runs_and_its_spp_row_takes_the_reading_val_prefers(tmp_path):
    pytest.importorskip("sklearn", reason="scikit-learn (its digits) is in the [test] and [bench] extras: pip install -e .[test]")
    out = tmp_path / "robust"
    command = [sys.executable, os.path.join(SCRIPTS, "benchmark_robustness.py"), "--settings", "digits-memorised",
               "--seeds", "0", "1", "--removed", "0.5", "0.85", "--search-steps", "6", "--taylor-batches", "2",
               "--pretrain-epochs", "2", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "digits-memorised −50%: spp" in done.stdout and "vs taylor" in done.stdout
    result = json.loads((out / "benchmark_robustness.json").read_text())
    methods = result["results"]["digits-memorised"]["methods"]
    readings = tuple(f"{r}-{v}" for r in ("entry", "z") for v in ("binary", "settled", "path"))
    assert set(methods) == {"spp", "spp-auto", "spp-train-nu", "taylor", "magnitude", "random",
                            *(f"spp-{r}" for r in readings)}
    for seed in ("0", "1"):
        for r in ("0.5", "0.85"):
            read = [methods[f"spp-{name}"][seed]["removed"][r] for name in readings]
            chosen = methods["spp"][seed]["removed"][r]
            assert chosen == max(read, key=lambda x: x["val"])        # the first reading of the best val
            assert methods["spp-auto"][seed]["removed"][r] in read[:3]  # entry order, any values
        assert methods["spp"][seed]["nu"] > 0 and methods["spp-train-nu"][seed]["nu"] > 0
    summary = result["summary"]["digits-memorised"]
    assert set(summary["taylor"]) == {"0.5", "0.85"} and len(summary["spp"]["0.5"]) == 2   # mean, std
    assert "| spp-train-nu |" in (out / "benchmark_robustness.md").read_text()
    assert (out / "models" / "digits-memorised.safetensors").is_file()   # cached for the next run


@pytest.mark.slow
def test_llm_speed_check_runs_on_a_tiny_model(tmp_path):
    """scripts/llm_speed.py (gpu_check.sh's LLM part) on CPU, tiny: a search step against a finetune step, then
    tokens/s of the dense model and of compressed members, each smaller than the last, with realised fractions."""
    pytest.importorskip("transformers", reason="the LLM speed check needs transformers")
    out = tmp_path / "llm_speed.json"
    result = subprocess.run([sys.executable, os.path.join(SCRIPTS, "benchmark_speed.py"), "--llm", "--tiny",
                             "--device", "cpu", "--removed", "0.3", "0.5", "--round-to", "1", "--batch-sizes", "1", "2",
                             "--repeats", "1", "--warmup", "0", "--paired", "--out", str(out)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.load(open(out))
    assert rows[0]["what"] == "search step vs finetune step" and rows[0]["search_s"] > 0 and rows[0]["finetune_s"] > 0
    inference = [r for r in rows if r["what"] == "inference"]
    assert [r["member"] for r in inference] == ["dense", "dense", "-30% (round_to 1)", "-30% (round_to 1)",
                                                "-50% (round_to 1)", "-50% (round_to 1)"]
    assert 1 < inference[2]["flops_ratio"] < inference[4]["flops_ratio"]
    for r in inference[2:]:
        assert r["prefill_realised"] == pytest.approx(r["prefill_speedup"] / r["flops_ratio"], abs=2e-3)
        assert r["decode_realised"] == pytest.approx(r["decode_speedup"] / r["weight_bytes_ratio"], abs=2e-3)
        assert r["paired_prefill_speedup"] > 0 and r["paired_decode_realised"] == pytest.approx(
            r["paired_decode_speedup"] / r["weight_bytes_ratio"], abs=2e-3)
    params = [r["params"] for r in inference[::2]]
    assert params[0] > params[1] > params[2]
    assert all(r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in inference)


def test_torch_pruning_falls_back_to_the_mlp_where_its_head_grouping_fails():
    """On SmolLM2's attention (9 query heads over 3 key/value heads) Torch-Pruning 1.6.1's head grouping raises;
    benchmark_llm then prunes the MLP channels only, says so in the run, and still meets the budget."""
    from types import SimpleNamespace

    bench, dense, ids = _torch_pruning_llama(hidden_size=48, intermediate_size=192, num_attention_heads=3,
                                             num_key_value_heads=1)
    with pytest.raises(RuntimeError):
        bench._torch_pruning(dense, 0.5, ids)
    run = SimpleNamespace(dense=dense, data={"train": [(ids[0], ids[0])]},
                          args=SimpleNamespace(tp_timeout=60, tp_bisections=8))
    members, extra = bench.run_torch_pruning(run, 0, [0.3])
    assert extra["note"].startswith("MLP channels only")
    small, info = members[0.3]
    full = bench._prunable_params(dense)
    assert abs(info["removed"] - 0.3) < 0.05 and bench._prunable_params(small) < full
    for layer in small.model.layers:
        assert layer.self_attn.q_proj.out_features == 48 and layer.mlp.up_proj.out_features < 192
    with torch.no_grad():
        assert torch.isfinite(small(ids).logits).all()


def test_llm_tables_merge_earlier_runs_and_take_only_the_methods_asked(tmp_path):
    """benchmark_llm --table-from A B:lasso: B's lasso seeds join A's runs, B's other methods (an SPP of another
    search length, say) stay out, and the table's seeds are both files'."""
    bench = _script("benchmark_llm")
    args = dict(removed=[0.3], seeds=[0], finetune_seeds=[], finetune_steps=100, long_steps=400, search_steps=240,
                batch=8, calibration_batches=8, lasso_steps=300, clip="auto", finetunes=["full"])

    def run(method, seeds, value):
        return {method: {str(s): {"time": 10.0 * (s + 1), "0.3": {"params": 70, "test": value + s}} for s in seeds}}

    common = dict(seq_len=64, test_tokens=630, prunable=100, dense={"params": 130, "val": 4.0, "test": 5.0})
    a = {**common, "args": args, "methods": ["spp"], "runs": run("spp", [0], 50.0)}
    b = {**common, "args": {**args, "seeds": [1, 2], "search_steps": 60}, "methods": ["spp", "lasso"],
         "runs": {**run("spp", [1, 2], 90.0), **run("lasso", [1, 2], 60.0)}}
    for name, obj in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(obj))
    merged = bench.merged_runs([str(tmp_path / "a.json"), f"{tmp_path / 'b.json'}:lasso"])
    assert merged["methods"] == ["spp", "lasso"] and set(merged["runs"]["spp"]) == {"0"}   # b's spp left out
    assert set(merged["runs"]["lasso"]) == {"1", "2"} and merged["args"]["seeds"] == [0, 1, 2]
    import argparse
    table = bench.write_tables(merged, argparse.Namespace(**merged["args"]), str(tmp_path))
    assert "| spp | 50.00 | 10 |" in table and "| lasso | 61.50 ± 0.71 | 25 |" in table
    with pytest.raises(SystemExit, match="has no runs of \\['taylor'\\]"):
        bench.merged_runs([str(tmp_path / "a.json"), f"{tmp_path / 'b.json'}:taylor"])
