"""FLOP and parameter counting with ``torch.utils.flop_counter``."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from .masks import is_masked, mask_parameters
from .models import family_of

__all__ = ["count_flops", "count_params"]

# PyTorch counts the CUDA attention kernels but not the CPU flash kernel that
# scaled_dot_product_attention picks under no_grad; count it with the same formula.
_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
if _CPU_SDPA is not None and _CPU_SDPA not in flop_counter.flop_registry:
    @flop_counter.register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


@torch.no_grad()
def count_flops(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> int:
    """Forward FLOPs for one input (2 per multiply-add), counted by ``FlopCounterMode``.

    ``input_size`` is ``(C, H, W)`` for vision models and ``(tokens,)`` for language models; it
    defaults to the model's own (its image size; for LLMs, see :mod:`spp.models.decoder`; CLIP: one image
    and one caption, see :mod:`spp.models.clip`).
    Compressed attention is counted at its true head widths (for timm models, without the zero
    columns it pads on CPU to reach the fused kernel).
    """
    family = family_of(model)
    x = family.example_input(model, input_size)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, family.counting():
        model(**x) if isinstance(x, dict) else model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


def count_params(model: nn.Module, exclude_masks: bool = True) -> int:
    """Parameters of ``model`` (a tied weight counted once), without the masks unless ``exclude_masks=False``."""
    skip = {id(p) for _, p in mask_parameters(model)} if exclude_masks and is_masked(model) else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)
