"""Building models and loading pretrained weights safely."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Mapping, NamedTuple, Optional

import torch
from torch import nn

from .compress import load_pruned
from .gguf import gguf_source, load_gguf_model
from .masks import is_masked, mask_parameters
from .models import family_for_model_type, family_of
from .structure import UnsupportedModel

__all__ = ["create_model", "load_checkpoint", "LoadResult"]


def create_model(name: str, pretrained: bool = False, checkpoint: Optional[str] = None, meta: bool = False,
                 **kwargs: Any) -> nn.Module:
    """A model to prune, by name:

    * a timm model name (``deit_small_patch16_224``): ``timm.create_model(name, pretrained, **kwargs)``,
      remembering how it was built (for :func:`spp.save_pruned`);
    * a local directory: a Hugging Face model directory (``config.json`` + ``*.safetensors``) through
      ``AutoModelForCausalLM.from_pretrained(name, use_safetensors=True, **kwargs)``, or a directory
      written by :func:`spp.save_pruned` through :func:`spp.load_pruned`;
    * ``hf:ORG/NAME``: a Hugging Face hub id, the same way (needs the internet or the hub cache);
    * a ``.gguf`` file, or a directory holding one and no ``config.json``: dequantized to ``dtype`` (float32 by
      default) in a plain transformers model (:mod:`spp.gguf`).

    ``checkpoint`` then loads weights from a local file or directory through :func:`load_checkpoint`.
    ``meta=True`` builds the model's skeleton on the meta device and reads no weights (the ranks of a
    sharded run that rank 0 broadcasts into: :mod:`spp.sharding`).
    """
    if is_hf(name):
        model = _hf_model(name, meta=meta, **kwargs)
    else:
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = _timm_model(name, pretrained and not meta, **kwargs)
        model.spp_base = {"name": name, "kwargs": dict(kwargs)}
    if checkpoint and not meta:
        load_checkpoint(model, checkpoint)
    return model


def _timm_model(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``timm.create_model``; a failed download of pretrained weights says how to go on offline."""
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as e:  # no network / not in the Hugging Face cache (FileNotFoundError, ConnectionError)
        if not pretrained:
            raise
        raise FileNotFoundError(
            f"could not get timm's pretrained weights for {name!r} ({type(e).__name__}: {e}). Offline, "
            "load a local file instead: spp.create_model(name, checkpoint=PATH) or model.checkpoint=PATH "
            "in a config (a DeiT release .pth, a state dict or .safetensors); HF_HUB_OFFLINE=1 reads "
            "only the Hugging Face cache, without retrying the network") from e


def is_hf(name: str) -> bool:
    """``name`` is a Hugging Face model (a local directory or ``hf:ORG/NAME``), not a timm model name."""
    return name.startswith("hf:") or os.path.isdir(name) or name.endswith(".gguf")


def _hf_model(name: str, meta: bool = False, **kwargs: Any) -> nn.Module:
    """A causal LM (or a CLIP model) from a local directory or ``hf:ORG/NAME`` (safetensors weights only);
    ``meta``: its skeleton on the meta device, in the dtype ``from_pretrained`` would give it."""
    import json

    source = name[3:] if name.startswith("hf:") else name
    config = None
    gguf = None if name.startswith("hf:") else gguf_source(source)
    if gguf:
        return load_gguf_model(*gguf, meta=meta, **kwargs)
    if os.path.isdir(source):
        config_path = os.path.join(source, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path} not found: a model directory holds config.json and *.safetensors "
                                    "(transformers' save_pretrained, or spp.save_pruned), or one .gguf file")
        with open(config_path) as f:
            config = json.load(f)
        if config.get("format") == "spp-pruned" or "spp" in config:
            return load_pruned(source, meta=meta)
    try:
        import transformers
        from transformers import AutoConfig
    except ImportError as e:
        raise ImportError(f"{name} is a Hugging Face model: pip install 'spp[llm]' (transformers)") from e
    try:
        model_type = (config or AutoConfig.from_pretrained(source).to_dict()).get("model_type")
        family = family_for_model_type(model_type)   # its Auto class (a causal LM where no family names the type)
        auto = getattr(transformers, family.auto_class if family is not None else "AutoModelForCausalLM")
        if meta:
            return _meta_model(auto, AutoConfig.from_pretrained(source), **kwargs)
        return auto.from_pretrained(source, use_safetensors=True, **kwargs)
    except OSError as e:
        raise FileNotFoundError(f"could not load {source!r} with transformers ({e}). Offline, give a local "
                                "directory with config.json and *.safetensors (HF_HUB_OFFLINE=1 reads only the "
                                "Hugging Face cache)") from e


def _meta_model(auto, config, dtype: Any = "auto", **kwargs: Any) -> nn.Module:
    if dtype in ("auto", None):   # the checkpoint's dtype, as from_pretrained reads it
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        return auto.from_config(config, dtype=dtype, **kwargs)


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
        state = _timm_model(source[5:], pretrained=True).state_dict()
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
