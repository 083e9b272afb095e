"""Pair-wise structured masks for timm vision transformers, inserted in place.

The masked modules subclass timm's ``Attention`` and ``Mlp`` and override only
``forward``; the existing instances are converted in place, so every pretrained weight
keeps its name and the masks appear as new parameters::

    blocks.{i}.attn.qk_mask   query-key: logits = q diag(m) kᵀ
    blocks.{i}.attn.v_mask    value-projection: scales v (row of W_v, column of W_proj)
    blocks.{i}.mlp.mask       MLP: scales the hidden activation after GELU

With ``granularity="dim"`` the attention masks are vectors of length ``head_dim`` shared
by all heads (the paper's layout); with ``"head"`` they hold one scalar per head.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.swin_transformer import WindowAttention

from .structure import GRANULARITIES, find_blocks, model_geometry

__all__ = ["MaskedAttention", "MaskedWindowAttention", "MaskedMlp", "add_masks", "remove_masks", "mask_parameters",
           "freeze_weights", "set_masks", "is_masked", "granularity_of"]


class _AttentionMasks:
    """Query-key and value masks for an attention module (mixed into timm's classes)."""

    qk_mask: nn.Parameter
    v_mask: nn.Parameter
    mask_granularity: str

    @classmethod
    def convert(cls, attn: nn.Module, granularity: str) -> nn.Module:
        head_dim = attn.qkv.out_features // (3 * attn.num_heads)
        size = head_dim if granularity == "dim" else attn.num_heads
        weight = attn.qkv.weight
        attn.__class__ = cls
        attn.mask_granularity = granularity
        attn.qk_mask = nn.Parameter(torch.ones(size, device=weight.device, dtype=torch.float32))
        attn.v_mask = nn.Parameter(torch.ones(size, device=weight.device, dtype=torch.float32))
        return attn

    def _broadcast(self, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        mask = mask.to(like.dtype)
        return mask if self.mask_granularity == "dim" else mask.view(-1, 1, 1)

    def _masked_qkv(self, x: torch.Tensor):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                   # (B, heads, N, head_dim)
        q = q * self._broadcast(self.qk_mask, q)                  # logits = q diag(m) kᵀ
        v = v * self._broadcast(self.v_mask, v)
        return q, k, v


class MaskedAttention(_AttentionMasks, Attention):
    """timm ``Attention`` whose queries and values are scaled by learnable masks."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self._masked_qkv(x)                             # (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0,
            is_causal=is_causal, scale=self.scale)                # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, -1)                   # (B, N, heads * head_dim)
        x = self.proj(x)
        return self.proj_drop(x)


class MaskedWindowAttention(_AttentionMasks, WindowAttention):
    """timm Swin ``WindowAttention`` whose queries and values are scaled by learnable masks."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, _ = x.shape
        q, k, v = self._masked_qkv(x)                             # (windows * B, heads, N, head_dim)
        bias = window_bias(self._get_rel_pos_bias(), mask, B_)    # (windows * B, heads, N, N)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.attn_drop.p if self.training else 0.0,
            scale=self.scale)
        x = x.transpose(1, 2).reshape(B_, N, -1)                  # (windows * B, N, heads * head_dim)
        return self.proj_drop(self.proj(x))


def window_bias(rel_pos_bias: torch.Tensor, mask: Optional[torch.Tensor], batch_windows: int) -> torch.Tensor:
    """Relative-position bias ``(1, heads, N, N)`` plus the shifted-window mask, as timm adds them."""
    if mask is None:
        return rel_pos_bias
    heads, n = rel_pos_bias.shape[1], rel_pos_bias.shape[-1]
    num_win = mask.shape[0]
    mask = mask.view(1, num_win, 1, n, n).expand(batch_windows // num_win, -1, heads, -1, -1)
    return rel_pos_bias + mask.reshape(-1, heads, n, n)


class MaskedMlp(Mlp):
    """timm ``Mlp`` whose hidden activation is scaled by a learnable mask."""

    mask: nn.Parameter

    @classmethod
    def convert(cls, mlp: Mlp) -> "MaskedMlp":
        weight = mlp.fc1.weight
        mlp.__class__ = cls
        mlp.mask = nn.Parameter(torch.ones(mlp.fc1.out_features, device=weight.device,
                                           dtype=torch.float32))
        return mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))                                 # (B, N, hidden)
        x = x * self.mask.to(x.dtype)
        x = self.norm(self.drop1(x))
        x = self.fc2(x)                                           # (B, N, dim)
        return self.drop2(x)


def add_masks(model: nn.Module, granularity: str = "dim", freeze: bool = True) -> nn.Module:
    """Insert query-key, value-projection and MLP masks (all ones) into every block, in place.

    With all masks at one the model computes exactly what it computed before. With
    ``freeze=True`` every other parameter stops requiring gradients, so a search computes
    mask gradients only. Returns ``model``.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}: choose one of {GRANULARITIES}")
    if is_masked(model):
        raise ValueError("the model already has masks; call spp.remove_masks(model) first")
    model_geometry(model)  # raises a clear error for unsupported models or blocks
    for block in find_blocks(model):
        masked = MaskedWindowAttention if isinstance(block.attn, WindowAttention) else MaskedAttention
        masked.convert(block.attn, granularity)
        MaskedMlp.convert(block.mlp)
    if freeze:
        freeze_weights(model)
    return model


def remove_masks(model: nn.Module) -> nn.Module:
    """Turn masked modules back into timm's (mask values are dropped), in place."""
    for module in model.modules():
        if isinstance(module, _AttentionMasks):
            del module.qk_mask, module.v_mask, module.mask_granularity
            module.__class__ = WindowAttention if isinstance(module, WindowAttention) else Attention
        elif isinstance(module, MaskedMlp):
            del module.mask
            module.__class__ = Mlp
    return model


def is_masked(model: nn.Module) -> bool:
    return any(isinstance(m, (_AttentionMasks, MaskedMlp)) for m in model.modules())


def granularity_of(model: nn.Module) -> str:
    for m in model.modules():
        if isinstance(m, _AttentionMasks):
            return m.mask_granularity
    raise ValueError("the model has no masks; call spp.add_masks(model) first")


def mask_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every mask, in block order: qk, v, then MLP per block."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, _AttentionMasks):
            out += [(f"{name}.qk_mask", module.qk_mask), (f"{name}.v_mask", module.v_mask)]
        elif isinstance(module, MaskedMlp):
            out.append((f"{name}.mask", module.mask))
    if not out:
        raise ValueError("the model has no masks; call spp.add_masks(model) first")
    return out


def require_masks(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """:func:`mask_parameters`, or a ValueError that says how to add them."""
    named = mask_parameters(model)
    if not named:
        raise ValueError("the model has no masks: call spp.add_masks(model) first")
    return named


def freeze_weights(model: nn.Module) -> nn.Module:
    """Stop gradients for every parameter except the masks."""
    masks = {id(p) for _, p in mask_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in masks)
    return model


@torch.no_grad()
def set_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy mask values (e.g. a family member's masks) into a masked model."""
    params: Dict[str, nn.Parameter] = dict(mask_parameters(model))
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise KeyError(f"unknown mask names {unknown[:5]}; the model's masks are {list(params)[:6]}...")
    for name, value in masks.items():
        if params[name].shape != value.shape:
            raise ValueError(f"mask {name}: shape {tuple(value.shape)} != model's {tuple(params[name].shape)}")
        params[name].copy_(value)
    return model
