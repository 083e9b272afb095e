"""Physical compression: slice a masked model into a smaller dense one that computes the same.

For every block, keep indices are read off the masks (non-zero = kept); the kept rows of
``qkv`` and ``fc1`` and the kept columns of ``proj`` and ``fc2`` are copied, with the mask
values folded into them, so the result equals the masked model for any masks, binary or
not. Three details keep it exact:

* the softmax scale stays the original ``head_dim ** -0.5``;
* a head whose query-key dims are all removed attends uniformly (the mean of its values);
* a block whose value dims (or MLP neurons) are all removed keeps the ``proj`` (``fc2``) bias
  as a constant output; the branch is not deleted.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from typing import Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import atomic_write, base_of, build_base
from .masks import granularity_of, is_masked, mask_parameters, remove_masks, window_bias
from .structure import BlockGeometry, Widths, find_blocks, mask_names, model_geometry, widths_from_masks

__all__ = ["PrunedAttention", "PrunedWindowAttention", "compress", "save_pruned", "load_pruned", "pruned_widths",
           "nominal_attention"]

_pad_on_cpu = True


@contextlib.contextmanager
def nominal_attention():
    """Run attention at its true head widths, without the CPU zero-padding (for FLOP counts)."""
    global _pad_on_cpu
    previous, _pad_on_cpu = _pad_on_cpu, False
    try:
        yield
    finally:
        _pad_on_cpu = previous

FORMAT = "spp-pruned"
FORMAT_VERSION = 1


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
        self.qkv = _new_linear(dim, 2 * num_qk_heads * qk_dim + num_heads * v_dim, qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = _new_linear(num_heads * v_dim, dim, proj_bias)
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
            vq = v[:, :hq]
            pad = self.v_dim - self.qk_dim
            if pad and x.device.type == "cpu" and _pad_on_cpu:
                # PyTorch's fused CPU kernel needs one head width for q, k and v; with two it falls
                # back to the unfused math path (attention map materialised; 3-4x slower for DeiT-S).
                # Zero columns change no dot product and only add output columns cut off below.
                q, k = (F.pad(q, (0, pad)), F.pad(k, (0, pad))) if pad > 0 else (q, k)
                vq = F.pad(vq, (0, -pad)) if pad < 0 else vq
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


class PrunedWindowAttention(PrunedAttention):
    """:class:`PrunedAttention` for Swin windows, with the relative-position bias of its kept heads."""

    def __init__(self, dim: int, num_heads: int, num_qk_heads: int, qk_dim: int, v_dim: int, scale: float,
                 window_size, qkv_bias: bool = True, proj_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        from timm.models.swin_transformer import get_relative_position_index

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


def _new_linear(in_features: int, out_features: int, bias: bool, **kwargs) -> nn.Linear:
    """``nn.Linear`` that also takes a removed (zero) width without a warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return nn.Linear(in_features, out_features, bias=bias, **kwargs)


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    layer = _new_linear(weight.shape[1], weight.shape[0], bias is not None,
                        device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


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


@torch.no_grad()
def _compress_attention(attn: nn.Module, geom: BlockGeometry, widths: Widths, qk, v, granularity):
    rows, scales, proj_cols, heads = _attention_keep(geom, qk, v, granularity)
    scales = scales.to(attn.qkv.weight.dtype)
    new = _new_attention(attn, geom, widths)
    bias = attn.qkv.bias[rows] * scales if geom.qkv_bias else None
    new.qkv = _linear(attn.qkv.weight[rows] * scales[:, None], bias)
    new.proj = _linear(attn.proj.weight[:, proj_cols], attn.proj.bias)
    if isinstance(new, PrunedWindowAttention):
        new.relative_position_bias_table.data = attn.relative_position_bias_table.data[:, heads].clone()
    return new.to(attn.qkv.weight.device)


def _new_attention(attn: nn.Module, geom: BlockGeometry, w: Widths) -> PrunedAttention:
    """An empty pruned attention of widths ``w`` in place of the timm module ``attn``."""
    args = (geom.dim, w.num_heads, w.num_qk_heads, w.qk_dim, w.v_dim)
    kwargs = dict(scale=attn.scale, qkv_bias=geom.qkv_bias, proj_bias=geom.proj_bias,
                  attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p)
    if geom.windowed:
        return PrunedWindowAttention(*args, window_size=attn.window_size, **kwargs)
    return PrunedAttention(*args, **kwargs)


@torch.no_grad()
def _compress_mlp(mlp: nn.Module, mask: torch.Tensor) -> nn.Module:
    keep = torch.nonzero(mask).flatten()
    fc1_bias = mlp.fc1.bias[keep] if mlp.fc1.bias is not None else None
    mlp.fc1 = _linear(mlp.fc1.weight[keep], fc1_bias)
    scale = mask[keep].to(mlp.fc2.weight.dtype)
    mlp.fc2 = _linear(mlp.fc2.weight[:, keep] * scale, mlp.fc2.bias)
    return mlp


def _block_masks(model: nn.Module, geoms: List[BlockGeometry], masks: Optional[Mapping[str, torch.Tensor]]):
    if masks is None:
        masks = {name: p.detach() for name, p in mask_parameters(model)}
    device = next(model.parameters()).device  # selected members' masks live on the CPU
    out = []
    for geom in geoms:
        names = mask_names(geom)
        missing = [n for n in names.values() if n not in masks]
        if missing:
            raise KeyError(f"masks lack {missing}; give one tensor per mask "
                           "(spp.mask_parameters or WeightFamily.select names them)")
        out.append({pair: masks[name].detach().to(device) for pair, name in names.items()})
    return out


def _infer_granularity(geom: BlockGeometry, qk: torch.Tensor) -> str:
    if qk.numel() == geom.head_dim and geom.head_dim != geom.num_heads:
        return "dim"
    if qk.numel() == geom.num_heads:
        return "head"
    raise ValueError(f"{geom.name}: qk mask of {qk.numel()} entries fits neither head_dim="
                     f"{geom.head_dim} nor num_heads={geom.num_heads}")


def pruned_widths(model: nn.Module, masks: Mapping[str, torch.Tensor], granularity: str) -> List[Widths]:
    """Per-block widths that :func:`compress` would produce for ``masks``."""
    geoms = model_geometry(model)
    return [widths_from_masks(g, m["qk"], m["v"], m["mlp"], granularity)
            for g, m in zip(geoms, _block_masks(model, geoms, masks))]


@torch.no_grad()
def compress(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]] = None,
             granularity: Optional[str] = None) -> nn.Module:
    """A new, smaller dense model that computes what ``model`` with ``masks`` computes.

    Args:
        model: a supported timm model, with or without masks (it is not modified).
        masks: ``{mask name: tensor}`` (e.g. ``WeightFamily.select(...).masks``); defaults to
            the model's own mask values. Zero entries are removed, others folded into weights.
        granularity: ``"dim"`` or ``"head"``; read from the model or the mask shapes if omitted.
    """
    geoms = model_geometry(model)
    block_masks = _block_masks(model, geoms, masks)
    if granularity is None:
        granularity = granularity_of(model) if is_masked(model) else _infer_granularity(geoms[0], block_masks[0]["qk"])
    pruned = copy.deepcopy(model)
    if is_masked(pruned):
        remove_masks(pruned)
    widths = []
    for block, geom, m in zip(find_blocks(pruned), geoms, block_masks):
        w = widths_from_masks(geom, m["qk"], m["v"], m["mlp"], granularity)
        block.attn = _compress_attention(block.attn, geom, w, m["qk"], m["v"], granularity)
        block.mlp = _compress_mlp(block.mlp, m["mlp"])
        widths.append(w)
    pruned.spp_widths = widths
    for p in pruned.parameters():
        p.requires_grad_(True)
    return pruned


def _shrink_structure(model: nn.Module, widths: List[Widths]) -> nn.Module:
    """Resize a dense model's blocks to ``widths`` (weights left uninitialised for loading)."""
    geoms = model_geometry(model)
    if len(widths) != len(geoms):
        raise ValueError(f"config.json lists {len(widths)} blocks but the base model has {len(geoms)}")
    for block, geom, w in zip(find_blocks(model), geoms, widths):
        block.attn = _new_attention(block.attn, geom, w)
        mlp = block.mlp
        mlp.fc1 = _new_linear(geom.dim, w.mlp_hidden, geom.fc1_bias)
        mlp.fc2 = _new_linear(w.mlp_hidden, geom.dim, geom.fc2_bias)
    model.spp_widths = list(widths)
    return model


def save_pruned(model: nn.Module, directory: str, base: Optional[Mapping] = None) -> None:
    """Write ``model.safetensors`` and ``config.json`` for a compressed model (no pickle).

    ``base`` is ``{"name": timm model name, "kwargs": {...}}``; it defaults to what
    :func:`spp.create_model` recorded on the model.
    """
    from safetensors.torch import save_file

    widths = getattr(model, "spp_widths", None)
    if widths is None:
        raise ValueError("model is not a compressed spp model; call spp.compress(model, masks) first")
    base = dict(base) if base is not None else base_of(model)
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = {"format": FORMAT, "version": FORMAT_VERSION, "base": base,
              "blocks": [w.to_dict() for w in widths],
              "params": sum(v.numel() for v in model.parameters())}
    atomic_write(os.path.join(directory, "model.safetensors"), lambda f: save_file(state, f))
    atomic_write(os.path.join(directory, "config.json"),
                 lambda f: open(f, "w").write(json.dumps(config, indent=2) + "\n"))


def _read_config(directory: str) -> Dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: a pruned model directory holds config.json "
                                "and model.safetensors (written by spp.save_pruned)")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is truncated or corrupt") from e
    if config.get("format") != FORMAT or "blocks" not in config or "base" not in config:
        raise ValueError(f"{path} is not an spp pruned-model config (format={config.get('format')!r})")
    return config


def load_pruned(directory: str, map_location: str = "cpu") -> nn.Module:
    """Rebuild a model written by :func:`save_pruned`; loads no pickle."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = _read_config(directory)
    widths = [Widths(**b) for b in config["blocks"]]
    model = _shrink_structure(build_base(config["base"]), widths)
    weights = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights} not found (written by spp.save_pruned beside config.json)")
    try:
        state = load_file(weights, device=map_location)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights} cannot be read ({e}); the file is truncated or corrupt") from e
    expected = model.state_dict()
    problems = [f"{k}: file {tuple(state[k].shape)} != model {tuple(v.shape)}"
                for k, v in expected.items() if k in state and state[k].shape != v.shape]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if problems or missing or unexpected:
        raise ValueError(f"{weights} does not match {os.path.join(directory, 'config.json')}: "
                         f"shape mismatches {problems[:5]}, missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state)
    return model.to(map_location)
