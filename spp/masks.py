"""Pair-wise structured masks, inserted in place into any supported model.

:func:`add_masks` asks the model's family (:mod:`spp.models`) to insert three float32 masks per block,
all at one, so the model computes exactly what it computed before:

* query-key (``qk``): logits = q diag(m) kᵀ;
* value (``v``): scales each value dim (a row of W_v and a column of the output projection);
* MLP (``mlp``): scales each hidden neuron (a row of the first matrix(es), a column of the last).

With ``granularity="dim"`` the attention masks hold one entry per head dim (a rotary pair for RoPE
models), shared by all heads; with ``"head"`` one entry per head. Every other weight keeps its name, so
pretrained checkpoints load into a masked model. The mask names come from the family, e.g.
``blocks.3.attn.qk_mask`` (timm ViT) or ``model.layers.3.self_attn.qk_mask`` (Llama).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import torch
from torch import nn

from .models import family_of, model_geometry
from .structure import GRANULARITIES, UnsupportedModel, mask_names

__all__ = ["add_masks", "remove_masks", "mask_parameters", "freeze_weights", "set_masks", "is_masked",
           "granularity_of", "require_masks", "MasksAtOne"]

_NO_MASKS = "the model has no masks; call spp.add_masks(model) first"


def add_masks(model: nn.Module, granularity: str = "dim", freeze: bool = True) -> nn.Module:
    """Insert query-key, value and MLP masks (all ones) into every block, in place.

    With all masks at one the model computes exactly what it computed before. With
    ``freeze=True`` every other parameter stops requiring gradients, so a search computes
    mask gradients only. Returns ``model``.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}: choose one of {GRANULARITIES}")
    if is_masked(model):
        raise ValueError("the model already has masks; call spp.remove_masks(model) first")
    family = family_of(model)
    if granularity not in family.granularities:
        raise UnsupportedModel(f"{type(model).__name__} ({family.name}): granularity={granularity!r} is not exact "
                               f"here: {family.granularity_note}; use granularity={family.granularities[0]!r} "
                               f"(spp search: model.granularity={family.granularities[0]})")
    family.geometry(model)  # raises a clear error for unsupported models or blocks
    family.add_masks(model, granularity)
    model.spp_granularity = granularity
    if freeze:
        freeze_weights(model)
    return model


def remove_masks(model: nn.Module) -> nn.Module:
    """Take the masks out again (their values are dropped), in place; modules keep their own classes."""
    if is_masked(model):
        family_of(model).remove_masks(model)
        del model.spp_granularity
    return model


def is_masked(model: nn.Module) -> bool:
    """Whether ``model`` holds spp masks (:func:`add_masks`)."""
    return getattr(model, "spp_granularity", None) is not None


def granularity_of(model: nn.Module) -> str:
    """The granularity (``dim`` or ``head``) a masked model's masks were added with."""
    if not is_masked(model):
        raise ValueError(_NO_MASKS)
    return model.spp_granularity


def mask_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every mask, in block order: qk, v, then MLP per block."""
    if not is_masked(model):
        raise ValueError(_NO_MASKS)
    params = dict(model.named_parameters())
    return [(name, params[name]) for geom in model_geometry(model) for name in mask_names(geom).values()]


require_masks = mask_parameters   # raises the same ValueError when there are no masks


def freeze_weights(model: nn.Module) -> nn.Module:
    """Stop gradients for every parameter except the masks."""
    masks = {id(p) for _, p in mask_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in masks)
    return model


@torch.no_grad()
def set_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy mask values (e.g. a family member's masks) into a masked model."""
    params: Dict[str, nn.Parameter] = dict(mask_parameters(model))
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise KeyError(f"unknown mask names {unknown[:5]}; the model's masks are {list(params)[:6]}...")
    for name, value in masks.items():
        if params[name].shape != value.shape:
            raise ValueError(f"mask {name}: shape {tuple(value.shape)} != model's {tuple(params[name].shape)}")
        params[name].copy_(value)
    return model


class MasksAtOne:
    """The dense model a masked model was made from, without a second copy of its weights: calling it runs
    the masked model with every mask at 1 (no gradients; the mask parameters themselves are not touched).
    A search's distillation teacher (``search.distill``)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.ones = {name: torch.ones_like(p) for name, p in mask_parameters(model)}

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        training = self.model.training
        try:   # the masks are swapped for ones for this call only: the student's graph keeps its own
            return torch.func.functional_call(self.model.eval(), self.ones, args, kwargs, strict=False)   # no dropout
        finally:
            self.model.train(training)
