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

from .runtime import NonFiniteLoss, Runtime
from .tasks import Classification, Task

__all__ = ["train_one_epoch", "evaluate", "DistillationLoss"]


class DistillationLoss(nn.Module):
    """``(1 - w) * base(student, target) + w * T² KL(softmax(teacher/T) || softmax(student/T))``;
    at ``w = 0`` (no teacher needed) the base loss alone."""

    def __init__(self, base: Callable, teacher: Optional[Callable], weight: float, temperature: float):
        super().__init__()
        self.base, self.teacher, self.weight, self.temperature = base, teacher, weight, temperature

    def forward(self, inputs: torch.Tensor, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.base(outputs, target)
        if self.weight == 0:
            return loss
        with torch.no_grad():
            teacher = self.teacher(inputs)
        t = self.temperature
        # language models: per-token distributions (outputs with .logits, (B, T, V)); the KL is their mean
        student, teacher = (getattr(x, "logits", x).flatten(0, -2).float() for x in (outputs, teacher))
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
        inputs, targets = task.split(batch)
        inputs = inputs.to(runtime.device, non_blocking=True)
        targets = targets.to(runtime.device, non_blocking=True)
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
    cross-entropy), summed over all ranks."""
    model.eval()
    sums = torch.zeros(len(task.metric_names), dtype=torch.float64, device=runtime.device)
    for i, batch in enumerate(tqdm(loader, desc=desc, disable=not runtime.is_main,
                                   dynamic_ncols=True, leave=False, mininterval=1.0)):
        if max_batches and i >= max_batches:
            break
        inputs, targets = task.split(batch)
        inputs, targets = inputs.to(runtime.device), targets.to(runtime.device)
        with runtime.autocast():
            outputs = task.forward(model, inputs)
        sums += task.metric_sums(outputs, targets).to(runtime.device)
    if runtime.distributed:
        torch.distributed.all_reduce(sums)
    return task.summarize(sums.tolist())
