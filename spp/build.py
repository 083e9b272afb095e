"""Objects a run builds from its config: model, loaders, loss."""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .create import create_model, is_hf
from .weights import load_checkpoint
from .contrastive import tokenize_prompts
from .compress import compress, load_pruned
from .config import Config, DataConfig, ExportConfig
from .data import DatasetNotFound, build_datasets, build_loader, class_prompts
from .engine import DistillationLoss, evaluate
from .errors import ConfigError
from .family import RANKINGS, WeightFamily
from .models import family_for_model_type, family_of, supported
from .path import SolutionPath
from .runtime import Runtime, main_print, setup_runtime
from .tasks import Contrastive, NextToken, task_class
from .text import load_tokenizer

__all__ = ["check_inputs", "build_model", "is_hf", "task_for", "input_size_for", "source_model", "build_loaders", "build_criterion", "select_member", "read_member", "HeldOutScore",
           "search_output", "searched_family"]


def task_for(cfg: Config):
    """How the loops read this config's batches: next-token prediction on text, contrastive image-caption
    pairs (CLIP; members read by retrieval recall@1, or on the demo's class captions by zero-shot accuracy
    over its class prompts), else classification."""
    kind = task_class(cfg.data.dataset)
    prompts = class_prompts(cfg.data) if kind is Contrastive else None
    if prompts:
        tokenizer = load_tokenizer(cfg.data.tokenizer or cfg.model.name)
        return Contrastive(tokenize_prompts(tokenizer, *prompts, cfg.data.seq_len), headline="zero-shot")
    return kind()


def check_inputs(cfg: Config) -> None:
    """Check, before any weights load, that the files a run reads are there: a local ``model.name`` (a directory,
    a GGUF file), a language model's or CLIP's text (``data.root``, ``data.images``) and its tokenizer (loaded
    here). A wrong path is reported in seconds instead of after minutes of loading a large model."""
    name = cfg.model.name
    if not name.startswith("hf:") and (name.endswith(".gguf") or os.sep in name or name.startswith(".")) \
            and not os.path.exists(name):
        raise FileNotFoundError(f"model.name={name} not found (looked for {os.path.abspath(name)}): give a Hugging Face "
                                "model directory, a .gguf file, hf:ORG/NAME or a timm model name")
    _check_granularity(cfg)
    if task_class(cfg.data.dataset).inputs == "image":
        return
    for key in ("root", "images"):
        path = getattr(cfg.data, key, None)
        if path and not path.startswith("hf:") and not os.path.exists(path):
            raise DatasetNotFound(f"data.{key}={path} not found (looked for {os.path.abspath(path)})")
    if is_hf(name) or cfg.data.tokenizer:
        load_tokenizer(cfg.data.tokenizer or name)


def _check_granularity(cfg: Config) -> None:
    """A local Hugging Face directory whose family cannot compress ``model.granularity`` exactly (Qwen3 at ``dim``)
    is refused from its config.json, before its weights load."""
    config = os.path.join(cfg.model.name, "config.json")
    if not os.path.isfile(config):
        return
    with open(config) as f:
        family = family_for_model_type(json.load(f).get("model_type"))
    if family is not None and cfg.model.granularity not in family.granularities:
        raise ConfigError(f"model.granularity={cfg.model.granularity} is not exact for {cfg.model.name} "
                          f"({family.name}): {family.granularity_note}; use model.granularity="
                          f"{family.granularities[0]}")


def input_size_for(cfg: Config) -> Optional[Tuple[int, ...]]:
    """The input FLOPs are counted at: a sequence of ``data.seq_len`` tokens for text, else the model's own."""
    return (cfg.data.seq_len,) if task_class(cfg.data.dataset).inputs == "text" else None


def _build_hf(cfg: Config, meta: bool = False) -> nn.Module:
    kind = task_class(cfg.data.dataset)
    if kind.inputs == "image":
        raise ConfigError(f"model.name={cfg.model.name} is a Hugging Face model: set data.dataset=text for a language "
                          f"model (and data.root to a text file or folder), or one of {Contrastive.datasets} for CLIP")
    dtype = cfg.model.dtype if cfg.model.dtype == "auto" else getattr(torch, cfg.model.dtype)
    model = create_model(cfg.model.name, dtype=dtype, meta=meta, **cfg.model.kwargs)
    if family_of(model).inputs != kind.inputs:
        raise ConfigError(f"model.name={cfg.model.name} is a {model.config.model_type} model but data.dataset="
                          f"{cfg.data.dataset}: CLIP takes image-caption pairs ({' or '.join(Contrastive.datasets)}), "
                          "a language model text (data.dataset=text)")
    text_config = getattr(model.config, "text_config", model.config)
    positions = getattr(text_config, "max_position_embeddings", None)
    if positions and cfg.data.seq_len > positions:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is longer than the model's {positions} positions "
                          f"(max_position_embeddings of {cfg.model.name}); use data.seq_len<={positions}")
    return model


def build_model(cfg: Config, runtime: Optional[Runtime] = None, meta: bool = False) -> nn.Module:
    """The dense model of ``cfg.model``, with pretrained weights if configured; ``meta=True``: its skeleton
    on the meta device, no weights read (:mod:`spp.sharding`)."""
    model = _build_model(cfg, runtime, meta)
    if cfg.model.activation_checkpointing:   # the libraries' own switches
        if hasattr(model, "gradient_checkpointing_enable"):
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        else:
            model.set_grad_checkpointing(True)
    return model


def _build_model(cfg: Config, runtime: Optional[Runtime], meta: bool) -> nn.Module:
    if is_hf(cfg.model.name):
        model = _build_hf(cfg, meta)
        if cfg.model.checkpoint and not meta:
            load_checkpoint(model, cfg.model.checkpoint)
        return model
    kind = task_class(cfg.data.dataset)
    if kind.inputs != "image":
        needs = "a language model" if kind is NextToken else "a CLIP model"
        raise ConfigError(f"data.dataset={cfg.data.dataset} needs {needs} from Hugging Face: model.name={cfg.model.name!r} is not a "
                          "directory or hf:ORG/NAME (a local Hugging Face model directory: config.json + *.safetensors)")
    kwargs = dict(cfg.model.kwargs)
    kwargs.setdefault("num_classes", cfg.data.num_classes)
    kwargs.setdefault("img_size", cfg.data.img_size)
    kwargs.setdefault("in_chans", cfg.data.in_chans)
    if cfg.model.drop_path:
        kwargs["drop_path_rate"] = cfg.model.drop_path
    checkpoint = cfg.model.checkpoint
    if checkpoint and not checkpoint.startswith("timm:") and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"model.checkpoint={checkpoint} not found. Give a local DeiT .pth or "
                                f".safetensors file, model.checkpoint=timm:{cfg.model.name} (online), or "
                                "try spp without ImageNet weights: make demo")
    try:
        model = create_model(cfg.model.name, pretrained=cfg.model.pretrained, meta=meta, **kwargs)
    except RuntimeError as e:
        if "Unknown model" not in str(e):
            raise
        raise ConfigError(f"model.name={cfg.model.name!r}: timm has no such model ({e}); "
                          f"timm.list_models('*deit*') lists names, spp prunes {supported()}") from e
    except TypeError as e:
        raise ConfigError(f"model.name={cfg.model.name!r} does not take the arguments spp passes ({e}); "
                          f"spp prunes {supported()}. Check model.kwargs and data.img_size, "
                          "data.in_chans and data.num_classes") from e
    if checkpoint and not meta:
        result = load_checkpoint(model, checkpoint)
        if runtime is not None and (result.missing_keys or result.unexpected_keys):
            main_print(runtime, f"loaded {checkpoint}: missing {result.missing_keys[:6]}, "
                                f"unexpected {result.unexpected_keys[:6]}")
    return model


def source_model(cfg: Config, runtime: Optional[Runtime] = None, meta: bool = False) -> nn.Module:
    """The model ``train.source`` names (``spp retrain``, ``spp eval``): a ``save_pruned`` dir, a member
    of a search dir's family picked by ``cfg.export``, or (no source) the dense model. ``meta=True``: its
    skeleton on the meta device (not for a search dir: picking a member reads the weights)."""
    source = cfg.train.source
    if not source:
        return build_model(cfg, runtime, meta)
    if os.path.isfile(os.path.join(source, "config.json")):
        return load_pruned(source, meta=meta)
    if os.path.isfile(os.path.join(source, "path.json")):
        if meta:
            raise ConfigError(f"model.fsdp=true: train.source={source} is a search output, and picking its member "
                              "reads the whole model on every rank; export the member first (spp export, "
                              "scripts/export.sh) and set train.source to that directory")
        model = build_model(cfg, runtime)
        family = WeightFamily(model, SolutionPath.load(source), input_size_for(cfg))
        if runtime is None:
            runtime = setup_runtime("cpu", "off", cfg.seed)
        score = HeldOutScore(cfg, runtime, model, family.granularity, cfg.export.max_batches)
        member = select_member(family, cfg.export, score)
        main_print(runtime, str(member.summary))
        return compress(model, member.masks, granularity=family.granularity)
    raise FileNotFoundError(f"train.source={source} holds neither config.json (a pruned model from "
                            "`spp export`) nor path.json (a search output); run the search first (deit_search.sh), "
                            "or try the whole pipeline on Fashion-MNIST: make demo")


def build_loaders(cfg: Config, runtime: Runtime,
                  splits: Sequence[str] = ("train", "val", "test")) -> Dict[str, torch.utils.data.DataLoader]:
    """Loaders of ``splits``; only the data they need is read (an eval does not scan train/)."""
    datasets = build_datasets(cfg.data, cfg.seed, splits, tokenizer=cfg.model.name if is_hf(cfg.model.name) else None)
    common = dict(workers=cfg.data.workers, seed=cfg.seed, num_replicas=runtime.world_size,
                  rank=runtime.rank, pin_memory=runtime.device.type == "cuda")
    return {split: build_loader(data, cfg.data.batch_size if split == "train" else cfg.data.eval_batch_size,
                                split == "train", **common) for split, data in datasets.items()}


def build_criterion(data: DataConfig, teacher: Optional[nn.Module] = None, distill: float = 0.0,
                    temperature: float = 1.0) -> Tuple[Optional[Callable], Callable]:
    """``(mixup_fn, criterion)``: the task's training loss (:meth:`spp.tasks.Task.training_loss`), distilled from
    ``teacher`` with weight ``distill`` (the KL to its class, next-token or image-text similarity distributions);
    ``criterion(inputs, outputs, targets)``, and ``criterion.base(outputs, targets)`` the loss without
    distillation (what the search calibrates ν on)."""
    task = task_class(data.dataset)()
    mixup_fn, base = task.training_loss(data)
    return mixup_fn, DistillationLoss(base, teacher, distill if teacher is not None else 0.0, temperature, task)


class HeldOutScore:
    """The task's headline metric (top-1 %, or minus the perplexity) of a member, compressed, on the first
    ``max_batches`` of the validation split (0: all of it): the score :meth:`spp.WeightFamily.select_best` reads a member by (``rank`` / ``values: best``).
    ``metrics[reading(member)]`` keeps each reading's evaluation, so the chosen one is not run twice."""

    def __init__(self, cfg: Config, runtime: Runtime, model: nn.Module, granularity: str, max_batches: int):
        self.cfg, self.model, self.granularity, self.max_batches, self.runtime = cfg, model, granularity, max_batches, runtime
        self.loader = None   # read at the first score: a member read without one (rank and values fixed) needs no data
        self.task = task_for(cfg)   # once: CLIP's demo task tokenizes its class prompts
        self.metrics: Dict[str, Dict[str, float]] = {}

    @staticmethod
    def reading(member) -> str:
        return f"{member.summary.rank}, {member.summary.values}"

    def __call__(self, member) -> float:
        if self.loader is None:
            self.loader = build_loaders(self.cfg, self.runtime, ["val"])["val"]
        pruned = compress(self.model, member.masks, granularity=self.granularity)
        label = self.reading(member)
        self.metrics[label] = evaluate(pruned, self.loader, self.runtime, self.max_batches,
                                       desc=f"{member.summary.kept:.0%} kept, {label}", task=self.task)
        return self.task.score(self.metrics[label])


def choices(setting: str, options) -> tuple:
    """A ``rank`` or ``values`` setting as the readings :meth:`~spp.WeightFamily.select_best` tries."""
    return tuple(options) if setting == "best" else (setting,)


def read_member(family, budget: Dict, rank: str, values: str, score: Optional[Callable] = None):
    """``family.select(**budget)`` read by ``rank`` and ``values``; where either is ``best``, every reading
    it allows is scored by ``score`` (a :class:`HeldOutScore`) and the best kept
    (:meth:`~spp.WeightFamily.select_best`)."""
    if "best" in (rank, values):
        if score is None:
            raise ValueError("rank or values best reads the member on held-out data: pass score= (HeldOutScore)")
        return family.select_best(score, choices(rank, RANKINGS), choices(values, ("binary", "settled", "path")), **budget)
    return family.select(rank=rank, values=values, **budget)


def select_member(family, e: ExportConfig, score: Optional[Callable] = None):
    """The member that ``export.*`` asks for (``keep`` or ``budget`` take precedence over ``remove``)."""
    remove = e.remove if e.keep is None and e.budget is None else None
    budget = dict(keep=e.keep, remove=remove, budget=e.budget, by=e.by, scope=e.scope, floor=e.floor,
                  round_to=e.round_to)
    return read_member(family, budget, e.rank, e.values, score)


def search_output(cfg: Config, explicit: Optional[str]) -> str:
    """The folder of the search whose path ``spp family`` / ``spp export`` read: ``explicit`` or ``cfg.output``."""
    directory = explicit or cfg.output
    if not os.path.isfile(os.path.join(directory, "path.json")):
        raise FileNotFoundError(f"no solution path in {directory} (path.json); run `spp search` first "
                                "or point family.path / export.path at a search output folder")
    return directory


def searched_family(cfg: Config, directory: str, runtime: Runtime):
    """The config's model on the runtime's device and the ``WeightFamily`` of the search saved in ``directory``."""
    model = build_model(cfg, runtime).to(runtime.device)
    return model, WeightFamily(model, SolutionPath.load(directory), input_size_for(cfg))
