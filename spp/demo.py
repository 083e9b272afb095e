"""`spp demo`: the whole pipeline on Fashion-MNIST in minutes on a laptop CPU.

pretrain a small ViT (cached) → LBI search → evaluate the family at several sparsities
without retraining → export one member → finetune it briefly → print a table.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import List, Sequence

from .config import load_config
from .commands import run_export, run_family, run_retrain, run_search
from .tables import write_table

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


VALUE_LABELS = {"binary": "1", "path": "search M at its end", "settled": "search M, settled"}


def shipped_config(name: str, overrides: Sequence[str] = ()):
    """A config shipped in ``configs/`` (the demos' and benchmarks'), with ``overrides``."""
    path = CONFIGS / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run the demo from a checkout of spp (pip install -e .)")
    return load_config(str(path), overrides)


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run_demo(output: str = "outputs/demo", overrides: Sequence[str] = (), fresh: bool = False) -> str:
    """``spp demo``: pretrain (cached), search, family, export and retrain a ViT on Fashion-MNIST; the table."""
    start = time.time()
    checkpoint = os.path.join(output, "pretrain", "best.safetensors")
    search_dir = os.path.join(output, "search")
    pruned_dir = os.path.join(search_dir, "pruned")
    fresh_start = ["resume=null"] if fresh else []   # --fresh: not even a checkpoint of an earlier pretrain is resumed
    pretrain = shipped_config("demo_pretrain.yaml", [f"output={output}/pretrain", *overrides, *fresh_start])
    if fresh or not os.path.isfile(checkpoint):
        _banner("1/5 pretrain a ViT on Fashion-MNIST (cached for the next run)")
        run_retrain(pretrain)
    else:
        _banner(f"1/5 pretrained model cached at {checkpoint} (--fresh retrains it)")
    shared = [f"model.checkpoint={checkpoint}", *overrides]
    search = shipped_config("demo_search.yaml", [f"output={search_dir}", "resume=null", f"export.out={pruned_dir}", *shared])
    retrain = shipped_config("demo_retrain.yaml", [f"output={output}/retrain", "resume=null", f"train.source={pruned_dir}",
                                            *shared])
    rows, result = search_to_retrain(search, retrain, "the frozen model", "retrain the exported member briefly "
                                     "(distilled from the dense model)")
    return report(output, rows, search.export.remove, result,
                  f"SPP demo on Fashion-MNIST (top-1 on 6,000 held-out validation images, {time.time() - start:.0f} s)",
                  "accuracy vs size")


def search_to_retrain(search, retrain, searched: str, finetune: str, total: int = 5):
    """A demo's stages 2-5 (search, family, export, finetune of the exported member): ``(family rows, retrain result)``;
    ``total``: the demo's number of stages."""
    _banner(f"2/{total} search: LBI over the masks of {searched}")
    run_search(search)
    _banner(f"3/{total} family: members at several sizes, no retraining")
    rows = run_family(search)
    _banner(f"4/{total} export: {search.export.remove:.0%} of the prunable parameters removed, compressed")
    run_export(search)
    _banner(f"5/{total} {finetune}")
    return rows, run_retrain(retrain)


def report(output: str, rows: List[dict], removed: float, result: dict, title: str, plotted: str,
           metric: str = "top1", columns=("top-1, no retrain", "top-1, retrained"), flops=("FLOPs", 2),
           second: str = "") -> str:
    """The demo's summary table (``output/summary.md``, printed): each member's size, reading and ``metric``
    (and ``second``: "recall / zero-shot") before and (the exported one) after retraining."""
    def cell(metrics: dict) -> str:
        return f"{metrics[metric]:.2f}" + (f" / {metrics[second]:.2f}" if second else "")

    table = []
    for r in rows:
        exported = abs(r["target"] - (1 - removed)) < 1e-9
        table.append({"prunable params kept": f"{r['target']:.0%}", "params": f"{r['params'] / 1e6:.3f}M",
                      flops[0]: f"{r['flops'] / 1e6:.{flops[1]}f}M ({r['flops_kept']:.0%})",
                      "ranked by, kept elements hold": f"{'entry step' if r['rank'] == 'entry' else 'final z'}, "
                                                       f"{VALUE_LABELS[r['values']]}",
                      columns[0]: cell(r),
                      columns[1]: cell(result["best"]) if exported else ""})
    markdown = write_table(table, os.path.join(output, "summary"))
    search_dir = os.path.join(output, "search")
    print(f"\n{title}:\n")
    print(markdown)
    print(f"plots: {search_dir}/path.png (solution path), {search_dir}/family_eval.png ({plotted})")
    return markdown
