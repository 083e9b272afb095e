"""Small helpers the model families share."""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

_padding = True   # off inside nominal_attention()


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


def equal_widths(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """On the CPU, zero-pad whichever of the query-key and value head widths is narrower to the other.

    PyTorch's fused CPU attention kernel needs one head width for q, k and v; with two it falls back to the
    unfused math path, which writes out the attention map (3-4x slower for DeiT-S; 44% of an LLM prefill
    against 14%). Zero query-key columns change no dot product; zero value columns only add output columns,
    which the caller cuts off at its value width. Not inside :func:`nominal_attention` (FLOP counts)."""
    qk, vd = q.shape[-1], v.shape[-1]
    if qk == vd or not _padding or q.device.type != "cpu":
        return q, k, v
    if qk < vd:
        return F.pad(q, (0, vd - qk)), F.pad(k, (0, vd - qk)), v
    return q, k, F.pad(v, (0, qk - vd))


@contextlib.contextmanager
def nominal_attention():
    """Run compressed attention at its true head widths, without :func:`equal_widths`' padding (for FLOP counts)."""
    global _padding
    previous, _padding = _padding, False
    try:
        yield
    finally:
        _padding = previous
