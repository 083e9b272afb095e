"""Loading weights into a model safely: safetensors, or ``torch.load(..., weights_only=True)``; a checkpoint of
another model is refused with the shapes that differ."""
from __future__ import annotations

import os
from typing import Dict, Mapping, NamedTuple

import torch
from torch import nn

from .masks import is_masked, mask_parameters
from .models import family_of
from .models.hub import timm_model
from .structure import UnsupportedModel

__all__ = ["load_checkpoint", "LoadResult"]


class LoadResult(NamedTuple):
    missing_keys: list
    unexpected_keys: list


def _read_state_dict(source: str) -> Dict[str, torch.Tensor]:
    if source.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(source)
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types
        raise ValueError(f"cannot read checkpoint {source}: {e}. spp loads with weights_only=True, "
                         "so checkpoints holding arbitrary Python objects are refused.") from e
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_ema", "module"):
            if key in obj and isinstance(obj[key], Mapping):
                return dict(obj[key])
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise ValueError(f"{source} holds no state dict: expected a dict of tensors or "
                     "{'model': state_dict} as DeiT writes")


def _read_safetensors_dir(directory: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {directory}; spp reads model directories' weights "
                                "from safetensors only (transformers: save_pretrained(dir, safe_serialization=True))")
    state: Dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(os.path.join(directory, f)))
    return state


def load_checkpoint(model: nn.Module, source: str, strict: bool = False) -> LoadResult:
    """Load pretrained weights into ``model`` (masked or not) from ``source``.

    ``source`` is a local file (safetensors; a DeiT-style ``.pth`` with ``{"model": ...}``;
    a plain state dict; read with ``weights_only=True``), a directory of ``*.safetensors`` files (a
    Hugging Face model directory, shards included) or ``timm:NAME`` to take timm's
    pretrained weights for NAME (needs the internet). Masks are never expected in the
    checkpoint. Shape mismatches always raise, naming every differing key; missing or
    unexpected keys raise when ``strict`` and are returned otherwise.
    """
    if source.startswith("timm:"):
        state = timm_model(source[5:], pretrained=True).state_dict()
    elif os.path.isfile(source):
        state = _read_state_dict(source)
    elif os.path.isdir(source):
        state = _read_safetensors_dir(source)
    else:
        raise FileNotFoundError(f"checkpoint {source!r} not found; give a local .pth/.safetensors "
                                "file, a directory of .safetensors files, or timm:MODEL_NAME for timm's pretrained weights")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    try:
        state = family_of(model).filter_state_dict(model, state)   # the model library's conversions (timm's ViT)
    except UnsupportedModel:   # a model no family handles: its state dict as it is
        pass
    own = model.state_dict()
    mask_keys = {name for name, _ in mask_parameters(model)} if is_masked(model) else set()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"checkpoint {source} does not fit this model; shapes differ for "
                         f"{len(mismatched)} tensors: " + "; ".join(mismatched[:8]))
    shared = set(state) & (set(own) - mask_keys)
    if len(shared) < len(set(own) - mask_keys) / 2:
        raise ValueError(f"checkpoint {source} holds only {len(shared)} of this {type(model).__name__}'s "
                         f"{len(set(own) - mask_keys)} tensors (its keys look like {sorted(state)[:3]}, the model's like "
                         f"{sorted(own)[:3]}): it is another model's")
    missing = sorted(set(own) - set(state) - mask_keys)
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint {source}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return LoadResult(missing, unexpected)
