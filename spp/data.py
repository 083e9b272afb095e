"""Datasets and loaders: ImageNet / any ImageFolder tree, Fashion-MNIST, synthetic, and image-caption pairs
(COCO / Flickr30k Karpathy splits, Fashion-MNIST captions); text: :mod:`spp.text`.

Every sample's augmentation is seeded by ``(seed, epoch, index)`` and batches come from a
sampler that can start mid-epoch, so a resumed run sees exactly the data an uninterrupted
one would, whatever the number of loader workers.
"""
from __future__ import annotations

import functools
import gzip
import json
import math
import os
import random
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import DataConfig
from .tasks import Contrastive, NextToken, task_class
from .text import load_tokenizer, text_datasets

__all__ = ["build_datasets", "build_loader", "ResumableSampler", "FASHION_MNIST_DIRS", "DatasetNotFound", "CaptionPairs",
           "karpathy_pairs", "caption_datasets", "class_prompts", "FASHION_CLASSES", "FASHION_TEMPLATES"]

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
SPLITS = ("train", "val", "test")
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class DatasetNotFound(FileNotFoundError):
    pass


class AugmentedDataset(Dataset):
    """``transform(base[i])`` with the RNGs seeded by ``(seed, epoch, i)`` for that sample only."""

    def __init__(self, base: Dataset, transform: Optional[Callable], seed: int = 0, indices=None):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0
        self.indices = indices

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.base)

    def __getitem__(self, i: int):
        index = int(self.indices[i]) if self.indices is not None else i
        image, label = self.base[index]
        if self.transform is None:
            return image, label
        sample_seed = (self.seed * 1_000_003 + self.epoch * 10_007 + index) % (2 ** 31)
        if isinstance(self.transform, TensorTransform):
            return self.transform(image, torch.Generator().manual_seed(sample_seed)), label
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed)
            image = self.transform(image)
        random.setstate(py_state)
        np.random.set_state(np_state)
        return image, label


class TensorImages(Dataset):
    """Images held as one uint8 tensor ``(N, C, H, W)`` with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def _read_idx(path: str) -> torch.Tensor:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).view(*shape)


def _find_fashion_mnist(root: Optional[str]) -> str:
    candidates = []
    if root:
        candidates += [root, os.path.join(root, "FashionMNIST", "raw")]
    candidates += list(FASHION_MNIST_DIRS)
    candidates.append(os.path.join(os.path.expanduser("~"), ".cache", "spp", "FashionMNIST", "raw"))
    for directory in candidates:
        name = _FASHION_FILES["train"][0]
        if any(os.path.isfile(os.path.join(directory, name + ext)) for ext in ("", ".gz")):
            return directory
    try:  # online: let torchvision download it into the cache
        from torchvision.datasets import FashionMNIST
        cache = os.path.join(os.path.expanduser("~"), ".cache", "spp")
        FashionMNIST(cache, train=True, download=True)
        return os.path.join(cache, "FashionMNIST", "raw")
    except Exception as e:  # noqa: BLE001 - no network is the usual cause
        raise DatasetNotFound(
            "Fashion-MNIST not found; looked in " + ", ".join(candidates) + f" (download failed: {e}). "
            "Install it with `apt-get install dataset-fashion-mnist` or set data.root=DIR") from None


def _fashion_mnist(root: Optional[str], split: str) -> TensorImages:
    directory = _find_fashion_mnist(root)
    paths = []
    for name in _FASHION_FILES[split]:
        path = os.path.join(directory, name)
        paths.append(path if os.path.isfile(path) else path + ".gz")
    images, labels = (_read_idx(p) for p in paths)
    return TensorImages(images.unsqueeze(1), labels.long())


def _synthetic(cfg: DataConfig, split: str, seed: int) -> TensorImages:
    """Class-dependent patterns plus noise: learnable, deterministic, no files."""
    n = cfg.synthetic_size if split == "train" else max(cfg.synthetic_size // 4, cfg.num_classes)
    g = torch.Generator().manual_seed(1234)
    prototypes = torch.rand(cfg.num_classes, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    g.manual_seed(seed + (0 if split == "train" else 1))
    labels = torch.randint(0, cfg.num_classes, (n,), generator=g)
    noise = torch.rand(n, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    images = (0.6 * prototypes[labels] + 0.4 * noise).mul(255).to(torch.uint8)
    return TensorImages(images, labels)


class TensorTransform:
    """Fast augmentation of uint8 image tensors: random crop from a padded image, flip, normalise.

    Takes its randomness from the generator it is given (seeded per sample).
    """

    def __init__(self, img_size: int, train: bool, mean: Sequence[float], std: Sequence[float]):
        self.img_size, self.train = img_size, train
        self.padding = max(img_size // 14, 1)
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = image.float().div_(255)                                   # (C, H, W)
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = torch.nn.functional.interpolate(x[None], size=(self.img_size, self.img_size),
                                                mode="bilinear", antialias=True, align_corners=False)[0]
        if self.train:
            p = self.padding
            x = torch.nn.functional.pad(x, (p, p, p, p))
            top, left = torch.randint(0, 2 * p + 1, (2,), generator=generator).tolist()
            x = x[:, top:top + self.img_size, left:left + self.img_size]
            if torch.rand(1, generator=generator).item() < 0.5:
                x = x.flip(-1)
        return (x - self.mean) / self.std


def _imagefolder(cfg: DataConfig, split: str):
    from torchvision.datasets import ImageFolder

    root = cfg.root
    if not root:
        raise DatasetNotFound("data.root is not set; point it at a folder with train/ and val/ "
                              "(data.root=/path/to/imagenet), or run the demo: make demo")
    directory = os.path.join(root, "train" if split == "train" else "val")
    if not os.path.isdir(directory):
        raise DatasetNotFound(f"{directory} not found; data.root must hold train/ and val/ class folders "
                              "(ImageNet layout). To try spp without ImageNet, run: make demo")
    try:
        return ImageFolder(directory)
    except FileNotFoundError as e:  # class folders without images, or no class folders at all
        raise DatasetNotFound(f"{directory}: {e} (data.root must hold train/ and val/, each with one folder of "
                              "images per class)") from e


def build_datasets(cfg: DataConfig, seed: int = 0, splits: Sequence[str] = SPLITS,
                   tokenizer: Optional[str] = None) -> Dict[str, Dataset]:
    """The datasets of ``splits`` (of train, val, test); ``val`` is held out from train when
    ``val_fraction > 0``, else it is the test set. Only the image folders a split needs are read.
    Text (``dataset: text``) is tokenized with ``tokenizer`` (``cfg.tokenizer`` first; see :mod:`spp.text`)."""
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown splits {unknown}; choose from {SPLITS}")
    source = cfg.tokenizer or tokenizer
    kind = task_class(cfg.dataset)
    if kind.inputs != "image" and not source:
        raise ValueError(f"data.dataset={cfg.dataset} needs a tokenizer: set data.tokenizer (a directory or hf:ORG/NAME)")
    if kind is NextToken:
        if not cfg.root:
            raise DatasetNotFound("data.dataset=text needs data.root: a text file or a folder of .txt / .jsonl / "
                                  ".md / .rst files")
        return text_datasets(cfg.root, source, cfg.seq_len, cfg.val_fraction, cfg.test_fraction, seed, splits,
                             cfg.max_documents)
    if kind is Contrastive:
        if cfg.dataset == "captions" and not cfg.root:
            raise DatasetNotFound("data.dataset=captions needs data.root (a Karpathy-split JSON: dataset_coco.json or "
                                  "dataset_flickr30k.json) and data.images (the image folder)")
        return caption_datasets(cfg, load_tokenizer(source), seed, splits)
    if cfg.dataset in ("imagenet", "imagefolder"):
        from timm.data import create_transform
        load = functools.partial(_imagefolder, cfg)
        train_tf = create_transform(cfg.img_size, is_training=True, auto_augment=cfg.auto_augment,
                                    re_prob=cfg.reprob, color_jitter=cfg.color_jitter, interpolation="bicubic")
        eval_tf = create_transform(cfg.img_size, is_training=False, interpolation="bicubic")
    else:
        if cfg.dataset == "fashion_mnist":
            if cfg.in_chans != 1:
                raise ValueError("Fashion-MNIST is grayscale: set data.in_chans=1")
            load = functools.partial(_fashion_mnist, cfg.root)
            mean, std = FASHION_MEAN, FASHION_STD
        else:
            load = functools.partial(_synthetic, cfg, seed=seed)
            mean, std = (0.5,) * cfg.in_chans, (0.25,) * cfg.in_chans
        train_tf = TensorTransform(cfg.img_size, True, mean, std)
        eval_tf = TensorTransform(cfg.img_size, False, mean, std)
    held_out = cfg.val_fraction > 0
    out: Dict[str, Dataset] = {}
    if "train" in splits or ("val" in splits and held_out):
        train_base = load(split="train")
        n = len(train_base)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
        n_val = int(round(cfg.val_fraction * n))
        if "train" in splits:
            out["train"] = AugmentedDataset(train_base, train_tf, seed, np.sort(order[n_val:]) if n_val else None)
        if "val" in splits and held_out:
            out["val"] = AugmentedDataset(train_base, eval_tf, seed, np.sort(order[:n_val]))
    if "test" in splits or ("val" in splits and not held_out):
        out["test"] = AugmentedDataset(load(split="test"), eval_tf, seed)
        if not held_out:
            out["val"] = out["test"]
    return {s: out[s] for s in splits}


class ResumableSampler(Sampler[int]):
    """Shuffled (or ordered) indices for one rank, reproducible per epoch, startable mid-epoch.

    Training (``shuffle=True``) gives every rank the same number of samples (dropping or
    repeating a few); evaluation splits the data without repeats, so metrics summed over
    ranks count every sample once.
    """

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        self.size, self.num_replicas, self.rank = size, num_replicas, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch, self.start = 0, 0
        if drop_last:
            self.per_rank = size // num_replicas
        elif shuffle:
            self.per_rank = math.ceil(size / num_replicas)
        else:
            self.per_rank = len(range(rank, size, num_replicas))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use epoch ``epoch``'s order and skip its first ``start`` samples of this rank."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            return iter(list(range(self.rank, self.size, self.num_replicas))[self.start:])
        total = self.per_rank * self.num_replicas
        if total > self.size:
            order = torch.cat([order, order[: total - self.size]])
        mine = order[:total][self.rank::self.num_replicas]
        return iter(mine[self.start:].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start


def build_loader(dataset: Dataset, batch_size: int, train: bool, workers: int, seed: int,
                 num_replicas: int = 1, rank: int = 0, pin_memory: bool = False) -> DataLoader:
    """A loader over ``dataset`` for one rank, resumable mid-epoch (:class:`ResumableSampler`)."""
    sampler = ResumableSampler(len(dataset), num_replicas, rank, shuffle=train, seed=seed, drop_last=train)
    # an explicit generator keeps DataLoader from drawing its worker seed from the global RNG,
    # so a resumed run's RNG stream matches an uninterrupted one
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=train, pin_memory=pin_memory, persistent_workers=False,
                      generator=torch.Generator().manual_seed(seed))


# ================================================================================================
# Image-caption pairs (CLIP): a COCO / Flickr30k Karpathy-split JSON with its image folder, or
# Fashion-MNIST with captions made from its class names (the demo). See spp.contrastive for what a pair holds.
# ================================================================================================
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")


FASHION_TEMPLATES = ("a photo of a {}.", "a black and white photo of a {}.", "a picture of the {}.",
                     "a small photo of a {}.", "a grayscale image of a {}.", "a low resolution photo of the {}.",
                     "a centered photo of a {}.", "an image of a {}, a kind of clothing.")


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
    base = _fashion_mnist(cfg.root, split)
    labels = base.labels.tolist()
    captions = [FASHION_TEMPLATES[i % len(FASHION_TEMPLATES)].format(FASHION_CLASSES[c]) for i, c in enumerate(labels)]
    offset = 0 if split == "train" else 1_000_000   # test images never share an id with training ones
    ids = [offset + i for i in range(len(labels))]
    return CaptionPairs(lambda i: base[i][0], captions, ids, labels, labels, tokenizer, cfg.seq_len)


def class_prompts(cfg) -> Optional[Tuple[Sequence[str], Sequence[str]]]:
    """``(class names, prompt templates)`` of a caption data set whose captions are made from class names (the
    demo's Fashion-MNIST captions: members are read by zero-shot accuracy over these prompts); None for
    captions of their own images (COCO, Flickr30k)."""
    return (FASHION_CLASSES, FASHION_TEMPLATES) if cfg.dataset == "fashion_mnist_captions" else None


def caption_datasets(cfg, tokenizer, seed: int, splits: Sequence[str]) -> Dict[str, Dataset]:
    """Caption datasets of ``splits`` for ``data.dataset`` ``captions`` (Karpathy JSON) or
    ``fashion_mnist_captions``, transformed as :func:`spp.data.build_datasets` transforms images."""
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
