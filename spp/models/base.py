"""The interface a model family implements (see :mod:`spp.models` for the registry)."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import nn

from ..structure import Geometry, Widths
from .common import nominal_attention


class Channels(NamedTuple):
    """Rows (``axis=0``: outputs the element writes) or columns (``axis=1``: inputs the element feeds) of
    one linear layer's weight that mask elements remove: ``index[i]`` belongs to element ``element[i]``.
    A row may be listed once per element it serves (a key/value head shared by its group's query heads)."""

    linear: nn.Linear
    axis: int
    index: torch.Tensor
    element: torch.Tensor


class ModelFamily:
    """One family of models that spp can mask, price and compress exactly (timm ViT, HF Llama, ...).

    ``classes`` are the fully qualified names of the model classes the family handles (a subclass of
    one is handled too); the registry matches them without importing the library that defines them.
    A family implements the methods below; everything else in spp is written against them.
    """

    name: str = ""
    description: str = ""
    classes: Sequence[str] = ()
    forward_methods: Sequence[str] = ()   # methods other than forward that run the model (CLIP's get_*_features):
                                          # FSDP2 gathers the weights around them too (spp.sharding)
    search_defaults: Mapping[str, Any] = {}   # search settings whose "auto" differs for this family ({"clip": 10.0})
    inputs: str = "image"                 # what one example is: "image", "text" (a causal LM) or "image-text" (CLIP)
    model_types: Sequence[str] = ()       # Hugging Face config model_type values it loads (read by spp.models.register)
    auto_class: Optional[str] = None      # the transformers Auto class that loads such a directory
    granularities: Sequence[str] = ("dim", "head")   # the mask granularities it compresses exactly
    granularity_note: str = ""            # why a granularity is missing from granularities (the refusal says it)

    # ----- structure ---------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> List[nn.Module]:
        """The prunable blocks (transformer layers), in forward order."""
        raise NotImplementedError

    def geometry(self, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> List[Geometry]:
        """One :class:`Geometry` per block, FLOPs priced at ``input_size`` (default: the model's own);
        raises :class:`spp.structure.UnsupportedModel` for a block it cannot mask exactly."""
        raise NotImplementedError

    def example_input(self, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """One input (batch of 1) at ``input_size``, for counting FLOPs."""
        raise NotImplementedError

    def filter_state_dict(self, model: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """A checkpoint's state dict made to fit ``model`` (the model library's own conversions: old layouts,
        resized position embeddings); by default as it is. :func:`spp.load_checkpoint` then checks shapes."""
        return state

    def input_size(self, model: nn.Module) -> Sequence[int]:
        """The size of one input (without the batch) that FLOPs and speed are measured at by default: the
        shape of :meth:`example_input` at its own default."""
        return tuple(self.example_input(model).shape[1:])

    def counting(self):
        """Context in which a forward runs at its nominal widths, for ``torch.utils.flop_counter`` (by default
        without the zero-padding of :func:`spp.models.common.equal_widths`)."""
        return nominal_attention()

    # ----- masks -------------------------------------------------------------------------------
    def add_masks(self, model: nn.Module, granularity: str) -> None:
        """Insert all-one masks (float32 parameters named by ``Geometry.mask_names``), in place."""
        raise NotImplementedError

    def remove_masks(self, model: nn.Module) -> None:
        """Undo :meth:`add_masks` in place (mask values are dropped)."""
        raise NotImplementedError

    def channels(self, block: nn.Module, geom: Geometry, granularity: str) -> Dict[str, List[Channels]]:
        """``{pair: [Channels, ...]}``: every weight row and column each element of the block's masks
        removes, for the activation- and gradient-based criteria of :mod:`spp.criteria` (Wanda-sp, FLAP,
        LLM-Pruner's Taylor) and magnitude."""
        raise NotImplementedError(f"the {self.name} family does not list its channels")

    # ----- compression -------------------------------------------------------------------------
    def replaced_modules(self, block: nn.Module) -> List[nn.Module]:
        """The modules of ``block`` that :meth:`compress_block` replaces (``compress`` does not copy them)."""
        raise NotImplementedError

    def compress_block(self, block: nn.Module, source: nn.Module, geom: Geometry, masks: Mapping[str, torch.Tensor],
                       granularity: str) -> Widths:
        """Put the compressed modules of ``source`` (the masked or dense block) into ``block`` (its copy,
        whose :meth:`replaced_modules` are placeholders); return the block's widths."""
        raise NotImplementedError

    def resize_block(self, block: nn.Module, geom: Geometry, widths: Widths) -> None:
        """Give a dense block the shapes of ``widths`` (weights uninitialised: they are loaded next)."""
        raise NotImplementedError

    # ----- save / load -------------------------------------------------------------------------
    def describe(self, model: nn.Module) -> Dict[str, Any]:
        """What :meth:`build` needs to rebuild the dense model (JSON-serialisable)."""
        raise NotImplementedError

    def build(self, base: Mapping[str, Any]) -> nn.Module:
        """The dense model that :meth:`describe` described, with uninitialised weights."""
        raise NotImplementedError

    def layout(self, model: nn.Module) -> Optional[List[Dict[str, Any]]]:
        """Per block, what a compressed block needs beyond its :class:`Widths` and weights (JSON), or None."""
        return None

    def set_layout(self, model: nn.Module, layout: List[Dict[str, Any]]) -> None:
        """Give a rebuilt compressed model the :meth:`layout` it was saved with."""

    def plain_config(self, model: nn.Module) -> Optional[Dict[str, Any]]:
        """A config the model's own library loads the compressed model from with no spp (e.g.
        ``AutoModelForCausalLM.from_pretrained``), where its shape allows one; else None."""
        return None

    def __repr__(self) -> str:
        return f"<spp model family {self.name}: {self.description}>"
