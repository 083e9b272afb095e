"""CLIP: the contrastive loss a search and a finetune minimise, retrieval and zero-shot evaluation, and
image-caption data (a COCO / Flickr30k Karpathy-split JSON with its image folder, or Fashion-MNIST with
captions made from its class names for the demo).

A caption dataset yields ``(image, info)``: ``info`` holds the caption's ``input_ids`` and
``attention_mask`` and ``target = [image_id, match, label]``. ``image_id`` says which items show the same
image (evaluation embeds each image once); ``match`` says which captions count as right for an image: the
image's own captions (COCO, Flickr30k: ``match = image_id``) or every caption of its class (the demo,
whose captions are made from class names: ``match = label``). ``label`` is the class (-1: none) that
zero-shot classification is scored against.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["contrastive_loss", "similarity_distillation", "retrieval_recall", "class_embeddings", "zero_shot_accuracy",
           "image_embeds", "text_embeds", "CaptionPairs", "karpathy_pairs", "caption_datasets", "TEMPLATES",
           "FASHION_CLASSES", "FASHION_TEMPLATES"]

TEMPLATES = ("a photo of a {}.",)   # CLIP's default zero-shot prompt
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
FASHION_TEMPLATES = ("a photo of a {}.", "a black and white photo of a {}.", "a picture of the {}.",
                     "a small photo of a {}.", "a grayscale image of a {}.", "a low resolution photo of the {}.",
                     "a centered photo of a {}.", "an image of a {}, a kind of clothing.")


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
class CaptionPairs(Dataset):
    """Image-caption pairs: item i is ``(image, {"input_ids", "attention_mask", "target"})``.

    ``images(i)`` loads image i (a PIL image or a tensor; the wrapping dataset transforms it); captions are
    tokenized once, padded to the longest (at most ``max_length`` tokens) so that batches stack.
    """

    def __init__(self, load_image, captions: Sequence[str], image_id: Sequence[int], match: Sequence[int],
                 labels: Optional[Sequence[int]], tokenizer, max_length: int):
        if not captions:
            raise ValueError("no image-caption pairs to load")
        batch = tokenizer(list(captions), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        self.load_image, self.ids, self.attention = load_image, batch["input_ids"], batch["attention_mask"]
        labels = labels if labels is not None else [-1] * len(captions)
        self.target = torch.tensor([list(x) for x in zip(image_id, match, labels)], dtype=torch.long)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int):
        return self.load_image(i), {"input_ids": self.ids[i], "attention_mask": self.attention[i],
                                    "target": self.target[i]}


_KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def karpathy_pairs(json_path: str, split: str) -> List[Dict]:
    """``[{"file", "caption", "image_id"}]`` of one split of a Karpathy-split JSON (``dataset_coco.json``,
    ``dataset_flickr30k.json``: ``images[*]`` with ``filename``, optional ``filepath``, ``split`` and
    ``sentences[*].raw``); COCO's ``restval`` images train."""
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"{json_path} not found: data.root is a Karpathy-split JSON (dataset_coco.json or "
                                "dataset_flickr30k.json) and data.images the folder its file paths start from")
    with open(json_path) as f:
        images = json.load(f)["images"]
    pairs = []
    for index, image in enumerate(images):
        if image.get("split") not in _KARPATHY_SPLITS[split]:
            continue
        file = os.path.join(image.get("filepath", ""), image["filename"])
        for sentence in image["sentences"]:
            pairs.append({"file": file, "caption": sentence["raw"].strip(), "image_id": image.get("imgid", index)})
    if not pairs:
        raise ValueError(f"{json_path} has no image of split {split!r} (splits: {sorted({i.get('split') for i in images})})")
    return pairs


def _karpathy(cfg, tokenizer, split: str) -> CaptionPairs:
    from PIL import Image

    if not cfg.images or not os.path.isdir(cfg.images):
        raise FileNotFoundError(f"data.images={cfg.images}: not a folder; give the image folder the JSON's paths are "
                                "relative to (COCO: the folder holding train2014/ and val2014/)")
    pairs = karpathy_pairs(cfg.root, split)
    missing = os.path.join(cfg.images, pairs[0]["file"])
    if not os.path.isfile(missing):
        raise FileNotFoundError(f"{missing} not found: data.images must be the folder the paths in {cfg.root} start from")
    files = [os.path.join(cfg.images, p["file"]) for p in pairs]
    ids = [p["image_id"] for p in pairs]
    return CaptionPairs(lambda i: Image.open(files[i]).convert("RGB"), [p["caption"] for p in pairs], ids, ids, None,
                        tokenizer, cfg.seq_len)


def _fashion_captions(cfg, tokenizer, split: str) -> CaptionPairs:
    from .data import _fashion_mnist

    base = _fashion_mnist(cfg.root, split)
    labels = base.labels.tolist()
    captions = [FASHION_TEMPLATES[i % len(FASHION_TEMPLATES)].format(FASHION_CLASSES[c]) for i, c in enumerate(labels)]
    offset = 0 if split == "train" else 1_000_000   # test images never share an id with training ones
    ids = [offset + i for i in range(len(labels))]
    return CaptionPairs(lambda i: base[i][0], captions, ids, labels, labels, tokenizer, cfg.seq_len)


def caption_datasets(cfg, tokenizer, seed: int, splits: Sequence[str]) -> Dict[str, Dataset]:
    """Caption datasets of ``splits`` for ``data.dataset`` ``captions`` (Karpathy JSON) or
    ``fashion_mnist_captions``, transformed as :func:`spp.data.build_datasets` transforms images."""
    from .data import AugmentedDataset, TensorTransform, FASHION_MEAN, FASHION_STD

    if cfg.dataset == "fashion_mnist_captions":
        read = functools.lru_cache(maxsize=None)(lambda file: _fashion_captions(cfg, tokenizer, file))
        load = lambda split: read("train" if split == "train" else "test")   # noqa: E731  (val and test: one read)
        train_tf = TensorTransform(cfg.img_size, True, FASHION_MEAN, FASHION_STD)
        eval_tf = TensorTransform(cfg.img_size, False, FASHION_MEAN, FASHION_STD)
        own_val = False
    else:
        from timm.data import create_transform
        from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        load = lambda split: _karpathy(cfg, tokenizer, split)   # noqa: E731
        common = dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, interpolation="bicubic", crop_pct=1.0)
        train_tf = create_transform(cfg.img_size, is_training=True, scale=(0.5, 1.0), auto_augment=cfg.auto_augment,
                                    re_prob=0.0, color_jitter=cfg.color_jitter, **common)
        eval_tf = create_transform(cfg.img_size, is_training=False, **common)
        own_val = True   # the Karpathy split has its own val images
    out: Dict[str, Dataset] = {}
    if own_val or cfg.val_fraction == 0:
        for split in splits:
            out[split] = AugmentedDataset(load(split), train_tf if split == "train" else eval_tf, seed)
        return out
    train = load("train")   # val held out of train by image
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).numpy()
    n_val = int(round(cfg.val_fraction * len(train)))
    for split in splits:
        if split == "train":
            out[split] = AugmentedDataset(train, train_tf, seed, sorted(order[n_val:]))
        elif split == "val":
            out[split] = AugmentedDataset(train, eval_tf, seed, sorted(order[:n_val]))
        else:
            out[split] = AugmentedDataset(load("test"), eval_tf, seed)
    return out
