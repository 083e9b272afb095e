"""Physical compression: slice a masked model into a smaller dense one that computes the same.

For every block the model's family (:mod:`spp.models`) reads the keep indices off the masks
(non-zero = kept), copies the kept rows and columns of the block's projections with the mask values
folded in, and puts modules of the kept widths in place; the result equals the masked model for any
masks, binary or not. A compressed model is saved as ``model.safetensors`` + ``config.json`` (no
pickle) and rebuilt from them by :func:`load_pruned`.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from typing import Dict, List, Mapping, Optional

import torch
from torch import nn

from .files import atomic_write
from .masks import granularity_of, is_masked, mask_parameters
from .models import family_named, family_of, model_geometry
from .structure import Geometry, Widths, block_masks

__all__ = ["compress", "save_pruned", "load_pruned", "pruned_widths"]

FORMAT = "spp-pruned"
FORMAT_VERSION = 1
_FAMILY_OF_FORMAT_0 = "timm-vit"   # members saved before the config named its family: spp pruned only timm ViTs then


def _masks_by_block(model: nn.Module, geoms: List[Geometry], masks: Optional[Mapping[str, torch.Tensor]]):
    if masks is None:
        masks = {name: p.detach() for name, p in mask_parameters(model)}
    device = next(model.parameters()).device  # selected members' masks live on the CPU
    return block_masks(geoms, masks, device)


def _infer_granularity(geom: Geometry, qk: torch.Tensor) -> str:
    dim, head = geom.mask_size("qk", "dim"), geom.mask_size("qk", "head")
    if qk.numel() == dim and dim != head:
        return "dim"
    if qk.numel() == head:
        return "head"
    raise ValueError(f"{geom.name}: qk mask of {qk.numel()} entries fits neither granularity='dim' ({dim} "
                     f"entries) nor 'head' ({head})")


def pruned_widths(model: nn.Module, masks: Mapping[str, torch.Tensor], granularity: str) -> List[Widths]:
    """Per-block widths that :func:`compress` would produce for ``masks``."""
    geoms = model_geometry(model)
    return [g.widths_from_masks(m["qk"], m["v"], m["mlp"], granularity)
            for g, m in zip(geoms, _masks_by_block(model, geoms, masks))]


@torch.no_grad()
def compress(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]] = None,
             granularity: Optional[str] = None) -> nn.Module:
    """A new, smaller dense model that computes what ``model`` with ``masks`` computes.

    Args:
        model: a supported model, with or without masks (it is not modified).
        masks: ``{mask name: tensor}`` (e.g. ``WeightFamily.select(...).masks``); defaults to
            the model's own mask values. Zero entries are removed, others folded into weights.
        granularity: ``"dim"`` or ``"head"``; read from the model or the mask shapes if omitted.

    Memory: the parts of the model outside the prunable projections (embeddings, norms, the
    head) are copied; the projections are not, only their kept rows and columns, block by block.
    At its peak the process holds ``model`` and the compressed model, never two copies of ``model``.
    """
    family = family_of(model)
    geoms = family.geometry(model)
    by_block = _masks_by_block(model, geoms, masks)
    if granularity is None:
        granularity = granularity_of(model) if is_masked(model) else _infer_granularity(geoms[0], by_block[0]["qk"])
    sources = family.blocks(model)
    memo = {id(m): nn.Identity() for block in sources for m in family.replaced_modules(block)}
    pruned = copy.deepcopy(model, memo)   # everything but the projections compress_block replaces
    widths = [family.compress_block(block, source, geom, m, granularity)
              for block, source, geom, m in zip(family.blocks(pruned), sources, geoms, by_block)]
    if is_masked(pruned):
        family.remove_masks(pruned)
        del pruned.spp_granularity
    pruned.spp_widths = widths
    pruned.spp_base = family.describe(model)
    for p in pruned.parameters():
        p.requires_grad_(True)
    return pruned


def save_pruned(model: nn.Module, directory: str, base: Optional[Mapping] = None,
                state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Write ``model.safetensors`` and ``config.json`` for a compressed model (no pickle).

    ``base`` says how to rebuild the dense model (the family's description, recorded by
    :func:`compress`; for timm, ``{"name": timm model name, "kwargs": {...}}``). ``state_dict`` (default
    ``model.state_dict()``) are the weights to write, under the model's own names.
    """
    from safetensors.torch import save_file

    widths = getattr(model, "spp_widths", None)
    if widths is None:
        raise ValueError("model is not a compressed spp model; call spp.compress(model, masks) first")
    family = family_of(model)
    base = dict(base) if base is not None else getattr(model, "spp_base", None) or family.describe(model)
    os.makedirs(directory, exist_ok=True)
    aliases = aliased_keys(model)   # tied weights (an LLM's lm_head and embeddings) are written once
    state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items() if k not in aliases}
    buffers = {name for name, _ in model.named_buffers()}
    config = {"format": FORMAT, "version": FORMAT_VERSION, "family": family.name, "base": base,
              "blocks": [w.to_dict() for w in widths],
              "params": sum(v.numel() for k, v in state.items() if k not in buffers)}
    layout = family.layout(model)
    if layout is not None:
        config["layout"] = layout
    plain = family.plain_config(model)
    if plain is not None:   # the model's library reads this file as its own config; spp reads the "spp" entry
        config = {**plain, "spp": config}
    atomic_write(os.path.join(directory, "model.safetensors"), lambda f: save_file(state, f, metadata={"format": "pt"}))
    atomic_write(os.path.join(directory, "config.json"),
                 lambda f: open(f, "w").write(json.dumps(config, indent=2) + "\n"))


def aliased_keys(model: nn.Module) -> set:
    """State-dict keys whose tensor is an earlier key's (tied weights; safetensors refuses shared storage)."""
    seen, aliases = set(), set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor   # FSDP2's DTensor: this rank's shard
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            aliases.add(name)
        seen.add(key)
    return aliases


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
    config = config.get("spp", config)   # a plain transformers config with spp's inside
    if config.get("format") != FORMAT or "blocks" not in config or "base" not in config:
        raise ValueError(f"{path} is not an spp pruned-model config (format={config.get('format')!r})")
    return config


def load_pruned(directory: str, map_location: str = "cpu", meta: bool = False) -> nn.Module:
    """Rebuild a model written by :func:`save_pruned`; loads no pickle. ``meta=True``: its skeleton on the
    meta device, no weights read (the ranks of a sharded run that rank 0 broadcasts into)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = _read_config(directory)
    family = family_named(config.get("family", _FAMILY_OF_FORMAT_0))
    widths = [Widths(**b) for b in config["blocks"]]
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = family.build(config["base"])
        geoms = family.geometry(model)
        if len(widths) != len(geoms):
            raise ValueError(f"config.json lists {len(widths)} blocks but the base model has {len(geoms)}")
        for block, geom, w in zip(family.blocks(model), geoms, widths):
            family.resize_block(block, geom, w)
    model.spp_widths = widths
    model.spp_base = dict(config["base"])
    if "layout" in config:
        family.set_layout(model, config["layout"])
    if meta:
        return model
    weights = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights} not found (written by spp.save_pruned beside config.json)")
    try:
        state = load_file(weights, device=map_location)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights} cannot be read ({e}); the file is truncated or corrupt") from e
    expected = model.state_dict()
    tied = aliased_keys(model)
    problems = [f"{k}: file {tuple(state[k].shape)} != model {tuple(v.shape)}"
                for k, v in expected.items() if k in state and state[k].shape != v.shape]
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    if problems or missing or unexpected:
        raise ValueError(f"{weights} does not match {os.path.join(directory, 'config.json')}: "
                         f"shape mismatches {problems[:5]}, missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=not tied)   # a tied weight is loaded through the tensor it shares
    return model.to(map_location)
