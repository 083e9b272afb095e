"""CLIP from Hugging Face transformers (``hf-clip``): ``CLIPModel`` with both towers, or one tower alone
(``CLIPVisionModel``, ``CLIPTextModel`` and their ``*WithProjection``).

A CLIP encoder layer has the projections of an OPT decoder layer (``q_proj``, ``k_proj``, ``v_proj``,
``out_proj`` with biases; ``mlp.fc1``, ``mlp.fc2``), so the masks, the exact compression and the saved
layout are the decoder family's (:mod:`spp.models.decoder`): query-key masks scale ``q_proj``'s output,
value masks ``out_proj``'s input, MLP masks ``fc2``'s input; ``granularity="dim"`` shares one entry per head
dim across the heads of a layer, ``"head"`` has one per head. The vision tower attends both ways; the text
tower causally (its model passes ``is_causal`` and its padding mask to every layer, compressed or not).

Blocks run vision layers first, then text layers, and each :class:`~spp.models.decoder.DecoderGeometry`
carries its tower in ``part`` (``"vision"`` / ``"text"``): ``WeightFamily.select(scope="part")`` meets a
budget within each tower, ``scope="global"`` (the default) over both together. FLOPs are priced for one
image (``(image_size / patch_size)² + 1`` tokens) and one caption of ``max_position_embeddings`` tokens.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..structure import Widths
from .decoder import DecoderGeometry, PrunedDecoderAttention, _DecoderFamily

__all__ = ["CLIP", "CLIPFamily"]

class CLIPFamily(_DecoderFamily):
    """``hf-clip``: transformers CLIP, both towers or one (see the module docstring)."""
    name = "hf-clip"
    description = "transformers CLIPModel (both towers), CLIPVisionModel, CLIPTextModel (+ WithProjection)"
    rotary = False
    out_proj = "out_proj"
    mlp_in = ("mlp.fc1",)
    mlp_out = "mlp.fc2"
    scale_query = False
    forward_methods = ("get_text_features", "get_image_features")   # zero-shot and retrieval embeddings
    inputs = "image-text"
    auto_class = "AutoModel"
    # the vision settings, not the decoder LLMs' (no step bound, nu_scale 1.5): the CLIP tables were measured with them
    search_defaults: dict = {}

    @staticmethod
    def towers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
        """``[(part, tower)]``: the vision tower first, then the text tower (one of them for a single-tower model)."""
        out = []
        for part, attribute in (("vision", "vision_model"), ("text", "text_model")):
            tower = getattr(model, attribute, None)
            if tower is None and model.config.model_type == f"clip_{part}_model":
                tower = model
            if tower is not None:
                out.append((part, tower))
        return out

    def blocks(self, model: nn.Module) -> List[nn.Module]:
        return [layer for _, tower in self.towers(model) for layer in tower.encoder.layers]

    @staticmethod
    def tower_tokens(tower: nn.Module, part: str) -> int:
        config = tower.config
        if part == "vision":
            return (config.image_size // config.patch_size) ** 2 + 1
        return config.max_position_embeddings

    def geometry(self, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> List[DecoderGeometry]:
        if input_size is not None:
            raise ValueError(f"{type(model).__name__}: CLIP's FLOPs are priced at its own image size and caption "
                             f"length (its position embeddings fix both); input_size={tuple(input_size)} is not taken")
        names = {id(m): n for n, m in model.named_modules()}
        geoms = []
        for part, tower in self.towers(model):
            tokens = self.tower_tokens(tower, part)
            for layer in tower.encoder.layers:
                geoms.append(self._layer_geometry(model, names[id(layer)], len(geoms), layer, tokens, part))
        return geoms

    def example_input(self, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> Dict[str, torch.Tensor]:
        """One image and one caption of the longest length (the keyword arguments of the model's forward)."""
        device = next(model.parameters()).device
        inputs = {}
        for part, tower in self.towers(model):
            c = tower.config
            if part == "vision":
                inputs["pixel_values"] = torch.zeros(1, c.num_channels, c.image_size, c.image_size, device=device)
            else:
                inputs["input_ids"] = torch.zeros(1, self.tower_tokens(tower, part), dtype=torch.long, device=device)
        return inputs

    def _new_attention(self, source: nn.Module, geom: DecoderGeometry, w: Widths) -> PrunedDecoderAttention:
        return PrunedDecoderAttention(
            source.config, geom.index, geom.dim, w, rotary=False, scaling=source.scale,
            biases=(geom.q_bias, geom.k_bias, geom.v_bias, geom.o_bias), out_proj=self.out_proj,
            attention_dropout=source.dropout, is_causal=geom.part == "text")

    def plain_config(self, model: nn.Module) -> Optional[Dict[str, Any]]:
        """The model's own CLIP config when only MLP neurons were removed and each tower keeps one MLP width
        (CLIP derives the head dim from the width and head count, so a member with fewer heads or head dims
        loads with :func:`spp.load_pruned` only)."""
        config, widths = model.config.to_dict(), list(model.spp_widths)
        for part, tower in self.towers(model):
            c = tower.config
            d = c.hidden_size // c.num_attention_heads
            mine, widths = widths[:len(tower.encoder.layers)], widths[len(tower.encoder.layers):]
            if any(w != Widths(c.num_attention_heads, c.num_attention_heads, d, d, mine[0].mlp_hidden,
                               c.num_attention_heads) for w in mine):
                return None
            if tower is model:
                config["intermediate_size"] = mine[0].mlp_hidden
            else:
                config[f"{part}_config"] = {**config[f"{part}_config"], "intermediate_size": mine[0].mlp_hidden}
        return config


CLIP = CLIPFamily()
