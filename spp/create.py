"""Creating a model to prune by name: a timm model name, a transformers folder or hub id, a GGUF file, or a member
saved by :func:`spp.save_pruned`."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from torch import nn

from .compress import load_pruned
from .gguf import gguf_source, load_gguf_model
from .models.hub import hf_model, is_hf, timm_model
from .weights import load_checkpoint

__all__ = ["create_model", "is_hf"]


def create_model(name: str, pretrained: bool = False, checkpoint: Optional[str] = None, meta: bool = False,
                 **kwargs: Any) -> nn.Module:
    """A model to prune, by name:

    * a timm model name (``deit_small_patch16_224``): ``timm.create_model(name, pretrained, **kwargs)``,
      remembering how it was built (for :func:`spp.save_pruned`);
    * a local directory: a Hugging Face model directory (``config.json`` + ``*.safetensors``) through the Auto
      class of its family (``AutoModelForCausalLM`` for a decoder) ``.from_pretrained(name, use_safetensors=True,
      **kwargs)``, or a directory written by :func:`spp.save_pruned` through :func:`spp.load_pruned`;
    * ``hf:ORG/NAME``: a Hugging Face hub id, the same way (needs the internet or the hub cache);
    * a ``.gguf`` file, or a directory holding one and no ``config.json``: dequantized to ``dtype`` (float32 by
      default) in a plain transformers model (:mod:`spp.gguf`).

    ``checkpoint`` then loads weights from a local file or directory through :func:`spp.load_checkpoint`.
    ``meta=True`` builds the model's skeleton on the meta device and reads no weights (the ranks of a
    sharded run that rank 0 broadcasts into: :mod:`spp.sharding`).
    """
    model = _hf_model(name, meta=meta, **kwargs) if is_hf(name) else timm_model(name, pretrained, meta=meta, **kwargs)
    if checkpoint and not meta:
        load_checkpoint(model, checkpoint)
    return model


def _hf_model(name: str, meta: bool = False, **kwargs: Any) -> nn.Module:
    """A GGUF file, a member saved by spp, or a transformers model (folder or ``hf:ORG/NAME``)."""
    source = name[3:] if name.startswith("hf:") else name
    gguf = None if name.startswith("hf:") else gguf_source(source)
    if gguf:
        return load_gguf_model(*gguf, meta=meta, **kwargs)
    config = None
    if os.path.isdir(source):
        config_path = os.path.join(source, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path} not found: a model directory holds config.json and *.safetensors "
                                    "(transformers' save_pretrained, or spp.save_pruned), or one .gguf file")
        with open(config_path) as f:
            config = json.load(f)
        if config.get("format") == "spp-pruned" or "spp" in config:
            return load_pruned(source, meta=meta)
    return hf_model(source, config, meta=meta, **kwargs)
