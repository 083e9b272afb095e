"""Typed run configuration: YAML defaults, ``key=value`` overrides, strict checking.

A config has one section per stage. ``load_config(path, overrides)`` reads the YAML file
with ``yaml.safe_load``, applies dotted overrides (``search.lr=5e-4``), and checks every
key and type: an unknown key lists the valid keys of its section, a wrong type names the
key and the expected type, a number out of its range names the key and the range.
``save_config`` writes the resolved config beside a run's outputs.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import yaml

from .calibrate import DEFAULTS as _SEARCH, NU_CALIBRATIONS   # the library's defaults are the CLI's
from .errors import ConfigError
from .family import BUDGET_KINDS, CHOSEN_RANKINGS, CHOSEN_VALUES, SCOPES
from .files import atomic_write
from .tasks import TASKS

__all__ = ["Config", "load_config", "save_config", "parse_overrides", "ConfigError"]


@dataclass
class ModelConfig:
    name: str = "deit_small_patch16_224"   # timm model name, a local Hugging Face model directory, or hf:ORG/NAME
    pretrained: bool = False                # timm's pretrained weights (needs the internet)
    checkpoint: Optional[str] = None        # local .pth / .safetensors / timm:NAME / a directory of .safetensors
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model / from_pretrained arguments
    granularity: str = "dim"                # mask granularity: dim | head
    drop_path: float = 0.0
    dtype: str = "auto"                     # Hugging Face models: auto (the checkpoint's) | float32 | bfloat16 | float16
    activation_checkpointing: bool = False  # recompute activations in the backward pass (memory for time)
    fsdp: bool = False                      # under torchrun: shard the model with FSDP2, not DDP (search, retrain)


@dataclass
class DataConfig:
    dataset: str = "imagenet"               # imagenet | imagefolder | fashion_mnist | synthetic | text | captions
                                            # | fashion_mnist_captions (CLIP's demo)
    root: Optional[str] = None              # text: a file or folder of .txt / .jsonl / .md / .rst, or hf:NAME[:CONFIG];
                                            # captions: a Karpathy-split JSON (dataset_coco.json, dataset_flickr30k.json)
    images: Optional[str] = None            # captions: the image folder the JSON's paths start from
    zero_shot: Optional[str] = None         # CLIP eval: an ImageFolder (one folder per class, named by it) to classify
    templates: List[str] = field(default_factory=lambda: ["a photo of a {}."])   # CLIP zero-shot prompts
    seq_len: int = 2048                     # text: tokens per sequence
    tokenizer: Optional[str] = None         # text: tokenizer directory or hf:ORG/NAME (default: the model's directory)
    test_fraction: float = 0.0              # text: hold out this fraction of the files (or sequences) as test
    max_documents: int = 0                  # hf: datasets: stream the first this many documents of each split (0: all)
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    batch_size: int = 256                   # per process
    eval_batch_size: int = 256
    workers: int = 8
    val_fraction: float = 0.0               # hold out this fraction of train as validation
    synthetic_size: int = 256
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    color_jitter: float = 0.3
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1


NU_DATA = ("val", "train")


@dataclass
class SearchConfig:
    steps: int = 0                          # total LBI steps; 0 means epochs * steps per epoch
    epochs: int = 60
    lr: Union[float, str] = "auto"          # α; "auto" sets α = rho * nu / kappa
    rho: float = _SEARCH["rho"]  # per-step pull of M toward Γ (κα/ν)
    kappa: float = _SEARCH["kappa"]
    nu: Union[float, str] = "auto"          # ν; "auto" calibrates it from the mask gradients
    nu_scale: Union[float, str] = _SEARCH["nu_scale"]  # auto ν = nu_scale / RMS of mask gradients at M = 1 (with adam:
                                            # nu_scale); auto: the model family's (4 for LLMs, 1.5 for ViT and CLIP)
    nu_calibration: str = _SEARCH["nu_calibration"]  # masks sharing one ν: pooled (all), pair (per pair type), mask
    nu_batch: Optional[int] = _SEARCH["nu_batch"]  # auto ν is for this batch: the RMS at batch B is scaled by √(B / nu_batch)
    calibration_batches: int = _SEARCH["calibration_batches"]
    nu_data: str = "val"                    # batches auto ν is calibrated on: val (held out, never trained on) | train
    lam: float = _SEARCH["lam"]  # κλ = 4: see spp.LBI (0.1, κλ = 1, ranked worse on the benchmark)
    distill: float = 0.0                    # weight of the KL to the dense model's outputs (the same weights, masks at 1)
    preconditioner: str = _SEARCH["preconditioner"]
    shrink: str = _SEARCH["shrink"]
    snapshots: int = _SEARCH["snapshots"]   # mask snapshots kept for members' settled values (0: none, M at the end)
    clip: Union[float, str, None] = _SEARCH["clip"]  # |loss gradient| a step takes, in units of 1/ν: auto (the model
                                            # family's: 10 for LLMs, unbounded for ViT and CLIP) | a number | null
    log_every: int = 20
    checkpoint_every: int = 500
    targets: List[float] = field(default_factory=lambda: [0.9, 0.7, 0.5, 0.3, 0.15])  # kept fractions in the family table


@dataclass
class FamilyConfig:
    path: Optional[str] = None              # search output dir (default: the run's output)
    targets: List[float] = field(default_factory=lambda: [1.0, 0.85, 0.7, 0.5, 0.3, 0.15])
    by: str = "params"
    scope: str = "global"
    rank: str = "best"                      # entry (entry step), z (final |z|), or best: whichever scores higher on val
    floor: int = 0
    round_to: int = 1
    values: str = "best"                    # kept elements hold 1 (binary), the search's mask values at its end
                                            # (path) or soon after the member's last element entered (settled),
                                            # auto (WeightFamily.select's rule), or best: whichever scores higher on val
    max_batches: int = 0                    # 0 = the whole validation set


@dataclass
class ExportConfig:
    path: Optional[str] = None              # search output dir (default: the run's output)
    keep: Optional[float] = None
    remove: Optional[float] = 0.5
    budget: Optional[float] = None
    by: str = "params"
    scope: str = "global"
    rank: str = "best"                      # as family.rank
    floor: int = 0
    round_to: int = 1
    values: str = "best"                    # as family.values
    max_batches: int = 20                   # val batches each reading is scored on when rank or values is best (0 = all)
    out: Optional[str] = None               # default: <output>/pruned


@dataclass
class TrainConfig:
    source: Optional[str] = None            # save_pruned dir; None = build the model of `model` (dense)
    epochs: int = 300
    steps: int = 0                          # stop after this many steps (0 = all epochs)
    lr: float = 1e-4                        # scaled by (batch size * world size) / 512
    min_lr: float = 1e-6
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    opt: str = "adamw"
    clip_grad: Optional[float] = None
    ema: bool = False
    ema_decay: float = 0.99996
    lora_rank: int = 0                      # language models: > 0 trains LoRA adapters of this rank (peft) on every
                                            # projection instead of all weights; merged into the saved model
    lora_alpha: float = 16.0
    distill: float = 0.0                    # weight of the soft KL to the dense teacher
    distill_temperature: float = 1.0
    eval_every: int = 1
    checkpoint_every: int = 0               # steps between mid-epoch checkpoints (0 = epoch ends only)
    log_every: int = 20


@dataclass
class EvalConfig:
    tasks: List[str] = field(default_factory=list)  # language models: lm-evaluation-harness tasks (arc_easy, ...)
    task_path: Optional[str] = None         # a folder of your own task YAML files (lm-eval's include_path)
    limit: Optional[int] = None             # at most this many examples per task
    num_fewshot: Optional[int] = None
    batch_size: int = 8


@dataclass
class Config:
    output: str = "outputs/run"
    seed: int = 0
    device: str = "auto"                    # auto | cpu | cuda
    amp: str = "auto"                       # auto | bf16 | fp16 | off
    resume: Optional[str] = "auto"          # auto | a checkpoint file | null (start afresh)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    family: FamilyConfig = field(default_factory=FamilyConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> Dict[str, Any]:
        """The config as nested plain dicts (what ``config.yaml`` and checkpoints store)."""
        return dataclasses.asdict(self)


def _type_name(tp) -> str:
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    origin = typing.get_origin(tp)
    if origin is Union:
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as e:
                errors.append(str(e))
        hint = " (YAML reads off/no/false as booleans: quote the word, or use null)" if isinstance(value, bool) else ""
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}{hint}")
    if origin in (list, List):
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 5e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, str):
        return value
    if tp is str and isinstance(value, bool):   # YAML 1.1 reads on/off (and yes/no, true/false) as booleans
        return "on" if value else "off"         # amp=off, amp: off; a choice check rejects "on" where it is none
    if tp in (int, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _merge(obj, data: Dict[str, Any], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            section = prefix.rstrip(".") or "top level"
            raise ConfigError(f"unknown config key {full!r}; valid keys in {section}: {', '.join(fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(full, value, hints[key]))


def parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    """``["search.lr=5e-4", "data.root=/x"]`` → nested dict (values parsed as YAML)."""
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (for example search.lr=5e-4)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _deep_update(base: Dict, extra: Dict, schema: Any) -> Dict:
    """Merge ``extra`` into ``base`` section by section; a value (even a dict) replaces the old one."""
    for k, v in extra.items():
        section = getattr(schema, k, None)
        if dataclasses.is_dataclass(section) and isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v, section)
        else:
            base[k] = v
    return base


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """The config of YAML file ``path`` (or the defaults) with dotted ``key=value`` ``overrides``, checked."""
    data: Dict[str, Any] = {}
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found (looked for {os.path.abspath(path)}); the shipped "
                              "ones are in the repository's configs/, and its shell scripts find them "
                              "from any directory") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
    config = Config()
    _deep_update(data, parse_overrides(overrides), config)
    _merge(config, data)
    _validate(config)
    return config


def _choice(key: str, value: Any, options: Sequence[Any]) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r}: choose one of {', '.join(map(str, options))}")


def _validate(c: Config) -> None:
    _choice("device", c.device, ("auto", "cpu", "cuda"))
    _choice("amp", c.amp, ("auto", "bf16", "fp16", "off"))
    _choice("model.granularity", c.model.granularity, ("dim", "head"))
    _choice("data.dataset", c.data.dataset, [d for task in TASKS for d in task.datasets])
    _choice("model.dtype", c.model.dtype, ("auto", "float32", "bfloat16", "float16"))
    for key, value in (("search.lr", c.search.lr), ("search.nu", c.search.nu), ("search.nu_scale", c.search.nu_scale),
                       ("search.clip", c.search.clip)):
        if isinstance(value, str) and value != "auto":
            raise ConfigError(f"{key}={value!r}: give a number or auto" + (" (or null: no bound)" if key == "search.clip" else ""))
    _choice("search.nu_calibration", c.search.nu_calibration, NU_CALIBRATIONS)
    _choice("search.nu_data", c.search.nu_data, NU_DATA)
    if c.search.nu_batch is not None and c.search.nu_batch < 1:
        raise ConfigError(f"search.nu_batch={c.search.nu_batch!r}: give a batch size (a positive integer; 128 is "
                          "the batch nu_scale was tuned at) or null to calibrate at the search's own batch")
    _choice("search.preconditioner", c.search.preconditioner, ("none", "adam"))
    _choice("search.shrink", c.search.shrink, ("two_sided", "one_sided"))
    for section in (c.family, c.export):
        name = "family" if section is c.family else "export"
        _choice(f"{name}.by", section.by, BUDGET_KINDS)
        _choice(f"{name}.scope", section.scope, SCOPES)
        _choice(f"{name}.rank", section.rank, CHOSEN_RANKINGS)
        _choice(f"{name}.values", section.values, CHOSEN_VALUES)
    _check_ranges(c)
    glued = [key for key, value in c.model.kwargs.items() if value is None and ":" in str(key)]
    if glued:
        raise ConfigError(f"model.kwargs has the key {glued[0]!r} with no value: YAML needs a space after each colon "
                          "(model.kwargs='{depth: 6, num_heads: 4}')")


def _check_ranges(c: Config) -> None:
    """Every number with a limit lies within it (None, where allowed, means unset)."""
    d, s, t = c.data, c.search, c.train
    positive = (lambda v: v > 0, "must be > 0")
    count = (lambda v: v >= 0, "must be >= 0")
    fraction = (lambda v: 0 <= v <= 1, "must lie in [0, 1]")
    below_one = (lambda v: 0 <= v < 1, "must lie in [0, 1)")
    numbers = {key: v for key, v in (("search.lr", s.lr), ("search.nu", s.nu), ("search.nu_scale", s.nu_scale))
               if not isinstance(v, str)}  # or auto
    if s.clip is not None and not isinstance(s.clip, str):   # or auto
        numbers["search.clip"] = s.clip
    table = [
        (positive, {
            "data.img_size": d.img_size, "data.in_chans": d.in_chans, "data.num_classes": d.num_classes,
            "data.batch_size": d.batch_size, "data.eval_batch_size": d.eval_batch_size,
            "data.synthetic_size": d.synthetic_size, "data.seq_len": d.seq_len, "search.epochs": s.epochs, "search.rho": s.rho,
            "search.kappa": s.kappa, "search.calibration_batches": s.calibration_batches,
            "search.log_every": s.log_every, "family.round_to": c.family.round_to,
            "export.round_to": c.export.round_to, "export.budget": c.export.budget, "train.epochs": t.epochs,
            "train.lr": t.lr, "train.clip_grad": t.clip_grad, "train.distill_temperature": t.distill_temperature,
            "train.eval_every": t.eval_every, "train.log_every": t.log_every, "train.lora_alpha": t.lora_alpha,
            "eval.batch_size": c.eval.batch_size, **numbers}),
        (count, {
            "data.workers": d.workers, "data.max_documents": d.max_documents, "data.mixup": d.mixup, "data.cutmix": d.cutmix,
            "data.color_jitter": d.color_jitter, "search.steps": s.steps, "search.lam": s.lam, "search.distill": s.distill,
            "search.checkpoint_every": s.checkpoint_every, "search.snapshots": s.snapshots, "family.floor": c.family.floor,
            "family.max_batches": c.family.max_batches, "export.floor": c.export.floor,
            "export.max_batches": c.export.max_batches, "train.steps": t.steps,
            "train.min_lr": t.min_lr, "train.warmup_epochs": t.warmup_epochs, "train.warmup_lr": t.warmup_lr,
            "train.weight_decay": t.weight_decay, "train.distill": t.distill,
            "train.checkpoint_every": t.checkpoint_every, "train.lora_rank": t.lora_rank,
            "eval.limit": c.eval.limit, "eval.num_fewshot": c.eval.num_fewshot}),
        (fraction, {
            "data.reprob": d.reprob, "export.keep": c.export.keep, "export.remove": c.export.remove,
            **{f"search.targets[{i}]": v for i, v in enumerate(s.targets)},
            **{f"family.targets[{i}]": v for i, v in enumerate(c.family.targets)}}),
        (below_one, {
            "data.val_fraction": d.val_fraction, "data.test_fraction": d.test_fraction, "data.smoothing": d.smoothing, "model.drop_path": c.model.drop_path,
            "train.ema_decay": t.ema_decay}),
    ]
    for (allowed, what), values in table:
        for key, value in values.items():
            if value is not None and not allowed(value):
                raise ConfigError(f"{key}={value!r}: {what}")


def save_config(config: Config, path: str) -> None:
    """Write the resolved ``config`` to ``path`` as YAML, atomically."""
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write(path, lambda f: open(f, "w").write(text))
