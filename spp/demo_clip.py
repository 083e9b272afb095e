"""`spp demo-clip`: the pipeline on a CLIP model (both towers) in minutes on a laptop CPU, on real images.

Stage 1 (cached): a word-level tokenizer for the captions, and a small CLIP trained from scratch on the
Fashion-MNIST training images paired with captions made from their class names and eight prompt
templates ("a black and white photo of a sneaker."); 6,000 training images are held out for validation,
and the 10,000 test images are never trained on. Then the LBI search over the masks of both towers, the
family's recall@1 and zero-shot accuracy at several sizes without retraining, one member exported and
finetuned briefly with distillation of the dense model's image-text similarities.
"""
from __future__ import annotations

import math
import os
import time
from typing import Sequence

import torch

from .build import build_loaders, task_for
from .data import FASHION_CLASSES, FASHION_TEMPLATES
from .demo import _banner, report, search_to_retrain, shipped_config
from .engine import evaluate, train_one_epoch
from .runtime import setup_runtime

VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, image_size=28,
              patch_size=7, num_channels=1)
TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=16)
STEPS, WARMUP, LR, BATCH = 900, 50, 1e-3, 128


def caption_tokenizer():
    """A word-level tokenizer over the demo's captions: ``<bos> words <eos>``, lower-cased, padded with ``<pad>``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]   # <eos> is 3: CLIP pools the text at the first eos token
    words = sorted({word for t in FASHION_TEMPLATES for c in FASHION_CLASSES
                    for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(t.format(c).lower())})
    vocab = {w: i for i, w in enumerate(specials + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", model_max_length=TEXT["max_position_embeddings"])


def pretrain(cfg, directory: str) -> None:
    """Tokenizer and CLIP from scratch on the training split of ``cfg.data`` (the search's), saved to
    ``directory`` as a Hugging Face model directory (safetensors) with its tokenizer."""
    from transformers import CLIPConfig, CLIPModel


    runtime = setup_runtime(cfg.device, cfg.amp, cfg.seed)
    tokenizer = caption_tokenizer()
    os.makedirs(directory, exist_ok=True)
    tokenizer.save_pretrained(directory)
    cfg.data.tokenizer = directory
    torch.manual_seed(cfg.seed)
    text = dict(TEXT, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=VISION, projection_dim=64)).to(runtime.device)
    loaders = build_loaders(cfg, runtime, ["train", "val"])
    print(f"model: CLIP, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters (vision {VISION['num_hidden_layers']} "
          f"layers, text {TEXT['num_hidden_layers']}), {STEPS} steps of {BATCH} image-caption pairs "
          f"({len(loaders['train'].dataset):,} training pairs)")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / WARMUP, 0.5 * (
        1 + math.cos(math.pi * min(s, STEPS) / STEPS)) * 0.99 + 0.01))
    task, step, epoch = task_for(cfg), 0, 0
    while step < STEPS:
        loaders["train"].sampler.set_epoch(epoch)
        loaders["train"].dataset.set_epoch(epoch)
        stats = train_one_epoch(model, lambda x, out, y: task.loss(out, y), loaders["train"], optimizer, runtime,
                                step=step, max_steps=STEPS, clip_grad=1.0, on_step=lambda s, loss: schedule.step(),
                                desc="pretrain", task=task)
        step, epoch = stats["step"], epoch + 1
    metrics = evaluate(model, loaders["val"], runtime, task=task)
    print(f"pretrained: val recall@1 {metrics['recall@1']:.2f} (image-to-text {metrics['i2t@1']:.2f}, text-to-image "
          f"{metrics['t2i@1']:.2f}), zero-shot {metrics['zero-shot']:.2f}% on {metrics['n']:,} held-out images")
    model.save_pretrained(directory)


def run_demo_clip(output: str = "outputs/demo_clip", overrides: Sequence[str] = (), fresh: bool = False) -> str:
    """``spp demo-clip``: train (cached), search, family, export and finetune a CLIP; the table."""
    start = time.time()
    model_dir = os.path.join(output, "pretrain", "model")
    search_dir, pruned_dir = os.path.join(output, "search"), os.path.join(output, "search", "pruned")
    shared = [f"model.name={model_dir}", *overrides]
    if fresh or not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        _banner("1/5 train a small CLIP on Fashion-MNIST images and captions (cached for the next run)")
        os.makedirs(model_dir, exist_ok=True)   # model.name must be a directory for the config to read as a HF model
        pretrain(shipped_config("demo_clip_search.yaml", [f"output={output}/pretrain", *shared]), model_dir)
    else:
        _banner(f"1/5 pretrained model cached in {model_dir} (--fresh trains it again)")
    search = shipped_config("demo_clip_search.yaml", [f"output={search_dir}", "resume=null", f"export.out={pruned_dir}",
                                               *shared])
    retrain = shipped_config("demo_clip_search.yaml", [f"output={output}/retrain", "resume=null", f"train.source={pruned_dir}",
                                                *shared])
    rows, result = search_to_retrain(search, retrain, "both towers of the frozen model", "finetune the exported "
                                     "member briefly (distilled from the dense model's similarities)")
    return report(output, rows, search.export.remove, result,
                  f"SPP CLIP demo on Fashion-MNIST (zero-shot top-1 and recall@1, %, on 6,000 held-out validation "
                  f"images, {time.time() - start:.0f} s)", "zero-shot accuracy and recall@1 vs size", metric="zero-shot",
                  columns=("zero-shot / recall@1, no finetune", "zero-shot / recall@1, finetuned"),
                  flops=("FLOPs per image+caption", 2), second="recall@1")
