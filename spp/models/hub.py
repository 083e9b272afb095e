"""Creating a model through its own library: timm by model name, transformers from a model folder or hub id.

The Auto class that reloads a transformers folder is the one its family names (``ModelFamily.auto_class``,
found from ``config.json``'s ``model_type``); a model type no family names loads as a causal LM.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Optional

import torch
from torch import nn

from . import family_for_model_type

__all__ = ["timm_model", "hf_model", "is_hf"]


def timm_model(name: str, pretrained: bool = False, meta: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained, **kwargs)`` (on the meta device with ``meta``), remembering how it was
    built (``model.spp_base``, which :func:`spp.save_pruned` writes); a failed download of pretrained weights says
    how to go on offline."""
    import timm   # optional: `import spp` loads no model library

    try:
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = timm.create_model(name, pretrained=pretrained and not meta, **kwargs)
    except OSError as e:  # no network / not in the Hugging Face cache (FileNotFoundError, ConnectionError)
        if not pretrained:
            raise
        raise FileNotFoundError(
            f"could not get timm's pretrained weights for {name!r} ({type(e).__name__}: {e}). Offline, "
            "load a local file instead: spp.create_model(name, checkpoint=PATH) or model.checkpoint=PATH "
            "in a config (a DeiT release .pth, a state dict or .safetensors); HF_HUB_OFFLINE=1 reads "
            "only the Hugging Face cache, without retrying the network") from e
    model.spp_base = {"name": name, "kwargs": dict(kwargs)}
    return model


def hf_model(source: str, config: Optional[Dict[str, Any]] = None, meta: bool = False, **kwargs: Any) -> nn.Module:
    """A transformers model from a local folder or a hub id (safetensors weights only), through the Auto class of
    the family that prunes its ``model_type`` (``config``: the folder's ``config.json``, when already read);
    ``meta``: its skeleton on the meta device, in the dtype ``from_pretrained`` would give it."""
    try:   # optional: `import spp` loads no model library
        import transformers
        from transformers import AutoConfig
    except ImportError as e:
        raise ImportError(f"{source} is a Hugging Face model: pip install 'spp[llm]' (transformers)") from e
    try:
        model_type = (config or AutoConfig.from_pretrained(source).to_dict()).get("model_type")
        family = family_for_model_type(model_type)
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


def is_hf(name: str) -> bool:
    """``name`` is a Hugging Face model (a local directory, a ``.gguf`` file or ``hf:ORG/NAME``), not a timm name."""
    return name.startswith("hf:") or os.path.isdir(name) or name.endswith(".gguf")
