"""Small helpers the model families share."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn


def new_linear(in_features: int, out_features: int, bias: bool, **kwargs) -> nn.Linear:
    """``nn.Linear`` that also takes a removed (zero) width without a warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return nn.Linear(in_features, out_features, bias=bias, **kwargs)


@torch.no_grad()
def copy_linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    """A new ``nn.Linear`` holding copies of ``weight`` (out, in) and ``bias``."""
    layer = new_linear(weight.shape[1], weight.shape[0], bias is not None, device=weight.device, dtype=weight.dtype)
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer


def restore_class(module: nn.Module) -> None:
    """Turn a module that a family's masks converted back into its own class (a user's subclass included)."""
    module.__class__ = module.spp_plain_class
    del module.spp_plain_class
