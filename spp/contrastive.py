"""Image-text contrastive learning (CLIP): the loss a search and a finetune minimise, retrieval and zero-shot evaluation. The
image-caption data sets are in :mod:`spp.data` (``caption_datasets``).

A caption dataset yields ``(image, info)``: ``info`` holds the caption's ``input_ids`` and
``attention_mask`` and ``target = [image_id, match, label]``. ``image_id`` says which items show the same
image (evaluation embeds each image once); ``match`` says which captions count as right for an image: the
image's own captions (COCO, Flickr30k: ``match = image_id``) or every caption of its class (the demo,
whose captions are made from class names: ``match = label``). ``label`` is the class (-1: none) that
zero-shot classification is scored against.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["contrastive_loss", "similarity_distillation", "retrieval_recall", "class_embeddings", "zero_shot_accuracy",
           "image_embeds", "text_embeds", "tokenize_prompts", "TEMPLATES"]

TEMPLATES = ("a photo of a {}.",)   # CLIP's default zero-shot prompt
# ================================================================================================
# Loss and metrics
# ================================================================================================
def _positives(match: Optional[torch.Tensor], n: int, device) -> torch.Tensor:
    """Rows of target probabilities: uniform over the batch's captions that match each image."""
    if match is None:
        return torch.eye(n, device=device)
    same = (match[:, None] == match[None, :]).float()
    return same / same.sum(1, keepdim=True)


def contrastive_loss(logits_per_image: torch.Tensor, match: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over a batch of pairs: the mean of the image-to-text and text-to-image
    cross-entropies of the (logit-scaled) similarities. With ``match`` (one key per pair) every caption
    whose key equals an image's is a positive for it, with equal weight (captions of one class, or two
    captions of one image in the same batch); without it, pair i's caption alone."""
    logits = logits_per_image.float()
    target = _positives(match, logits.shape[0], logits.device)
    i2t = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    t2i = -(target.t() * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return (i2t + t2i) / 2


def similarity_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL from the teacher's image-to-text and text-to-image distributions (softmax of its similarity
    logits ``logits_per_image``, ``(B, B)``) to the student's, both directions averaged, times T²."""
    t = temperature
    kl = 0.0
    for s, q in ((student, teacher), (student.t(), teacher.t())):
        kl = kl + F.kl_div(F.log_softmax(s.float() / t, 1), F.log_softmax(q.float() / t, 1), reduction="batchmean",
                           log_target=True)
    return kl / 2 * t * t


def retrieval_recall(images: torch.Tensor, texts: torch.Tensor, image_id: torch.Tensor, match: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> Dict[str, float]:
    """Image-to-text and text-to-image recall@k (%) of normalised embeddings, one row per pair.

    Images are embedded once per ``image_id`` (the first row of each); a retrieved caption (image) is a hit
    when its ``match`` key equals the query's. ``i2t@k``: images with a right caption among their k nearest
    captions; ``t2i@k``: captions with a right image among their k nearest images. ``recall@1`` is the
    mean of ``i2t@1`` and ``t2i@1``."""
    import numpy as np

    first = torch.as_tensor(np.unique(image_id.cpu().numpy(), return_index=True)[1])   # each image's first row
    gallery, gallery_match = images[first], match[first]
    out: Dict[str, float] = {}
    for name, queries, q_match, keys, k_match in (("i2t", gallery, gallery_match, texts, match),
                                                   ("t2i", texts, match, gallery, gallery_match)):
        hits = torch.zeros(len(ks))
        for start in range(0, queries.shape[0], chunk):
            sim = queries[start:start + chunk].float() @ keys.float().t()
            top = sim.topk(min(max(ks), keys.shape[0]), dim=1).indices
            right = k_match[top] == q_match[start:start + chunk, None]
            for j, k in enumerate(ks):
                hits[j] += right[:, :k].any(1).sum()
        for j, k in enumerate(ks):
            out[f"{name}@{k}"] = 100.0 * float(hits[j]) / max(queries.shape[0], 1)
    out["recall@1"] = (out["i2t@1"] + out["t2i@1"]) / 2
    return out


def _pooled(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output whose ``pooler_output`` is the embedding (5)."""
    return output if torch.is_tensor(output) else output.pooler_output


def image_embeds(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings (float32) of a CLIP model for ``pixel_values``."""
    return F.normalize(_pooled(model.get_image_features(pixel_values=pixel_values)).float(), dim=-1)


def text_embeds(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """L2-normalised text embeddings (float32) of a CLIP model for tokenized captions."""
    return F.normalize(_pooled(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)).float(),
                       dim=-1)


@torch.no_grad()
def class_embeddings(model, prompts: Dict[str, torch.Tensor]) -> torch.Tensor:
    """One normalised text embedding per class: the mean over its prompt templates (``prompts``: the tokenized
    prompts, ``input_ids`` and ``attention_mask`` of shape ``(classes, templates, length)``)."""
    c, t, n = prompts["input_ids"].shape
    device = next(model.parameters()).device
    emb = text_embeds(model, prompts["input_ids"].reshape(c * t, n).to(device),
                      prompts["attention_mask"].reshape(c * t, n).to(device))
    return F.normalize(emb.reshape(c, t, -1).mean(1), dim=-1)


def tokenize_prompts(tokenizer, class_names: Sequence[str], templates: Sequence[str] = TEMPLATES,
                     max_length: int = 77) -> Dict[str, torch.Tensor]:
    """Every class name in every template, tokenized: ``(classes, templates, length)`` tensors."""
    texts = [t.format(c) for c in class_names for t in templates]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    shape = (len(class_names), len(templates), -1)
    return {"input_ids": batch["input_ids"].reshape(shape), "attention_mask": batch["attention_mask"].reshape(shape)}


@torch.no_grad()
def zero_shot_accuracy(model, loader, prompts: Dict[str, torch.Tensor], device=None) -> float:
    """Top-1 accuracy (%) of zero-shot classification: each image's nearest class embedding
    (:func:`class_embeddings`). ``loader`` yields ``(images, labels)``."""
    model.eval()
    device = device or next(model.parameters()).device
    classes = class_embeddings(model, prompts)
    correct = total = 0
    for images, labels in loader:
        pred = (image_embeds(model, images.to(device)) @ classes.t()).argmax(1)
        correct += int((pred.cpu() == labels).sum())
        total += labels.numel()
    return 100.0 * correct / max(total, 1)


# ================================================================================================
# Data
# ================================================================================================
