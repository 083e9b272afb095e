"""Tasks: how a batch becomes a loss, and what an evaluation reports.

The loops (:func:`spp.engine.train_one_epoch`, :func:`spp.engine.evaluate`) and ν calibration know
nothing of images or tokens; a task splits a batch into inputs and targets, runs the model, and sums
the metrics an evaluation reports over batches and ranks. :class:`Classification` is the vision
models' (top-1 / top-5); :class:`NextToken` is a causal language model's (token-level cross-entropy
and perplexity).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["Task", "Classification", "NextToken"]


class Task:
    """The interface; ``metric_names`` name the sums :meth:`metric_sums` returns, in order; ``headline`` is
    the metric tables lead with and held-out scores use (``higher_is_better`` says which way is better);
    ``table`` the metrics a family table shows."""

    metric_names: Sequence[str] = ()
    headline: str = ""
    higher_is_better: bool = True
    table: Sequence[str] = ()

    def score(self, metrics: Dict[str, float]) -> float:
        """The headline as a score where higher is better (for :meth:`spp.WeightFamily.select_best`)."""
        return metrics[self.headline] if self.higher_is_better else -metrics[self.headline]

    def split(self, batch: Any) -> Tuple[Any, Any]:
        """``(inputs, targets)`` of one batch from the loader."""
        inputs, targets = batch
        return inputs, targets

    def forward(self, model, inputs):
        return model(inputs)

    def loss(self, outputs, targets) -> torch.Tensor:
        raise NotImplementedError

    def metric_sums(self, outputs, targets) -> torch.Tensor:
        """float64 sums over the batch, one per ``metric_names``; the evaluation adds them up."""
        raise NotImplementedError

    def summarize(self, sums: Sequence[float]) -> Dict[str, float]:
        raise NotImplementedError


class Classification(Task):
    """Images and class labels: cross-entropy, top-1 and top-5 accuracy (%)."""

    metric_names = ("loss", "top1", "top5", "n")
    headline, table = "top1", ("top1", "top5")

    def loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets)

    def metric_sums(self, outputs, targets):
        outputs = outputs.float()
        top = outputs.topk(min(5, outputs.shape[-1]), dim=-1).indices
        correct = top == targets[:, None]
        return torch.tensor([F.cross_entropy(outputs, targets, reduction="sum").item(), correct[:, :1].sum().item(),
                             correct.sum().item(), targets.numel()], dtype=torch.float64)

    def summarize(self, sums):
        loss, top1, top5, n = sums
        n = max(n, 1)
        return {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "n": int(n)}


class NextToken(Task):
    """Token sequences for a causal language model: the next-token cross-entropy and perplexity, over every
    predicted token (positions 1..T-1 of each sequence). A batch is a ``(B, T)`` tensor of token ids, or a
    pair whose first item is."""

    metric_names = ("loss", "tokens")
    headline, higher_is_better, table = "perplexity", False, ("perplexity", "loss")

    def split(self, batch):
        ids = batch[0] if isinstance(batch, (tuple, list)) else batch
        return ids, ids

    def loss(self, outputs, targets):
        from .calibrate import next_token_loss
        return next_token_loss(outputs, targets)

    def metric_sums(self, outputs, targets):
        logits = getattr(outputs, "logits", outputs)[:, :-1].float()
        loss = F.cross_entropy(logits.flatten(0, 1), targets[:, 1:].flatten(), reduction="sum")
        return torch.tensor([loss.item(), targets[:, 1:].numel()], dtype=torch.float64)

    def summarize(self, sums):
        loss, tokens = sums
        mean = loss / max(tokens, 1)
        return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": int(tokens)}
