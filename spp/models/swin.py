"""timm Swin Transformer v1 (``SwinTransformer``): the ViT family's masks and compression (:mod:`spp.models.vit`)
on windowed attention with a relative-position bias.

A head whose query-key dims are all removed still applies the softmax of its relative-position bias to its
values (not a uniform mean), and a compressed window attention keeps the bias-table columns of its kept
heads.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from timm.models.swin_transformer import WindowAttention, get_relative_position_index

from ..structure import UnsupportedModel, Widths
from .vit import BlockGeometry, PrunedAttention, _AttentionMasks, _drop_path_rate, _TimmFamily

__all__ = ["MaskedWindowAttention", "PrunedWindowAttention", "window_bias", "SwinFamily", "SWIN"]


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


class PrunedWindowAttention(PrunedAttention):
    """:class:`PrunedAttention` for Swin windows, with the relative-position bias of its kept heads."""

    def __init__(self, dim: int, num_heads: int, num_qk_heads: int, qk_dim: int, v_dim: int, scale: float,
                 window_size, qkv_bias: bool = True, proj_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__(dim, num_heads, num_qk_heads, qk_dim, v_dim, scale, qkv_bias, proj_bias, attn_drop, proj_drop)
        self.window_size = tuple(window_size)
        wh, ww = self.window_size
        self.window_area = wh * ww
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer("relative_position_index", get_relative_position_index(wh, ww), persistent=False)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.num_heads == 0:
            return self._attend(x)
        n = self.window_area
        rel = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        rel = rel.permute(2, 0, 1).unsqueeze(0)                       # (1, heads, N, N)
        return self._attend(x, bias=window_bias(rel, mask, x.shape[0]))


class SwinFamily(_TimmFamily):
    """``timm-swin``: timm SwinTransformer v1 (windowed attention with relative-position bias)."""
    name = "timm-swin"
    description = "timm SwinTransformer (Swin v1)"
    classes = ("timm.models.swin_transformer.SwinTransformer",)
    masked_attention = MaskedWindowAttention

    def check_attention(self, name: str, attn: nn.Module) -> None:
        if not isinstance(attn, WindowAttention):
            raise UnsupportedModel(f"{name}.attn is {type(attn).__name__}; spp supports timm's WindowAttention. "
                                   "Was the model compressed already?")

    def new_attention(self, attn: nn.Module, geom: BlockGeometry, w: Widths, heads=None) -> PrunedAttention:
        new = PrunedWindowAttention(geom.dim, w.num_heads, w.num_qk_heads, w.qk_dim, w.v_dim, scale=attn.scale,
                                    window_size=attn.window_size, qkv_bias=geom.qkv_bias, proj_bias=geom.proj_bias,
                                    attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p)
        if heads is not None:   # the bias-table columns of the kept heads
            new.relative_position_bias_table.data = attn.relative_position_bias_table.data[:, heads].clone()
        return new

    def blocks(self, model: nn.Module) -> List[nn.Module]:
        return [block for stage in model.layers for block in stage.blocks]

    def _attention_shape(self, model, block, input_size):
        if input_size is not None:
            raise ValueError("input_size= is for ViT/DeiT; build the Swin model at the input size you want counted")
        attn = block.attn
        (h, w), (wh, ww) = block.input_resolution, block.window_size
        tokens = -(-h // wh) * wh * -(-w // ww) * ww   # padded to whole windows
        span = dict(keys=wh * ww, windowed=True, bias_rows=attn.relative_position_bias_table.shape[0])
        return span, attn.qkv.out_features // (3 * attn.num_heads), tokens

    def _constructor_arguments(self, model: nn.Module) -> Optional[Dict[str, Any]]:
        embed, first = model.patch_embed, model.layers[0].blocks[0]
        attn = first.attn
        return dict(img_size=list(embed.img_size), patch_size=embed.patch_size[0], in_chans=embed.proj.in_channels,
                    num_classes=model.num_classes, global_pool=model.global_pool, embed_dim=model.embed_dim,
                    depths=[len(stage.blocks) for stage in model.layers],
                    num_heads=[stage.blocks[0].attn.num_heads for stage in model.layers],
                    head_dim=attn.qkv.out_features // (3 * attn.num_heads), window_size=list(first.window_size),
                    mlp_ratio=first.mlp.fc1.out_features / model.embed_dim, qkv_bias=attn.qkv.bias is not None,
                    drop_path_rate=_drop_path_rate(model.layers[-1].blocks[-1]))


SWIN = SwinFamily()
