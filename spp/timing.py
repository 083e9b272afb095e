"""Wall-clock speed of a model: medians of timed calls (CUDA synchronised), images, caption pairs or tokens
per second."""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Dict, Sequence

import torch
from torch import nn

from .runtime import Runtime
from .tasks import Contrastive, to_device

__all__ = ["median_seconds", "lm_throughput", "throughput", "pair_throughput"]


def median_seconds(fn, device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (CUDA synchronised)."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def lm_throughput(model: nn.Module, seq_len: int, device: torch.device, amp_dtype=None, *, batch: int = 1,
                  prompt: int = 16, new_tokens: int = 32, repeats: int = 5, warmup: int = 1) -> Dict[str, float]:
    """Tokens/s of a language model, medians of ``repeats`` after ``warmup`` runs: prefill (a forward over
    ``batch`` sequences of ``seq_len`` tokens) and greedy decoding with the KV cache (``new_tokens`` after a
    ``prompt``-token prompt, less the prompt's own forward)."""
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    start = ids[:, :prompt]
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()

    def timed(fn) -> float:
        def run():
            with autocast:
                fn()
        return median_seconds(run, device, repeats, warmup)

    prefill = timed(lambda: model(ids))
    generate = timed(lambda: model.generate(start, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                            do_sample=False, use_cache=True, pad_token_id=0))
    first = prefill if prompt == seq_len else timed(lambda: model(start))
    return {"prefill_tokens_per_s": round(batch * seq_len / prefill, 1),
            "decode_tokens_per_s": round(batch * new_tokens / max(generate - first, 1e-9), 1)}


@torch.no_grad()
def throughput(model: nn.Module, input_size: Sequence[int], batch_size: int, device: torch.device,
               amp_dtype=None, repeats: int = 10, warmup: int = 3) -> float:
    """Images per second (median of ``repeats`` timed forwards after ``warmup``)."""
    model.eval()
    x = torch.randn(batch_size, *input_size, device=device)

    def run():
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
            model(x)
    return batch_size / median_seconds(run, device, repeats, warmup)


@torch.no_grad()
def pair_throughput(model: nn.Module, loader, runtime: Runtime, repeats: int = 5, warmup: int = 1) -> float:
    """Image-caption pairs per second of a CLIP model's forward (both towers) on the first batch of ``loader``."""
    model.eval()
    inputs, _ = to_device(Contrastive().split(next(iter(loader))), runtime.device)

    def run():
        with runtime.autocast():
            model(**inputs)
    return round(inputs["input_ids"].shape[0] / median_seconds(run, runtime.device, repeats, warmup), 1)
