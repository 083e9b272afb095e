"""Tasks: how a batch becomes a loss, and what an evaluation reports.

The loops (:func:`spp.engine.train_one_epoch`, :func:`spp.engine.evaluate`) and ν calibration know
nothing of images or tokens; a task splits a batch into inputs and targets, runs the model, and sums
the metrics an evaluation reports over batches and ranks. :class:`Classification` is the vision
models' (top-1 / top-5); :class:`NextToken` is a causal language model's (token-level cross-entropy
and perplexity); :class:`Contrastive` is CLIP's (InfoNCE; retrieval recall and zero-shot accuracy over
the whole evaluation set, which a task marked ``pooled`` computes from outputs gathered over all batches).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .contrastive import class_embeddings, contrastive_loss, retrieval_recall

__all__ = ["Task", "Classification", "NextToken", "Contrastive", "TASKS", "task_class", "to_device", "next_token_loss"]


def to_device(x: Any, device) -> Any:
    """A tensor, or a dict / tuple / list of them, on ``device``."""
    if torch.is_tensor(x):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


def next_token_loss(output, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a causal language model: ``output`` (its logits, or an output with
    ``.logits``) at positions ``0..T-2`` against ``input_ids`` at ``1..T-1``. Use it as ``loss_fn`` with
    batches ``(input_ids, input_ids)``: ``spp.calibrate_nu(llm, [(ids, ids)], spp.next_token_loss)``."""
    logits = getattr(output, "logits", output)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


class Task:
    """The interface; ``metric_names`` name the sums :meth:`metric_sums` returns, in order; ``headline`` is
    the metric tables lead with and held-out scores use (``higher_is_better`` says which way is better);
    ``table`` the metrics a family table shows."""

    metric_names: Sequence[str] = ()
    headline: str = ""
    higher_is_better: bool = True
    table: Sequence[str] = ()
    pooled: bool = False   # evaluation gathers pool() of every batch and summarize_pool()s them (not sums)
    datasets: Sequence[str] = ()   # the data.dataset values whose batches this task reads (task_class looks them up)
    inputs: str = "image"          # what one example holds: "image", "text" or "image-text" (a ModelFamily's inputs)
    samples: str = "images"        # what the examples are called in messages

    def score(self, metrics: Dict[str, float]) -> float:
        """The headline as a score where higher is better (for :meth:`spp.WeightFamily.select_best`)."""
        return metrics[self.headline] if self.higher_is_better else -metrics[self.headline]

    def split(self, batch: Any) -> Tuple[Any, Any]:
        """``(inputs, targets)`` of one batch from the loader."""
        inputs, targets = batch
        return inputs, targets

    def forward(self, model, inputs):
        """Run ``model`` on ``inputs`` (a dict as keyword arguments)."""
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)

    def distill_logits(self, outputs) -> torch.Tensor:
        """The logits a distillation loss matches between student and teacher, as rows of distributions."""
        return getattr(outputs, "logits", outputs).flatten(0, -2)

    def begin(self, model) -> None:
        """Called with the evaluated model before an evaluation's first batch."""

    def pool(self, outputs, targets) -> Dict[str, torch.Tensor]:
        """For a ``pooled`` task: tensors of one batch that :meth:`summarize_pool` reads over all batches."""
        raise NotImplementedError

    def summarize_pool(self, pooled: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """The metrics from the concatenated :meth:`pool` outputs of every batch and rank."""
        raise NotImplementedError

    def loss(self, outputs, targets) -> torch.Tensor:
        """The training loss of ``outputs`` against ``targets`` (a scalar tensor)."""
        raise NotImplementedError

    def training_loss(self, data) -> Tuple[Optional[Callable], Callable]:
        """``(mixup_fn, loss)`` a search or finetune trains with under the data config ``data``
        (:class:`spp.config.DataConfig`): :meth:`loss` and no batch mixing, unless the task says otherwise."""
        return None, self.loss

    def held_out(self, n: int, data) -> str:
        """Where ``n`` held-out examples (the validation split ν is calibrated on) come from, for the log."""
        return f"{n:,} held-out {self.samples}"

    def metric_sums(self, outputs, targets) -> torch.Tensor:
        """float64 sums over the batch, one per ``metric_names``; the evaluation adds them up."""
        raise NotImplementedError

    def summarize(self, sums: Sequence[float]) -> Dict[str, float]:
        """The metrics (``{name: value}``) from the sums of :meth:`metric_sums` over all batches."""
        raise NotImplementedError


class Classification(Task):
    """Images and class labels: cross-entropy, top-1 and top-5 accuracy (%)."""

    metric_names = ("loss", "top1", "top5", "n")
    headline, table = "top1", ("top1", "top5")
    datasets = ("imagenet", "imagefolder", "fashion_mnist", "synthetic")

    def loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets)

    def training_loss(self, data):
        """The DeiT recipe's: timm's Mixup / CutMix with soft-target cross-entropy (``data.mixup``,
        ``data.cutmix``), label smoothing (``data.smoothing``), else cross-entropy."""
        from timm.data import Mixup   # optional: `import spp` loads no model library
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        if data.mixup > 0 or data.cutmix > 0:
            return (Mixup(mixup_alpha=data.mixup, cutmix_alpha=data.cutmix, label_smoothing=data.smoothing,
                          num_classes=data.num_classes), SoftTargetCrossEntropy())
        if data.smoothing > 0:
            return None, LabelSmoothingCrossEntropy(data.smoothing)
        return None, torch.nn.CrossEntropyLoss()

    def held_out(self, n, data):
        return (f"{n:,} training images held out (data.val_fraction={data.val_fraction})" if data.val_fraction > 0
                else f"the dataset's validation set ({n:,} images)")

    def metric_sums(self, outputs, targets):
        outputs = outputs.float()
        top = outputs.topk(min(5, outputs.shape[-1]), dim=-1).indices
        correct = top == targets[:, None]
        return torch.tensor([F.cross_entropy(outputs, targets, reduction="sum").item(), correct[:, :1].sum().item(),
                             correct.sum().item(), targets.numel()], dtype=torch.float64)

    def summarize(self, sums):
        """Mean loss, top-1 and top-5 (%) from the summed metrics."""
        loss, top1, top5, n = sums
        n = max(n, 1)
        return {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "n": int(n)}


class NextToken(Task):
    """Token sequences for a causal language model: the next-token cross-entropy and perplexity, over every
    predicted token (positions 1..T-1 of each sequence). A batch is a ``(B, T)`` tensor of token ids, or a
    pair whose first item is."""

    metric_names = ("loss", "tokens")
    headline, higher_is_better, table = "perplexity", False, ("perplexity", "loss")
    datasets, inputs, samples = ("text",), "text", "sequences"

    def split(self, batch):
        ids = batch[0] if isinstance(batch, (tuple, list)) else batch
        return ids, ids

    def loss(self, outputs, targets):
        return next_token_loss(outputs, targets)

    def held_out(self, n, data):
        return f"the validation text ({n:,} sequences of {data.seq_len} tokens)"

    def metric_sums(self, outputs, targets):
        logits = getattr(outputs, "logits", outputs)[:, :-1].float()
        loss = F.cross_entropy(logits.flatten(0, 1), targets[:, 1:].flatten(), reduction="sum")
        return torch.tensor([loss.item(), targets[:, 1:].numel()], dtype=torch.float64)

    def summarize(self, sums):
        """Mean token loss and perplexity from the summed metrics."""
        loss, tokens = sums
        mean = loss / max(tokens, 1)
        return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": int(tokens)}


class Contrastive(Task):
    """Image-caption pairs for CLIP (:mod:`spp.contrastive`): a batch is ``(images, info)`` with the captions' ids
    and ``info["target"] = [image_id, match, label]``. The loss is the symmetric InfoNCE over the batch
    (:func:`spp.contrastive.contrastive_loss`); an evaluation reports image-to-text and text-to-image recall@1/5/10
    over the whole set (``recall@1``: their mean at 1, the headline) and, with ``prompts`` (the classes'
    tokenized prompts, :func:`spp.contrastive.tokenize_prompts`), zero-shot top-1 accuracy on the labelled images.

    ``headline`` is the metric members are read by: ``recall@1`` for captions of their own image (COCO,
    Flickr30k); ``zero-shot`` where captions are made from class names (the demo), because there the
    text-to-image recall moves in steps of one distinct caption (80 of them in the demo) and says little."""

    table, pooled = ("recall@1", "i2t@1", "t2i@1", "i2t@5", "t2i@5", "zero-shot"), True
    datasets, inputs, samples = ("captions", "fashion_mnist_captions"), "image-text", "image-caption pairs"

    def __init__(self, prompts: Optional[Dict[str, torch.Tensor]] = None, headline: str = "recall@1"):
        if headline not in self.table:
            raise ValueError(f"headline={headline!r}: choose one of {self.table}")
        if headline == "zero-shot" and prompts is None:
            raise ValueError("headline='zero-shot' needs the classes' prompts (spp.contrastive.tokenize_prompts)")
        self.prompts, self.classes, self.headline = prompts, None, headline

    def split(self, batch):
        images, info = batch
        return {"pixel_values": images, "input_ids": info["input_ids"], "attention_mask": info["attention_mask"]}, \
            info["target"]

    def loss(self, outputs, targets):
        return contrastive_loss(outputs.logits_per_image, targets[:, 1])

    def distill_logits(self, outputs):   # image-to-text rows, then text-to-image rows
        return torch.cat([outputs.logits_per_image, outputs.logits_per_text])

    def begin(self, model):
        self.classes = class_embeddings(model, self.prompts) if self.prompts is not None else None

    def pool(self, outputs, targets):
        """The batch's image and text embeddings and targets (and zero-shot hits), gathered by the evaluation."""
        out = {"image": outputs.image_embeds.float(), "text": outputs.text_embeds.float(), "target": targets}
        if self.classes is not None:
            out["zero_shot"] = (out["image"] @ self.classes.t()).argmax(1) == targets[:, 2]
        return out

    def summarize_pool(self, pooled):
        """Retrieval recall@1/5/10 and zero-shot top-1 over every gathered pair."""
        target = pooled["target"]
        metrics = retrieval_recall(pooled["image"], pooled["text"], target[:, 0], target[:, 1])
        metrics["n"] = int(target.shape[0])
        labelled = target[:, 2] >= 0
        if "zero_shot" in pooled and labelled.any():
            metrics["zero-shot"] = 100.0 * float(pooled["zero_shot"][labelled].float().mean())
        else:
            metrics["zero-shot"] = float("nan")
        return metrics


TASKS = (Classification, NextToken, Contrastive)


def task_class(dataset: str) -> type:
    """The :class:`Task` subclass whose ``datasets`` hold ``dataset`` (a config's ``data.dataset``)."""
    for task in TASKS:
        if dataset in task.datasets:
            return task
    raise ValueError(f"data.dataset={dataset!r}: choose one of {', '.join(d for t in TASKS for d in t.datasets)}")
