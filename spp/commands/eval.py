"""`spp eval`: a model's quality (top-1, perplexity and zero-shot tasks, retrieval recall), size and speed."""
from __future__ import annotations

import json
import os
from typing import Dict

import torch
from torch import nn

from ..build import build_loaders, check_inputs, source_model, task_for
from ..contrastive import tokenize_prompts, zero_shot_accuracy
from ..config import Config
from ..engine import evaluate
from ..flops import count_flops, count_params
from ..models import family_of
from ..runtime import Runtime, main_print, setup_runtime
from ..text import load_tokenizer
from ..timing import lm_throughput, pair_throughput, throughput

__all__ = ["run_eval", "zero_shot", "imagefolder_zero_shot"]


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
