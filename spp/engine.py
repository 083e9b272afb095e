"""The training and evaluation loops, shared by the search and the retrain.

``train_one_epoch`` and ``evaluate`` are plain functions that return averaged metrics;
checkpointing and logging live in the caller, reached through ``on_step``.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .errors import NonFiniteLoss
from .runtime import Runtime
from .sharding import is_sharded
from .tasks import Classification, Task, to_device

__all__ = ["train_one_epoch", "evaluate", "DistillationLoss"]


class DistillationLoss(nn.Module):
    """``(1 - w) * base(student, target) + w * T² KL(softmax(teacher/T) || softmax(student/T))``;
    at ``w = 0`` (no teacher needed) the base loss alone."""

    def __init__(self, base: Callable, teacher: Optional[Callable], weight: float, temperature: float,
                 task: Task = Classification()):
        super().__init__()
        self.base, self.teacher, self.weight, self.temperature, self.task = base, teacher, weight, temperature, task

    def forward(self, inputs: torch.Tensor, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.base(outputs, target)
        if self.weight == 0:
            return loss
        with torch.no_grad():
            teacher = self.task.forward(self.teacher, inputs)
        t = self.temperature
        # rows of distributions: classes; a language model's per-token ones (.logits, (B, T, V)); CLIP's
        # image-to-text and text-to-image similarities. The KL is their mean
        student, teacher = (self.task.distill_logits(x).float() for x in (outputs, teacher))
        kl = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                      reduction="batchmean", log_target=True) * (t * t)
        return (1 - self.weight) * loss + self.weight * kl


def train_one_epoch(
    model: nn.Module,
    criterion: Callable,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    runtime: Runtime,
    *,
    step: int,
    max_steps: Optional[int] = None,
    mixup_fn: Optional[Callable] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    clip_grad: Optional[float] = None,
    on_step: Optional[Callable[[int, float], None]] = None,
    desc: str = "train",
    task: Task = Classification(),
) -> Dict[str, float]:
    """One pass over ``loader`` (or until global step ``max_steps``).

    ``task`` splits each batch into inputs and targets and runs the model (:mod:`spp.tasks`);
    ``criterion(inputs, outputs, targets)`` gives the loss. ``on_step(step, loss)`` runs
    after every optimizer step, with the new global step. Raises :class:`NonFiniteLoss`
    before stepping on a NaN or infinite loss.
    """
    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=desc, disable=not runtime.is_main, dynamic_ncols=True, leave=False, mininterval=1.0)
    for batch in bar:
        if max_steps is not None and step >= max_steps:
            break
        inputs, targets = to_device(task.split(batch), runtime.device)
        if mixup_fn is not None:
            inputs, targets = mixup_fn(inputs, targets)
        with runtime.autocast():
            outputs = task.forward(model, inputs)
            loss = criterion(inputs, outputs, targets)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLoss(f"loss is {value} at step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        step += 1
        total, count = total + value, count + 1
        bar.set_postfix(loss=f"{value:.4f}", step=step)
        if on_step is not None:
            on_step(step, value)
    return {"loss": runtime.all_mean(total / max(count, 1)), "steps": count, "step": step}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, runtime: Runtime, max_batches: int = 0,
             desc: str = "eval", task: Task = Classification()) -> Dict[str, float]:
    """The task's metrics over ``loader`` (classification: top-1 / top-5 accuracy (%) and mean
    cross-entropy), summed over all ranks; a ``pooled`` task (CLIP's retrieval) gathers every rank's
    outputs and computes its metrics over the whole set."""
    model.eval()
    task.begin(model)
    sums = torch.zeros(len(task.metric_names), dtype=torch.float64, device=runtime.device)
    pooled: Dict[str, list] = {}
    batches = min(len(loader), max_batches) if max_batches else len(loader)
    spare = _spare_forwards(model, runtime, batches)
    inputs = None
    for i, batch in enumerate(tqdm(loader, desc=desc, disable=not runtime.is_main,
                                   dynamic_ncols=True, leave=False, mininterval=1.0)):
        if i >= batches:
            break
        inputs, targets = to_device(task.split(batch), runtime.device)
        with runtime.autocast():
            outputs = task.forward(model, inputs)
        if task.pooled:
            for k, v in task.pool(outputs, targets).items():
                pooled.setdefault(k, []).append(v.detach().cpu())
        else:
            sums += task.metric_sums(outputs, targets).to(runtime.device)
    for _ in range(spare):   # a sharded model's forward is a collective: match the ranks with more batches
        with runtime.autocast():
            task.forward(model, inputs)
    if task.pooled:   # every rank's outputs, in rank order
        local = {k: torch.cat(v) for k, v in pooled.items()}
        if runtime.distributed:
            ranks = [None] * runtime.world_size
            torch.distributed.all_gather_object(ranks, local)
            local = {k: torch.cat([r[k] for r in ranks]) for k in local}
        return task.summarize_pool(local)
    if runtime.distributed:
        torch.distributed.all_reduce(sums)
    return task.summarize(sums.tolist())


def _spare_forwards(model: nn.Module, runtime: Runtime, batches: int) -> int:
    """How many forwards, beyond its own ``batches``, this rank must run so that every rank runs as many as
    the busiest (0 unless the model is sharded by FSDP2: an evaluation split leaves some ranks a batch short)."""
    if not runtime.distributed or not is_sharded(model):
        return 0
    most = torch.tensor([batches], device=runtime.device)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    if batches == 0 and int(most):
        raise ValueError("a rank has no evaluation batch to run; give the evaluation split at least "
                         "one batch per process (data.eval_batch_size, data.val_fraction)")
    return int(most) - batches
