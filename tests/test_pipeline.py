"""The commands end to end on synthetic data and a tiny ViT (seconds each)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

import spp
from helpers import kill_after_checkpoint
from spp.build import build_model
from spp.cli import main
from spp.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke_synthetic.yaml")


def run(command, out, *overrides):
    return main([command, SMOKE, f"output={out}", *overrides])


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match=r"unknown config key 'search.lrr'; valid keys in search: steps, epochs, lr"):
        load_config(SMOKE, ["search.lrr=1"])
    with pytest.raises(ConfigError, match=r"search.epochs: expected int, got 'many'"):
        load_config(SMOKE, ["search.epochs=many"])
    with pytest.raises(ConfigError, match=r"data.dataset='cifar': choose one of"):
        load_config(SMOKE, ["data.dataset=cifar"])
    with pytest.raises(ConfigError, match=r"search.nu_calibration='type': choose one of pooled, pair, mask"):
        load_config(SMOKE, ["search.nu_calibration=type"])
    with pytest.raises(ConfigError, match=r"export.values='scaled': choose one of auto, binary, path, settled, best"):
        load_config(SMOKE, ["export.values=scaled"])
    for override, message in [("search.steps=-5", "search.steps=-5: must be >= 0"),
                              ("data.batch_size=0", "data.batch_size=0: must be > 0"),
                              ("search.kappa=0", "search.kappa=0.0: must be > 0"),
                              ("search.nu=-3", "search.nu=-3.0: must be > 0"),
                              ("search.clip=0", "search.clip=0.0: must be > 0"),
                              ("search.clip=often", r"search.clip='often': give a number or auto \(or null: no bound\)"),
                              ("family.targets=[1.0,1.5]", r"family.targets\[1\]=1.5: must lie in \[0, 1\]"),
                              ("train.ema_decay=1", r"train.ema_decay=1.0: must lie in \[0, 1\)")]:
        with pytest.raises(ConfigError, match=message):
            load_config(SMOKE, [override])
    assert load_config(SMOKE, ["search.nu=auto", "export.budget=null"]).search.nu == "auto"
    assert load_config(SMOKE, ["amp=off"]).amp == "off"          # YAML reads off as False: the word it was
    with pytest.raises(ConfigError, match="amp='on': choose one of auto, bf16, fp16, off"):
        load_config(SMOKE, ["amp=yes"])
    with pytest.raises(ConfigError, match="'depth:3' with no value: YAML needs a space after each colon"):
        load_config(SMOKE, ["model.kwargs={depth:3}"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(SMOKE, ["search.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope.yaml")
    cfg = load_config(SMOKE, ["search.lr=5e-4", "family.targets=[0.5]"])
    assert cfg.search.lr == 5e-4 and cfg.family.targets == [0.5] and cfg.data.dataset == "synthetic"
    assert load_config(SMOKE, ["model.kwargs={depth: 3}"]).model.kwargs == {"depth": 3}  # replaced, not merged
    assert load_config(SMOKE, ["data.batch_size=8"]).data.img_size == 32  # sections merge


@pytest.mark.slow
def test_each_dataset_belongs_to_one_task_and_the_task_says_what_it_needs():
    """data.dataset picks the workload in one place (spp.tasks.task_class): the loops, the checks and the
    criterion ask the task, not the dataset's name."""
    from spp.build import build_criterion, input_size_for, task_for
    from spp.tasks import TASKS, Classification, Contrastive, NextToken, task_class
    names = [d for task in TASKS for d in task.datasets]
    assert len(names) == len(set(names))                   # no dataset read by two tasks
    assert task_class("text") is NextToken and task_class("captions") is Contrastive
    assert task_class("fashion_mnist") is Classification and task_class("synthetic").inputs == "image"
    with pytest.raises(ValueError, match="data.dataset='cifar': choose one of imagenet, .*text, captions"):
        task_class("cifar")
    cfg = load_config(SMOKE)
    assert isinstance(task_for(cfg), Classification) and input_size_for(cfg) is None
    mixup, criterion = build_criterion(cfg.data)
    assert mixup is not None and isinstance(criterion.task, Classification)   # timm's mixup and soft targets
    assert type(criterion.base).__name__ == "SoftTargetCrossEntropy"
    plain = load_config(SMOKE, ["data.mixup=0", "data.cutmix=0", "data.smoothing=0.1", "data.val_fraction=0.1"]).data
    assert Classification().training_loss(plain)[0] is None
    assert type(Classification().training_loss(plain)[1]).__name__ == "LabelSmoothingCrossEntropy"
    assert "(data.val_fraction=" in Classification().held_out(100, plain)   # where ν's batches come from
    assert NextToken().held_out(10, cfg.data).startswith("the validation text (10 sequences of")
    cfg = load_config(SMOKE, ["data.dataset=text", "data.seq_len=48"])
    assert input_size_for(cfg) == (48,)
    mixup, criterion = build_criterion(cfg.data)
    assert mixup is None and isinstance(criterion.task, NextToken)
    ids = torch.randint(0, 7, (2, 5))
    logits = torch.randn(2, 5, 7)
    torch.testing.assert_close(criterion(ids, logits, ids), spp.next_token_loss(logits, ids))


def test_shell_entry_points_run_from_any_directory(tmp_path):
    """The users' commands (deit_search.sh, scripts/export.sh, deit_retrain.sh) run from outside the
    repository: a config relative to where they run, or one of configs/ by its repository path, and
    relative outputs land where they run, not in the repository."""
    with open(SMOKE) as f:
        config = yaml.safe_load(f)
    config["search"]["steps"] = 8
    with open(tmp_path / "mine.yaml", "w") as f:
        yaml.safe_dump(config, f)

    def shell(script, *args):
        result = subprocess.run(["bash", os.path.join(ROOT, script), *args], cwd=tmp_path, capture_output=True,
                                text=True, env={**os.environ, "NPROC": "1"}, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]

    shell("deit_search.sh", "mine.yaml", "output=run")
    assert spp.SolutionPath.load(str(tmp_path / "run")).steps == 8
    shell("scripts/export.sh", "configs/smoke_synthetic.yaml", "output=run", "export.remove=0.5")
    assert (tmp_path / "run" / "pruned" / "config.json").is_file()
    shell("deit_retrain.sh", "mine.yaml", "output=finetuned", "train.source=run/pruned", "train.epochs=1")
    assert (tmp_path / "finetuned" / "log.jsonl").is_file()
    assert not any(os.path.exists(os.path.join(ROOT, d)) for d in ("run", "finetuned"))


def test_cli_asks_only_for_the_config(capsys):
    with pytest.raises(SystemExit):
        main(["search"])
    err = capsys.readouterr().err
    assert "required: config" in err and "overrides" not in err.splitlines()[-1]
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"spp {spp.__version__}"


def test_model_and_device_problems_are_errors_not_tracebacks(tmp_path, capsys):
    cases = [(["model.name=vit_nonexistent"], "model.name='vit_nonexistent': timm has no such model"),
             (["model.name=resnet18"], "model.name='resnet18' does not take the arguments spp passes"),
             (["model.kwargs={patch_size: 8, embed_dim: 64, depth: 1, num_heads: 4, qk_norm: true}"],
              "blocks.0.attn uses qk_norm")]
    if not torch.cuda.is_available():
        cases.append((["device=cuda"], "device=cuda but no CUDA device is visible"))
    for overrides, message in cases:
        assert run("search", str(tmp_path / "run"), *overrides) == 2
        assert f"spp search: error: {message}" in capsys.readouterr().err


def test_resume_refuses_other_settings_and_leaves_the_folder_as_it_was(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run("search", out, "search.steps=8") == 0
    capsys.readouterr()
    assert run("search", out, "search.steps=8", "search.lam=0.2") == 2
    err = capsys.readouterr().err
    assert "search.lam is 0.4 there and 0.2 here" in err and "resume=null" in err
    assert load_config(os.path.join(out, "config.yaml")).search.lam == 0.4        # not overwritten
    assert run("search", out, "search.steps=16", "search.log_every=8") == 0        # running on is no other run
    assert spp.SolutionPath.load(out).steps == 16
    assert run("search", out, "search.steps=8", "search.lam=0.2", "resume=null") == 0
    assert load_config(os.path.join(out, "config.yaml")).search.lam == 0.2
    assert spp.SolutionPath.load(out).meta["hyperparameters"]["lam"] == 0.2

    assert run("export", out) == 0
    trained = str(tmp_path / "trained")
    assert run("retrain", trained, f"train.source={out}/pruned", "train.epochs=1") == 0
    capsys.readouterr()
    assert run("retrain", trained, f"train.source={out}/pruned", "train.epochs=1", "train.lr=5e-4") == 2
    assert "train.lr is 0.001 there and 0.0005 here" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_caches_its_pretrained_model_and_fresh_trains_it_again(tmp_path, capsys):
    from spp.demo import run_demo

    tiny = ["data.dataset=synthetic", "data.synthetic_size=64", "data.batch_size=16", "data.eval_batch_size=32",
            "train.epochs=1", "search.steps=8", "search.calibration_batches=1", "family.max_batches=1"]
    out = str(tmp_path / "demo")
    table = run_demo(out, tiny)
    assert "| 50% |" in table and os.path.isfile(os.path.join(out, "search", "pruned", "model.safetensors"))
    assert "| ranked by, kept elements hold |" in table and "| 100% | 0.803M | 27.53M (100%) | " in table
    from spp.demo import VALUE_LABELS
    readings = {f"{rank}, {values}" for rank in ("entry step", "final z") for values in VALUE_LABELS.values()}
    assert {line.split(" | ")[3] for line in table.splitlines()[2:]} <= readings   # each member's val-picked reading
    assert "1/5 pretrain a ViT" in capsys.readouterr().out
    run_demo(out, tiny)
    assert "pretrained model cached" in capsys.readouterr().out
    run_demo(out, tiny, fresh=True)
    printed = capsys.readouterr().out
    assert "1/5 pretrain a ViT" in printed and "resumed" not in printed   # trained again, not resumed at its end


def test_resume_check_compares_only_settings_both_runs_know():
    from spp.runtime import CheckpointError, check_same_run

    config = load_config(SMOKE).to_dict()
    older = {**config, "search": {k: v for k, v in config["search"].items() if k != "nu_batch"}}  # an older spp
    check_same_run({"kind": "search", "config": older}, config, "ckpt")
    check_same_run({"kind": "search"}, config, "ckpt")                                             # no settings stored
    changed = {**config, "search": {**config["search"], "rho": 0.5}, "train": {**config["train"], "lr": 1.0}}
    with pytest.raises(CheckpointError, match=r"search.rho is 0.5 there and 0.02 here\. Resume"):  # train.* is not the search's
        check_same_run({"kind": "search", "config": changed}, config, "ckpt")


def test_shipped_configs_load():
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        cfg = load_config(os.path.join(ROOT, "configs", name))
        assert cfg.output


def test_end_to_end_search_family_export_retrain(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run("search", out) == 0
    for name in ("path.json", "path.safetensors", "family.md", "family.json", "path.png", "config.yaml",
                 "log.jsonl", "checkpoint.pth"):
        assert os.path.isfile(os.path.join(out, name)), name
    resolved = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert resolved["output"] == out and resolved["search"]["steps"] == 24
    path = spp.SolutionPath.load(out)
    assert path.steps == 24 and path.support and path.meta["hyperparameters"]["nu"] > 0
    table = json.load(open(os.path.join(out, "family.json")))
    assert len(table) == 3
    reach = spp.WeightFamily(build_model(load_config(SMOKE)), path).reach()
    assert f"path: the support covers {reach:.1%} of the prunable params after 24 steps" in capsys.readouterr().out
    assert [r["ranked"] for r in table] == ["along the path" if float(r["kept (prunable params)"][:-1]) <= 100 * reach
                                            else "past its end, by final z" for r in table]
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert log[-1]["step"] == 24 and "support/mlp" in log[-1]
    assert log[0]["run"]["torch"] == torch.__version__ and log[0]["run"]["processes"] == 1   # what it ran on

    assert run("family", out) == 0
    assert f"path: the support covers {reach:.1%}" in capsys.readouterr().out
    rows = json.load(open(os.path.join(out, "family_eval.json")))
    assert [r["target"] for r in rows] == [1.0, 0.5, 0.2]
    assert rows[0]["params"] > rows[1]["params"] > rows[2]["params"]
    assert os.path.isfile(os.path.join(out, "family_eval.png"))

    assert run("export", out, "export.remove=0.6", "export.round_to=4") == 0
    pruned = spp.load_pruned(os.path.join(out, "pruned"))
    summary = json.load(open(os.path.join(out, "pruned", "summary.json")))
    assert spp.count_params(pruned) == summary["params_after"]
    assert all(w["mlp_hidden"] % 4 == 0 for w in summary["widths"])
    assert summary["values"] in ("binary", "path") and {r["values"] for r in rows} <= {"binary", "path"}
    exported = {}
    for values in ("binary", "path"):   # export.values reaches the member: same widths, other weights
        assert run("export", out, "export.remove=0.6", f"export.values={values}", f"export.out={out}/{values}") == 0
        assert json.load(open(os.path.join(out, values, "summary.json")))["values"] == values
        exported[values] = spp.load_pruned(os.path.join(out, values)).eval()
    x = torch.randn(2, 3, 32, 32)
    assert spp.count_params(exported["binary"]) == spp.count_params(exported["path"])
    with torch.no_grad():
        assert not torch.allclose(exported["binary"](x), exported["path"](x), atol=1e-4)

    train_out = str(tmp_path / "retrain")
    assert main(["retrain", SMOKE, f"output={train_out}", f"train.source={out}/pruned"]) == 0
    result = json.load(open(os.path.join(train_out, "result.json")))
    assert result["steps"] == 16 and 0 <= result["best"]["top1"] <= 100
    best = spp.load_pruned(os.path.join(train_out, "best"))
    assert spp.count_params(best) == summary["params_after"]

    assert main(["eval", SMOKE, f"output={train_out}", f"train.source={train_out}/best"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(printed)["params"] == summary["params_after"]
    # a search folder works as the source too, as for retrain: export.* picks the member
    assert main(["eval", SMOKE, f"output={train_out}", f"train.source={out}", "export.remove=0.6", "export.round_to=4"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(printed)["params"] == summary["params_after"]


def test_retrain_from_a_search_folder_selects_a_member(tmp_path):
    out = str(tmp_path / "run")
    assert run("search", out, "search.steps=8") == 0
    train_out = str(tmp_path / "retrain")
    assert main(["retrain", SMOKE, f"output={train_out}", f"train.source={out}", "export.remove=0.3",
                 "train.steps=4", "train.ema=false", "train.distill=0"]) == 0
    assert os.path.isfile(os.path.join(train_out, "best", "model.safetensors"))


def _search_cmd(out, *overrides):
    return [sys.executable, "-m", "spp", "search", SMOKE, f"output={out}", *overrides]


def _path_tensors(out):
    path = spp.SolutionPath.load(out)
    return path, {f"{n}/{k}": v for n, e in path.entries.items() for k, v in e.items()}


def test_search_with_one_nu_per_pair_type(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run("search", out, "search.nu_calibration=pair", "search.steps=8") == 0
    path = spp.SolutionPath.load(out)
    hyper = path.meta["hyperparameters"]
    assert path.meta["nu_calibration"] == "pair" and set(hyper["nu"]) == set(path.entries)
    by_pair = {}
    for name, nu in hyper["nu"].items():
        by_pair.setdefault(path.pairs[name][0], set()).add(nu)
        assert hyper["lr"][name] == pytest.approx(load_config(SMOKE).search.rho * nu / 10.0)  # rho nu / kappa
    assert all(len(v) == 1 for v in by_pair.values()) and len({v.pop() for v in by_pair.values()}) == 3
    # its checkpoint cannot be resumed under another grouping of the masks
    capsys.readouterr()
    assert run("search", out, "search.steps=16", "resume=auto") != 0
    assert "search.nu_calibration is 'pair' there and 'pooled' here" in capsys.readouterr().err


def test_notebook_set_up_matches_spp_search(tmp_path):
    """spp.calibrate_nu and spp.search_optimizer, given the search's batches and loss, set up the
    optimizer that spp search runs: the same ν and step."""
    from timm.loss import LabelSmoothingCrossEntropy

    from spp.build import build_loaders, build_model
    from spp.data import build_loader
    from spp.runtime import setup_runtime

    overrides = ["data.mixup=0", "data.cutmix=0"]
    out = str(tmp_path / "run")
    assert run("search", out, "search.steps=2", *overrides) == 0
    hyper = spp.SolutionPath.load(out).meta["hyperparameters"]
    cfg = load_config(SMOKE, overrides)
    runtime = setup_runtime(cfg.device, cfg.amp, cfg.seed)
    model = spp.add_masks(build_model(cfg, runtime))
    # held-out batches (search.nu_data: val): shuffled batches of data.batch_size from the validation split
    val = build_loaders(cfg, runtime, ("val",))["val"].dataset
    loader = build_loader(val, cfg.data.batch_size, True, cfg.data.workers, cfg.seed + 7919)
    nu = spp.calibrate_nu(model, loader, LabelSmoothingCrossEntropy(cfg.data.smoothing),
                          batches=cfg.search.calibration_batches)
    assert list(nu.values()) == [pytest.approx(hyper["nu"], rel=1e-6)] * len(nu)
    optimizer = spp.search_optimizer(model, nu)
    (group,) = optimizer.param_groups
    assert group["lr"] == pytest.approx(hyper["lr"], rel=1e-6)
    assert (group["kappa"], group["lam"]) == (hyper["kappa"], hyper["lam"]) == (10.0, 0.4)


def test_auto_nu_is_taken_at_nu_batch(tmp_path):
    # At M = 1 the mask gradient is mostly sampling noise, its per-batch RMS ∝ 1/√batch: auto ν is
    # calibrated as at search.nu_batch samples, so it stays put when data.batch_size (16 here) changes
    nus = {}
    for nu_batch in ("null", "128", "64"):
        out = str(tmp_path / nu_batch)
        assert run("search", out, f"search.nu_batch={nu_batch}", "search.steps=2") == 0
        nus[nu_batch] = spp.SolutionPath.load(out).meta["hyperparameters"]["nu"]
    batch = load_config(SMOKE).data.batch_size
    assert nus["128"] == pytest.approx(nus["null"] * math.sqrt(128 / batch))
    assert nus["64"] == pytest.approx(nus["null"] * math.sqrt(64 / batch))
    with pytest.raises(ConfigError, match="search.nu_batch=0: give a batch size"):
        load_config(SMOKE, ["search.nu_batch=0"])


def test_adam_search_calibrates_nu_to_the_adam_direction(tmp_path):
    # The Adam direction has RMS 1 whatever the gradient scale, so auto ν is nu_scale itself; ν
    # from the raw gradient (~1e3 on the demo) made every element enter at its first steps.
    out = str(tmp_path / "run")
    assert run("search", out, "search.preconditioner=adam", "search.nu_scale=2", "search.steps=8") == 0
    hyper = spp.SolutionPath.load(out).meta["hyperparameters"]
    assert hyper["preconditioner"] == "adam" and hyper["nu"] == 2.0
    assert hyper["lr"] == pytest.approx(load_config(SMOKE).search.rho * 2.0 / 10.0)
    plain = str(tmp_path / "plain")
    assert run("search", plain, "search.nu_scale=2", "search.steps=8") == 0
    assert spp.SolutionPath.load(plain).meta["hyperparameters"]["nu"] != pytest.approx(2.0)


def test_search_keeps_mask_snapshots_for_settled_members(tmp_path):
    """`spp search` writes the LBI's mask snapshots into the path (every 0.2/ρ steps, here every 10 of 24), with
    the settle time 3/ρ; search.snapshots=0 keeps none, and its members' settled values are the end's."""
    out = str(tmp_path / "run")
    assert run("search", out, "search.steps=24") == 0
    path = spp.SolutionPath.load(out)
    rho = load_config(SMOKE).search.rho
    assert path.settle == pytest.approx(3 / rho)
    every = max(1, round(0.2 / rho))
    assert all(sorted(s) == list(range(every, 25, every)) for s in path.snapshots.values()) and path.snapshots
    none = str(tmp_path / "none")
    assert run("search", none, "search.steps=24", "search.snapshots=0") == 0
    bare = spp.SolutionPath.load(none)
    assert bare.snapshots == {} and all(torch.equal(bare.values_at(0)[n], e["mask"]) for n, e in bare.entries.items())


@pytest.mark.slow
def test_killed_search_resumes_to_the_same_path(tmp_path):
    long = ["search.steps=120", "search.checkpoint_every=10", "data.synthetic_size=256"]
    reference = str(tmp_path / "reference")
    subprocess.run(_search_cmd(reference, *long), check=True, capture_output=True)

    out = str(tmp_path / "killed")
    kill_after_checkpoint(_search_cmd(out, *long), os.path.join(out, "checkpoint.pth"), total=120)
    assert not os.path.isfile(os.path.join(out, "path.json"))

    subprocess.run(_search_cmd(out, *long, "resume=auto"), check=True, capture_output=True)
    (ref_path, ref), (got_path, got) = _path_tensors(reference), _path_tensors(out)
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    assert ref_path.support == got_path.support


@pytest.mark.slow
def test_killed_retrain_resumes_to_the_same_model(tmp_path):
    """Model, AdamW, EMA, schedule, mixup and data order all continue: the resumed run ends bit-identical."""
    search = str(tmp_path / "search")
    assert run("search", search, "search.steps=8") == 0 and run("export", search) == 0
    long = [f"train.source={search}/pruned", "train.epochs=4", "data.synthetic_size=256", "train.checkpoint_every=4"]

    def cmd(out, *extra):
        return [sys.executable, "-m", "spp", "retrain", SMOKE, f"output={out}", *long, *extra]

    reference, out = str(tmp_path / "reference"), str(tmp_path / "killed")
    subprocess.run(cmd(reference), check=True, capture_output=True)
    killed_at = kill_after_checkpoint(cmd(out), os.path.join(out, "train_checkpoint.pth"), total=64)
    resumed = subprocess.run(cmd(out, "resume=auto"), check=True, capture_output=True, text=True)
    assert f"resumed {out}/train_checkpoint.pth at step {killed_at}" in resumed.stdout
    assert json.load(open(os.path.join(out, "result.json"))) == json.load(open(os.path.join(reference, "result.json")))
    ref, got = (spp.load_pruned(os.path.join(d, "last")).state_dict() for d in (reference, out))   # the EMA weights
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    ref, got = (torch.load(os.path.join(d, "train_checkpoint.pth"), weights_only=True) for d in (reference, out))
    assert all(torch.equal(ref["model"][k], got["model"][k]) for k in ref["model"])   # the trained weights too
    assert ref["step"] == got["step"] == 64


def test_corrupt_checkpoint_gives_clear_error_and_is_left_intact(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run("search", out, "search.steps=8") == 0
    checkpoint = os.path.join(out, "checkpoint.pth")
    with open(checkpoint, "r+b") as f:
        f.truncate(100)
    before = open(checkpoint, "rb").read()
    assert run("search", out, "search.steps=16") == 2
    err = capsys.readouterr().err
    assert "checkpoint.pth is corrupt" in err and "resume=" in err and "checkpoint.pth.prev" in err
    assert open(checkpoint, "rb").read() == before
    assert os.path.isfile(checkpoint + ".prev")


def test_resume_names_a_checkpoint_of_the_wrong_kind_model_or_path(tmp_path, capsys):
    from spp.runtime import CheckpointError, load_training_checkpoint, resume_file

    out = str(tmp_path / "run")
    assert run("search", out, "search.steps=8") == 0
    checkpoint = os.path.join(out, "checkpoint.pth")
    with pytest.raises(CheckpointError, match=r"checkpoint.pth is not a train checkpoint \(found search\)"):
        load_training_checkpoint(checkpoint, "train", "vit_tiny_patch16_224")
    with pytest.raises(CheckpointError, match=r"written for model 'vit_tiny_patch16_224', not 'deit_small"):
        load_training_checkpoint(checkpoint, "search", "deit_small_patch16_224")
    with pytest.raises(CheckpointError, match=r"resume=.*nowhere.pth not found \(use resume=auto"):
        resume_file(str(tmp_path / "nowhere.pth"), checkpoint)
    assert resume_file("auto", str(tmp_path / "nowhere.pth")) is None and resume_file("auto", checkpoint) == checkpoint
    assert run("retrain", str(tmp_path / "train"), f"train.source={out}", f"resume={checkpoint}") == 2   # a search's
    assert "is not a train checkpoint (found search)" in capsys.readouterr().err


def test_checkpoint_from_another_model_is_rejected(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run("search", out, "search.steps=8") == 0
    assert run("search", out, "search.steps=16", "model.kwargs={patch_size: 8, embed_dim: 96, depth: 2, num_heads: 4}") == 2
    err = capsys.readouterr().err
    assert "shapes differ" in err and "blocks.0.attn.qk_mask" in err


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run("search", out, "search.lr=1e30", "search.nu=1.0", "search.steps=16", "search.checkpoint_every=1") == 2
    err = capsys.readouterr().err
    assert "loss is nan" in err.lower() or "loss is inf" in err.lower()
    assert "last good checkpoint" in err
    assert not os.path.isfile(os.path.join(out, "path.json"))


def test_missing_data_and_checkpoint_say_where_they_looked(tmp_path, capsys):
    assert main(["search", SMOKE, f"output={tmp_path}", "data.dataset=imagenet", f"data.root={tmp_path}/imagenet"]) == 2
    assert f"{tmp_path}/imagenet/train not found" in capsys.readouterr().err
    assert main(["search", SMOKE, f"output={tmp_path}", f"model.checkpoint={tmp_path}/deit.pth"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/deit.pth not found" in err and "make demo" in err


def test_eval_reads_only_the_split_it_needs(tmp_path):
    """An eval on an ImageFolder tree reads val/ and never scans train/ (ImageNet's is 1.2M files)."""
    from PIL import Image

    from spp.data import build_datasets

    for label in ("a", "b"):
        os.makedirs(tmp_path / "val" / label)
        Image.new("RGB", (40, 40), (10, 200, 30)).save(tmp_path / "val" / label / "0.png")
    cfg = load_config(SMOKE, ["data.dataset=imagefolder", f"data.root={tmp_path}", "data.in_chans=3",
                              "data.val_fraction=0.0"]).data
    data = build_datasets(cfg, splits=["test"])
    assert list(data) == ["test"] and len(data["test"]) == 2
    assert build_datasets(cfg, splits=["val"])["val"][0][0].shape == (3, cfg.img_size, cfg.img_size)
    with pytest.raises(spp.data.DatasetNotFound, match="train not found"):
        build_datasets(cfg, splits=["train", "test"])
    os.makedirs(tmp_path / "train" / "a")   # a class folder without images
    with pytest.raises(spp.data.DatasetNotFound, match=f"{tmp_path}/train: .*one folder of images per class"):
        build_datasets(cfg, splits=["train", "test"])
    with pytest.raises(ValueError, match=r"unknown splits \['dev'\]"):
        build_datasets(cfg, splits=["dev"])


@pytest.mark.slow
def test_fsdp2_vit_retrain_with_mixup_and_drop_path_gives_ddps_weights(tmp_path):
    """model.fsdp=true on a ViT (2 CPU processes): rank 1 builds a meta-device skeleton, yet every rank's random
    stream (mixup, drop path) is DDP's, since the ranks are seeded again once their models are built; the search
    gives DDP's path, the retrain DDP's weights."""
    assert run("search", str(tmp_path / "search"), "search.steps=8", "model.drop_path=0.1") == 0
    assert run("export", str(tmp_path / "search"), "model.drop_path=0.1") == 0   # the member keeps its drop path
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["model.drop_path=0.1", "search.steps=8", "search.nu=2000", f"train.source={tmp_path / 'search' / 'pruned'}",
              "train.epochs=2", "train.ema=false", "train.distill=0"]
    out = {}
    for mode in ("ddp", "fsdp"):
        for command in ("search", "retrain"):
            out[mode, command] = tmp_path / f"{mode}-{command}"
            result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                                     "-m", "spp", command, SMOKE, f"output={out[mode, command]}", *common,
                                     *(["model.fsdp=true"] if mode == "fsdp" else [])],
                                    capture_output=True, text=True, env=env, timeout=300)
            assert result.returncode == 0, result.stderr[-3000:]
    paths = [spp.SolutionPath.load(str(out[mode, "search"])) for mode in ("ddp", "fsdp")]
    assert all(torch.equal(e["entry_step"], paths[1].entries[n]["entry_step"]) for n, e in paths[0].entries.items())
    ddp, fsdp = (spp.load_pruned(str(out[mode, "retrain"] / "last")).state_dict() for mode in ("ddp", "fsdp"))
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torchrun_two_processes_give_one_identical_path(tmp_path):
    out = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--standalone", "-m", "spp", "search", SMOKE, f"output={out}",
                             "search.steps=12"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "solution path identical on all 2 ranks" in result.stdout
    assert result.stdout.count("wrote ") == 1  # only rank 0 writes
    path = spp.SolutionPath.load(out)
    assert path.steps == 12
    files = sorted(os.listdir(out))
    assert files.count("path.json") == 1 and not any("rank" in f for f in files)
    runs = [line["run"] for line in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "run" in line]
    assert [r["processes"] for r in runs] == [2]   # one record of the start, from rank 0


@pytest.mark.slow
def test_torchrun_two_processes_retrain(tmp_path):
    """deit_retrain.sh's DDP path: the lr scales with the processes, rank 0 alone writes, and the
    evaluation counts every val image once across the two ranks."""
    from spp.data import build_datasets

    search = str(tmp_path / "search")
    assert run("search", search, "search.steps=8") == 0 and run("export", search, "data.val_fraction=0.1") == 0
    out = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the search folder as the source: both ranks score the member's readings on the val split they share
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                             "-m", "spp", "retrain", SMOKE, f"output={out}", f"train.source={search}",
                             "train.epochs=1", "data.val_fraction=0.1"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = json.load(open(os.path.join(search, "pruned", "summary.json")))   # one process, the same val images
    reading = "entry step" if exported["rank"] == "entry" else "final z"
    assert result.stdout.count(f"ranked by {reading}, kept elements hold") == 1 and "scores of each reading" in result.stdout
    cfg = load_config(SMOKE, ["data.val_fraction=0.1"])
    assert f"lr {cfg.train.lr * cfg.data.batch_size * 2 / 512:.3g}" in result.stdout   # batch 16 on each of 2
    assert result.stdout.count("epoch 0: train loss") == 1                              # printed by rank 0 only
    n_val = len(build_datasets(cfg.data, cfg.seed, splits=["val"])["val"])
    assert n_val % 2 == 1   # 13 held-out images: two ranks cannot split them evenly
    assert json.load(open(os.path.join(out, "result.json")))["last"]["n"] == n_val      # each image once
    assert spp.count_params(spp.load_pruned(os.path.join(out, "last"))) == \
        spp.count_params(spp.load_pruned(os.path.join(search, "pruned")))
    runs = [line["run"] for line in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "run" in line]
    assert [r["processes"] for r in runs] == [2]


def test_search_distills_from_the_dense_vit(tmp_path):
    """search.distill on a ViT (mixup on): the KL to the dense model's predictions, masks at 1, without a copy."""
    assert run("search", str(tmp_path / "kd"), "search.steps=6", "search.distill=0.5") == 0
    assert spp.SolutionPath.load(str(tmp_path / "kd")).steps == 6
