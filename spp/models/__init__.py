"""Model families: each one knows where a family's prunable pairs are and how to compress them.

=====================  =================================================  ============================
family                 models                                             module
=====================  =================================================  ============================
``timm-vit``           timm ``VisionTransformer`` (ViT, DeiT, distilled)  :mod:`spp.models.vit`
``timm-swin``          timm ``SwinTransformer`` (v1)                      :mod:`spp.models.swin`
``hf-llama``           transformers Llama, Mistral, Qwen2 (GQA, RoPE)     :mod:`spp.models.decoder`
``hf-qwen3``           transformers Qwen3 (whole heads: q/k norms)        :mod:`spp.models.decoder`
``hf-gemma3``          transformers Gemma 3 text (whole heads)            :mod:`spp.models.decoder`
``hf-phi3``            transformers Phi-3 / Phi-4 (fused, partial RoPE)   :mod:`spp.models.decoder`
``hf-opt``             transformers OPT                                   :mod:`spp.models.decoder`
``hf-clip``            transformers CLIP (both towers, or one)            :mod:`spp.models.clip`
=====================  =================================================  ============================

A family is found from the model's class (or any base class) by name, so matching a model imports
neither timm nor transformers; a family's module is imported the first time it is used. Add one with
:func:`register` (see :class:`spp.models.base.ModelFamily` for what it implements).
"""
from __future__ import annotations

import importlib
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from torch import nn

from ..structure import Geometry, UnsupportedModel, mask_names
from .base import ModelFamily

__all__ = ["ModelFamily", "family_of", "family_named", "family_for_model_type", "register", "supported",
           "UnsupportedModel", "find_blocks", "model_geometry", "mask_pairs"]


class _Entry(NamedTuple):
    name: str
    description: str
    classes: Sequence[str]
    target: str                       # "module:attribute" of the ModelFamily instance
    model_types: Sequence[str] = ()   # Hugging Face config model_type values (which family loads a directory)


_LLAMA = "transformers.models.{0}.modeling_{0}.{1}"
_REGISTRY: List[_Entry] = [
    _Entry("timm-vit", "timm VisionTransformer (ViT, DeiT, DeiT distilled)",
           ("timm.models.vision_transformer.VisionTransformer",), "spp.models.vit:VIT"),
    _Entry("timm-swin", "timm SwinTransformer (Swin v1)",
           ("timm.models.swin_transformer.SwinTransformer",), "spp.models.swin:SWIN"),
    _Entry("hf-llama", "transformers LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (and their *Model)",
           tuple(_LLAMA.format(m, c + s) for m, c in (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"))
                 for s in ("ForCausalLM", "Model")), "spp.models.decoder:LLAMA", ("llama", "mistral", "qwen2")),
    _Entry("hf-qwen3", "transformers Qwen3ForCausalLM (and Qwen3Model): whole query heads (q/k norms), MLP neurons",
           (_LLAMA.format("qwen3", "Qwen3ForCausalLM"), _LLAMA.format("qwen3", "Qwen3Model")),
           "spp.models.decoder:QWEN3", ("qwen3",)),
    _Entry("hf-gemma3", "transformers Gemma3ForCausalLM (and Gemma3TextModel): whole query heads (q/k norms), MLP "
           "neurons", (_LLAMA.format("gemma3", "Gemma3ForCausalLM"), _LLAMA.format("gemma3", "Gemma3TextModel")),
           "spp.models.decoder:GEMMA3", ("gemma3_text",)),
    _Entry("hf-phi3", "transformers Phi3ForCausalLM (and Phi3Model): Phi-3, Phi-3.5, Phi-4 (fused qkv and gate_up "
           "projections, partial RoPE)", (_LLAMA.format("phi3", "Phi3ForCausalLM"), _LLAMA.format("phi3", "Phi3Model")),
           "spp.models.decoder:PHI3", ("phi3",)),
    _Entry("hf-opt", "transformers OPTForCausalLM (and OPTModel)",
           (_LLAMA.format("opt", "OPTForCausalLM"), _LLAMA.format("opt", "OPTModel")), "spp.models.decoder:OPT",
           ("opt",)),
    _Entry("hf-clip", "transformers CLIPModel (both towers), CLIPVisionModel, CLIPTextModel (+ WithProjection)",
           tuple(f"transformers.models.clip.modeling_clip.{c}" for c in (
               "CLIPModel", "CLIPVisionModel", "CLIPTextModel", "CLIPVisionModelWithProjection",
               "CLIPTextModelWithProjection")), "spp.models.clip:CLIP",
           ("clip", "clip_vision_model", "clip_text_model")),
]

# Models people try that spp cannot prune exactly, and why (instead of the generic "not supported").
_KNOWN_UNSUPPORTED: Dict[str, str] = {
    "Gemma3ForConditionalGeneration": "the multimodal Gemma 3 (with its vision tower) is not supported; its language "
                                      "model is: load it as Gemma3ForCausalLM (family hf-gemma3)",
    "Gemma": "Gemma 1 and 2 soft-cap the attention logits, which pruned attention does not reproduce; Gemma 3 "
             "(Gemma3ForCausalLM, family hf-gemma3) is supported",
    "Phi": "Phi-1 and Phi-2 (PhiForCausalLM: attention and MLP in parallel, LayerNorm with biases) are not "
           "supported; Phi-3, Phi-3.5 and Phi-4 (Phi3ForCausalLM, family hf-phi3) are",
}

_loaded: Dict[str, ModelFamily] = {}


def _load(entry: _Entry) -> ModelFamily:
    if entry.target not in _loaded:
        module, attribute = entry.target.split(":")
        _loaded[entry.target] = getattr(importlib.import_module(module), attribute)
    return _loaded[entry.target]


def _class_names(model: nn.Module) -> List[str]:
    return [f"{c.__module__}.{c.__qualname__}" for c in type(model).__mro__]


def supported() -> str:
    """One line per supported family."""
    return "; ".join(f"{e.name}: {e.description}" for e in _REGISTRY)


def family_of(model: nn.Module) -> ModelFamily:
    """The family that handles ``model``; :class:`UnsupportedModel` lists the supported ones."""
    names = _class_names(model)
    for entry in _REGISTRY:
        if any(c in names for c in entry.classes):
            return _load(entry)
    model_name = type(model).__name__
    for prefix, why in _KNOWN_UNSUPPORTED.items():
        if model_name.startswith(prefix):
            raise UnsupportedModel(f"spp does not support {model_name}: {why}. Supported: {supported()}")
    raise UnsupportedModel(f"spp does not support {model_name}. Supported: {supported()}. "
                           "Another family can be added with spp.models.register (docs/library.md)")


def family_named(name: str) -> ModelFamily:
    """The family registered as ``name`` (``timm-vit``, ``hf-llama``, ...), as a saved model's config names it."""
    for entry in _REGISTRY:
        if entry.name == name:
            return _load(entry)
    raise ValueError(f"model family {name!r} is not one this spp has; families: {[e.name for e in _REGISTRY]}")


def family_for_model_type(model_type: Optional[str]) -> Optional[ModelFamily]:
    """The family whose models a Hugging Face config of ``model_type`` describes (None: no family names it;
    such a directory loads as a causal LM and :func:`family_of` then says whether spp can prune it)."""
    for entry in _REGISTRY:
        if model_type in entry.model_types:
            return _load(entry)
    return None


def register(family: ModelFamily, first: bool = True) -> None:
    """Add a family: ``family.classes`` are the fully qualified class names it handles. With ``first``
    it is tried before the built-in ones (so it can take over a class they handle)."""
    if not family.classes:
        raise ValueError("a ModelFamily needs .classes: the fully qualified names of the model classes it handles")
    key = f"registered:{id(family)}"
    _loaded[key] = family
    entry = _Entry(family.name or type(family).__name__, family.description, tuple(family.classes), key,
                   tuple(family.model_types))
    _REGISTRY.insert(0 if first else len(_REGISTRY), entry)


def find_blocks(model: nn.Module) -> List[nn.Module]:
    """The prunable blocks of a supported model, in forward order."""
    return family_of(model).blocks(model)


def model_geometry(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> List[Geometry]:
    """One :class:`Geometry` per block; FLOPs are priced at ``input_size`` (default: the model's)."""
    return family_of(model).geometry(model, input_size)


def mask_pairs(model: nn.Module) -> Dict[str, Tuple[str, int]]:
    """``{mask name: (pair type, block index)}`` for every mask a masked ``model`` has (or would have)."""
    return {name: (pair, geom.index) for geom in model_geometry(model) for pair, name in mask_names(geom).items()}
