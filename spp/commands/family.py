"""`spp family`: the members at ``family.targets``, evaluated without retraining; a table and a plot."""
from __future__ import annotations

import os
from typing import Dict, List

from ..build import HeldOutScore, check_inputs, read_member, search_output, searched_family
from ..config import Config
from ..runtime import main_print, setup_runtime
from ..tables import plot_family, reach_note, write_table

__all__ = ["run_family"]


def run_family(cfg: Config) -> List[Dict]:
    """Evaluate members at ``family.targets`` without retraining; table + plot of accuracy (language models:
    perplexity on non-overlapping windows of ``data.seq_len`` tokens of the validation text) vs size."""
    check_inputs(cfg)
    runtime = setup_runtime(cfg.device, cfg.amp, cfg.seed)
    directory = search_output(cfg, cfg.family.path)
    model, family = searched_family(cfg, directory, runtime)
    f = cfg.family
    score = HeldOutScore(cfg, runtime, model, family.granularity, f.max_batches)
    task = score.task
    main_print(runtime, reach_note(family, family.path.steps))
    rows = []
    for keep in f.targets:
        budget = dict(keep=keep, by=f.by, scope=f.scope, floor=f.floor, round_to=f.round_to)
        member = read_member(family, budget, f.rank, f.values, score)   # rank/values best: readings scored on val
        if not member.summary.scores:
            score(member)
        metrics = score.metrics[score.reading(member)]
        s = member.summary
        rows.append({"target": keep, "kept": round(s.kept, 4), "params": s.params_after,
                     "params_kept": round(s.params_after / s.params_before, 4), "flops": s.flops_after,
                     "flops_kept": round(s.flops_after / s.flops_before, 4), "rank": s.rank, "values": s.values,
                     **{m: round(metrics[m], 2 if m != "loss" else 4) for m in task.table},
                     **{f"{task.headline} {reading}": round(abs(value), 2) for reading, value in s.scores.items()}})
        main_print(runtime, f"keep {keep:.0%} of prunable {f.by}: {s.params_after / 1e6:.3f}M params, "
                            f"{s.flops_after / 1e9:.4f} GFLOPs, " + (f"top-1 {metrics['top1']:.2f}%" if task.headline == "top1"
                                                                   else f"{task.headline} {metrics[task.headline]:.2f}"))
    if runtime.is_main:
        out = os.path.join(cfg.output, "family_eval")
        if task.headline == "perplexity":   # peers' perplexities differ by protocol: say which this is
            for r in rows:
                r["protocol"] = f"non-overlapping {cfg.data.seq_len}-token windows of the val text, token-level"
        write_table(rows, out)
        plot_family(rows, out + ".png", metric=("zero-shot", "recall@1") if task.pooled else task.headline)
        main_print(runtime, f"wrote {out}.md, {out}.json, {out}.png")
    return rows
