"""One-shot unstructured and N:M pruners, the baselines of :func:`spp.elements.element_search`.

Each ranks every weight of a linear layer (higher is kept) from the weight and its input Gram matrix
(:class:`spp.elements.Gram`), so that members are cut by the same :func:`spp.elements.element_masks` as SPP's:

- ``magnitude``: ``|W_ij|``.
- ``wanda``: ``|W_ij| · ‖X_j‖`` (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models",
  ICLR 2024), compared within each output row.
- ``ria``: relative importance times activations, ``(|W_ij| / Σ_i |W_ij| + |W_ij| / Σ_j |W_ij|) · ‖X_j‖^0.5``
  (Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning Method for Large Language Models", ICLR 2024).
- ``sparsegpt``: :func:`sparsegpt_update`, the OBS update of Frantar & Alistarh ("SparseGPT: Massive Language
  Models Can Be Accurately Pruned in One-Shot", ICML 2023): columns pruned left to right, each pruned weight's
  error spread over the columns still to come through the inverse Hessian's Cholesky factor, its mask chosen
  adaptively per 128 columns; with ``keep`` it reconstructs the weights for a given mask (any method's).

Two ways to rewrite the weights a mask keeps (``prune_one_shot(..., update=)``): ``"obs"``, SparseGPT's update,
which spreads each pruned weight's error over the columns after it only; ``"refit"`` (:func:`refit`), the exact
least-squares fit of each output row's kept weights to the dense row's outputs on the calibration inputs.

:func:`prune_one_shot` runs any of them block by block, each block's Gram matrices read from the already pruned
blocks' outputs, as their papers do.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from .elements import BlockInputs, Gram, element_layers, element_masks, input_grams, parse_pattern

__all__ = ["SCORES", "magnitude", "wanda", "ria", "sparsegpt_update", "refit", "prune_one_shot", "METHODS", "UPDATES"]


def magnitude(weight: torch.Tensor, gram: Optional[Gram] = None) -> torch.Tensor:
    """``|W|``."""
    return weight.detach().float().abs()


def wanda(weight: torch.Tensor, gram: Gram) -> torch.Tensor:
    """``|W_ij| · ‖X_j‖``."""
    return weight.detach().float().abs() * gram.norms().to(weight.device)


def ria(weight: torch.Tensor, gram: Gram, power: float = 0.5) -> torch.Tensor:
    """``(|W_ij| / Σ_i |W_ij| + |W_ij| / Σ_j |W_ij|) · ‖X_j‖^power``."""
    w = weight.detach().float().abs()
    relative = w / w.sum(0, keepdim=True).clamp_min(1e-12) + w / w.sum(1, keepdim=True).clamp_min(1e-12)
    return relative * gram.norms().to(weight.device).pow(power)


SCORES: Dict[str, Callable[[torch.Tensor, Gram], torch.Tensor]] = {"magnitude": magnitude, "wanda": wanda, "ria": ria}
METHODS = (*SCORES, "sparsegpt")
UPDATES = ("obs", "refit")   # how prune_one_shot rewrites the kept weights (None: it keeps them as they are)


@torch.no_grad()
def sparsegpt_update(weight: torch.Tensor, gram: Gram, sparsity: Optional[float] = None,
                     pattern: Union[str, Tuple[int, int], None] = None, keep: Optional[torch.Tensor] = None,
                     block: int = 128, damp: float = 0.01) -> torch.Tensor:
    """The pruned and reconstructed weight (a new tensor, ``weight``'s dtype): at ``sparsity`` (the mask chosen per
    ``block`` columns by ``w² / [H⁻¹]_jj²``), at N:M ``pattern`` (per group of ``m`` columns), or for the mask
    ``keep`` (True: kept). ``damp``: the fraction of the mean diagonal added to ``H`` before inverting it."""
    if sum(x is not None for x in (sparsity, pattern, keep)) != 1:
        raise ValueError("sparsegpt_update: give exactly one of sparsity, pattern or keep")
    nm = parse_pattern(pattern)
    w = weight.detach().float().clone()
    h = gram.xtx.to(w.device, torch.float32).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    rows, cols = w.shape
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w1, hinv1 = w[:, start:end].clone(), hinv[start:end, start:end]
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        diag = hinv1.diagonal()
        if keep is not None:
            prune = ~keep[:, start:end].to(w.device, torch.bool)
        elif nm is None:
            saliency = w1.pow(2) / diag.pow(2)
            count = int(saliency.numel() * sparsity)
            prune = torch.zeros_like(w1, dtype=torch.bool)
            if count:
                prune.view(-1)[saliency.view(-1).topk(count, largest=False).indices] = True
        else:
            prune = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(end - start):
            if nm is not None and keep is None and i % nm[1] == 0:
                saliency = w1[:, i:i + nm[1]].pow(2) / diag[i:i + nm[1]].pow(2)
                drop = saliency.topk(nm[1] - nm[0], dim=1, largest=False).indices
                prune[:, i:i + nm[1]].scatter_(1, drop, True)
            col = w1[:, i]
            q = col.masked_fill(prune[:, i], 0)
            q1[:, i] = q
            err = (col - q) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, start:end] = q1
        w[:, end:] -= err1 @ hinv[start:end, end:]
    return w.to(weight.dtype)


@torch.no_grad()
def refit(weight: torch.Tensor, gram: Gram, keep: torch.Tensor, damp: float = 0.01,
          memory: float = 2 ** 29) -> torch.Tensor:
    """The weight for the mask ``keep`` (True: kept) whose every output row best reproduces the dense row's outputs
    on the calibration inputs: the kept weights ``ŵ_S`` of a row minimise ``‖X ŵ_S − X w‖² + δ‖ŵ_S − w_S‖²``
    (δ: ``damp`` times the mean diagonal of ``H = XᵀX``, SparseGPT's dampening), i.e. solve
    ``(H_SS + δI) ŵ_S = ((H + δI) w)_S``; pruned weights are 0, and a row that keeps everything is unchanged.
    Rows with the same number of kept weights are solved together, ``memory`` bytes of sub-matrices at a time.
    Returns a new tensor in ``weight``'s dtype."""
    w = weight.detach().float()
    h = gram.xtx.to(w.device, torch.float32).clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    keep = keep.to(w.device, torch.bool)
    target = w @ h                    # row r: H w_r (H is symmetric)
    out = torch.zeros_like(w)
    counts = keep.sum(1)
    for k in counts.unique().tolist():
        if not k:
            continue
        rows = torch.nonzero(counts == k).flatten()
        chunk = max(1, int(memory // (4 * k * k)))
        for start in range(0, len(rows), chunk):
            r = rows[start:start + chunk]
            index = torch.nonzero(keep[r])[:, 1].view(len(r), k)          # each row's kept columns, in order
            solution = torch.linalg.solve(h[index[:, :, None], index[:, None, :]],
                                          target[r].gather(1, index).unsqueeze(-1)).squeeze(-1)
            out[r] = out[r].scatter(1, index, solution)
    return out.to(weight.dtype)


@torch.no_grad()
def prune_one_shot(model: nn.Module, batches: Iterable[torch.Tensor], method: Optional[str] = None,
                   sparsity: Optional[float] = None,
                   pattern: Union[str, Tuple[int, int], None] = None, scope: str = "row",
                   keep: Optional[Dict[str, torch.Tensor]] = None, sequential: bool = True,
                   forward: Optional[Callable] = None, progress: Optional[Callable[[str], None]] = None,
                   update: Optional[str] = None) -> nn.Module:
    """Prune ``model`` in place with ``method`` (:data:`METHODS`) at ``sparsity`` or N:M ``pattern``, block by
    block on the calibration ``batches``; with ``sequential`` each block's inputs come from the blocks pruned before
    it (as Wanda and SparseGPT run), else from the dense model. ``keep`` (``{layer: mask}``, e.g. an SPP member from
    :func:`spp.elements.element_masks`) gives the masks instead of ``method`` choosing them (``method`` may then be
    None). ``update`` (:data:`UPDATES`) rewrites the kept weights: ``"obs"`` SparseGPT's update, ``"refit"``
    :func:`refit`; by default ``sparsegpt`` updates by OBS (also with ``keep``) and the other methods keep the
    weights as they are. Returns the model."""
    if method not in METHODS and not (method is None and keep is not None):
        raise ValueError(f"prune_one_shot: unknown method {method!r}; choose one of {', '.join(METHODS)} "
                         "(or give the masks: keep=)")
    if update not in (None, *UPDATES):
        raise ValueError(f"prune_one_shot: unknown update {update!r}; choose one of {', '.join(UPDATES)} (or None)")
    update = update or ("obs" if method == "sparsegpt" else None)
    if keep is not None and update is None:
        raise ValueError("prune_one_shot: keep= (given masks) needs a weight update: update='obs' or 'refit' "
                         "(method='sparsegpt' updates by OBS)")
    if method == "magnitude" and update is None:   # reads no data: no walk
        for name, layer in element_layers(model).items():
            layer.weight.mul_(element_masks({name: magnitude(layer.weight)}, sparsity, pattern, scope)[name])
        return model
    inputs, start = BlockInputs(model, batches, forward), time.time()
    for index, block in enumerate(inputs.blocks):
        layers = element_layers(model, [block])
        dense_out: List[torch.Tensor] = []
        grams = input_grams(layers, lambda: dense_out.extend(inputs.run(index)))
        for name, layer in layers.items():
            given = keep[name] if keep is not None else None
            if given is None and method != "sparsegpt":
                given = element_masks({name: SCORES[method](layer.weight, grams[name])}, sparsity, pattern, scope)[name]
            if update == "refit":
                layer.weight.copy_(refit(layer.weight, grams[name], given.bool()))
            elif update == "obs":
                layer.weight.copy_(sparsegpt_update(layer.weight, grams[name], sparsity=None if given is not None
                                                    or pattern else sparsity, pattern=None if given is not None
                                                    else pattern, keep=given))
            else:
                layer.weight.mul_(given.to(layer.weight.dtype))
        inputs.advance(index, inputs.run(index) if sequential else dense_out)
        if progress is not None:
            progress(f"{method or update}: block {index + 1}/{len(inputs.blocks)}, {time.time() - start:.0f} s")
    return model
