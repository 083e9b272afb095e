"""FLOP and parameter counting with ``torch.utils.flop_counter``."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "count_params", "input_size_of"]

# PyTorch counts the CUDA attention kernels but not the CPU flash kernel that
# scaled_dot_product_attention picks under no_grad; count it with the same formula.
_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
if _CPU_SDPA is not None and _CPU_SDPA not in flop_counter.flop_registry:
    @flop_counter.register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def input_size_of(model: nn.Module) -> Sequence[int]:
    """``(C, H, W)`` the model was built for."""
    embed = model.patch_embed
    size = embed.img_size
    return (embed.proj.in_channels, *(size if isinstance(size, (tuple, list)) else (size, size)))


@torch.no_grad()
def count_flops(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> int:
    """Forward FLOPs for one image (2 per multiply-add), counted by ``FlopCounterMode``.

    Compressed attention is counted at its true head widths (:func:`spp.compress.nominal_attention`),
    not with the zero columns it pads on CPU to reach the fused kernel.
    """
    from .compress import nominal_attention

    input_size = tuple(input_size or input_size_of(model))
    param = next(model.parameters())
    x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, nominal_attention():
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


def count_params(model: nn.Module, exclude_masks: bool = True) -> int:
    from .masks import is_masked, mask_parameters
    skip = {id(p) for _, p in mask_parameters(model)} if exclude_masks and is_masked(model) else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)
