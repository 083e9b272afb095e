"""Where the prunable pairs are in a model, and what each kept width costs.

Every supported block has one attention with query-key (``qk``) and value-projection
(``v``) pairs and one MLP (``mlp``) pair. A block's shape after pruning is described by
:class:`Widths`; its parameter and FLOP counts follow from it in closed form, and
``tests/test_compress.py`` checks them against the compressed model and
``torch.utils.flop_counter``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import torch
from torch import nn
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from timm.models.vision_transformer import VisionTransformer

PAIRS = ("qk", "v", "mlp")
GRANULARITIES = ("dim", "head")
SUPPORTED_FAMILIES = "timm VisionTransformer (ViT, DeiT, DeiT distilled) and SwinTransformer (Swin v1)"


@dataclass(frozen=True)
class Widths:
    """Shape of one block's prunable inner dimensions.

    The attention has ``num_heads`` heads with ``v_dim`` value dims each; the first
    ``num_qk_heads`` of them attend with ``qk_dim`` query-key dims, the rest attend
    uniformly (all their query-key dims were removed).
    """

    num_heads: int
    num_qk_heads: int
    qk_dim: int
    v_dim: int
    mlp_hidden: int

    def to_dict(self) -> Dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class BlockGeometry:
    """The unpruned shape of one block, and how to price any :class:`Widths` of it."""

    name: str            # module name of the block, e.g. "blocks.3"
    index: int
    dim: int             # residual width C
    num_heads: int
    head_dim: int
    mlp_hidden: int
    tokens: int          # tokens through qkv/proj/MLP at the model's input size (padded for windows)
    qkv_bias: bool
    proj_bias: bool
    fc1_bias: bool
    fc2_bias: bool
    keys: int = 0        # keys each query attends to (window area for Swin; 0 means all tokens)
    windowed: bool = False  # relative-position bias: heads without query-keys still attend (not uniformly)
    bias_rows: int = 0   # rows of the relative-position bias table (one column per head)

    @property
    def span(self) -> int:
        return self.keys or self.tokens

    @property
    def full(self) -> Widths:
        return Widths(self.num_heads, self.num_heads, self.head_dim, self.head_dim, self.mlp_hidden)

    def mask_shape(self, granularity: str) -> int:
        return self.head_dim if granularity == "dim" else self.num_heads

    def params(self, w: Widths) -> int:
        c = self.dim
        qk_rows = 2 * w.num_qk_heads * w.qk_dim
        v_rows = w.num_heads * w.v_dim
        attn = (qk_rows + v_rows) * (c + self.qkv_bias) + v_rows * c + c * self.proj_bias
        mlp = w.mlp_hidden * (c + self.fc1_bias) + w.mlp_hidden * c + c * self.fc2_bias
        return attn + self.bias_rows * w.num_heads + mlp

    def flops(self, w: Widths) -> int:
        """Forward FLOPs per image (2 per multiply-add), as ``torch.utils.flop_counter`` counts."""
        c, n = self.dim, self.tokens
        qk_rows = 2 * w.num_qk_heads * w.qk_dim
        v_rows = w.num_heads * w.v_dim
        projections = 2 * n * c * (qk_rows + v_rows) + 2 * n * v_rows * c
        attention = w.num_qk_heads * 2 * n * self.span * (w.qk_dim + w.v_dim)
        if self.windowed:  # heads with no query-key dims still apply softmax(bias) to their values
            attention += (w.num_heads - w.num_qk_heads) * 2 * n * self.span * w.v_dim
        mlp = 4 * n * c * w.mlp_hidden
        return projections + attention + mlp

    def elements(self, w: Widths, granularity: str) -> int:
        """Number of non-zero mask entries of a member with these widths."""
        if granularity == "head":
            return w.num_qk_heads + w.num_heads + w.mlp_hidden
        return (w.qk_dim if w.num_qk_heads else 0) + (w.v_dim if w.num_heads else 0) + w.mlp_hidden

    def cost(self, w: Widths, by: str, granularity: str) -> int:
        if by == "params":
            return self.params(w)
        if by == "flops":
            return self.flops(w)
        return self.elements(w, granularity)

    def unit_costs(self, by: str, granularity: str) -> Dict[str, int]:
        """Cost of one mask entry of each pair, counted on its own (no interactions)."""
        heads_per_entry = self.num_heads if granularity == "dim" else 1
        dims_per_entry = 1 if granularity == "dim" else self.head_dim
        c, n = self.dim, self.tokens
        if by == "elements":
            return {"qk": 1, "v": 1, "mlp": 1}
        if by == "params":
            qk = 2 * (c + self.qkv_bias)
            v = (c + self.qkv_bias) + c
            mlp = (c + self.fc1_bias) + c
        else:
            qk = 4 * n * c + 2 * n * self.span
            v = 4 * n * c + 2 * n * self.span
            mlp = 4 * n * c
        scale = heads_per_entry * dims_per_entry
        table = self.bias_rows if by == "params" and granularity == "head" else 0  # a head's bias column
        return {"qk": qk * scale, "v": v * scale + table, "mlp": mlp}


def widths_from_counts(geom: BlockGeometry, granularity: str, qk: int, v: int, mlp: int,
                       qk_heads: int = 0) -> Widths:
    """Widths of the compressed block that keeps ``qk``, ``v`` and ``mlp`` mask entries.

    ``qk`` and ``v`` count dims (``granularity="dim"``) or heads (``"head"``); with heads,
    ``qk_heads`` counts the heads that keep both their query-keys and their values. A head
    with no value dims left contributes nothing, so its query-key dims go too.
    """
    if granularity == "dim":
        qk_dim = qk if v else 0
        num_heads = geom.num_heads if v else 0
        return Widths(num_heads, num_heads if qk_dim else 0, qk_dim, v, mlp)
    return Widths(v, qk_heads, geom.head_dim if qk_heads else 0, geom.head_dim if v else 0, mlp)


def widths_from_masks(geom: BlockGeometry, qk: torch.Tensor, v: torch.Tensor, mlp: torch.Tensor,
                      granularity: str) -> Widths:
    """Widths of the compressed block for masks ``qk``, ``v``, ``mlp`` (non-zero = kept)."""
    qk_on, v_on = qk != 0, v != 0
    return widths_from_counts(geom, granularity, int(qk_on.sum()), int(v_on.sum()), int((mlp != 0).sum()),
                              int((qk_on & v_on).sum()) if granularity == "head" else 0)


class UnsupportedModel(TypeError):
    """The model (or one of its blocks) is not one spp can mask and compress exactly."""


def _check_supported_block(name: str, block: nn.Module) -> None:
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    if isinstance(attn, WindowAttention):
        pass
    elif not isinstance(attn, Attention):
        raise UnsupportedModel(f"{name}.attn is {type(attn).__name__}; spp supports timm's Attention and "
                               f"WindowAttention ({SUPPORTED_FAMILIES}). Was the model compressed already?")
    elif not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
            and isinstance(attn.norm, nn.Identity) and getattr(attn, "gate", None) is None):
        raise UnsupportedModel(f"{name}.attn uses qk_norm, scale_norm or a gate; masks on those "
                               "cannot be compressed exactly. spp supports plain timm Attention.")
    if not isinstance(mlp, Mlp):
        raise UnsupportedModel(f"{name}.mlp is {type(mlp).__name__}; spp supports timm's Mlp "
                               f"({SUPPORTED_FAMILIES})")
    if not (isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.norm, nn.Identity)):
        raise UnsupportedModel(f"{name}.mlp must be a Linear Mlp without a hidden norm")


def find_blocks(model: nn.Module) -> List[nn.Module]:
    """The transformer blocks of a supported model, in forward order."""
    if isinstance(model, VisionTransformer):
        return list(model.blocks)
    if isinstance(model, SwinTransformer):
        return [block for stage in model.layers for block in stage.blocks]
    raise UnsupportedModel(f"spp does not support {type(model).__name__}; supported: {SUPPORTED_FAMILIES}")


def model_geometry(model: nn.Module) -> List[BlockGeometry]:
    """One :class:`BlockGeometry` per block, with token counts at the model's input size."""
    blocks = find_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    geoms = []
    for i, block in enumerate(blocks):
        name = names[id(block)]
        _check_supported_block(name, block)
        attn, mlp = block.attn, block.mlp
        if isinstance(attn, WindowAttention):
            (h, w), (wh, ww) = block.input_resolution, block.window_size
            tokens = -(-h // wh) * wh * -(-w // ww) * ww   # padded to whole windows
            span = dict(keys=wh * ww, windowed=True, bias_rows=attn.relative_position_bias_table.shape[0])
            head_dim = attn.qkv.out_features // (3 * attn.num_heads)
        else:
            tokens = model.patch_embed.num_patches + model.num_prefix_tokens
            span, head_dim = {}, attn.head_dim
        geoms.append(BlockGeometry(
            name=name, index=i, dim=attn.qkv.in_features,
            num_heads=attn.num_heads, head_dim=head_dim, mlp_hidden=mlp.fc1.out_features,
            tokens=tokens, qkv_bias=attn.qkv.bias is not None, proj_bias=attn.proj.bias is not None,
            fc1_bias=mlp.fc1.bias is not None, fc2_bias=mlp.fc2.bias is not None, **span,
        ))
    return geoms


def mask_names(geom: BlockGeometry) -> Dict[str, str]:
    """Parameter names of a block's masks, by pair."""
    return {"qk": f"{geom.name}.attn.qk_mask", "v": f"{geom.name}.attn.v_mask",
            "mlp": f"{geom.name}.mlp.mask"}


def mask_pairs(model: nn.Module) -> Dict[str, Tuple[str, int]]:
    """``{mask name: (pair type, block index)}`` for every mask a masked ``model`` has (or would have)."""
    return {name: (pair, geom.index) for geom in model_geometry(model) for pair, name in mask_names(geom).items()}
