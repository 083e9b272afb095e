"""SPP against magnitude, Taylor, random and Lasso on both towers of a CLIP model: the same model, data,
structures, budgets and finetuning.

    pip install -e .[llm,bench] && python scripts/benchmark_clip.py

Model: the small CLIP of ``make demo-clip`` (vision 4 layers, text 3, width 128), trained on the Fashion-MNIST
training images with captions made from their class names (trained here, as the demo does, if its cache is
missing). Data: the demo's: searches, calibration, Lasso and finetunes read the training pairs; every
setting is chosen on the 6,000 held-out validation pairs; figures are on the 10,000 test images (one
caption each), never trained on.

Methods, each ranking the same structures (query-key and value dims, MLP neurons of every layer of both
towers) and cut by the same global parameter-budget walk (``spp.WeightFamily``) at ``--removed`` fractions
of the prunable parameters:

  spp        one LBI search (``calibrate_nu`` on validation batches, ``search_optimizer``'s defaults,
             ``--search-steps`` steps); each budget's member by ``WeightFamily.select_best``, val zero-shot
  magnitude  RMS of each structure's weights (``spp.criteria.magnitude_scores``)
  random     a random ranking
  taylor     first-order Taylor importance of each mask element, |m ∂L/∂m| summed over
             ``--calibration-batches`` training batches (``spp.criteria.taylor_scores``)
  lasso      contrastive loss + lam |M|_1 on the masks (Adam, ``--lasso-steps``), one run per lam in
             ``--lasso-lams``; per budget the lam and the member values (1 or the Lasso masks') on val

Every choice (SPP's reading of each member, Lasso's lam and values) is by validation zero-shot accuracy, the
demo's headline: with captions made from class names, text-to-image recall moves in steps of one of the 80
distinct captions. Figures: test zero-shot top-1 (each image's nearest class prompt embedding, eight
templates) and recall@1 (the mean of image-to-text and text-to-image recall@1; a caption is right for an
image of its class),
mean ± std over ``--seeds`` with no finetuning, and for ``--finetune-seeds`` after ``--finetune-steps`` steps
of full finetuning (AdamW, contrastive loss, the same recipe for every method); the time each method takes
for all budgets. Writes JSON and a Markdown table to --out.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Dict

import torch
from torch.utils.data import DataLoader, Subset

import spp
from spp.criteria import lasso_path, lasso_values, magnitude_scores, random_scores, taylor_scores
from spp.bench import MaskedBench, budget_section, run_methods, take
from spp.bench import finetune as harness_finetune
from spp.runtime import provenance
from spp.tables import mean_std, write_json

METHODS = ("spp", "magnitude", "random", "taylor", "lasso")


class Bench(MaskedBench):
    """The trained CLIP, its masked copy and the data splits, shared by every method."""

    def __init__(self, args):
        from spp.build import build_datasets, task_for
        from spp.demo import shipped_config

        self.args = args
        overrides = [f"model.name={args.model}"] + ([f"data.root={args.data_root}"] if args.data_root else [])
        if not os.path.isfile(os.path.join(args.model, "model.safetensors")):
            from spp.demo_clip import pretrain
            print(f"no trained CLIP in {args.model}: training it as make demo-clip does")
            os.makedirs(args.model, exist_ok=True)
            pretrain(shipped_config("demo_clip_search.yaml", overrides), args.model)
        cfg = shipped_config("demo_clip_search.yaml", overrides)
        self.data = build_datasets(cfg.data, cfg.seed, ["train", "val", "test"], tokenizer=args.model)
        self.val = Subset(self.data["val"], range(min(args.val_pairs, len(self.data["val"]))))
        super().__init__(spp.create_model(args.model), task_for(cfg))

    def loader(self, split: str, seed: int) -> DataLoader:
        data = {"val": self.val}.get(split, self.data[split])
        train = split == "train"
        return DataLoader(data, batch_size=self.args.batch if train else 500, shuffle=train, drop_last=train,
                          generator=torch.Generator().manual_seed(seed))

    def scores(self, model, split: str) -> Dict[str, float]:
        m = self.metrics(model, self.loader(split, 0))
        return {"recall@1": m["recall@1"], "zero-shot": m["zero-shot"]}

    def steps(self, seed: int, steps: int):
        """``steps`` training batches in the seed's order (each epoch's seed moved by 7 per batch before it)."""
        return take(lambda done: self.loader("train", seed + 7 * done), steps)


def run_spp(bench, seed, removed):
    masked = copy.deepcopy(bench.masked)
    nu = spp.calibrate_nu(masked, bench.loader("val", seed), bench.task.loss, task=bench.task)
    optimizer = spp.search_optimizer(masked, nu)
    masked.train()
    for batch in bench.steps(seed, bench.args.search_steps):
        loss = bench.loss(masked, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    family = bench.family_of(spp.SolutionPath.from_optimizer(optimizer, masked.eval()))
    return {r: (bench.compressed(family.select_best(
        lambda m: bench.scores(bench.compressed(m.masks), "val")["zero-shot"], remove=r).masks), {})
            for r in removed}, {}


def run_scores(name):
    def method(bench, seed, removed):
        if name == "magnitude":
            scores = magnitude_scores(bench.masked)
        elif name == "random":
            scores = random_scores(bench.masked, seed)
        else:
            scores = taylor_scores(bench.masked, bench.loader("train", seed), bench.args.calibration_batches,
                                   bench.task.loss, task=bench.task)
        return bench.members(spp.SolutionPath.from_scores(bench.masked, scores), removed), {}
    return method


def run_lasso(bench, seed, removed):
    families = [bench.family_of(lasso_path(bench.masked, lasso_values(
        bench.masked, bench.loader("train", seed), lam, bench.args.lasso_steps, 1e-2,
        bench.task.loss, task=bench.task))) for lam in bench.args.lasso_lams]
    out = {}
    for r in removed:
        candidates = [bench.compressed(f.select(remove=r, values=v).masks) for f in families for v in ("binary", "path")]
        out[r] = (max(candidates, key=lambda m: bench.scores(m, "val")["zero-shot"]), {})
    return out, {}


RUNNERS = {"spp": run_spp, "lasso": run_lasso, **{m: run_scores(m) for m in ("magnitude", "random", "taylor")}}


def finetune(bench, model, seed: int) -> Dict[str, float]:
    """Full finetuning of a compressed member (AdamW, ``--finetune-lr`` after 10 warm-up steps, cosine to 0,
    weight decay 0.05, gradient clip 1); test metrics after ``--finetune-steps``."""
    steps = bench.args.finetune_steps
    return harness_finetune(bench, model, bench.steps(1000 + seed, steps), steps, bench.args.finetune_lr,
                            weight_decay=0.05, cosine=True, evaluate_at=lambda m: bench.scores(m, "test"))[steps]


def write_table(results: Dict, args, out: str) -> str:
    removed, dense = args.removed, results["dense"]
    lines = [f"Dense: {dense['params']:,} parameters ({results['prunable']:,} prunable), test recall@1 "
             f"{dense['test']['recall@1']:.2f}, zero-shot {dense['test']['zero-shot']:.2f}"
             + (f" (finetuned by the same recipe: zero-shot {dense['ft']['zero-shot']:.2f}, recall@1 "
                f"{dense['ft']['recall@1']:.2f})" if "ft" in dense else "")
             + ". Cells: test zero-shot top-1 / recall@1 (%), mean ± std over seeds.", ""]
    for title, key, seeds in (("no finetuning", "test", args.seeds),
                              (f"after {args.finetune_steps} finetuning steps", "ft", args.finetune_seeds)):
        rows = []
        for method in results["methods"]:
            runs = results["runs"].get(method, {})
            cells = []
            for r in removed:
                got = [runs[str(s)][str(r)][key] for s in seeds if str(s) in runs and key in runs[str(s)][str(r)]]
                cells.append(" / ".join(mean_std([x[m] for x in got]) for m in ("zero-shot", "recall@1")))
            rows.append((method, cells, [runs[str(s)]["time"] for s in args.seeds if str(s) in runs]))
        lines += budget_section(title, seeds, removed, rows)
    text = "\n".join(lines)
    with open(os.path.join(out, "benchmark_clip.md"), "w") as f:
        f.write(text + "\n")
    plot(results, args, os.path.join(out, "benchmark_clip.png"))
    return text


def plot(results: Dict, args, filename: str) -> None:
    """Test zero-shot accuracy against parameters for every method, before and after finetuning."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    dense = results["dense"]
    for ax, key, seeds, title in ((axes[0], "test", args.seeds, "no finetuning (mean over seeds)"),
                                  (axes[1], "ft", args.finetune_seeds, f"after {args.finetune_steps} finetuning steps")):
        for method in results["methods"]:
            runs = results["runs"].get(method, {})
            points = []
            for r in args.removed:
                rows = [runs[str(s)][str(r)] for s in seeds if str(s) in runs and key in runs[str(s)][str(r)]]
                if rows:
                    points.append((rows[0]["params"] / 1e6, statistics.mean(x[key]["zero-shot"] for x in rows)))
            if points:
                ax.plot(*zip(*points), marker="o", lw=2.5 if method == "spp" else 1.2, label=method)
        reference = dense["test"] if key == "test" else dense.get("ft")
        if reference:
            ax.axhline(reference["zero-shot"], color="gray", ls="--", lw=1, label="dense")
        ax.set(xlabel="parameters (M)", title=title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test zero-shot top-1 (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle("CLIP, both towers: same structures, same budget walk")
    fig.tight_layout()
    fig.savefig(filename, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/demo_clip/pretrain/model",
                        help="the demo's trained CLIP (trained here if missing)")
    parser.add_argument("--data-root", help="Fashion-MNIST's folder (default: the Debian package's)")
    parser.add_argument("--out", default="outputs/benchmark_clip")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--removed", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--val-pairs", type=int, default=3000, help="validation pairs for every choice")
    parser.add_argument("--search-steps", type=int, default=600)
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--lasso-lams", type=float, nargs="+", default=[1e-4, 3e-4])
    parser.add_argument("--lasso-steps", type=int, default=300)
    parser.add_argument("--finetune-seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--table-from", metavar="JSON", help="measure nothing: the table and plot of an earlier run")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.table_from:
        with open(args.table_from) as f:
            results = __import__("json").load(f)
        print(write_table(results, argparse.Namespace(**{**results["args"], "out": args.out}), args.out))
        return
    start = time.time()
    bench = Bench(args)
    results = {"args": vars(args), "provenance": provenance(bench.runtime.device), "prunable": bench.prunable,
               "methods": args.methods, "runs": {},
               "dense": {"params": spp.count_params(bench.dense), "val": bench.scores(bench.dense, "val"),
                         "test": bench.scores(bench.dense, "test")}}
    if args.finetune_seeds:   # the reference for the finetuned rows: the dense model finetuned by the same recipe
        results["dense"]["ft"] = finetune(bench, bench.dense, args.finetune_seeds[0])
    print(f"dense: {results['dense']}, {bench.prunable:,} prunable parameters", flush=True)
    path = os.path.join(args.out, "benchmark_clip.json")

    def score(method, seed, r, model, info):
        row = {"params": spp.count_params(model), "val": bench.scores(model, "val"), "test": bench.scores(model, "test")}
        if seed in args.finetune_seeds:
            row["ft"] = finetune(bench, model, seed)
        print(f"{method:10s} seed {seed} -{r:.0%}: params {row['params']:,}  test {row['test']}"
              + (f"  finetuned {row['ft']}" if "ft" in row else ""), flush=True)
        return row

    run_methods(bench, results, path, args.methods, args.seeds, args.removed, RUNNERS, score)
    results["minutes"] = (time.time() - start) / 60
    write_json(results, path)
    print(write_table(results, args, args.out))
    print(f"{results['minutes']:.1f} minutes; {path}")


if __name__ == "__main__":
    main()
