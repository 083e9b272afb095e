"""The commands that read a search's output: `spp family`, `spp export`, `spp eval`."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import torch
from torch import nn

from .build import (HeldOutScore, build_loaders, build_model, check_inputs, input_size_for, read_member, select_member,
                    source_model, task_for)
from .clip import tokenize_prompts, zero_shot_accuracy
from .compress import compress, save_pruned
from .config import Config
from .engine import evaluate
from .family import WeightFamily
from .files import atomic_write
from .flops import count_flops, count_params
from .models import family_of
from .path import SolutionPath
from .runtime import Runtime, main_print, setup_runtime
from .tables import plot_family, reach_note, write_table
from .text import load_tokenizer
from .timing import lm_throughput, pair_throughput, throughput

__all__ = ["run_family", "run_export", "run_eval", "zero_shot"]


def _search_dir(cfg: Config, explicit: Optional[str]) -> str:
    directory = explicit or cfg.output
    if not os.path.isfile(os.path.join(directory, "path.json")):
        raise FileNotFoundError(f"no solution path in {directory} (path.json); run `spp search` first "
                                "or point family.path / export.path at a search output folder")
    return directory


def _family(cfg: Config, directory: str, runtime: Runtime):
    model = build_model(cfg, runtime).to(runtime.device)
    path = SolutionPath.load(directory)
    return model, WeightFamily(model, path, input_size_for(cfg))


def run_family(cfg: Config) -> List[Dict]:
    """Evaluate members at ``family.targets`` without retraining; table + plot of accuracy (language models:
    perplexity on non-overlapping windows of ``data.seq_len`` tokens of the validation text) vs size."""
    check_inputs(cfg)
    runtime = setup_runtime(cfg.device, cfg.amp, cfg.seed)
    directory = _search_dir(cfg, cfg.family.path)
    model, family = _family(cfg, directory, runtime)
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


def run_export(cfg: Config) -> str:
    """Select one member, compress it and ``save_pruned`` it."""
    check_inputs(cfg)
    runtime = setup_runtime(cfg.device, cfg.amp, cfg.seed)   # where rank / values best score their readings
    directory = _search_dir(cfg, cfg.export.path)
    model, family = _family(cfg, directory, runtime)
    member = select_member(family, cfg.export, HeldOutScore(cfg, runtime, model, family.granularity,
                                                            cfg.export.max_batches))
    pruned = compress(model.cpu(), member.masks, granularity=family.granularity)
    out = cfg.export.out or os.path.join(cfg.output, "pruned")
    save_pruned(pruned, out)
    atomic_write(os.path.join(out, "summary.json"),
                 lambda f: open(f, "w").write(json.dumps(member.summary.to_dict(), indent=1) + "\n"))
    print(member.summary)
    print(f"wrote {out}/model.safetensors, config.json, summary.json")
    return out


def zero_shot(model: nn.Module, cfg: Config) -> Dict[str, Dict[str, float]]:
    """``eval.tasks`` through lm-evaluation-harness (its ``HFLM`` around the model and its tokenizer):
    ``{task: {metric: value}}``. Tasks read their data sets through ``datasets`` (online or cached);
    ``eval.task_path`` adds task YAML files of your own (local data files work offline)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("eval.tasks needs lm-evaluation-harness: pip install -e '.[llm]' (lm-eval)") from e

    e = cfg.eval
    tokenizer = load_tokenizer(cfg.data.tokenizer or cfg.model.name)
    manager = TaskManager(include_path=e.task_path) if e.task_path else TaskManager()
    unknown = [t for t in e.tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"eval.tasks: lm-evaluation-harness has no task {unknown} (lm_eval --tasks list names "
                         "them; eval.task_path adds your own YAML files)")
    lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=e.batch_size, max_length=cfg.data.seq_len)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(e.tasks), task_manager=manager, limit=e.limit,
                                      num_fewshot=e.num_fewshot)["results"]
    return {task: {k.split(",")[0]: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
            for task, metrics in results.items()}


def imagefolder_zero_shot(model: nn.Module, cfg: Config, runtime: Runtime) -> float:
    """Zero-shot top-1 (%) of a CLIP model on ``data.zero_shot``: an ImageFolder (its ``val/`` if it has one), the
    class names its folder names with ``_`` read as spaces, the prompts ``data.templates``."""
    from timm.data import create_transform
    from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from torchvision.datasets import ImageFolder


    root = cfg.data.zero_shot
    root = os.path.join(root, "val") if os.path.isdir(os.path.join(root, "val")) else root
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.zero_shot={cfg.data.zero_shot}: not a folder (give an ImageFolder: one folder "
                                "of images per class, named by the class)")
    transform = create_transform(cfg.data.img_size, is_training=False, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                                 interpolation="bicubic", crop_pct=1.0)
    data = ImageFolder(root, transform=transform)
    prompts = tokenize_prompts(load_tokenizer(cfg.data.tokenizer or cfg.model.name),
                               [c.replace("_", " ") for c in data.classes], cfg.data.templates, cfg.data.seq_len)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.workers)
    return zero_shot_accuracy(model, loader, prompts, runtime.device)


def run_eval(cfg: Config) -> Dict:
    """Top-1/top-5 (LLMs: perplexity, zero-shot tasks; CLIP: retrieval recall@1/5/10, zero-shot), params, FLOPs and
    throughput of train.source (a pruned model, or a member of a search's family picked by export.*) or of the
    dense model."""
    check_inputs(cfg)
    runtime = setup_runtime(cfg.device, cfg.amp, cfg.seed)
    source = cfg.train.source
    model = source_model(cfg, runtime).to(runtime.device)
    task = task_for(cfg)
    test = build_loaders(cfg, runtime, ["test"])["test"]
    metrics = evaluate(model, test, runtime, task=task)
    if task.headline == "perplexity":
        seq_len = cfg.data.seq_len
        result = {"model": source or cfg.model.name, "perplexity": round(metrics["perplexity"], 3),
                  "loss": round(metrics["loss"], 4), "tokens": metrics["tokens"],
                  "protocol": f"non-overlapping {seq_len}-token windows of the test text, token-level",
                  "params": count_params(model), "flops_per_sequence": count_flops(model, (seq_len,)),
                  **lm_throughput(model, seq_len, runtime.device, runtime.amp_dtype)}
        if cfg.eval.tasks:
            result["tasks"] = zero_shot(model, cfg)
        main_print(runtime, json.dumps(result))
        return result
    if task.pooled:   # CLIP's retrieval and zero-shot
        result = {"model": source or cfg.model.name, **{k: round(v, 2) for k, v in metrics.items() if k != "n"},
                  "pairs": metrics["n"], "params": count_params(model), "flops_per_pair": count_flops(model),
                  "pairs_per_s": pair_throughput(model, test, runtime)}
        if cfg.data.zero_shot:
            result["zero_shot_imagefolder"] = round(imagefolder_zero_shot(model, cfg, runtime), 2)
        main_print(runtime, json.dumps(result))
        return result
    size = family_of(model).input_size(model)
    result = {"model": source or cfg.model.name, "top1": round(metrics["top1"], 2), "top5": round(metrics["top5"], 2),
              "params": count_params(model), "flops": count_flops(model, size),
              "images_per_s": round(throughput(model, size, cfg.data.eval_batch_size, runtime.device,
                                               runtime.amp_dtype), 1)}
    main_print(runtime, json.dumps(result))
    return result
