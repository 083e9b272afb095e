"""Where the prunable pairs are in a model, and what each kept width costs: the model-independent part.

Every prunable block (a transformer layer) has three pairs: query-key (``qk``), value (``v``) and MLP
(``mlp``), each scaled by one mask. A block's shape after pruning is a :class:`Widths`; its
:class:`Geometry` (one per block, made by the model's family in :mod:`spp.models`) prices any widths in
closed form (parameters, FLOPs, mask elements), and names the block's masks. The solution path, the
weight family, ν calibration and the loops read models only through these two classes and the family
lookup of :mod:`spp.models` (``family_of``, ``model_geometry``, ``mask_pairs``), so they work on every family (``tests/test_masks_compress.py`` and
``tests/test_decoder.py`` check the closed forms against compressed models and
``torch.utils.flop_counter``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

PAIRS = ("qk", "v", "mlp")
GRANULARITIES = ("dim", "head")


class UnsupportedModel(TypeError):
    """The model (or one of its blocks) is not one spp can mask and compress exactly."""


@dataclass(frozen=True)
class Widths:
    """Shape of one block's prunable inner dimensions.

    The attention has ``num_heads`` query heads with ``v_dim`` value dims each; ``num_qk_heads`` of them
    attend with ``qk_dim`` query-key dims, the rest attend uniformly (all their query-key dims were
    removed). ``num_kv_heads`` counts key/value heads where the family shares them between query heads
    (grouped-query attention; None where every head has its own). ``qk_rot_dim``: with partial rotary embeddings,
    how many of the ``qk_dim`` query-key dims are rotated (the rest are plain dims).
    """

    num_heads: int
    num_qk_heads: int
    qk_dim: int
    v_dim: int
    mlp_hidden: int
    num_kv_heads: Optional[int] = None
    qk_rot_dim: Optional[int] = None   # partial RoPE (Phi-3): how many of qk_dim rotate (None: all, or no RoPE)

    def to_dict(self) -> Dict[str, int]:
        """The widths as a dict, without unset fields (``config.json`` of a pruned model)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


class Geometry:
    """The unpruned shape of one block, how its masks are named and laid out, and what widths cost.

    A model family subclasses it (as a frozen dataclass) and fills in the methods; the core calls
    nothing else. ``name`` is the block's module name, ``index`` its position in forward order.
    """

    name: str
    index: int
    part: str = ""   # the part of the model the block belongs to (CLIP's "vision" / "text" tower), for per-part budgets

    # ----- masks ---------------------------------------------------------------------------
    def mask_names(self) -> Dict[str, str]:
        """Parameter names of the block's masks, by pair."""
        raise NotImplementedError

    def mask_size(self, pair: str, granularity: str) -> int:
        """Entries of the block's ``pair`` mask."""
        raise NotImplementedError

    # ----- widths --------------------------------------------------------------------------
    @property
    def full(self) -> Widths:
        raise NotImplementedError

    @property
    def empty(self) -> Widths:
        return Widths(0, 0, 0, 0, 0)

    def widths_from_kept(self, qk: np.ndarray, v: np.ndarray, mlp: int, granularity: str) -> Widths:
        """Widths of the compressed block that keeps the ``qk`` and ``v`` entries marked True (boolean
        arrays of the masks' sizes) and ``mlp`` MLP neurons."""
        raise NotImplementedError

    def widths_from_masks(self, qk: torch.Tensor, v: torch.Tensor, mlp: torch.Tensor, granularity: str) -> Widths:
        """Widths of the compressed block for masks ``qk``, ``v``, ``mlp`` (non-zero = kept)."""
        return self.widths_from_kept((qk != 0).cpu().numpy().ravel(), (v != 0).cpu().numpy().ravel(),
                                     int((mlp != 0).sum()), granularity)

    # ----- costs ---------------------------------------------------------------------------
    def params(self, w: Widths) -> int:
        """Parameters of the block's prunable projections at widths ``w``."""
        raise NotImplementedError

    def flops(self, w: Widths) -> int:
        """Forward FLOPs per input (2 per multiply-add), as ``torch.utils.flop_counter`` counts them."""
        raise NotImplementedError

    def elements(self, w: Widths, granularity: str) -> int:
        """Number of non-zero mask entries of a member with these widths."""
        raise NotImplementedError

    def unit_costs(self, by: str, granularity: str) -> Dict[str, int]:
        """Cost of one mask entry of each pair, counted on its own (no interactions)."""
        raise NotImplementedError

    def cost(self, w: Widths, by: str, granularity: str) -> int:
        """What widths ``w`` cost by ``by``: parameters, FLOPs or mask elements."""
        if by == "params":
            return self.params(w)
        if by == "flops":
            return self.flops(w)
        return self.elements(w, granularity)


def mask_names(geom: Geometry) -> Dict[str, str]:
    """Parameter names of a block's masks, by pair."""
    return geom.mask_names()


def widths_from_masks(geom: Geometry, qk: torch.Tensor, v: torch.Tensor, mlp: torch.Tensor,
                      granularity: str) -> Widths:
    """Widths of the compressed block for masks ``qk``, ``v``, ``mlp`` (non-zero = kept)."""
    return geom.widths_from_masks(qk, v, mlp, granularity)


def block_masks(geoms: Sequence[Geometry], masks: Mapping[str, torch.Tensor],
                device: Optional[torch.device] = None) -> List[Dict[str, torch.Tensor]]:
    """``masks`` regrouped per block as ``{pair: tensor}``; a missing mask is a KeyError naming it."""
    out = []
    for geom in geoms:
        names = mask_names(geom)
        missing = [n for n in names.values() if n not in masks]
        if missing:
            raise KeyError(f"masks lack {missing}; give one tensor per mask "
                           "(spp.mask_parameters or WeightFamily.select names them)")
        out.append({pair: masks[name].detach().to(device) if device is not None else masks[name].detach()
                    for pair, name in names.items()})
    return out
