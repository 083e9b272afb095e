"""timm vision transformers: ViT / DeiT (``VisionTransformer``), and what Swin (:mod:`spp.models.swin`) shares.

Masks, inserted in place by turning timm's ``Attention`` / ``WindowAttention`` / ``Mlp`` instances into
subclasses that override only ``forward`` (every pretrained weight keeps its name)::

    blocks.{i}.attn.qk_mask   query-key: logits = q diag(m) kᵀ
    blocks.{i}.attn.v_mask    value: scales v (row of W_v, column of W_proj)
    blocks.{i}.mlp.mask       MLP: scales the hidden activation after GELU

With ``granularity="dim"`` the attention masks are vectors of length ``head_dim`` shared by all heads
(the paper's layout); with ``"head"`` they hold one scalar per head.

Compression keeps the rows of ``qkv`` and ``fc1`` and the columns of ``proj`` and ``fc2`` that the masks
keep, with the mask values folded in. Three details keep it exact: the softmax scale stays the original
``head_dim ** -0.5``; a head whose query-key dims are all removed attends uniformly (the mean of its
values; Swin: softmax of its relative-position bias); a block whose value dims (or MLP neurons) are all
removed keeps the ``proj`` (``fc2``) bias as a constant output.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import checkpoint_filter_fn

from .hub import timm_model
from ..structure import Geometry, UnsupportedModel, Widths
from .base import Channels, ModelFamily
from .common import copy_linear, equal_widths, new_linear, nominal_attention, restore_class

__all__ = ["BlockGeometry", "MaskedAttention", "MaskedMlp", "PrunedAttention", "nominal_attention", "VIT"]


# ================================================================================================
# Geometry
# ================================================================================================
@dataclass(frozen=True)
class BlockGeometry(Geometry):
    """The unpruned shape of one ViT / Swin block, and how to price any :class:`Widths` of it."""

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

    def mask_names(self) -> Dict[str, str]:
        return {"qk": f"{self.name}.attn.qk_mask", "v": f"{self.name}.attn.v_mask", "mlp": f"{self.name}.mlp.mask"}

    def mask_size(self, pair: str, granularity: str) -> int:
        if pair == "mlp":
            return self.mlp_hidden
        return self.mask_shape(granularity)

    def mask_shape(self, granularity: str) -> int:
        """Entries of the block's attention masks: head dims (``dim``) or heads (``head``)."""
        return self.head_dim if granularity == "dim" else self.num_heads

    @property
    def span(self) -> int:
        return self.keys or self.tokens

    @property
    def full(self) -> Widths:
        return Widths(self.num_heads, self.num_heads, self.head_dim, self.head_dim, self.mlp_hidden)

    def widths_from_counts(self, granularity: str, qk: int, v: int, mlp: int, qk_heads: int = 0) -> Widths:
        """Widths that keep ``qk`` and ``v`` entries (dims or heads) and ``mlp`` neurons; with heads,
        ``qk_heads`` counts the heads that keep both their query-keys and their values. A head with no
        value dims left contributes nothing, so its query-key dims go too."""
        if granularity == "dim":
            qk_dim = qk if v else 0
            num_heads = self.num_heads if v else 0
            return Widths(num_heads, num_heads if qk_dim else 0, qk_dim, v, mlp)
        return Widths(v, qk_heads, self.head_dim if qk_heads else 0, self.head_dim if v else 0, mlp)

    def widths_from_kept(self, qk: np.ndarray, v: np.ndarray, mlp: int, granularity: str) -> Widths:
        both = int((qk & v).sum()) if granularity == "head" else 0
        return self.widths_from_counts(granularity, int(qk.sum()), int(v.sum()), mlp, both)

    def params(self, w: Widths) -> int:
        """Parameters of the block's prunable projections at widths ``w``."""
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
        if granularity == "head":
            return w.num_qk_heads + w.num_heads + w.mlp_hidden
        return (w.qk_dim if w.num_qk_heads else 0) + (w.v_dim if w.num_heads else 0) + w.mlp_hidden

    def unit_costs(self, by: str, granularity: str) -> Dict[str, int]:
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


def _check_supported_mlp(name: str, block: nn.Module) -> None:
    mlp = getattr(block, "mlp", None)
    if not isinstance(mlp, Mlp):
        raise UnsupportedModel(f"{name}.mlp is {type(mlp).__name__}; spp supports timm's Mlp")
    if not (isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.norm, nn.Identity)):
        raise UnsupportedModel(f"{name}.mlp must be a Linear Mlp without a hidden norm")


# ================================================================================================
# Masks
# ================================================================================================
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
        attn.spp_plain_class = type(attn)
        attn.__class__ = type(f"Masked{type(attn).__name__}", (cls, type(attn)), {}) \
            if type(attn) not in cls.__bases__ else cls
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


class MaskedMlp(Mlp):
    """timm ``Mlp`` whose hidden activation is scaled by a learnable mask."""

    mask: nn.Parameter

    @classmethod
    def convert(cls, mlp: Mlp) -> "MaskedMlp":
        weight = mlp.fc1.weight
        mlp.spp_plain_class = type(mlp)
        mlp.__class__ = type(f"Masked{type(mlp).__name__}", (cls, type(mlp)), {}) if type(mlp) is not Mlp else cls
        mlp.mask = nn.Parameter(torch.ones(mlp.fc1.out_features, device=weight.device, dtype=torch.float32))
        return mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))                                 # (B, N, hidden)
        x = x * self.mask.to(x.dtype)
        x = self.norm(self.drop1(x))
        x = self.fc2(x)                                           # (B, N, dim)
        return self.drop2(x)


# ================================================================================================
# Compressed attention
# ================================================================================================
class PrunedAttention(nn.Module):
    """Multi-head attention with separate query-key and value head widths.

    ``num_heads`` heads produce ``v_dim`` outputs each; the first ``num_qk_heads`` attend
    with ``qk_dim``-wide queries and keys, the rest attend uniformly over the tokens.
    ``scale`` is the unpruned model's ``head_dim ** -0.5``.
    """

    def __init__(self, dim: int, num_heads: int, num_qk_heads: int, qk_dim: int, v_dim: int,
                 scale: float, qkv_bias: bool = True, proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if not 0 <= num_qk_heads <= num_heads:
            raise ValueError(f"num_qk_heads={num_qk_heads} must be in [0, num_heads={num_heads}]")
        self.num_heads, self.num_qk_heads = num_heads, num_qk_heads
        self.qk_dim, self.v_dim, self.scale = qk_dim, v_dim, scale
        self.qkv = new_linear(dim, 2 * num_qk_heads * qk_dim + num_heads * v_dim, qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = new_linear(num_heads * v_dim, dim, proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    @property
    def widths(self) -> Widths:
        return Widths(self.num_heads, self.num_qk_heads, self.qk_dim, self.v_dim, 0)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        return self._attend(x, attn_mask, is_causal)

    def _attend(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention with an optional per-head additive ``bias`` ``(B or 1, heads, N, N)``."""
        B, N, _ = x.shape
        hq, qk_width = self.num_qk_heads, self.num_qk_heads * self.qk_dim
        q, k, v = self.qkv(x).split([qk_width, qk_width, self.num_heads * self.v_dim], dim=-1)
        v = v.view(B, N, self.num_heads, self.v_dim).transpose(1, 2)     # (B, heads, N, v_dim)
        outputs = []
        if hq:
            q = q.view(B, N, hq, self.qk_dim).transpose(1, 2)            # (B, qk_heads, N, qk_dim)
            k = k.view(B, N, hq, self.qk_dim).transpose(1, 2)
            mask = bias[:, :hq].to(q.dtype) if bias is not None else attn_mask
            q, k, vq = equal_widths(q, k, v[:, :hq])                     # the fused CPU kernel's one width
            outputs.append(F.scaled_dot_product_attention(
                q, k, vq, attn_mask=mask, is_causal=is_causal, scale=self.scale,
                dropout_p=self.attn_drop.p if self.training else 0.0)[..., :self.v_dim])  # (B, qk_heads, N, v_dim)
        if hq < self.num_heads:  # heads without query-key dims: logits are the bias alone
            if bias is not None:
                weights = self.attn_drop(torch.softmax(bias[:, hq:].float(), dim=-1).to(v.dtype))
                outputs.append(weights @ v[:, hq:])                      # (B, heads - qk_heads, N, v_dim)
            elif attn_mask is not None or is_causal:
                raise NotImplementedError("heads with no query-key dims need attn_mask=None")
            else:
                uniform = v[:, hq:].mean(dim=2, keepdim=True)           # (B, heads - qk_heads, 1, v_dim)
                outputs.append(uniform.expand(-1, -1, N, -1))
        x = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0] if outputs else v
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.v_dim)  # (B, N, heads * v_dim)
        return self.proj_drop(self.proj(x))


def _attention_keep(geom: BlockGeometry, qk: torch.Tensor, v: torch.Tensor, granularity: str):
    """Rows of ``qkv`` to keep (q, k, v order), their scales, and the kept ``proj`` columns."""
    H, hd = geom.num_heads, geom.head_dim
    if granularity == "dim":
        qk, v = qk.view(1, hd).expand(H, hd), v.view(1, hd).expand(H, hd)
    else:
        qk, v = qk.view(H, 1).expand(H, hd), v.view(H, 1).expand(H, hd)
    head_has_v = (v != 0).any(dim=1)
    head_has_qk = (qk != 0).any(dim=1) & head_has_v
    qk_heads = torch.nonzero(head_has_qk).flatten().tolist()
    heads = qk_heads + torch.nonzero(head_has_v & ~head_has_qk).flatten().tolist()
    index = torch.arange(H * hd, device=qk.device).view(H, hd)
    q_rows = [index[h][qk[h] != 0] for h in qk_heads]
    v_rows = [index[h][v[h] != 0] for h in heads]
    q_rows = torch.cat(q_rows) if q_rows else index.new_zeros(0)
    v_rows = torch.cat(v_rows) if v_rows else index.new_zeros(0)
    rows = torch.cat([q_rows, q_rows + H * hd, v_rows + 2 * H * hd])
    scales = torch.cat([qk.flatten()[q_rows], torch.ones_like(q_rows, dtype=qk.dtype),
                        v.flatten()[v_rows]])
    return rows, scales, v_rows, heads


# ================================================================================================
# The families
# ================================================================================================
class _TimmFamily(ModelFamily):
    """What ViT and Swin share: the block layout (``attn``, ``mlp``), masks and compression. A family names its
    masked attention class and builds its compressed attention (:meth:`new_attention`)."""

    masked_attention = MaskedAttention

    def check_attention(self, name: str, attn: nn.Module) -> None:
        """Raise :class:`UnsupportedModel` for an attention module the masks cannot compress exactly."""
        if not isinstance(attn, Attention):
            raise UnsupportedModel(f"{name}.attn is {type(attn).__name__}; spp supports timm's Attention. "
                                   "Was the model compressed already?")
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
                and isinstance(attn.norm, nn.Identity) and getattr(attn, "gate", None) is None):
            raise UnsupportedModel(f"{name}.attn uses qk_norm, scale_norm or a gate; masks on those "
                                   "cannot be compressed exactly. spp supports plain timm Attention.")

    def new_attention(self, attn: nn.Module, geom: BlockGeometry, w: Widths, heads=None) -> PrunedAttention:
        """An empty compressed attention of widths ``w`` in place of the timm module ``attn`` (``heads``: the
        kept heads, when compressing)."""
        return PrunedAttention(geom.dim, w.num_heads, w.num_qk_heads, w.qk_dim, w.v_dim, scale=attn.scale,
                               qkv_bias=geom.qkv_bias, proj_bias=geom.proj_bias, attn_drop=attn.attn_drop.p,
                               proj_drop=attn.proj_drop.p)

    def geometry(self, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> List[BlockGeometry]:
        blocks = self.blocks(model)
        names = {id(m): n for n, m in model.named_modules()}
        geoms = []
        for i, block in enumerate(blocks):
            name = names[id(block)]
            self.check_attention(name, getattr(block, "attn", None))
            _check_supported_mlp(name, block)
            attn, mlp = block.attn, block.mlp
            span, head_dim, tokens = self._attention_shape(model, block, input_size)
            geoms.append(BlockGeometry(
                name=name, index=i, dim=attn.qkv.in_features,
                num_heads=attn.num_heads, head_dim=head_dim, mlp_hidden=mlp.fc1.out_features,
                tokens=tokens, qkv_bias=attn.qkv.bias is not None, proj_bias=attn.proj.bias is not None,
                fc1_bias=mlp.fc1.bias is not None, fc2_bias=mlp.fc2.bias is not None, **span,
            ))
        return geoms

    def example_input(self, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        param = next(model.parameters())
        return torch.zeros(1, *tuple(input_size or input_size_of(model)), device=param.device, dtype=param.dtype)

    def add_masks(self, model: nn.Module, granularity: str) -> None:
        for block in self.blocks(model):
            self.masked_attention.convert(block.attn, granularity)
            MaskedMlp.convert(block.mlp)

    def remove_masks(self, model: nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, _AttentionMasks):
                del module.qk_mask, module.v_mask, module.mask_granularity
                restore_class(module)
            elif isinstance(module, MaskedMlp):
                del module.mask
                restore_class(module)

    def channels(self, block: nn.Module, geom: BlockGeometry, granularity: str) -> Dict[str, List[Channels]]:
        width = geom.num_heads * geom.head_dim
        inner = torch.arange(width)                       # (head, dim) within q, k or v
        elem = inner // geom.head_dim if granularity == "head" else inner % geom.head_dim
        qkv, neurons = block.attn.qkv, torch.arange(geom.mlp_hidden)
        return {"qk": [Channels(qkv, 0, torch.cat([inner, inner + width]), torch.cat([elem, elem]))],
                "v": [Channels(qkv, 0, inner + 2 * width, elem), Channels(block.attn.proj, 1, inner, elem)],
                "mlp": [Channels(block.mlp.fc1, 0, neurons, neurons), Channels(block.mlp.fc2, 1, neurons, neurons)]}

    def replaced_modules(self, block: nn.Module) -> List[nn.Module]:
        return [block.attn, block.mlp.fc1, block.mlp.fc2]

    @torch.no_grad()
    def compress_block(self, block, source, geom: BlockGeometry, masks, granularity: str) -> Widths:
        qk, v, mlp_mask = masks["qk"], masks["v"], masks["mlp"]
        w = geom.widths_from_masks(qk, v, mlp_mask, granularity)
        attn = source.attn
        rows, scales, proj_cols, heads = _attention_keep(geom, qk, v, granularity)
        scales = scales.to(attn.qkv.weight.dtype)
        new = self.new_attention(attn, geom, w, heads)
        bias = attn.qkv.bias[rows] * scales if geom.qkv_bias else None
        new.qkv = copy_linear(attn.qkv.weight[rows] * scales[:, None], bias)
        new.proj = copy_linear(attn.proj.weight[:, proj_cols], attn.proj.bias)
        block.attn = new.to(attn.qkv.weight.device)
        keep = torch.nonzero(mlp_mask).flatten()
        fc1, fc2 = source.mlp.fc1, source.mlp.fc2
        block.mlp.fc1 = copy_linear(fc1.weight[keep], fc1.bias[keep] if fc1.bias is not None else None)
        block.mlp.fc2 = copy_linear(fc2.weight[:, keep] * mlp_mask[keep].to(fc2.weight.dtype), fc2.bias)
        return w

    def resize_block(self, block: nn.Module, geom: BlockGeometry, widths: Widths) -> None:
        block.attn = self.new_attention(block.attn, geom, widths)
        block.mlp.fc1 = new_linear(geom.dim, widths.mlp_hidden, geom.fc1_bias)
        block.mlp.fc2 = new_linear(widths.mlp_hidden, geom.dim, geom.fc2_bias)

    def describe(self, model: nn.Module) -> Dict[str, Any]:
        base = getattr(model, "spp_base", None)
        if base is not None:
            return dict(base)
        return self._infer_base(model)

    def _infer_base(self, model: nn.Module) -> Dict[str, Any]:
        kwargs = self._constructor_arguments(model)
        if kwargs is not None:   # checked by rebuilding the model and comparing every tensor's shape
            base = {"class": f"{type(model).__module__}.{type(model).__qualname__}", "kwargs": kwargs}
            own = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("mask")}
            if {k: v.shape for k, v in self.build(base).state_dict().items()} == own:
                return base
        raise ValueError(f"the {type(model).__name__} does not record how it was built; create it with "
                         "spp.create_model(name, **kwargs) or pass base={'name': ..., 'kwargs': {...}}")

    def _constructor_arguments(self, model: nn.Module) -> Optional[Dict[str, Any]]:
        """The arguments of ``type(model)(...)`` read off a model built without :func:`spp.create_model`."""
        return None

    def build(self, base: Mapping[str, Any]) -> nn.Module:
        if "class" in base:   # a model built without spp.create_model: its class and constructor arguments
            module, _, name = base["class"].rpartition(".")
            model = getattr(importlib.import_module(module), name)(**base.get("kwargs", {}))
            model.spp_base = dict(base)
            return model
        return timm_model(base["name"], pretrained=False, **base.get("kwargs", {}))


class ViTFamily(_TimmFamily):
    """``timm-vit``: timm VisionTransformer (ViT, DeiT, DeiT distilled)."""
    name = "timm-vit"
    description = "timm VisionTransformer (ViT, DeiT, DeiT distilled)"
    classes = ("timm.models.vision_transformer.VisionTransformer",)

    def blocks(self, model: nn.Module) -> List[nn.Module]:
        return list(model.blocks)

    def filter_state_dict(self, model: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """timm's own filter: resizes ``pos_embed`` to the model's grid, converts old checkpoint layouts (a failure
        leaves the state dict as it was: the shape checks of :func:`spp.load_checkpoint` then name the problem)."""
        try:
            return checkpoint_filter_fn(state, model)
        except Exception:  # noqa: BLE001 - a convenience; load_checkpoint's checks decide
            return state

    def _attention_shape(self, model, block, input_size):
        if input_size is None:
            tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        else:
            patch = model.patch_embed.patch_size
            tokens = (input_size[1] // patch[0]) * (input_size[2] // patch[1]) + model.num_prefix_tokens
        return {}, block.attn.head_dim, tokens

    def _constructor_arguments(self, model: nn.Module) -> Optional[Dict[str, Any]]:
        embed, block = model.patch_embed, model.blocks[0]
        return dict(img_size=list(embed.img_size), patch_size=list(embed.patch_size), in_chans=embed.proj.in_channels,
                    num_classes=model.num_classes, embed_dim=model.embed_dim, depth=len(model.blocks),
                    num_heads=block.attn.num_heads, mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,
                    qkv_bias=block.attn.qkv.bias is not None, class_token=model.has_class_token,
                    reg_tokens=model.num_reg_tokens, global_pool=model.global_pool, no_embed_class=model.no_embed_class,
                    drop_path_rate=_drop_path_rate(model.blocks[-1]))


def _drop_path_rate(last_block: nn.Module) -> float:
    """timm spreads drop-path rates linearly over the blocks, so the last block's is the model's."""
    return float(getattr(getattr(last_block, "drop_path1", None), "drop_prob", 0.0))


def input_size_of(model: nn.Module) -> Sequence[int]:
    """``(C, H, W)`` the model was built for."""
    embed = model.patch_embed
    size = embed.img_size
    return (embed.proj.in_channels, *(size if isinstance(size, (tuple, list)) else (size, size)))


VIT = ViTFamily()
