"""Pruning quality: SPP against baselines at the same budgets and structures, in one run.

    pip install -e .[bench] && python scripts/benchmark_quality.py

Model and data: the demo's ViT pretrained on Fashion-MNIST (trained first if missing) with
6,000 training images held out as a validation split. Every setting (SPP's nu, lam, search
batch, ranking rule and member values; the Lasso weight and member values) is chosen on the validation split;
accuracy is reported on the test set. Each method ranks the same structures (query-key dims, value dims, MLP neurons; spp-head:
whole heads instead of dims, for comparison); all
members are cut from the rankings by the same global parameter-budget walk
(``spp.WeightFamily``), so only the ranking differs. Methods:

  spp-entry / spp-z  ONE LBI search per seed; every budget read off its path by entry order / final |z|,
                     the kept elements holding --spp-values (auto: the search's final mask values for a
                     member inside the support the search reached, 1 for a larger one; spp.WeightFamily.select)
  spp                the same searches, each budget by the rule and values (1 or the search's mask values)
                     with the best val accuracy (seed 0)
  spp-head           as spp, from searches over whole heads (model.granularity=head: one query-key and one
                     value mask entry per head, MLP neurons as before) at the settings spp picked, the nu
                     calibration picked on val: what the speed benchmark's whole-head members cost in accuracy
  random             random ranking
  magnitude          RMS of the paired weights (q and k rows; v row and proj column; fc1 row and fc2 column)
  taylor             |m · dL/dm| of the masks at 1, summed over --taylor-batches batches
  lasso              cross-entropy + lam * |M|_1 on the masks (Adam), ranked by |M|; lam and values (1 or the
                     Lasso masks' own) per budget on val
  tp-{magnitude,taylor}-{uniform,global}
                     Torch-Pruning's group importances pruning inner dims only (proj, fc2, head
                     and the patch embedding ignored, so the residual width stays), in one step at
                     a pruning ratio bisected until the model has the budget's parameter count
                     (global: where it can get there; on the benchmark ViT not at -85%). Note: Torch-Pruning
                     removes the same head dims from q, k and v together.
  tp-{magnitude,taylor}-global-iter
                     global Torch-Pruning in --tp-steps steps of its own schedule, importance re-read
                     at every step; each budget's member is the model at the first step at or under it

For each, and for the dense model as a reference: test accuracy with no finetuning, after
--finetune-steps of AdamW and after one epoch (at the --epoch-removed budgets), with the lr
cosine-annealed to 0 over the finetune and the same data order for all, over --seeds; and the
wall time to produce all budgets. Writes JSON, a Markdown table and a plot to --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

import spp
from spp.build import build_model
from spp.config import load_config
from spp.criteria import lasso_path, lasso_values, magnitude_scores, random_scores, taylor_scores
from spp.data import build_datasets, build_loader
from spp.engine import evaluate, train_one_epoch
from spp.runtime import Runtime, provenance, seed_everything
from spp.commands import run_search

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_root(root):
    """The config override that points the data at ``root`` (none: the Debian package's folder)."""
    return [f"data.root={root}"] if root else []


def taylor_gradients(dense, batches) -> Dict[str, torch.Tensor]:
    """Weight gradients of the cross-entropy summed over ``batches``: what Torch-Pruning's Taylor
    importance reads from ``.grad`` (computed once, reused by every pruning ratio tried)."""
    model = copy.deepcopy(dense).eval()
    model.zero_grad()
    device = next(model.parameters()).device
    for x, y in batches:
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def tp_importance(kind):
    """Torch-Pruning's group importance: ``taylor`` (reads ``.grad``) or ``magnitude`` (L2 of the weights)."""
    import torch_pruning as tp

    return tp.importance.GroupTaylorImportance() if kind == "taylor" else tp.importance.GroupMagnitudeImportance(p=2)


def tp_pruner(model, example, importance, global_pruning, ratio, steps=1):
    """Torch-Pruning's pruner over ``model``'s inner dims only (proj, fc2, head and the patch embedding
    ignored, so the residual width stays), to channel ratio ``ratio`` in ``steps`` steps of its schedule."""
    import torch_pruning as tp

    ignored = [model.head, model.patch_embed.proj] + [b.attn.proj for b in model.blocks] + [b.mlp.fc2 for b in model.blocks]
    return tp.pruner.MetaPruner(model, example, importance=importance, global_pruning=global_pruning,
                                pruning_ratio=ratio, iterative_steps=steps,
                                num_heads={b.attn.qkv: b.attn.num_heads for b in model.blocks},
                                prune_head_dims=True, prune_num_heads=False, ignored_layers=ignored)


def tp_finish(model):
    """A pruned copy ready to run: timm's Attention reads head_dim and attn_dim in forward (the softmax
    scale stays), and no gradients are kept."""
    model = copy.deepcopy(model)
    for block in model.blocks:
        attn = block.attn
        attn.head_dim = attn.qkv.out_features // (3 * attn.num_heads)
        attn.attn_dim = attn.num_heads * attn.head_dim
    model.zero_grad(set_to_none=True)
    return model


def tp_copy(dense, grads):
    """A copy of ``dense`` in eval mode carrying ``grads`` (what Taylor importance reads from ``.grad``)."""
    model = copy.deepcopy(dense).eval()
    if grads is not None:
        for n, p in model.named_parameters():
            p.grad = grads[n].clone() if n in grads else None
    return model


def tp_prune(dense, example, ratio, importance, global_pruning, grads=None):
    """Torch-Pruning on a copy of ``dense`` at channel ratio ``ratio``, in one step."""
    model = tp_copy(dense, grads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp_pruner(model, example, importance, global_pruning, ratio).step()
    return tp_finish(model)


def tp_member(dense, example, target_params, kind, global_pruning, grads):
    """Torch-Pruning in one step: bisect its ratio until the pruned model has at most ``target_params``
    (global mode: only where it can get there, see :func:`tp_global_members`)."""
    importance = tp_importance(kind)
    low, high = 0.0, 0.99
    best = None
    for _ in range(10):
        mid = (low + high) / 2
        model = tp_prune(dense, example, mid, importance, global_pruning, grads)
        if spp.count_params(model) <= target_params:
            best, high = model, mid
        else:
            low = mid
    return best if best is not None else tp_prune(dense, example, high, importance, global_pruning, grads)


def tp_global_members(dense, example, targets, kind, grads, steps=200):
    """Iterative global Torch-Pruning, one member per budget: ``steps`` steps of its own schedule towards ratio
    0.99, importance re-read at every step (Taylor: from the dense model's gradients, which Torch-Pruning
    prunes along with the weights); each budget's member is the model at the first step at or under
    its parameter count (``targets``: budget -> parameters), so within one step's removal of it.

    In one step at a bisected ratio (:func:`tp_member`) the global mode cannot reach -85%: at high
    ratios every head dim of some block's attention falls under the global threshold, Torch-Pruning
    refuses to empty a layer and leaves that attention whole, and the model stays at about twice the
    budget (282k parameters against 132k on the benchmark's ViT). In small steps the attention shrinks
    before that happens.
    """
    model = tp_copy(dense, grads)
    pending = sorted(targets, key=targets.get, reverse=True)   # the largest budget is reached first
    members = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp_pruner(model, example, tp_importance(kind), True, 0.99, steps)
        for _ in range(steps):
            pruner.step()
            params = spp.count_params(model)
            while pending and params <= targets[pending[0]]:
                members[pending.pop(0)] = tp_finish(model)
            if not pending:
                return members
    raise RuntimeError(f"global Torch-Pruning stopped at {params} parameters, above the budgets "
                       f"{[targets[r] for r in pending]}; raise its steps or ratio")


FINETUNE_LR = 2e-4   # the finetune's lr, for every method and the dense model (why: finetune's docstring)


def finetune(model, loader, steps: int, seed: int, runtime: Runtime, lr: float) -> nn.Module:
    """``steps`` of AdamW: lr warmed up over 10 steps, then cosine-annealed to 0 (timm's scheduler); how the
    recipe and its lr were chosen: docs/log/quality.md ("The finetune recipe")."""
    from timm.scheduler import CosineLRScheduler

    seed_everything(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = CosineLRScheduler(opt, t_initial=steps, lr_min=0.0, warmup_t=min(10, steps // 2),
                                 warmup_lr_init=lr / 100, t_in_epochs=False)
    schedule.step_update(0)
    per_epoch = len(loader)
    step = 0
    while step < steps:
        epoch, offset = divmod(step, per_epoch)
        loader.sampler.set_epoch(1000 + seed + 10_000 * epoch, start=offset * loader.batch_size)
        loader.dataset.set_epoch(1000 + seed + 10_000 * epoch)
        step = train_one_epoch(model, lambda i, o, t: F.cross_entropy(o, t), loader, opt, runtime, step=step,
                               max_steps=steps, on_step=lambda s, _: schedule.step_update(s), desc="finetune")["step"]
    return model


class Bench:
    def __init__(self, args):
        self.args = args
        self.cfg = load_config(os.path.join(ROOT, "configs", "demo_search.yaml"),
                               [f"model.checkpoint={args.checkpoint}", "data.workers=0", *data_root(args.data_root)])
        self.runtime = Runtime(torch.device(args.device), None)   # fp32 everywhere, the searches too
        data = build_datasets(self.cfg.data, seed=0)   # the split is fixed: seed 0
        self.train, self.val, self.test = data["train"], data["val"], data["test"]
        self.dense = build_model(self.cfg).to(args.device).eval()
        self.masked = spp.add_masks(build_model(self.cfg).eval(), "dim").to(args.device)
        self._members = {}   # (id(path), removed, rank, values) -> (path, member): the path is kept so its id stays its own
        self._families = {}  # id(path) -> (path, its WeightFamily)

    def loader(self, split, seed=0):
        """A fresh loader over ``split``; its data (order and augmentation) depend on ``seed`` alone: the
        datasets are shared, and a finetune moves their epoch, so it is set back to 0 here."""
        dataset = {"train": self.train, "val": self.val, "test": self.test}[split]
        dataset.set_epoch(0)
        return build_loader(dataset, 128 if split == "train" else 500, split == "train", 0, seed)

    def accuracy(self, model, split, max_batches=0):
        return evaluate(model, self.loader(split), self.runtime, max_batches, desc=split)["top1"]

    def member(self, path, removed, rank="entry", values="auto"):
        """The compressed member (``values``: see ``spp.WeightFamily.select``); the same object for the same
        (path, budget, rule, values that "auto" resolves to), so that rows sharing a member (spp and
        spp-entry, say) share its test and finetune figures."""
        if id(path) not in self._families:
            self._families[id(path)] = (path, spp.WeightFamily(self.dense, path))
        selected = self._families[id(path)][1].select(remove=removed, rank=rank, values=values)
        key = (id(path), removed, rank, selected.summary.values)
        if key not in self._members:
            self._members[key] = (path, spp.compress(self.dense, selected.masks, granularity=path.granularity))
        return self._members[key][1]

    def search(self, seed, out, overrides=()):
        """``spp search`` (configs/demo_search.yaml) from this benchmark's checkpoint into ``out``."""
        cfg = load_config(os.path.join(ROOT, "configs", "demo_search.yaml"),
                          [f"output={out}", f"seed={seed}", "resume=null", f"model.checkpoint={self.args.checkpoint}",
                           f"device={self.args.device}", "amp='off'", *data_root(self.args.data_root), *overrides])
        return run_search(cfg)

    def rho(self, nu_scale):
        """The pull ρ = --search-step / nu_scale, so that every ν is tried at the same gradient step κα = ρν
        (in units of 1 / RMS gradient)."""
        return self.args.search_step / nu_scale

    def spp_path(self, seed, nu_scale, lam, batch, granularity=None, nu_calibration=None):
        """One search with ν = nu_scale / RMS gradient and ρ = :meth:`rho`, at ``batch`` samples per step;
        ``granularity`` and ``nu_calibration`` (default: configs/demo_search.yaml's) name the search when they
        differ from the config's."""
        rho = self.rho(nu_scale)
        changed = {"model.granularity": (granularity, self.cfg.model.granularity),
                   "search.nu_calibration": (nu_calibration, self.cfg.search.nu_calibration)}
        changed = {k: value for k, (value, default) in changed.items() if value not in (None, default)}
        name = (f"seed{seed}_nu{nu_scale}_rho{rho:.3g}_lam{lam}" + ("" if batch == 128 else f"_b{batch}")
                + "".join(f"_{value}" for value in changed.values()))
        return self.search(seed, os.path.join(self.args.out, "searches", name),
                           [f"search.nu_scale={nu_scale}", f"search.rho={rho}", f"search.lam={lam}",
                            f"search.steps={self.args.search_steps}", f"data.batch_size={batch}",
                            *(f"{k}={value}" for k, value in changed.items())])


METHODS = ("spp", "spp-entry", "spp-z", "spp-head", "random", "magnitude", "taylor", "lasso",
           "tp-magnitude-uniform", "tp-magnitude-global", "tp-magnitude-global-iter",
           "tp-taylor-uniform", "tp-taylor-global", "tp-taylor-global-iter")


RULES = ("entry", "z")
# what a member's kept elements hold: 1, the search's mask values soon after the member's last element entered, or
# at the search's end (spp.WeightFamily.select's values); a Lasso path has no snapshots, so it takes binary or path
VALUES = ("binary", "settled", "path")
LASSO_VALUES = ("binary", "path")


def val_by_reading(bench, path, readings, removed):
    """``{reading: {budget: val accuracy}}`` of ``path``'s members, each reading a (rule, values) pair."""
    return {reading: {r: bench.accuracy(bench.member(path, r, *reading), "val") for r in removed} for reading in readings}


def best_by_budget(val, removed):
    """``{budget: val accuracy of its best reading}`` in ``val`` (:func:`val_by_reading`): the members a row
    reports, since it reads every budget by its best reading."""
    return {r: max(by_budget[r] for by_budget in val.values()) for r in removed}


def best_reading_mean(val, removed):
    """The mean over budgets of :func:`best_by_budget`; settings are compared by it."""
    return statistics.mean(best_by_budget(val, removed).values())


def pick_readings(val, removed, tuning, name):
    """Per budget the reading of ``val`` (:func:`val_by_reading`) with the best val accuracy (a tie: the first,
    entry order and binary), recorded in ``tuning`` under ``name`` with every reading's figures."""
    reading_of = {r: max(val, key=lambda reading: val[reading][r]) for r in removed}
    tuning[f"{name} rank and values per budget"] = {str(r): list(reading) for r, reading in reading_of.items()}
    tuning[f"{name} val per budget"] = {" ".join(reading): {str(r): round(v, 2) for r, v in by_budget.items()}
                                        for reading, by_budget in val.items()}
    return reading_of


def spp_methods(bench, args, tuning):
    """One search per seed; nu_scale (with rho = --search-step / nu_scale) and lam chosen on val with the
    first seed at the first of --search-batches, then the batch among --search-batches at those (each setting
    scored by :func:`best_reading_mean`), then the ranking rule and member values. spp-entry and spp-z read
    every budget by one rule, with --spp-values; spp takes, per budget, the rule and values with the better val
    accuracy (free: a family is read by either, as Lasso's lam and values are picked per budget)."""
    paths, val = {}, {}
    readings = [(rule, values) for rule in RULES for values in VALUES]

    def key(scale, lam, batch, *reading):
        """The tuning entry of a setting read by one (rule, values), or with no reading by each budget's best."""
        setting = f"spp nu_scale={scale} rho={bench.rho(scale):.3g} lam={lam} batch={batch}"
        return f"{setting} rank={reading[0]} values={reading[1]}" if reading else f"{setting}, each budget's best reading"

    def tune(setting):
        """Search the first seed at ``setting`` = (nu_scale, lam, batch); judge it on val by each reading."""
        start = time.time()
        path = bench.spp_path(args.seeds[0], *setting)
        paths[(*setting, args.seeds[0])] = (path, time.time() - start)
        val[setting] = val_by_reading(bench, path, readings, args.removed)
        for reading in readings:
            mean = statistics.mean(val[setting][reading].values())
            tuning[key(*setting, *reading)] = round(mean, 2)
            print(f"tuning {key(*setting, *reading)}: mean val {mean:.2f}%")
        name = key(*setting)
        tuning[name] = round(best_reading_mean(val[setting], args.removed), 2)
        tuning[f"{name} per budget"] = {str(r): round(v, 2) for r, v in best_by_budget(val[setting], args.removed).items()}
        print(f"tuning {name}: mean val {tuning[name]:.2f}%")

    def score(setting):
        """A tuned setting's mean val, each budget read by its best reading (as the spp row reads it)."""
        return best_reading_mean(val[setting], args.removed)

    first = args.search_batches[0]
    grid = [(scale, lam, first) for scale in args.nu_scales for lam in args.lams]
    for setting in grid:
        tune(setting)
    scale, lam, _ = max(grid, key=score)
    for batch in args.search_batches[1:]:
        tune((scale, lam, batch))
    best = max([(scale, lam, batch) for batch in args.search_batches], key=score)
    tuning["spp_nu_scale"], tuning["spp_lam"], tuning["spp_batch"] = best
    tuning["spp_rho"] = bench.rho(best[0])
    reading_of = pick_readings(val[best], args.removed, tuning, "spp")
    for seed in args.seeds[1:]:
        start = time.time()
        paths[(*best, seed)] = (bench.spp_path(seed, *best), time.time() - start)
    methods = {"spp": {}, "spp-entry": {}, "spp-z": {}}
    for seed in args.seeds:
        path, seconds = paths[(*best, seed)]
        methods["spp"][seed] = (lambda r, p=path: bench.member(p, r, *reading_of[r]), seconds)
        methods["spp-entry"][seed] = (lambda r, p=path: bench.member(p, r, "entry", args.spp_values), seconds)
        methods["spp-z"][seed] = (lambda r, p=path: bench.member(p, r, "z", args.spp_values), seconds)
    if "spp-head" in args.methods:
        methods["spp-head"] = head_method(bench, args, best, readings, tuning)
    return methods


def head_method(bench, args, setting, readings, tuning):
    """Searches over whole heads at ``setting`` (spp's pick), one per seed, with the ν calibration of
    --head-nu-calibrations that does better on val (seed 0, :func:`best_reading_mean`, as spp's settings),
    then per budget the reading (rule and values) with the best val accuracy, as for spp."""
    searched, val = {}, {}

    def search(seed, calibration):
        start = time.time()
        searched[(seed, calibration)] = (bench.spp_path(seed, *setting, granularity="head", nu_calibration=calibration),
                                         time.time() - start)
        return searched[(seed, calibration)][0]

    for calibration in args.head_nu_calibrations:
        path = search(args.seeds[0], calibration)
        val[calibration] = val_by_reading(bench, path, readings, args.removed)
        mean = best_reading_mean(val[calibration], args.removed)
        tuning[f"spp-head nu_calibration={calibration}"] = round(mean, 2)
        print(f"tuning spp-head nu_calibration={calibration}: mean val {mean:.2f}% (each budget's better reading)")
    calibration = max(args.head_nu_calibrations, key=lambda c: tuning[f"spp-head nu_calibration={c}"])
    tuning["spp-head nu_calibration"] = calibration
    reading_of = pick_readings(val[calibration], args.removed, tuning, "spp-head")
    for seed in args.seeds[1:]:
        search(seed, calibration)
    return {seed: (lambda r, p=searched[(seed, calibration)][0]: bench.member(p, r, *reading_of[r]),
                   searched[(seed, calibration)][1]) for seed in args.seeds}


def lasso_method(bench, args, tuning):
    """One Lasso run per lam; per budget the lam, and the member values (1, or the Lasso run's mask values), with
    the best validation accuracy (seed 0)."""
    runs = {}

    def run(lam, seed):
        seed_everything(seed)
        start = time.time()
        values = lasso_values(bench.masked, bench.loader("train", seed), lam, args.lasso_steps, 1e-2)
        runs[(lam, seed)] = (lasso_path(bench.masked, values), time.time() - start)

    for lam in args.lasso_lams:
        run(lam, args.seeds[0])
    settings = [(lam, values) for lam in args.lasso_lams for values in args.lasso_values]
    chosen = {r: max(settings, key=lambda lv: bench.accuracy(bench.member(runs[(lv[0], args.seeds[0])][0], r, "entry", lv[1]), "val"))
              for r in args.removed}
    tuning["lasso lam and values per budget"] = {str(r): list(lv) for r, lv in chosen.items()}
    lams = sorted({lam for lam, _ in chosen.values()})
    for seed in args.seeds[1:]:
        for lam in lams:
            run(lam, seed)
    return {seed: (lambda r, s=seed: bench.member(runs[(chosen[r][0], s)][0], r, "entry", chosen[r][1]),
                   sum(runs[(lam, seed)][1] for lam in lams)) for seed in args.seeds}


def score_methods(bench, args, magnitude, magnitude_time):
    """Random, magnitude and first-order Taylor rankings of the same structures."""
    methods = {"random": {}, "magnitude": {}, "taylor": {}}
    for seed in args.seeds:
        rnd = spp.SolutionPath.from_scores(bench.masked, random_scores(bench.masked, seed))
        methods["random"][seed] = (lambda r, p=rnd: bench.member(p, r), 0.0)
        methods["magnitude"][seed] = (lambda r: bench.member(magnitude, r), magnitude_time)   # one ranking for all
        seed_everything(seed)
        start = time.time()
        taylor = spp.SolutionPath.from_scores(bench.masked, taylor_scores(bench.masked, bench.loader("train", seed), args.taylor_batches))
        methods["taylor"][seed] = (lambda r, p=taylor: bench.member(p, r), time.time() - start)
    return methods


def tp_methods(bench, args, targets, wanted):
    """Torch-Pruning members at the same parameter budgets (magnitude: one set, reused for every seed)."""
    example = next(iter(bench.loader("val")))[0][:2].to(args.device)
    methods = {}
    for kind in ("magnitude", "taylor"):
        for scope in ("uniform", "global", "global-iter"):
            name = f"tp-{kind}-{scope}"
            if name not in wanted:
                continue
            methods[name] = {}
            for seed in (args.seeds if kind == "taylor" else args.seeds[:1]):
                start = time.time()
                grads = taylor_gradients(bench.dense, [b for _, b in zip(range(args.taylor_batches), bench.loader("train", seed))]) \
                    if kind == "taylor" else None
                members = tp_global_members(bench.dense, example, targets, kind, grads, args.tp_steps) \
                    if scope == "global-iter" else \
                    {r: tp_member(bench.dense, example, targets[r], kind, scope == "global", grads) for r in args.removed}
                methods[name][seed] = (members.__getitem__, time.time() - start)
            for seed in args.seeds[1:]:
                methods[name].setdefault(seed, methods[name][args.seeds[0]])
    return methods


def evaluate_methods(bench, args, methods, targets, dense_test):
    """Test accuracy of every member with no finetune, after --finetune-steps, and after one epoch
    (at --epoch-removed); mean and std over seeds. Returns (rows, dense reference row)."""
    epoch = args.epoch_steps or len(bench.loader("train"))
    test = lambda m: bench.accuracy(m, "test")  # noqa: E731

    # a model shared by seeds (magnitude) or by rows (spp and spp-entry) is tested once, and finetuned
    # once per seed and length; the models stay alive in ``methods`` and ``bench``, so their ids stay theirs
    measured = {(id(bench.dense), 0, None): dense_test}

    def tuned(model, steps, seed):
        key = (id(model), steps, seed if steps else None)
        if key not in measured:
            measured[key] = test(model if not steps else finetune(
                copy.deepcopy(model), bench.loader("train", seed), steps, seed, bench.runtime, args.finetune_lr))
        return measured[key]

    def row(model_of_seed, seeds, with_epoch):
        before, after, whole = [], [], []
        for seed in seeds:
            model = model_of_seed(seed)
            before.append(tuned(model, 0, seed))
            after.append(tuned(model, args.finetune_steps, seed))
            if with_epoch:
                whole.append(tuned(model, epoch, seed))
        stats = {}
        for key, values in (("test_no_ft", before), ("test_ft", after), ("test_epoch", whole)):
            if values:
                stats.update({key: round(statistics.mean(values), 2), f"{key}_std": round(statistics.pstdev(values), 2)})
        return stats

    dense = {"method": "dense", "removed": 0.0, "params": spp.count_params(bench.dense), "test_no_ft": dense_test}
    if not args.no_dense_finetune:
        dense.update(row(lambda seed: bench.dense, args.seeds, bool(args.epoch_removed)))
    print(json.dumps(dense))
    results: List[Dict] = []
    for method, per_seed in methods.items():
        for removed in args.removed:
            members = {seed: make(removed) for seed, (make, _) in per_seed.items()}
            result = {"method": method, "removed": removed, "params": spp.count_params(next(iter(members.values()))),
                      "budget_params": targets[removed],
                      **row(members.__getitem__, list(members), removed in args.epoch_removed),
                      "seconds_all_budgets": round(statistics.mean(s for _, s in per_seed.values()), 1)}
            results.append(result)
            print(json.dumps(result))
    return results, dense


def main():
    sys.stdout.reconfigure(line_buffering=True)  # figures show as they are measured, also in a log file
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="outputs/demo/pretrain/best.safetensors")
    parser.add_argument("--out", default="outputs/benchmark_quality")
    parser.add_argument("--data-root", help="folder with the Fashion-MNIST files (default: where the Debian package puts them)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where every model runs (fp32); scripts/gpu_check.sh uses cuda")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--removed", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.85])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--search-steps", type=int, default=600)
    parser.add_argument("--search-batches", type=int, nargs="+", default=[128, 192],
                        help="batch sizes of the SPP searches tried on val, after nu and lam are picked at the first "
                             "(nu stays batch 128's: search.nu_batch; the finetunes and the other methods keep 128). "
                             "192: one 600-step search sees 0.75 of the samples of four 300-step Lasso runs at 128; "
                             "the seed spread at -85%% is gradient noise that more samples per step reduce "
                             "(docs/log/quality.md)")
    parser.add_argument("--nu-scales", type=float, nargs="+", default=[0.3, 1.0, 1.5, 3.0],
                        help="SPP nu values tried, as nu_scale (nu = nu_scale / RMS mask gradient at M = 1)")
    parser.add_argument("--search-step", type=float, default=0.03,
                        help="SPP gradient step kappa*alpha = rho*nu held fixed while nu varies, in units of "
                             "1 / RMS gradient: each search gets rho = search_step / nu_scale (0.03: the configs' "
                             "rho 0.02 at nu_scale 1.5)")
    parser.add_argument("--lams", type=float, nargs="+", default=[0.1, 0.4],
                        help="SPP lam values tuned with the nu scales (0.1 is the config default; "
                             "scripts/ablate_search.py found 0.4 better on val)")
    parser.add_argument("--spp-values", default="auto", choices=("auto", *VALUES),
                        help="what the kept elements of the spp-entry and spp-z members hold (spp.WeightFamily.select)")
    parser.add_argument("--head-nu-calibrations", nargs="+", default=["pooled", "pair"], choices=("pooled", "pair", "mask"),
                        help="spp-head: nu calibrations tried on val (search.nu_calibration). Pooled, one nu for every "
                             "mask, is set by the head masks' gradients, which sum a whole head's and dwarf a neuron's")
    parser.add_argument("--lasso-values", nargs="+", default=list(LASSO_VALUES), choices=LASSO_VALUES,
                        help="member values the Lasso rows choose from on val: 1 (binary) or the Lasso masks' own (path)")
    parser.add_argument("--lasso-lams", type=float, nargs="+", default=[3e-4, 1e-3])
    parser.add_argument("--lasso-steps", type=int, default=300)
    parser.add_argument("--taylor-batches", type=int, default=20)
    parser.add_argument("--tp-steps", type=int, default=200,
                        help="steps of the tp-*-global-iter schedule (each budget's member: the first step at or "
                             "under its parameters; more steps, closer to the budget)")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--finetune-lr", type=float, default=FINETUNE_LR)
    parser.add_argument("--epoch-removed", type=float, nargs="*", default=None,
                        help="budgets that also get a one-epoch finetune (default: every --removed budget; each "
                             "adds 15-30 min on 2 cores; the flag with no budgets: none)")
    parser.add_argument("--epoch-steps", type=int, default=0, help="steps of the long finetune (default: one epoch)")
    parser.add_argument("--no-dense-finetune", action="store_true", help="skip the dense reference finetunes")
    parser.add_argument("--merge", nargs="+", metavar="DIR",
                        help="run nothing: combine the benchmark_quality.json of earlier runs (e.g. one per group of "
                             "methods) into one table and plot in --out; for the same method and budget a later "
                             "DIR's figures replace an earlier one's and add those it lacks")
    args = parser.parse_args()
    if args.epoch_removed is None:
        args.epoch_removed = list(args.removed)
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        return merge(args.merge, args.out)
    if not os.path.isfile(args.checkpoint):
        print(f"{args.checkpoint} missing: pretraining the demo model first")
        subprocess.run([sys.executable, "-m", "spp", "retrain", os.path.join(ROOT, "configs", "demo_pretrain.yaml"),
                        f"output={os.path.dirname(args.checkpoint)}",
                        *data_root(args.data_root)], check=True)
    started = time.time()   # a pretraining above is not counted
    bench = Bench(args)
    dense_val, dense_test = bench.accuracy(bench.dense, "val"), bench.accuracy(bench.dense, "test")
    print(f"dense: val {dense_val:.2f}%, test {dense_test:.2f}%")

    start = time.time()
    magnitude = spp.SolutionPath.from_scores(bench.masked, magnitude_scores(bench.masked))
    magnitude_time = time.time() - start
    family = spp.WeightFamily(bench.dense, magnitude)
    targets = {r: family.select(remove=r).summary.params_after for r in args.removed}
    tuning: Dict = {}
    wanted = set(args.methods)
    methods = spp_methods(bench, args, tuning) if wanted & {"spp", "spp-entry", "spp-z", "spp-head"} else {}
    if "lasso" in wanted:
        methods["lasso"] = lasso_method(bench, args, tuning)
    methods.update(score_methods(bench, args, magnitude, magnitude_time))
    methods.update(tp_methods(bench, args, targets, wanted))
    methods = {m: methods[m] for m in METHODS if m in wanted and m in methods}
    results, dense_ft = evaluate_methods(bench, args, methods, targets, dense_test)

    summary = {"dense_val": dense_val, "dense_test": dense_test, "dense_ft": dense_ft,
               "tuning_val": tuning, "args": vars(args), "results": results, "run": provenance(args.device, started)}
    write_outputs(summary, args, args.out)


def write_outputs(summary, args, out):
    """``benchmark_quality.json``, ``.md`` and ``.png`` in ``out`` (made if missing); prints the table."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "benchmark_quality.json"), "w") as f:
        json.dump(summary, f, indent=1)
    write_markdown(summary, args, os.path.join(out, "benchmark_quality.md"))
    plot(summary, args, os.path.join(out, "benchmark_quality.png"))
    print(open(os.path.join(out, "benchmark_quality.md")).read())


def merge(directories, out):
    """One summary from the runs in ``directories``: their rows (for the same method and budget, a later run's
    figures replacing an earlier one's and adding those it lacks, e.g. one-epoch finetunes at other budgets;
    every figure the runs both measured and disagree on is printed), the dense reference's figures combined
    the same way, every run's tuning."""
    summaries = []
    for directory in directories:
        filename = os.path.join(directory, "benchmark_quality.json")
        if not os.path.isfile(filename):
            raise SystemExit(f"--merge: {filename} not found; each DIR is the --out of an earlier run")
        with open(filename) as f:
            summaries.append(json.load(f))
    for key in ("removed", "seeds", "finetune_steps", "checkpoint"):
        values = {json.dumps(s["args"][key]) for s in summaries}
        if len(values) > 1:
            raise SystemExit(f"--merge: the runs differ in --{key.replace('_', '-')} ({', '.join(sorted(values))}); "
                             "only runs of the same benchmark can share a table")
    rows: Dict = {}
    dense_ft: Dict = {}   # the dense reference's figures, combined the same way
    for directory, s in zip(directories, summaries):
        dense_ft.update(s["dense_ft"])
        for r in s["results"]:
            row = rows.setdefault((r["method"], r["removed"]), {})
            changed = [f"{k} {row[k]} -> {v}" for k, v in r.items() if k in row and row[k] != v]
            if changed:
                print(f"--merge: {directory} changes {r['method']} at -{100 * r['removed']:.0f}%: {', '.join(changed)}")
            row.update(r)
    order = {m: i for i, m in enumerate(METHODS)}
    args = argparse.Namespace(**summaries[0]["args"])
    args.epoch_removed = sorted({r for s in summaries for r in s["args"]["epoch_removed"]})
    args.merged_from = list(directories)
    summary = {"dense_val": summaries[0]["dense_val"], "dense_test": summaries[0]["dense_test"],
               "dense_ft": dense_ft,
               "tuning_val": {k: v for s in summaries for k, v in s["tuning_val"].items()}, "args": vars(args),
               "results": sorted(rows.values(), key=lambda r: (order[r["method"]], r["removed"])),
               "merged_runs": {directory: s.get("run") for directory, s in zip(directories, summaries)}}
    write_outputs(summary, args, out)


def columns(args):
    """(key, label, budgets) of each table column group."""
    groups = [("test_no_ft", "no finetune", args.removed), ("test_ft", f"{args.finetune_steps}-step finetune", args.removed)]
    if args.epoch_removed:
        groups.append(("test_epoch", "1-epoch finetune", [r for r in args.removed if r in args.epoch_removed]))
    return groups


def write_markdown(summary, args, filename):
    by = {(r["method"], r["removed"]): r for r in summary["results"]}
    methods = list(dict.fromkeys(r["method"] for r in summary["results"]))
    groups = columns(args)
    dense = summary["dense_ft"]
    reference = "; ".join(f"{label} {dense[key]:.2f} ± {dense.get(key + '_std', 0.0):.2f}" for key, label, _ in groups if key in dense)
    lines = [f"Test accuracy (%) on Fashion-MNIST, mean ± std over seeds {args.seeds}. Dense model: {reference}. "
             "Columns: share of prunable parameters removed.", "",
             "| method | " + " | ".join(f"{label}: -{100 * r:.0f}%" if i == 0 else f"-{100 * r:.0f}%"
                                       for _, label, budgets in groups for i, r in enumerate(budgets))
             + " | time for all budgets (s) |",
             "|---|" + "---|" * (sum(len(b) for _, _, b in groups) + 1)]

    def cell(row, key):
        if key not in row:
            return "–"
        over = row["params"] > 1.01 * row["budget_params"]  # a method that could not reach the budget
        return f"{row[key]:.2f} ± {row[key + '_std']:.2f}" + (" †" if over else "")

    for m in methods:
        cells = " | ".join(cell(by[(m, r)], key) for key, _, budgets in groups for r in budgets)
        lines.append(f"| {m} | {cells} | {by[(m, args.removed[0])]['seconds_all_budgets']} |")
    lines += ["", "† the method could not reach this budget: its model keeps more parameters than the others "
              "(see `params` in benchmark_quality.json)."]

    def measured(run):
        return (f"commit {run['commit'] or 'unknown (not a git checkout)'}, started {run['started']}, {run['minutes']} min "
                f"on {run['processor']} ({run['device']}, {run['threads']} threads), torch {run['torch']}, timm {run['timm']}")

    if "run" in summary:
        lines += ["", f"Measured at {measured(summary['run'])}."]
    if "merged_runs" in summary:   # runs from before provenance was recorded have none
        lines += ["", "Merged from " + "; ".join(f"`{d}`" + (f" ({measured(run)})" if run else "")
                                                  for d, run in summary["merged_runs"].items()) + "."]
    with open(filename, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(summary, args, filename):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = columns(args)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in summary["results"]))
    colors = plt.get_cmap("tab20").colors   # one colour per method up to 20; SPP thick, Torch-Pruning dashed
    for ax, (key, title, budgets) in zip(axes[0], groups):
        for i, m in enumerate(methods):
            rows = sorted((r for r in summary["results"] if r["method"] == m and r["removed"] in budgets and key in r),
                          key=lambda r: r["params"])   # a method that missed a budget keeps more, not fewer
            ax.errorbar([r["params"] / 1e6 for r in rows], [r[key] for r in rows], yerr=[r[key + "_std"] for r in rows],
                        marker="o", capsize=3, label=m, color=colors[2 * i % 20 + (2 * i // 20) % 2],
                        lw=2.5 if m.startswith("spp") else 1.2, ls="--" if m.startswith("tp-") else "-")
        ax.axhline(summary["dense_ft"].get(key, summary["dense_test"]), color="gray", ls=":", label="dense")
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
