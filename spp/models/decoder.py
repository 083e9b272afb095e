"""Decoder LLMs from Hugging Face transformers: Llama, Mistral, Qwen2 (``hf-llama``), Qwen3 (``hf-qwen3``), Gemma 3
(``hf-gemma3``), Phi-3 / Phi-4 (``hf-phi3``) and OPT (``hf-opt``).

Masks per decoder layer, applied by hooks on the projections (the models' own forwards run unchanged):

* query-key, ``{layer}.self_attn.q_proj.qk_mask``, scales the query (after ``q_proj``):
  logits = q diag(m) kᵀ. With RoPE an entry covers a **rotary pair**: head dims j and j + d/2, which
  the rotation mixes at one frequency. Scaling both dims of a pair by one value commutes with the
  rotation, so masking q before RoPE is masking it after, and a removed pair is two rows of ``q_proj``
  and ``k_proj`` that can be sliced out. OPT (learned positions): one entry per head dim. Partial RoPE
  (Phi-4-mini): pairs (j, j + rot/2) over the rotated dims, then one entry per plain dim. Phi-3's fused
  ``qkv_proj`` carries the mask on its query part; Qwen3 and Gemma 3 (per-head q/k norms) carry one entry per
  head on ``q_norm``'s output.
* value, ``{layer}.self_attn.o_proj.v_mask`` (OPT: ``out_proj``), scales each value dim of every
  head at the output projection's input: a column of ``o_proj`` and a row of ``v_proj``.
* MLP, ``{layer}.mlp.down_proj.mlp_mask`` (OPT: ``{layer}.fc2.mlp_mask``), scales each intermediate
  neuron: rows of ``gate_proj`` and ``up_proj`` (OPT: ``fc1``), a column of ``down_proj`` (``fc2``).

**Grouped-query attention.** With ``granularity="dim"`` (the default) an entry is one pair / dim of
*every* head, query and key/value alike: removing value dim i removes row i of every key/value head
and column i of every query head, so each query head still reads its own group's key/value head and
compression stays exact with the model's grouping unchanged. With ``granularity="head"`` the masks
hold one entry per **query** head; a key/value head is removed when all the query heads of its group
are, and the compressed attention maps each kept query head to its kept key/value head (groups may
then differ in size; equal groups use the model's own repeat).

**Compression** keeps the original softmax scale and the original rotary frequencies of the kept pairs
(the compressed attention indexes the model's cos/sin tables; nothing is recomputed from the new head
dim). A query head with values but no query-key entries attends uniformly over its prefix (its query
rows are zero, so its logits are); a layer with no query-key entries left at all attends through one
zero dim; a layer with no value dims keeps the ``o_proj`` bias (if any) as a constant output; the KV
cache holds each layer's kept widths.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..structure import Geometry, UnsupportedModel, Widths
from .base import Channels, ModelFamily
from .common import copy_linear, equal_widths, new_linear

__all__ = ["DecoderGeometry", "PrunedDecoderAttention", "LLAMA", "QWEN3", "GEMMA3", "PHI3", "OPT", "DEFAULT_TOKENS"]

DEFAULT_TOKENS = 2048   # sequence length FLOPs are priced at (capped by the model's max_position_embeddings)


# ================================================================================================
# Geometry
# ================================================================================================
@dataclass(frozen=True)
class DecoderGeometry(Geometry):
    """The unpruned shape of one decoder layer, and how to price any :class:`Widths` of it."""

    name: str              # module name of the layer, e.g. "model.layers.3"
    index: int
    attn: str              # the attention's name within the layer ("self_attn")
    out_proj: str          # the attention's output projection ("o_proj" or OPT's "out_proj")
    mlp_out: str           # the MLP's output projection within the layer ("mlp.down_proj" or OPT's "fc2")
    dim: int               # hidden size C
    num_heads: int         # query heads H
    num_kv_heads: int      # key/value heads (H / group size)
    head_dim: int          # d
    mlp_hidden: int        # intermediate size F
    tokens: int            # sequence length the FLOPs are priced at
    rotary: bool           # RoPE: a query-key entry is a pair of dims (j, j + d/2)
    q_bias: bool
    k_bias: bool
    v_bias: bool
    o_bias: bool
    gated: bool            # gate_proj and up_proj (Llama) or one fc1 (OPT)
    mlp_in_bias: bool
    mlp_out_bias: bool
    part: str = ""         # the tower a layer belongs to (CLIP: "vision" / "text"), for per-part budgets
    qk_at: str = "q_proj"  # the module whose output the query-key mask scales (Qwen3: "q_norm", after the norm)
    rotary_dim: int = 0    # partial RoPE (Phi-3): the first rotary_dim dims of a head rotate, the rest are plain dims

    @property
    def rot(self) -> int:
        """Rotated dims per head: pairs (j, j + rot/2) for j < rot/2; dims rot.. are plain (0 without RoPE)."""
        return (self.rotary_dim or self.head_dim) if self.rotary else 0

    @property
    def partial(self) -> bool:
        return 0 < self.rot < self.head_dim

    def qk_entry_of_dim(self) -> torch.Tensor:
        """For each head dim, the query-key mask entry (granularity "dim") it belongs to: a rotary pair's two dims
        share one entry, each plain dim has its own."""
        j, half = torch.arange(self.head_dim), self.rot // 2
        return torch.where(j < self.rot, j % max(half, 1), half + j - self.rot)

    def _dims_per_entry(self) -> np.ndarray:
        """Head dims per query-key entry at granularity "dim": 2 for a rotary pair, 1 for a plain dim."""
        return np.array([2] * (self.rot // 2) + [1] * (self.head_dim - self.rot))

    def mask_names(self) -> Dict[str, str]:
        a = f"{self.name}.{self.attn}"
        return {"qk": f"{a}.{self.qk_at}.qk_mask", "v": f"{a}.{self.out_proj}.v_mask",
                "mlp": f"{self.name}.{self.mlp_out}.mlp_mask"}

    def mask_size(self, pair: str, granularity: str) -> int:
        if pair == "mlp":
            return self.mlp_hidden
        if granularity == "head":
            return self.num_heads
        return self.rot // 2 + self.head_dim - self.rot if pair == "qk" else self.head_dim

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def full(self) -> Widths:
        return Widths(self.num_heads, self.num_heads, self.head_dim, self.head_dim, self.mlp_hidden, self.num_kv_heads,
                      self.rot if self.partial else None)

    @property
    def empty(self) -> Widths:
        return Widths(0, 0, 0, 0, 0, 0, 0 if self.partial else None)

    def widths_from_kept(self, qk: np.ndarray, v: np.ndarray, mlp: int, granularity: str) -> Widths:
        if granularity == "dim":
            v_dim = int(v.sum())
            if not v_dim:
                return Widths(0, 0, 0, 0, mlp, 0, 0 if self.partial else None)
            qk_dim = int((qk * self._dims_per_entry()).sum())
            rot = 2 * int(qk[:self.rot // 2].sum()) if self.partial and qk_dim else (0 if self.partial else None)
            return Widths(self.num_heads, self.num_heads if qk_dim else 0, qk_dim, v_dim, mlp, self.num_kv_heads, rot)
        heads, qk_heads = int(v.sum()), int((qk & v).sum())
        kv_heads = int(v.reshape(self.num_kv_heads, self.group).any(axis=1).sum())
        rot = (self.rot if qk_heads else 0) if self.partial else None
        return Widths(heads, qk_heads, self.head_dim if qk_heads else 0, self.head_dim if heads else 0, mlp, kv_heads,
                      rot)

    def _attention_dims(self, w: Widths) -> Tuple[int, int, int, int, int]:
        """Rows of q_proj, k_proj, v_proj, columns of o_proj, and the q/k width attention runs at."""
        kv = w.num_kv_heads or 0
        q_rows = w.num_heads * w.qk_dim            # heads without query-keys keep zero query rows
        run_qk = w.qk_dim or (1 if w.num_heads else 0)   # no query-key dims at all: one zero dim
        return q_rows, kv * w.qk_dim, kv * w.v_dim, w.num_heads * w.v_dim, run_qk

    def params(self, w: Widths) -> int:
        """Parameters of the layer's prunable projections at widths ``w``."""
        c = self.dim
        q, k, v, o, _ = self._attention_dims(w)
        attn = q * (c + self.q_bias) + k * (c + self.k_bias) + v * (c + self.v_bias) + o * c + c * self.o_bias
        mlp = (2 if self.gated else 1) * w.mlp_hidden * (c + self.mlp_in_bias) + w.mlp_hidden * c + c * self.mlp_out_bias
        return attn + mlp

    def flops(self, w: Widths) -> int:
        """Forward FLOPs per sequence of ``tokens`` tokens (2 per multiply-add), as
        ``torch.utils.flop_counter`` counts: the attention over all T x T query-key pairs (the kernels
        skip the masked half; the counter does not)."""
        c, t = self.dim, self.tokens
        q, k, v, o, run_qk = self._attention_dims(w)
        projections = 2 * t * c * (q + k + v) + 2 * t * o * c
        attention = 2 * w.num_heads * t * t * (run_qk + w.v_dim) if w.num_heads else 0
        mlp = 2 * t * c * w.mlp_hidden * (3 if self.gated else 2)
        return projections + attention + mlp

    def elements(self, w: Widths, granularity: str) -> int:
        if granularity == "head":
            return w.num_qk_heads + w.num_heads + w.mlp_hidden
        rotated = w.qk_rot_dim if self.partial else (w.qk_dim if self.rotary else 0)
        entries = rotated // 2 + w.qk_dim - rotated   # rotary pairs and plain dims
        return (entries if w.num_qk_heads else 0) + (w.v_dim if w.num_heads else 0) + w.mlp_hidden

    def unit_costs(self, by: str, granularity: str) -> Dict[str, Any]:
        """The cost of one element of each pair type. With partial RoPE a query-key entry costs by its dims (a
        rotary pair twice a plain dim), so ``"qk"`` is then an array over the block's entries."""
        if by == "elements":
            return {"qk": 1, "v": 1, "mlp": 1}
        c, t = self.dim, self.tokens
        if granularity == "dim":   # one dim of every head (a query-key entry: that times its dims)
            qk_rows, kv_rows, o_cols = self.num_heads, self.num_kv_heads, self.num_heads
            qk = qk_rows * (c + self.q_bias) + kv_rows * (c + self.k_bias)
            v = self.num_kv_heads * (c + self.v_bias) + o_cols * c
            attn_flops = 2 * self.num_heads * t * t, 2 * self.num_heads * t * t
            qk_f, v_f = 2 * t * c * (qk_rows + kv_rows), 2 * t * c * (self.num_kv_heads + o_cols)
            dims = self._dims_per_entry() if self.partial else 2 if self.rotary else 1
        else:                      # one query head (its share of the key/value head)
            d = self.head_dim
            qk = d * (c + self.q_bias) + d * (c + self.k_bias) // self.group
            v = d * (c + self.v_bias) // self.group + d * c
            attn_flops = 2 * t * t * d, 2 * t * t * d
            qk_f, v_f = 2 * t * c * d * (1 + 1 / self.group), 2 * t * c * d * (1 + 1 / self.group)
            dims = 1
        mlp = (2 if self.gated else 1) * (c + self.mlp_in_bias) + c
        if by == "params":
            return {"qk": qk * dims, "v": v, "mlp": mlp}
        return {"qk": (int(qk_f + attn_flops[0]) * dims), "v": int(v_f + attn_flops[1]),
                "mlp": 2 * t * c * (3 if self.gated else 2)}


# ================================================================================================
# Masks: hooks on the projections
# ================================================================================================
def _scale(x: torch.Tensor, mask: torch.Tensor, layout: Tuple[int, int, int, str]) -> torch.Tensor:
    """``x`` (..., heads * head_dim) scaled per head (granularity "head") or per dim; ``rot`` rotated dims per head
    share an entry per rotary pair (j, j + rot/2), the dims after them (partial RoPE) have one each."""
    heads, head_dim, rot, granularity = layout
    mask = mask.to(x.dtype)
    if granularity == "head":
        return (x.unflatten(-1, (heads, head_dim)) * mask[:, None]).flatten(-2)
    if rot:
        mask = torch.cat([mask[:rot // 2], mask[:rot // 2], mask[rot // 2:]])
    return (x.unflatten(-1, (heads, head_dim)) * mask).flatten(-2)


def _qk_hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return _scale(output, module.qk_mask, module.spp_layout)


def _qkv_hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    """A fused ``qkv_proj``'s output (Phi-3) with its query part scaled; keys and values as they are."""
    width = module.spp_layout[0] * module.spp_layout[1]
    return torch.cat([_scale(output[..., :width], module.qk_mask, module.spp_layout), output[..., width:]], -1)


def _qk_norm_hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    """A query norm's output scaled per head (whole-head masks after the q_norm): heads on axis -2 (Qwen3 norms
    (batch, tokens, heads, head_dim)) or -3 (Gemma 3 norms (batch, heads, tokens, head_dim))."""
    mask = module.qk_mask.to(output.dtype)
    return output * (mask[:, None] if module.spp_head_axis == -2 else mask[:, None, None])


def _v_hook(module: nn.Module, inputs):
    return (_scale(inputs[0], module.v_mask, module.spp_layout), *inputs[1:])


def _mlp_hook(module: nn.Module, inputs):
    return (inputs[0] * module.mlp_mask.to(inputs[0].dtype), *inputs[1:])


_HOOKS = (_qk_hook, _qkv_hook, _qk_norm_hook, _v_hook, _mlp_hook)


def _add_mask(linear: nn.Linear, attr: str, size: int, layout=None) -> None:
    setattr(linear, attr, nn.Parameter(torch.ones(size, device=linear.weight.device, dtype=torch.float32)))
    if layout is not None:
        linear.spp_layout = layout


# ================================================================================================
# Compressed attention
# ================================================================================================
class _Grouped:
    """An attention module as transformers' attention functions read it (``module.num_key_value_groups``,
    ``module.training``, ...), with another key/value group size for one call: the module itself is not changed."""

    __slots__ = ("module", "num_key_value_groups")

    def __init__(self, module: nn.Module, groups: int):
        self.module, self.num_key_value_groups = module, groups

    def __getattr__(self, name: str):
        return getattr(self.module, name)


class PrunedDecoderAttention(nn.Module):
    """A decoder attention with pruned widths, a drop-in for the model's own (same call and return).

    ``num_heads`` query heads with ``qk_dim`` query-key and ``v_dim`` value dims each read
    ``num_kv_heads`` key/value heads: query head h reads ``kv_map[h]``. With RoPE, ``rope_index``
    picks the kept dims' entries of the model's cos/sin tables (kept pairs' original frequencies).
    ``scaling`` is the unpruned model's softmax scale. With partial RoPE (``widths.qk_rot_dim``) only the first
    ``qk_rot_dim`` query-key dims of a head rotate (``rope_index`` has that many entries), the rest are plain.
    ``fused_qkv``: one ``qkv_proj`` (Phi-3's layout) instead of three projections. ``is_causal=False`` (CLIP's
    vision tower) attends both ways unless the caller passes ``is_causal`` or a mask. ``head_norms``: the model's
    own query and key norms over each head's dims (Qwen3's ``q_norm`` / ``k_norm``; whole heads only), after which
    each query head's logits are scaled by ``qk_scale`` (its query-key mask value, which cannot be folded into
    weights a norm follows).
    """

    def __init__(self, config, layer_idx: int, dim: int, widths: Widths, *, rotary: bool, scaling: float,
                 biases: Tuple[bool, bool, bool, bool], out_proj: str = "o_proj", scale_query: bool = False,
                 attention_dropout: float = 0.0, sliding_window: Optional[int] = None, is_causal: bool = True,
                 head_norms: Optional[Tuple[nn.Module, nn.Module]] = None, fused_qkv: bool = False):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.num_kv_heads = widths.num_heads, widths.num_kv_heads or 0
        self.qk_dim, self.v_dim = widths.qk_dim, widths.v_dim
        self.scaling, self.scale_query, self.rotary = scaling, scale_query, rotary
        self.attention_dropout, self.sliding_window, self.is_causal = attention_dropout, sliding_window, is_causal
        self.out_proj_name = out_proj
        q_bias, k_bias, v_bias, o_bias = biases
        self.fused_qkv = fused_qkv
        self.split = [self.num_heads * self.qk_dim, self.num_kv_heads * self.qk_dim, self.num_kv_heads * self.v_dim]
        if fused_qkv:   # one qkv_proj (Phi-3's name and layout: query rows, then key rows, then value rows)
            self.qkv_proj = new_linear(dim, sum(self.split), q_bias)
        else:
            self.q_proj, self.k_proj, self.v_proj = (new_linear(dim, n, b) for n, b in zip(self.split, biases))
        setattr(self, out_proj, new_linear(self.num_heads * self.v_dim, dim, o_bias))
        self.head_norms = head_norms is not None
        if self.head_norms:   # the model's own names (q_norm, k_norm), so their weights load as they were saved
            self.q_norm, self.k_norm = (copy.deepcopy(n) for n in head_norms)
        # which kept key/value head each query head reads, and (RoPE) the kept dims' cos/sin entries; saved
        # in spp's config.json ("layout"), not with the weights, so the weights are the model's own names only
        self.register_buffer("kv_map", torch.zeros(self.num_heads, dtype=torch.long), persistent=False)
        rotated = self.qk_dim if widths.qk_rot_dim is None else widths.qk_rot_dim   # partial RoPE: the first ones
        self.register_buffer("rope_index", torch.arange(rotated, dtype=torch.long), persistent=False)
        self.register_buffer("slots", torch.arange(self.num_heads, dtype=torch.long), persistent=False)
        self.register_buffer("qk_scale", torch.ones(self.num_heads), persistent=False)
        self._refresh(torch.zeros(self.num_heads, dtype=torch.long, device="cpu"))

    def set_layout(self, kv_map: Sequence[int], rope_index: Optional[Sequence[int]] = None,
                   qk_scale: Optional[Sequence[float]] = None) -> None:
        """Which kept key/value head each query head reads, (RoPE) the kept dims' cos/sin entries and (head norms)
        each query head's scale of its logits."""
        kv_map = torch.as_tensor(kv_map, dtype=torch.long)
        self.kv_map.copy_(kv_map)   # on the meta device (a skeleton, spp.sharding) a no-op: the buffers come from rank 0
        if rope_index is not None:
            self.rope_index.copy_(torch.as_tensor(rope_index, dtype=torch.long))
        if qk_scale is not None:
            self.qk_scale.copy_(torch.as_tensor(qk_scale, dtype=torch.float32))
        self._refresh(kv_map)

    @property
    def layout(self) -> Dict[str, List]:
        out = {"kv_map": self.kv_map.tolist(), "rope_index": self.rope_index.tolist()}
        return {**out, "qk_scale": self.qk_scale.tolist()} if self.head_norms else out

    def _refresh(self, kv_map: torch.Tensor) -> None:
        """Use the model's repeat of key/value heads when every kept group has the same size, in order. Else
        a decoded token's query heads are placed in ``slots`` of equal groups (``group_max`` per key/value
        head, the empty ones zero), so that the attention reads the cache as it is instead of a copy per query
        head (what the dense model's grouped attention does too)."""
        h, kv = self.num_heads, self.num_kv_heads
        kv_map = kv_map.cpu()
        group = h // kv if kv and h % kv == 0 else 0
        self.standard_groups = bool(group) and torch.equal(kv_map, torch.arange(h, device="cpu") // group)
        self.num_key_value_groups = group if self.standard_groups else 1   # unequal groups: keys and values per query head
        self.group_max = int(torch.bincount(kv_map, minlength=kv).max()) if h else 0
        rank = [int((kv_map[:i] == kv_map[i]).sum()) for i in range(h)]   # a head's place within its group
        self.slots.copy_(kv_map * self.group_max + torch.tensor(rank, dtype=torch.long, device="cpu"))   # meta: no-op

    def _project(self, hidden_states: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if self.fused_qkv:
            return tuple(self.qkv_proj(hidden_states).split(self.split, -1))
        return self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                cache=None, past_key_values=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

        cache = cache if cache is not None else past_key_values
        B, T, _ = hidden_states.shape
        out_proj = getattr(self, self.out_proj_name)
        if not self.num_heads:   # no value dims left: the output projection's bias, and a placeholder cache entry
            if cache is not None:
                empty = hidden_states.new_zeros(B, 1, T, 1)
                cache.update(empty, empty, self.layer_idx, kwargs=kwargs)
            # the empty projections' (B, T, 0) outputs, so that every parameter is in the graph (DDP expects it)
            nothing = torch.cat(self._project(hidden_states), -1)
            return out_proj(nothing), None
        q, k, v = self._project(hidden_states)
        if self.scale_query:
            q = q * self.scaling
        q = q.view(B, T, self.num_heads, self.qk_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.qk_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.v_dim).transpose(1, 2)
        if self.head_norms and self.qk_dim:   # whole heads: the norms see every dim they saw unpruned
            q = self.q_norm(q) * self.qk_scale.to(q.dtype)[:, None, None]
            k = self.k_norm(k)
        rotated = self.rope_index.numel()
        if self.rotary and rotated:
            cos, sin = position_embeddings
            cos, sin = cos[..., self.rope_index], sin[..., self.rope_index]
            if rotated == self.qk_dim:
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
            else:   # partial RoPE: the rotated dims come first, the plain ones pass
                q_rot, k_rot = apply_rotary_pos_emb(q[..., :rotated], k[..., :rotated], cos, sin)
                q, k = torch.cat([q_rot, q[..., rotated:]], -1), torch.cat([k_rot, k[..., rotated:]], -1)
        if not self.qk_dim:   # no query-key dims: equal logits, i.e. uniform attention over the prefix (one zero
            q, k = F.pad(q, (0, 1)), F.pad(k, (0, 1))   # dim, padded on: the projections stay in the graph for DDP)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        padded = not self.standard_groups and T == 1   # a decoded token: its query heads in equal groups
        caller = self   # what the attention function reads num_key_value_groups (and the rest) from
        if padded:
            q = q.new_zeros(B, self.num_kv_heads * self.group_max, 1, q.shape[-1]).index_copy_(1, self.slots, q)
            caller = _Grouped(self, self.group_max)
        elif not self.standard_groups:   # a prompt: each query head's keys and values
            k, v = k[:, self.kv_map], v[:, self.kv_map]
        if T > 1:   # a prompt: one head width for the fused kernel (one decoded token: no copy of the cache)
            q, k, v = equal_widths(q, k, v)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attend(caller, q, k, v, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
                              scaling=1.0 if self.scale_query else self.scaling, sliding_window=self.sliding_window,
                              **kwargs)
        if padded:
            out = out[:, :, self.slots]
            weights = None if weights is None else weights[:, self.slots]
        return out_proj(out[..., :self.v_dim].reshape(B, T, -1).contiguous()), weights


# ================================================================================================
# The families
# ================================================================================================
class _DecoderFamily(ModelFamily):
    """What the Hugging Face decoders share; subclasses name the modules."""

    # a pretrained LLM's mask gradients are heavy-tailed: bound the step (spp.LBI's clip), and hold the masks nearer
    # their dense values while the path is taken (a larger ν): the measurements are in docs/ablations.md
    search_defaults = {"clip": 10.0, "nu_scale": 4.0}
    inputs = "text"
    auto_class = "AutoModelForCausalLM"

    rotary = True
    out_proj = "o_proj"
    mlp_in = ("mlp.gate_proj", "mlp.up_proj")   # the MLP's input projections within the layer
    mlp_out = "mlp.down_proj"
    scale_query = False
    head_norms = False   # q_norm / k_norm over each head's dims (Qwen3): whole heads only, the mask after the norm
    head_axis = -2       # where the model's q_norm sees the heads: (B, T, H, d) in Qwen3, (B, H, T, d) in Gemma 3
    fused_qkv = False    # one qkv_proj for the query, key and value rows (Phi-3)
    fused_gate_up = False   # one gate_up_proj: the gate's rows, then the up projection's (Phi-3)
    partial_rotary = False  # the family's attention rotates only the first dims of each head (Phi-3)

    # ----- structure -------------------------------------------------------------------------
    def decoder(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> List[nn.Module]:
        return list(self.decoder(model).layers)

    def _mlp_in(self, layer: nn.Module) -> List[nn.Linear]:
        return [layer.get_submodule(path) for path in self.mlp_in]

    def _check(self, model: nn.Module, name: str, layer: nn.Module) -> None:
        config = model.config
        attn = layer.self_attn
        for norm in () if self.head_norms else ("q_norm", "k_norm"):
            if isinstance(getattr(attn, norm, None), nn.Module):
                raise UnsupportedModel(f"{type(model).__name__}: {name}.self_attn.{norm} normalises over the head dim, "
                                       "so query-key masks cannot be folded into the weights; not supported")
        factor = _partial_rotary_factor(config)
        if factor != 1 and not self.partial_rotary:
            raise UnsupportedModel(f"{type(model).__name__}: partial rotary embeddings (partial_rotary_factor="
                                   f"{factor}) are not supported by the {self.name} family")
        if isinstance(attn, PrunedDecoderAttention):
            raise UnsupportedModel(f"{name}.self_attn is already compressed (PrunedDecoderAttention); prune the "
                                   "dense model, or load the compressed one to finetune it")
        if self.rotary and int(attn.head_dim * factor) % 2:
            raise UnsupportedModel(f"{name}: {int(attn.head_dim * factor)} rotated dims cannot hold rotary pairs")

    def tokens(self, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> int:
        if input_size is not None:
            return int(input_size[-1])
        return min(DEFAULT_TOKENS, getattr(model.config, "max_position_embeddings", DEFAULT_TOKENS) or DEFAULT_TOKENS)

    def geometry(self, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> List[DecoderGeometry]:
        names = {id(m): n for n, m in model.named_modules()}
        tokens = self.tokens(model, input_size)
        return [self._layer_geometry(model, names[id(layer)], i, layer, tokens)
                for i, layer in enumerate(self.blocks(model))]

    def _layer_geometry(self, model: nn.Module, name: str, index: int, layer: nn.Module, tokens: int,
                        part: str = "") -> DecoderGeometry:
        self._check(model, name, layer)
        attn, fcs = layer.self_attn, self._mlp_in(layer)
        out = layer.get_submodule(self.mlp_out)
        d = attn.head_dim
        (q, _), (k, _), (v, _) = self._qkv_rows(attn)
        if self.fused_qkv:
            heads, kv_heads = attn.config.num_attention_heads, attn.num_key_value_heads
        else:
            heads, kv_heads = q.out_features // d, k.out_features // d
        rot = int(d * _partial_rotary_factor(model.config)) if self.rotary else 0
        return DecoderGeometry(
            name=name, index=index, attn="self_attn", out_proj=self.out_proj, mlp_out=self.mlp_out,
            dim=q.in_features, num_heads=heads, num_kv_heads=kv_heads, head_dim=d,
            mlp_hidden=fcs[0].out_features // (2 if self.fused_gate_up else 1), tokens=tokens, rotary=self.rotary,
            q_bias=q.bias is not None, k_bias=k.bias is not None,
            v_bias=v.bias is not None, o_bias=getattr(attn, self.out_proj).bias is not None,
            gated=len(fcs) == 2 or self.fused_gate_up, mlp_in_bias=fcs[0].bias is not None,
            mlp_out_bias=out.bias is not None, part=part,
            qk_at="q_norm" if self.head_norms else "qkv_proj" if self.fused_qkv else "q_proj",
            rotary_dim=rot if rot < d else 0)

    def _qkv_rows(self, attn: nn.Module) -> List[Tuple[nn.Linear, int]]:
        """The linear layer and first row of the query, key and value projections (all one ``qkv_proj`` in Phi-3)."""
        if not self.fused_qkv:
            return [(attn.q_proj, 0), (attn.k_proj, 0), (attn.v_proj, 0)]
        d, heads, kv = attn.head_dim, attn.config.num_attention_heads, attn.num_key_value_heads
        return [(attn.qkv_proj, 0), (attn.qkv_proj, heads * d), (attn.qkv_proj, (heads + kv) * d)]

    def example_input(self, model: nn.Module, input_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        device = next(model.parameters()).device
        return torch.zeros(1, self.tokens(model, input_size), dtype=torch.long, device=device)

    # ----- masks -----------------------------------------------------------------------------
    def add_masks(self, model: nn.Module, granularity: str) -> None:
        for geom, layer in zip(self.geometry(model), self.blocks(model)):
            attn = layer.self_attn
            qk_layout = (geom.num_heads, geom.head_dim, geom.rot, granularity)
            qk_module = attn.get_submodule(geom.qk_at)
            _add_mask(qk_module, "qk_mask", geom.mask_size("qk", granularity), qk_layout)
            qk_module.spp_head_axis = self.head_axis
            qk_module.register_forward_hook(_qk_norm_hook if self.head_norms else _qkv_hook if self.fused_qkv
                                            else _qk_hook)
            o = getattr(attn, self.out_proj)
            _add_mask(o, "v_mask", geom.mask_size("v", granularity), (geom.num_heads, geom.head_dim, 0, granularity))
            o.register_forward_pre_hook(_v_hook)
            down = layer.get_submodule(self.mlp_out)
            _add_mask(down, "mlp_mask", geom.mlp_hidden)
            down.register_forward_pre_hook(_mlp_hook)

    def remove_masks(self, model: nn.Module) -> None:
        for module in model.modules():
            for attr in ("qk_mask", "v_mask", "mlp_mask", "spp_layout", "spp_head_axis"):
                if attr in module._parameters or attr in module.__dict__:
                    delattr(module, attr)
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                for key in [k for k, fn in hooks.items() if fn in _HOOKS]:
                    del hooks[key]

    def channels(self, block: nn.Module, geom: DecoderGeometry, granularity: str) -> Dict[str, List[Channels]]:
        attn, d = block.self_attn, geom.head_dim
        query = torch.arange(geom.num_heads * d)          # rows of q_proj, columns of o_proj: (head, dim)
        if granularity == "head":                         # a query head, with its key/value head's rows
            q_elem = v_elem = query // d
            kv_index = (query // d // geom.group) * d + query % d
            kv_qk = kv_v = (kv_index, q_elem)
        else:                                             # a dim (rotary pair) of every head
            entry = geom.qk_entry_of_dim()
            v_elem = query % d
            q_elem = entry[v_elem]
            kv_index = torch.arange(geom.num_kv_heads * d)
            kv_qk = (kv_index, entry[kv_index % d])
            kv_v = (kv_index, kv_index % d)
        neurons = torch.arange(geom.mlp_hidden)
        (q, q0), (k, k0), (v, v0) = self._qkv_rows(attn)
        if self.fused_gate_up:   # a neuron's gate row and its up row
            mlp_in = [Channels(self._mlp_in(block)[0], 0, torch.cat([neurons, neurons + geom.mlp_hidden]),
                               torch.cat([neurons, neurons]))]
        else:
            mlp_in = [Channels(fc, 0, neurons, neurons) for fc in self._mlp_in(block)]
        return {"qk": [Channels(q, 0, query + q0, q_elem), Channels(k, 0, kv_qk[0] + k0, kv_qk[1])],
                "v": [Channels(v, 0, kv_v[0] + v0, kv_v[1]), Channels(getattr(attn, self.out_proj), 1, query, v_elem)],
                "mlp": [*mlp_in, Channels(block.get_submodule(self.mlp_out), 1, neurons, neurons)]}

    # ----- compression -----------------------------------------------------------------------
    def replaced_modules(self, block: nn.Module) -> List[nn.Module]:
        return [block.self_attn, *self._mlp_in(block), block.get_submodule(self.mlp_out)]

    def _new_attention(self, source: nn.Module, geom: DecoderGeometry, w: Widths) -> PrunedDecoderAttention:
        return PrunedDecoderAttention(
            source.config, source.layer_idx, geom.dim, w, rotary=self.rotary, scaling=source.scaling,
            biases=(geom.q_bias, geom.k_bias, geom.v_bias, geom.o_bias), out_proj=self.out_proj,
            scale_query=self.scale_query,
            attention_dropout=getattr(source, "attention_dropout", getattr(source, "dropout", 0.0)),
            sliding_window=getattr(source, "sliding_window", None) or (   # Mistral and Phi-3 read it from the config
                getattr(source.config, "sliding_window", None) if type(source).__name__.startswith(("Mistral", "Phi3"))
                else None),
            is_causal=getattr(source, "is_causal", True),
            head_norms=(source.q_norm, source.k_norm) if self.head_norms else None, fused_qkv=self.fused_qkv)

    @torch.no_grad()
    def compress_block(self, block, source, geom: DecoderGeometry, masks, granularity: str) -> Widths:
        qk, v, mlp_mask = masks["qk"].float(), masks["v"].float(), masks["mlp"]
        w = geom.widths_from_masks(qk, v, mlp_mask, granularity)
        attn = source.self_attn
        H, K, d = geom.num_heads, geom.num_kv_heads, geom.head_dim
        if granularity == "dim":
            qk_full = qk[geom.qk_entry_of_dim()]                          # (d,) per head dim
            dims = torch.nonzero(qk_full).flatten() if w.qk_dim else qk_full.new_zeros(0, dtype=torch.long)
            v_dims = torch.nonzero(v).flatten()
            heads = torch.arange(H) if w.num_heads else torch.zeros(0, dtype=torch.long)
            kv_heads = torch.arange(K) if w.num_heads else torch.zeros(0, dtype=torch.long)
            q_scale = qk_full[dims].expand(len(heads), -1)                # (heads, qk_dim)
            v_scale = v[v_dims].expand(len(heads), -1)                    # (heads, v_dim)
        else:
            heads = torch.nonzero(v).flatten()
            kv_heads = torch.unique(heads // geom.group)
            dims = torch.arange(d) if w.qk_dim else torch.zeros(0, dtype=torch.long)
            v_dims = torch.arange(d) if w.v_dim else torch.zeros(0, dtype=torch.long)
            q_scale = (qk[heads] * (v[heads] != 0))[:, None].expand(-1, len(dims))
            v_scale = v[heads][:, None].expand(-1, len(v_dims))
        head_scale = None
        if self.head_norms:   # a norm follows q_proj: each head's scale goes on its logits, not into its rows
            head_scale, q_scale = q_scale[:, 0] if len(dims) else torch.zeros(len(heads)), None
        device, dtype = getattr(attn, self.out_proj).weight.device, getattr(attn, self.out_proj).weight.dtype
        new = self._new_attention(attn, geom, w)

        def rows(source_rows, head_index, dim_index, scale=None):
            linear, first = source_rows
            index = (first + head_index[:, None] * d + dim_index[None, :]).flatten().to(device)
            weight, bias = linear.weight[index], linear.bias[index] if linear.bias is not None else None
            if scale is not None:
                s = scale.flatten().to(device, dtype)
                weight, bias = weight * s[:, None], bias * s if bias is not None else None
            return weight, bias

        q_rows, k_rows, v_rows = self._qkv_rows(attn)
        q, k, v = rows(q_rows, heads, dims, q_scale), rows(k_rows, kv_heads, dims), rows(v_rows, kv_heads, v_dims)
        if self.fused_qkv:
            new.qkv_proj = copy_linear(torch.cat([q[0], k[0], v[0]]),
                                       torch.cat([q[1], k[1], v[1]]) if q[1] is not None else None)
        else:
            new.q_proj, new.k_proj, new.v_proj = copy_linear(*q), copy_linear(*k), copy_linear(*v)
        o = getattr(attn, self.out_proj)
        cols = (heads[:, None] * d + v_dims[None, :]).flatten().to(device)
        setattr(new, self.out_proj, copy_linear(o.weight[:, cols] * v_scale.flatten().to(device, dtype), o.bias))
        kv_position = {int(h): i for i, h in enumerate(kv_heads.tolist())}
        kv_map = torch.tensor([kv_position[int(h) // geom.group] for h in heads.tolist()], dtype=torch.long)
        new.set_layout(kv_map, dims[dims < geom.rot] if self.rotary else None, head_scale)
        block.self_attn = new.to(device)
        self._compress_mlp(block, source, mlp_mask)
        return w

    def _compress_mlp(self, block, source, mask: torch.Tensor) -> None:
        keep = torch.nonzero(mask).flatten()
        down = source.get_submodule(self.mlp_out)
        rows = torch.cat([keep, keep + down.in_features]) if self.fused_gate_up else keep   # gate rows, up rows
        for path, linear in zip(self.mlp_in, self._mlp_in(source)):
            _set(block, path, copy_linear(linear.weight[rows], linear.bias[rows] if linear.bias is not None else None))
        _set(block, self.mlp_out, copy_linear(down.weight[:, keep] * mask[keep].to(down.weight), down.bias))

    def resize_block(self, block: nn.Module, geom: DecoderGeometry, widths: Widths) -> None:
        weight = self._qkv_rows(block.self_attn)[0][0].weight
        like = dict(dtype=weight.dtype, device=weight.device)
        block.self_attn = self._new_attention(block.self_attn, geom, widths).to(**like)
        for path in self.mlp_in:
            rows = widths.mlp_hidden * (2 if self.fused_gate_up else 1)
            _set(block, path, new_linear(geom.dim, rows, geom.mlp_in_bias, **like))
        _set(block, self.mlp_out, new_linear(widths.mlp_hidden, geom.dim, geom.mlp_out_bias, **like))

    # ----- save / load -----------------------------------------------------------------------
    def layout(self, model: nn.Module) -> List[Dict[str, List[int]]]:
        return [layer.self_attn.layout for layer in self.blocks(model)]

    def set_layout(self, model: nn.Module, layout: List[Dict[str, List[int]]]) -> None:
        for layer, entry in zip(self.blocks(model), layout):
            layer.self_attn.set_layout(entry["kv_map"], entry["rope_index"] if self.rotary else None,
                                       entry.get("qk_scale"))

    def plain_config(self, model: nn.Module) -> Optional[Dict[str, Any]]:
        """The model's own transformers config at the pruned widths, when every layer keeps the same number of
        whole heads (query-key and value dims uncut, key/value groups equal and in order) and the same MLP
        width. A member with fewer dims per head needs its original softmax scale and rotary frequencies,
        which a plain config cannot state; it loads with :func:`spp.load_pruned` only."""
        widths, attns = model.spp_widths, [layer.self_attn for layer in self.blocks(model)]
        w, d = widths[0], model.config.to_dict().get("head_dim") or model.config.hidden_size // model.config.num_attention_heads
        if not (all(x == w for x in widths) and w.num_heads and w.num_qk_heads == w.num_heads
                and w.qk_dim == w.v_dim == d and all(a.standard_groups for a in attns)
                and all(bool((a.qk_scale == 1).all()) for a in attns)):   # head norms: logits scaled only by 1
            return None
        return self._plain(model.config.to_dict(), w)

    def _plain(self, config: Dict[str, Any], w: Widths) -> Optional[Dict[str, Any]]:
        return {**config, "num_attention_heads": w.num_heads, "num_key_value_heads": w.num_kv_heads,
                "head_dim": w.qk_dim, "intermediate_size": w.mlp_hidden}

    def describe(self, model: nn.Module) -> Dict[str, Any]:
        config = model.config.to_dict()
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")   # what the weights are, whatever config says
        return {"class": f"{type(model).__module__}.{type(model).__qualname__}", "config": config, "dtype": dtype,
                "attn_implementation": getattr(model.config, "_attn_implementation", None)}

    def build(self, base: Mapping[str, Any]) -> nn.Module:
        import importlib

        from transformers import AutoConfig
        config = dict(base["config"])
        config = AutoConfig.for_model(config.pop("model_type"), **config)
        if base.get("attn_implementation"):
            config._attn_implementation = base["attn_implementation"]
        module, _, name = base["class"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        dtype = getattr(torch, base.get("dtype", "float32"))
        # built in its saved dtype (a bf16 model never exists in float32); the dense layers are replaced by
        # the pruned ones before the weights load, so the process holds one dense model's worth at most
        return cls._from_config(config, dtype=dtype).eval()


def _partial_rotary_factor(config) -> float:
    """The share of each head's dims that RoPE rotates (1.0 for most models; Phi-4-mini's 0.75), wherever the
    config keeps it (transformers 5 moved it into ``rope_parameters``)."""
    factor = getattr(config, "partial_rotary_factor", None)
    parameters = getattr(config, "rope_parameters", None)
    if factor is None and isinstance(parameters, Mapping):
        factor = parameters.get("partial_rotary_factor")
    return float(factor) if factor is not None else 1.0


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


class LlamaFamily(_DecoderFamily):
    """``hf-llama``: transformers Llama, Mistral, Qwen2 (RoPE, grouped-query attention)."""
    name = "hf-llama"
    description = "transformers LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (and their *Model)"

    def decoder(self, model: nn.Module) -> nn.Module:
        return model.model if hasattr(model, "lm_head") else model


class Qwen3Family(LlamaFamily):
    """``hf-qwen3``: transformers Qwen3 (per-head q/k RMS norms, GQA, optional sliding window): whole heads."""
    name = "hf-qwen3"
    description = "transformers Qwen3ForCausalLM (and Qwen3Model): whole query heads, MLP neurons"
    head_norms = True
    granularities = ("head",)
    granularity_note = ("q_norm / k_norm normalise each head's query and key over all its dims, so removing some "
                        "dims of a head changes what the norm divides by; whole heads stay exact")


class Gemma3Family(Qwen3Family):
    """``hf-gemma3``: transformers Gemma 3's text model (per-head q/k RMS norms: whole heads).

    What else Gemma 3 does stays outside the pruned modules and so stays exact: sliding-window and global layers
    (each compressed attention keeps its layer's window and receives its layer type's rotary tables),
    ``query_pre_attn_scalar`` (the softmax scale is the source attention's, not recomputed from kept dims), the
    embedding scale √hidden, the GeGLU MLP (only its neurons are cut) and the norms before and after each block.
    A layer whose query heads all go drops its attention exactly: the output projection then writes zeros, which
    the post-attention norm keeps at zero, as the masked model computes."""
    name = "hf-gemma3"
    description = "transformers Gemma3ForCausalLM (and Gemma3TextModel): whole query heads, MLP neurons"
    head_axis = -3


class Phi3Family(LlamaFamily):
    """``hf-phi3``: transformers Phi-3 / Phi-4 (fused ``qkv_proj`` and ``gate_up_proj``, partial RoPE, GQA).

    The fused projections are sliced by parts: a query-key entry takes its rows from the query and the key parts
    of ``qkv_proj``, a value dim its rows from the value part, a neuron its gate row and its up row of
    ``gate_up_proj``; the compressed model keeps both fused (its weights keep Phi-3's names). With a partial rotary
    factor (Phi-4-mini: 0.75) only the first ``rot`` dims of a head rotate: they form the pairs (j, j + rot/2); each
    dim after them is a plain dim with its own query-key entry."""
    name = "hf-phi3"
    description = ("transformers Phi3ForCausalLM (and Phi3Model): Phi-3, Phi-3.5, Phi-4 (fused projections, "
                   "partial RoPE)")
    mlp_in = ("mlp.gate_up_proj",)
    fused_qkv = fused_gate_up = partial_rotary = True

    def _plain(self, config: Dict[str, Any], w: Widths) -> Optional[Dict[str, Any]]:
        rope = config.get("rope_parameters") or {}
        if rope.get("short_factor") is not None and w.num_heads != config["num_attention_heads"]:
            return None   # LongRoPE's factors are checked against hidden_size / heads, which fewer heads change
        return super()._plain(config, w)


class OPTFamily(_DecoderFamily):
    """``hf-opt``: transformers OPT (learned positions, biases, query scaled before the product)."""
    name = "hf-opt"
    description = "transformers OPTForCausalLM (and OPTModel)"
    rotary = False
    out_proj = "out_proj"
    mlp_in = ("fc1",)
    mlp_out = "fc2"
    scale_query = True

    def decoder(self, model: nn.Module) -> nn.Module:
        return model.model.decoder if hasattr(model, "lm_head") else model.decoder


    def _plain(self, config: Dict[str, Any], w: Widths) -> Optional[Dict[str, Any]]:
        if w.num_heads != config["num_attention_heads"]:   # OPT's head dim is hidden_size / heads
            return None
        return {**config, "ffn_dim": w.mlp_hidden}


LLAMA, QWEN3, GEMMA3, PHI3, OPT = LlamaFamily(), Qwen3Family(), Gemma3Family(), Phi3Family(), OPTFamily()
