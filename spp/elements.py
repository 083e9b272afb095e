"""Element masks: unstructured and N:M sparsity of every linear layer in a model's blocks, from one search.

One entry per weight of each linear layer inside the family's blocks (a Llama's ``q/k/v/o_proj`` and
``gate/up/down_proj``). :func:`element_search` runs a Linearized Bregman iteration over them block by block: the
solution path of each layer's sparse reconstruction problem on calibration inputs ``X`` (``n`` tokens),

    min ‖X W'ᵀ − X Wᵀ‖² / n   over W' with few non-zeros,

written in activation-scaled coordinates ``W̃ = W diag(‖X_j‖)`` (the paper's LLM metric, weight magnitude times
input activation norm, is ``|W̃|``) and needing only the inputs' Gram matrix. The support of the sparse companion
``Γ`` grows from empty to full; each weight's entry time ranks it (earlier is more important; ties and weights
that never entered by ``|z|``), so one search gives a member at every sparsity and every N:M pattern
(:func:`element_masks`). With uncorrelated inputs the order is ``|W̃|``'s, Wanda's; with correlated ones (as in
LLMs) the path also sees weights that cancel each other and weights that stand in for a removed one.

Every block reads the dense model's inputs to it, so the family does not depend on which member is read. Memory:
one block's Gram matrices and iterates at a time, and the path: 4 bytes per weight (an int16 entry time and a
float16 ``z``), kept on the CPU.

Members are applied in place (:func:`prune_weights`): the model stays dense with zeros, saved by its library
(``save_pretrained``) and loaded by it untouched. The one-shot pruners the search is measured against (magnitude,
Wanda, RIA, SparseGPT) and SparseGPT's reconstruction of the kept weights for any member are in
:mod:`spp.element_criteria`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .files import atomic_write
from .models import family_of

__all__ = ["element_layers", "BlockInputs", "input_grams", "ElementPath", "element_search", "element_masks",
           "parse_pattern", "prune_weights", "sparsity_of", "to_semi_structured"]



def element_layers(model: nn.Module, blocks: Optional[Sequence[nn.Module]] = None) -> Dict[str, nn.Linear]:
    """``{qualified name: linear}``: every ``nn.Linear`` inside the family's blocks (or ``blocks``), in order."""
    names = {id(m): n for n, m in model.named_modules()}
    layers = {}
    for block in family_of(model).blocks(model) if blocks is None else blocks:
        for module in block.modules():
            if isinstance(module, nn.Linear):
                layers[names[id(module)]] = module
    return layers


class _Stop(Exception):
    """Raised by the last block's pre-hook: the dense pass has what it needs."""


def _default_forward(model: nn.Module) -> Callable[[nn.Module, torch.Tensor], object]:
    if family_of(model).inputs == "text":   # no KV cache: a block replayed with a cache would read its own past
        return lambda m, x: m(x, use_cache=False)
    return lambda m, x: m(x)


class BlockInputs:
    """Calibration inputs walked block by block, as SparseGPT and Wanda walk them: one dense pass records each
    block's call (its arguments: attention mask, rotary embeddings ...) and the first block's hidden states;
    :meth:`run` then calls one block on the current hidden states of every batch and :meth:`advance` moves them to
    the block's outputs. Only one block's inputs are held at a time.

    ``batches``: the model's inputs (token ids); ``forward(model, x)`` runs the model (default: without the KV
    cache for a causal LM)."""

    def __init__(self, model: nn.Module, batches: Iterable[torch.Tensor],
                 forward: Optional[Callable[[nn.Module, torch.Tensor], object]] = None):
        self.blocks = list(family_of(model).blocks(model))
        forward = forward or _default_forward(model)
        self.calls: List[List[Tuple[tuple, dict, bool]]] = [[] for _ in self.blocks]
        self.hidden: List[torch.Tensor] = []
        last = len(self.blocks) - 1

        def capture(index):
            def hook(module, args, kwargs):
                kwargs = dict(kwargs)
                if "past_key_values" in kwargs:
                    kwargs["past_key_values"] = None
                hidden = args[0] if args else kwargs.pop("hidden_states")
                # the call without its hidden states (each block's would be a copy of the activations)
                self.calls[index].append((tuple(args[1:]), kwargs, bool(args)))
                if index == 0:
                    self.hidden.append(hidden.detach())
                if index == last:
                    raise _Stop
            return hook

        handles = [b.register_forward_pre_hook(capture(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        try:
            with torch.no_grad():
                for x in batches:
                    try:
                        forward(model, x)
                    except _Stop:
                        pass
        finally:
            for h in handles:
                h.remove()
        if not self.hidden:
            raise ValueError("BlockInputs: no calibration batches (the iterable was empty)")

    @torch.no_grad()
    def run(self, index: int, block: Optional[nn.Module] = None) -> List[torch.Tensor]:
        """Block ``index`` (or ``block`` in its place) on every batch's current hidden states: its outputs."""
        block = self.blocks[index] if block is None else block
        outputs = []
        for hidden, (args, kwargs, positional) in zip(self.hidden, self.calls[index]):
            out = block(hidden, *args, **kwargs) if positional else block(hidden_states=hidden, **kwargs)
            outputs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())
        return outputs

    def advance(self, index: int, outputs: List[torch.Tensor]) -> None:
        """Block ``index``'s outputs become the next block's inputs (its recorded call is dropped)."""
        self.hidden = outputs
        self.calls[index] = []


@dataclass
class Gram:
    """``XᵀX`` of one linear layer's inputs summed over ``tokens`` tokens (float32, on the layer's device)."""
    xtx: torch.Tensor
    tokens: int = 0

    def mean(self) -> torch.Tensor:
        """``Ĥ = XᵀX / n``."""
        return self.xtx / max(self.tokens, 1)

    def norms(self) -> torch.Tensor:
        """Each input's ℓ2 norm over the tokens, ``‖X_j‖`` (Wanda's activation norm)."""
        return self.xtx.diagonal().clamp_min(0).sqrt()


def input_grams(layers: Dict[str, nn.Linear], run: Callable[[], object]) -> Dict[str, Gram]:
    """The Gram matrices of ``layers``' inputs while ``run()`` runs (layers fed the same tensor, such as
    ``q/k/v_proj``, share one :class:`Gram` object). Padding is not excluded: every token counts."""
    grams: Dict[str, Gram] = {}
    last: List = [None, None]   # the input tensor the previous layer read, and that layer's name

    def hook(name):
        def accumulate(module, inputs):
            x = inputs[0]
            if x is last[0]:     # the same tensor as the layer before (k_proj after q_proj): share its Gram
                grams[name] = grams[last[1]]
                return
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            gram = grams.get(name) or Gram(torch.zeros(flat.shape[1], flat.shape[1], device=flat.device))
            gram.xtx.addmm_(flat.T, flat)
            gram.tokens += flat.shape[0]
            grams[name] = gram
            last[:] = [x, name]
        return accumulate

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
        last[:] = [None, None]
    return grams


class ElementPath:
    """Where each weight entered the support of Γ in :func:`element_search`: ``entry[name]`` (int16, in ``steps``-ths
    of the layer's run; above ``steps`` if it never did) and ``z[name]`` (float16, the dual variable at the end),
    one tensor per linear layer, shaped as its weight."""

    def __init__(self, entry: Dict[str, torch.Tensor], z: Dict[str, torch.Tensor], steps: int):
        self.entry, self.z, self.steps = entry, z, steps

    def scores(self, name: str) -> torch.Tensor:
        """Layer ``name``'s ranking (float64, higher is kept first): entry time, ties (and weights that never
        entered) by larger ``|z|``."""
        z = self.z[name].double().abs() / self.z[name].double().abs().max().clamp_min(1e-30)
        return -self.entry[name].double() + torch.atan(z) / math.pi    # atan/π lies in [0, 1/2)

    def reach(self) -> float:
        """The fraction of the weights that entered the support."""
        entered = sum(int((e <= self.steps).sum()) for e in self.entry.values())
        return entered / max(1, sum(e.numel() for e in self.entry.values()))

    def save(self, path: str) -> None:
        """Write the path as safetensors (atomically)."""
        from safetensors.torch import save_file
        tensors = {**{f"entry/{n}": t.contiguous() for n, t in self.entry.items()},
                   **{f"z/{n}": t.contiguous() for n, t in self.z.items()}}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"steps": str(self.steps)}))

    @classmethod
    def load(cls, path: str) -> "ElementPath":
        """Read a path :meth:`save` wrote (no pickles)."""
        from safetensors import safe_open
        entry, z = {}, {}
        with safe_open(path, "pt") as f:
            steps = int(f.metadata()["steps"])
            for key in f.keys():
                kind, name = key.split("/", 1)
                (entry if kind == "entry" else z)[name] = f.get_tensor(key)
        return cls(entry, z, steps)


SCALE = 10_000   # entry times are stored in units of 1/SCALE of each layer's run


def _search_layer(w: torch.Tensor, h: torch.Tensor, steps: int, enter_at: float, kappa: float, nu_scale: float,
                  correlations: bool = True, damp: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """The LBI over one layer's weights (see :func:`element_search`): entry times (int16, in 1/SCALE of the run),
    final z over λ (float16) and the relative reconstruction error of the support's weights at the end."""
    h = h + damp * torch.diag(h.diagonal()) if correlations else h    # SparseGPT's dampening, relative to each input
    norms = h.diagonal().clamp_min(0).sqrt()
    scaled = w * norms                                              # W̃ = W diag(‖X_j‖): Wanda's metric, signed
    live = norms > 0
    corr = h / torch.outer(norms, norms).clamp_min(1e-30)
    corr = corr * torch.outer(live, live) if correlations else torch.diag(live.to(h.dtype))
    corr.diagonal().copy_(torch.ones_like(norms))                     # the inputs' correlation matrix C
    inv_nu = 2.0 / nu_scale
    # the exact minimiser of the augmented loss over W' for a given Γ: W' = W̃ A + Γ B
    inverse = torch.linalg.inv((2 * corr + inv_nu * torch.eye(len(norms), dtype=h.dtype, device=h.device)).double())
    a_mat = (2 * corr.double() @ inverse).to(w.dtype)
    b_mat = (inv_nu * inverse).to(w.dtype)
    held = scaled @ a_mat
    lam = float(scaled.pow(2).mean().sqrt()) or 1.0   # λ: the layer's RMS, so a weight held there enters at enter_at
    rate = 1.0 / (enter_at * steps)                   # α/ν
    z, gamma = torch.zeros_like(w), torch.zeros_like(w)
    first = torch.full(w.shape, SCALE + 1, dtype=torch.int32, device=w.device)
    current = held
    for step in range(1, steps + 1):
        coupling = current - gamma
        z.add_(coupling, alpha=rate)                                          # z += (α/ν)(W' − Γ)
        gamma = kappa * z.sign() * (z.abs() - lam).clamp_min(0)               # Γ = κ shrink(z, λ)
        current = held + (gamma * b_mat.diagonal() if not correlations else gamma @ b_mat)
        new = (gamma != 0) & (first > SCALE)
        if new.any():   # the entry time, interpolated within the step at which |z| crossed λ
            late = ((z.abs() - lam) / (rate * coupling.abs()).clamp_min(1e-30)).clamp(0, 1)
            first[new] = (SCALE * (step - late[new]) / steps).round().to(first.dtype)
    delta = (gamma != 0) * scaled - scaled
    error = float(((delta @ corr) * delta).sum()) / max(float(((scaled @ corr) * scaled).sum()), 1e-30)
    return first.to(torch.int16).cpu(), (z / lam).clamp(-6e4, 6e4).to(torch.float16).cpu(), error


def element_search(model: nn.Module, batches: Iterable[torch.Tensor], *, steps: int = 50, enter_at: float = 0.25,
                   kappa: float = 10.0, nu_scale: float = 100.0, correlations: bool = True, damp: float = 0.1,
                   forward: Optional[Callable[[nn.Module, torch.Tensor], object]] = None,
                   progress: Optional[Callable[[str], None]] = print) -> ElementPath:
    """SPP's path over every weight of every linear layer in ``model``'s blocks, block by block (module docstring).
    ``batches``: calibration inputs (token ids), read once. The model is not changed.

    Per layer, in activation-scaled coordinates ``W̃ = W diag(‖X_j‖)`` (the inputs then have unit norm and
    correlation matrix ``C``): the LBI's weights ``W'`` follow ``L = tr((W' − W̃) C (W' − W̃)ᵀ)`` coupled to the sparse
    ``Γ`` with ``1/ν = 2 / nu_scale`` (``C``'s diagonal dampened by ``damp`` first, as SparseGPT dampens its Hessian:
    a calibration set has fewer independent directions than an LLM layer has inputs); each step takes the exact minimiser over ``W'`` (one matrix product), then
    ``z += (α/ν)(W' − Γ)`` and ``Γ = κ shrink(z, λ)``, with ``λ`` the RMS of the layer's ``W̃`` and ``α/ν =
    1 / (enter_at · steps)``: a weight held at the RMS enters at ``enter_at`` of the run. With ``correlations=False`` (``C = I``) each weight's entry time falls with
    ``|W_ij|·‖X_j‖`` alone: the paper's LLM metric; with them, weights that cancel leave together and weights that
    compensate for a removed one enter earlier. Entry times are stored in ten-thousandths of the run."""
    for name, value in (("steps", steps), ("enter_at", enter_at), ("kappa", kappa), ("nu_scale", nu_scale)):
        if not value > 0:
            raise ValueError(f"element_search: {name}={value!r} must be > 0")
    if not damp >= 0:
        raise ValueError(f"element_search: damp={damp!r} must be >= 0")
    inputs = BlockInputs(model, batches, forward)
    entry, z, start = {}, {}, time.time()
    for index, block in enumerate(inputs.blocks):
        layers = element_layers(model, [block])
        outputs: List[torch.Tensor] = []
        grams = input_grams(layers, lambda: outputs.extend(inputs.run(index)))
        inputs.advance(index, outputs)
        errors = []
        for name, layer in layers.items():
            entry[name], z[name], error = _search_layer(layer.weight.detach().float(), grams[name].mean(), steps,
                                                        enter_at, kappa, nu_scale, correlations, damp)
            errors.append(error)
        del grams
        if progress is not None:
            progress(f"element search: block {index + 1}/{len(inputs.blocks)}, relative reconstruction error of the "
                     f"support at the end {sum(errors) / len(errors):.3g}, {time.time() - start:.0f} s")
    return ElementPath(entry, z, SCALE)


def parse_pattern(pattern: Union[str, Tuple[int, int], None]) -> Optional[Tuple[int, int]]:
    """``"2:4"`` (or ``(2, 4)``) as ``(n, m)``: keep ``n`` of every ``m`` consecutive input weights; None stays None."""
    if pattern is None:
        return None
    try:
        n, m = (int(v) for v in (pattern.split(":") if isinstance(pattern, str) else pattern))
    except (ValueError, TypeError):
        raise ValueError(f"N:M pattern {pattern!r}: write it as 'N:M' with whole numbers, e.g. '2:4'") from None
    if not 0 < n < m:
        raise ValueError(f"N:M pattern {pattern!r}: need 0 < N < M (keep N of every M weights), e.g. '2:4'")
    return n, m


def _check_widths(shapes: Dict[str, Tuple[int, int]], m: int) -> None:
    bad = {name: shape[1] for name, shape in shapes.items() if shape[1] % m}
    if bad:
        widths = sorted(set(s[1] for s in shapes.values()))
        common = math.gcd(*widths)
        fits = [d for d in range(2, min(common, 64) + 1) if common % d == 0]
        name, width = next(iter(bad.items()))
        raise ValueError(f"an N:M pattern with M={m} needs every layer's input width divisible by {m}; {len(bad)} "
                         f"layers are not (e.g. {name}: {width}). Input widths here: {widths}; M values that divide "
                         f"them all: {fits or 'none'}")


def element_masks(scores: Union[ElementPath, Dict[str, torch.Tensor]], sparsity: Optional[float] = None,
                  pattern: Union[str, Tuple[int, int], None] = None, scope: str = "row") -> Dict[str, torch.Tensor]:
    """``{layer: bool mask}`` (True: kept) of the member at ``sparsity`` (the fraction of weights removed) or
    N:M ``pattern`` (keep the ``n`` ranked highest of every ``m`` consecutive input weights of a row), from a
    path or ``{layer: scores}`` (higher kept first: :mod:`spp.element_criteria`). ``scope`` for a sparsity:
    ``"row"`` (each output row keeps the same number of weights: Wanda's comparison group) or ``"layer"``."""
    if (sparsity is None) == (pattern is None):
        raise ValueError("element_masks: give a sparsity (e.g. 0.5) or an N:M pattern (e.g. '2:4'), not both")
    names = list(scores.entry if isinstance(scores, ElementPath) else scores)
    score_of = scores.scores if isinstance(scores, ElementPath) else scores.__getitem__
    out = {}
    if pattern is not None:
        n, m = parse_pattern(pattern)
        _check_widths({name: tuple(score_of(name).shape) for name in names}, m)
        for name in names:
            s = score_of(name)
            groups = s.reshape(s.shape[0], -1, m)
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(n, dim=-1).indices, True)
            out[name] = keep.reshape(s.shape)
        return out
    if not 0 <= sparsity < 1:
        raise ValueError(f"element_masks: sparsity={sparsity!r} must lie in [0, 1) (the fraction of weights removed)")
    if scope not in ("row", "layer"):
        raise ValueError(f"element_masks: scope={scope!r}; use 'row' or 'layer'")
    for name in names:
        s = score_of(name)
        flat = s if scope == "row" else s.reshape(1, -1)
        kept = flat.shape[1] - int(round(flat.shape[1] * sparsity))
        keep = torch.zeros_like(flat, dtype=torch.bool)
        if kept:
            keep.scatter_(1, flat.topk(kept, dim=1).indices, True)
        out[name] = keep.reshape(s.shape)
    return out


@torch.no_grad()
def prune_weights(model: nn.Module, masks: Dict[str, torch.Tensor]) -> nn.Module:
    """Zero the weights ``masks`` (from :func:`element_masks`) remove, in place; the model stays dense. A mask
    whose shape differs from its layer's weight is refused with both shapes."""
    for name, keep in masks.items():
        weight = model.get_submodule(name).weight
        if tuple(keep.shape) != tuple(weight.shape):
            raise ValueError(f"prune_weights: the mask for {name} has shape {tuple(keep.shape)}, its weight "
                             f"{tuple(weight.shape)}: masks from another model?")
        weight.mul_(keep.to(weight.device, weight.dtype))
    return model


def sparsity_of(model: nn.Module) -> float:
    """The fraction of zero weights over the linear layers of the model's blocks."""
    layers = element_layers(model)
    zeros = sum(int((layer.weight == 0).sum()) for layer in layers.values())
    return zeros / max(1, sum(layer.weight.numel() for layer in layers.values()))


@torch.no_grad()
def to_semi_structured(model: nn.Module) -> nn.Module:
    """Give every linear layer of a 2:4 member (:func:`prune_weights` with ``pattern="2:4"``) a weight in
    PyTorch's semi-structured sparse format (``torch.sparse.to_sparse_semi_structured``), which NVIDIA's sparse
    tensor cores multiply at up to twice the dense speed, in place. Needs the model on a CUDA device in float16 or
    bfloat16 (the format's requirement); a layer that breaks the 2:4 pattern is refused by name."""
    from torch.sparse import to_sparse_semi_structured
    for name, layer in element_layers(model).items():
        weight = layer.weight
        if weight.device.type != "cuda" or weight.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"to_semi_structured: {name} is {weight.dtype} on {weight.device}; the semi-structured "
                             "format needs a CUDA device and float16 or bfloat16 (model.to('cuda', torch.bfloat16))")
        if weight.shape[1] % 4 or ((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) > 2).any():
            raise ValueError(f"to_semi_structured: {name} is not 2:4 sparse (some group of 4 consecutive input weights "
                             "keeps more than 2); prune it with element_masks(..., pattern='2:4') first")
        layer.weight = nn.Parameter(to_sparse_semi_structured(weight.detach()), requires_grad=False)
    return model
