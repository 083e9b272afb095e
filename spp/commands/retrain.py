"""`spp retrain`: finetune a family member (or train a dense model) with the DeiT recipe."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..build import build_criterion, build_loaders, build_model, check_inputs, source_model, task_for
from ..compress import aliased_keys, save_pruned
from ..config import Config, save_config
from ..engine import evaluate, train_one_epoch
from ..errors import ConfigError, NonFiniteLoss
from ..files import atomic_write
from ..models import family_of
from ..runtime import (RunLogger, check_same_run, check_shapes, gather_rng_states, load_training_checkpoint, main_print,
                      reseed_ranks, restore_rng_states, resume_file, save_training_checkpoint, setup_runtime)
from ..sharding import full_optimizer_state, full_state_dict, is_sharded, load_full_state, shard
from ..tasks import NextToken, task_class

__all__ = ["run_retrain"]

CHECKPOINT = "train_checkpoint.pth"


def _with_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """``model`` with LoRA adapters (peft) of ``rank`` on every prunable projection; only they train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("train.lora_rank needs peft: pip install peft") from e
    family = family_of(model)
    names = sorted({name.rsplit(".", 1)[-1] for block in family.blocks(model)
                    for name, m in block.named_modules() if isinstance(m, nn.Linear)})
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=names))


def merged_lora(model: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The weights of a peft ``model``'s base model with every LoRA adapter merged, ``W + scaling · B A``
    (peft's ``merge_and_unload``, done on ``state``, the peft model's state dict: whole tensors, gathered
    from a sharded model too), under the base model's own names."""
    prefix = "base_model.model."
    merged = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    for name, module in model.get_base_model().named_modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "base_layer")):
            continue
        key = f"{name}.base_layer.weight"
        weight = merged[key].float()
        for adapter in module.lora_A:
            down, up = merged[f"{name}.lora_A.{adapter}.weight"], merged[f"{name}.lora_B.{adapter}.weight"]
            weight = weight + module.scaling[adapter] * (up.float() @ down.float())
        merged[key] = weight.to(merged[key].dtype)
    return {k.replace(".base_layer.", "."): v for k, v in merged.items() if ".lora_" not in k}


def _weights(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model``'s whole weights: gathered to rank 0 from a sharded model (a collective; ``{}`` elsewhere)."""
    return full_state_dict(model) if is_sharded(model) else model.state_dict()


def _save_model(model: nn.Module, directory: str, state: Dict[str, torch.Tensor]) -> None:
    """``state`` (``_weights(model)``) as a ``save_pruned`` dir for a pruned model, ``<dir>.safetensors``
    for a dense one; a model with LoRA adapters is saved with them merged into its weights."""
    if hasattr(model, "get_base_model"):
        state, model = merged_lora(model, state), model.get_base_model()
    if getattr(model, "spp_widths", None) is not None:
        save_pruned(model, directory, state_dict=state)
    else:
        from safetensors.torch import save_file

        aliases = aliased_keys(model)   # tied weights once
        state = {k: v.detach().contiguous().cpu() for k, v in state.items() if k not in aliases}
        atomic_write(directory + ".safetensors", lambda f: save_file(state, f))


def _check_shardable(cfg: Config, runtime) -> bool:
    """Whether this retrain shards the model with FSDP2 (``model.fsdp`` under torchrun), and that its
    settings allow it."""
    if not (runtime.distributed and cfg.model.fsdp):
        return False
    if cfg.train.ema:
        raise ConfigError("model.fsdp=true: train.ema keeps a whole copy of the model on every GPU; set train.ema=false")
    if runtime.amp_dtype is torch.float16:
        raise ConfigError("model.fsdp=true: amp=fp16 needs a gradient scaler across the shards; use amp=bf16")
    return True


def run_retrain(cfg: Config) -> Dict:
    """``spp retrain``: finetune ``train.source`` (or train the dense model); returns the best and last metrics."""
    check_inputs(cfg)
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    runtime = setup_runtime(cfg.device, cfg.amp, cfg.seed)
    t = cfg.train
    sharded = _check_shardable(cfg, runtime)
    meta = sharded and not runtime.is_main   # FSDP2: rank 0 reads the weights, the others build on meta
    model = source_model(cfg, runtime, meta=meta)
    for p in model.parameters():
        p.requires_grad_(True)
    if t.lora_rank:
        if task_class(cfg.data.dataset) is not NextToken:
            raise ValueError("train.lora_rank is for language models (data.dataset=text); set train.lora_rank=0")
        model = _with_lora(model, t.lora_rank, t.lora_alpha)
    model = shard(model, runtime) if sharded else model.to(runtime.device)
    loaders = build_loaders(cfg, runtime)
    loader = loaders["train"]
    steps_per_epoch = len(loader)
    total_steps = min(t.steps or t.epochs * steps_per_epoch, t.epochs * steps_per_epoch)
    teacher = None
    if t.distill > 0:
        teacher = build_model(cfg, runtime, meta=meta)
        teacher = (shard(teacher, runtime) if sharded else teacher.to(runtime.device)).eval().requires_grad_(False)
    reseed_ranks(runtime, cfg.seed)
    mixup_fn, criterion = build_criterion(cfg.data, teacher, t.distill, t.distill_temperature)
    lr = t.lr * cfg.data.batch_size * runtime.world_size / 512
    optimizer = create_optimizer_v2(model, t.opt, lr=lr, weight_decay=t.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=t.epochs, warmup_epochs=t.warmup_epochs,
                                       min_lr=t.min_lr, warmup_lr=t.warmup_lr, step_on_epochs=False,
                                       updates_per_epoch=steps_per_epoch)
    ema = ModelEmaV3(model, decay=t.ema_decay) if t.ema else None
    scaler = torch.amp.GradScaler(runtime.device.type) if runtime.amp_dtype is torch.float16 else None
    net = DistributedDataParallel(model, device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None) \
        if runtime.distributed and not sharded else model

    task = task_for(cfg)   # classification, or next-token prediction for language models
    step, epoch, batch, best = 0, 0, 0, {"score": float("-inf")}
    resume = resume_file(cfg.resume, os.path.join(cfg.output, CHECKPOINT))
    if resume:
        state = load_training_checkpoint(resume, "train", cfg.model.name)
        check_shapes(state["model"], model.state_dict(), resume)   # another model: which shapes differ
        check_same_run(state, cfg.to_dict(), resume)                # same model: which settings differ
        if sharded:
            load_full_state(model, optimizer, state["model"], state["optimizer"])
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        if ema is not None and "ema" in state:
            ema.module.load_state_dict(state["ema"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        step, epoch, batch, best = state["step"], state["epoch"], state["batch"], state["best"]
        restore_rng_states(state["rng"], runtime)
        main_print(runtime, f"resumed {resume} at step {step} (epoch {epoch})")
    if runtime.is_main:  # after the resume checks: a refused resume leaves the folder as it was
        os.makedirs(cfg.output, exist_ok=True)
        save_config(cfg, os.path.join(cfg.output, "config.yaml"))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    main_print(runtime, f"train: {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M params"
                        + (f" ({trained / 1e6:.3f}M in LoRA adapters of rank {t.lora_rank})" if t.lora_rank else "") + ", "
                        f"{total_steps} steps ({steps_per_epoch}/epoch), lr {lr:.3g}")
    logger = RunLogger(cfg.output, runtime)

    def save(global_step: int, at_epoch: int, at_batch: int, weights: Optional[Dict] = None) -> None:
        rng = gather_rng_states(runtime)  # collective: every rank takes part
        weights = _weights(model) if weights is None else weights   # so is gathering a sharded model's tensors
        optim = full_optimizer_state(model, optimizer) if sharded else None
        if not runtime.is_main:
            return
        optim = optim if sharded else optimizer.state_dict()
        state = {"kind": "train", "model_name": cfg.model.name, "config": cfg.to_dict(), "model": weights,
                 "optimizer": optim, "step": global_step, "epoch": at_epoch,
                 "batch": at_batch, "best": best, "rng": rng}
        if ema is not None:
            state["ema"] = ema.module.state_dict()
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        save_training_checkpoint(state, os.path.join(cfg.output, CHECKPOINT))

    def on_step(global_step: int, loss: float) -> None:
        scheduler.step_update(num_updates=global_step)
        if ema is not None:
            ema.update(model, step=global_step)
        if global_step % t.log_every == 0:
            logger.log(global_step, loss=loss, lr=optimizer.param_groups[0]["lr"])
        if t.checkpoint_every and global_step % t.checkpoint_every == 0:
            save(global_step, epoch, global_step - epoch_start)

    scheduler.step_update(num_updates=step)
    metrics: Dict = {}
    try:
        while step < total_steps:
            epoch_start = step - batch
            loader.sampler.set_epoch(epoch, start=batch * cfg.data.batch_size)
            loader.dataset.set_epoch(epoch)
            stats = train_one_epoch(net, criterion, loader, optimizer, runtime, step=step, max_steps=total_steps,
                                    mixup_fn=mixup_fn, scaler=scaler, clip_grad=t.clip_grad, on_step=on_step,
                                    desc=f"train epoch {epoch}", task=task)
            step = stats["step"]
            finished_epoch = step - epoch_start >= steps_per_epoch
            weights = None   # the model's, once gathered for last/best: the checkpoint takes them too
            if (epoch + 1) % t.eval_every == 0 or step >= total_steps:
                evaluated = ema.module if ema is not None else model
                metrics = evaluate(evaluated, loaders["val"], runtime, desc="val", task=task)
                logger.log(step, **{f"val/{k}": v for k, v in metrics.items()})
                main_print(runtime, f"epoch {epoch}: train loss {stats['loss']:.4f}, val " + (
                    f"top-1 {metrics['top1']:.2f}%" if task.headline == "top1" else
                    f"{task.headline} {metrics[task.headline]:.3f}"))
                score = task.score(metrics)
                saved = _weights(evaluated)   # a collective on a sharded model
                if runtime.is_main:
                    _save_model(evaluated, os.path.join(cfg.output, "last"), saved)
                if score > best.get("score", best.get("top1", float("-inf"))):
                    best = {**metrics, "score": score, "epoch": epoch, "step": step}
                    if runtime.is_main:
                        _save_model(evaluated, os.path.join(cfg.output, "best"), saved)
                weights = saved if evaluated is model else None
            epoch, batch = (epoch + 1, 0) if finished_epoch else (epoch, step - epoch_start)
            save(step, epoch, batch, weights)
    except NonFiniteLoss as e:
        logger.close()
        raise NonFiniteLoss(f"{e}; training stopped. The last good checkpoint is "
                            f"{os.path.join(cfg.output, CHECKPOINT)}; lower train.lr") from None
    logger.close()
    result = {"best": best, "last": metrics, "steps": step}
    if runtime.is_main:
        atomic_write(os.path.join(cfg.output, "result.json"), lambda f: open(f, "w").write(json.dumps(result, indent=1)))
    runtime.barrier()
    return result
