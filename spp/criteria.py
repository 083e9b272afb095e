"""One-shot importance criteria over the same structures SPP's masks rank, as families.

Each function returns ``{mask name: scores}`` (higher is more important) for
:meth:`spp.SolutionPath.from_scores`, so that a baseline's members are cut by the same budget walk
as SPP's and only the ranking differs::

    scores = spp.criteria.taylor_scores(masked, loader, batches=20)
    family = spp.WeightFamily(dense, spp.SolutionPath.from_scores(masked, scores))

``model`` is a masked model (:func:`spp.add_masks`) with its masks at 1.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable

import torch
import torch.nn.functional as F

from .masks import granularity_of, require_masks
from .path import SolutionPath
from .structure import mask_names, model_family

__all__ = ["magnitude_scores", "taylor_scores", "random_scores", "lasso_values", "lasso_path"]


def magnitude_scores(model) -> Dict[str, torch.Tensor]:
    """RMS of the weights each element removes: a query-key dim's (rotary pair's) rows of W_q and W_k, a
    value dim's row of W_v and column of the output projection, a neuron's rows of the MLP's input
    matrices and column of its output matrix (each matrix's mean square, so a structure's size does not
    decide its rank). Rank by weight norm, as in Li et al., "Pruning Filters for Efficient ConvNets"
    (ICLR 2017), over SPP's pairs; every model family computes it for its own layout."""
    require_masks(model)
    granularity = granularity_of(model)
    family = model_family(model)
    scores = {}
    for geom, block in zip(family.geometry(model), family.blocks(model)):
        names = mask_names(geom)
        scores.update({names[pair]: s for pair, s in family.magnitude(block, geom, granularity).items()})
    return scores


def taylor_scores(model, data: Iterable, batches: int, loss_fn: Callable = F.cross_entropy) -> Dict[str, torch.Tensor]:
    """First-order Taylor importance ``Σ_batches |m · ∂L/∂m|`` at M = 1 over the first ``batches``
    ``(inputs, targets)`` of ``data``: the loss change if the element were removed, to first order
    (Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019)."""
    named = require_masks(model)
    total = {n: torch.zeros_like(p) for n, p in named}
    was_training = model.training
    model.eval()
    device = named[0][1].device
    for i, (x, y) in enumerate(data):
        if i >= batches:
            break
        x, y = x.to(device), y.to(device)
        grads = torch.autograd.grad(loss_fn(model(x), y), [p for _, p in named])
        for (n, p), g in zip(named, grads):
            total[n] += (p.detach() * g).abs()
    model.train(was_training)
    return total


def random_scores(model, seed: int) -> Dict[str, torch.Tensor]:
    """Uniform random scores, reproducible from ``seed``: the floor every criterion must beat."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) for n, p in require_masks(model)}


def lasso_values(model, data: Iterable, lam: float, steps: int, lr: float,
                 loss_fn: Callable = F.cross_entropy) -> Dict[str, torch.Tensor]:
    """The masks after ``steps`` of Adam on ``loss + lam · ‖M‖₁`` from M = 1, cycling over ``data``
    (an L1-penalised mask search, one run per budget in the benchmarks). The model's masks are set back
    to 1 afterwards; the elements rank by the absolute value returned (:func:`lasso_path`)."""
    named = require_masks(model)
    with torch.no_grad():
        for _, p in named:
            p.fill_(1.0)
    opt = torch.optim.Adam([p for _, p in named], lr=lr)
    model.train()
    device = named[0][1].device
    step = 0
    while step < steps:
        for x, y in data:
            x, y = x.to(device), y.to(device)
            loss = loss_fn(model(x), y) + lam * sum(p.abs().sum() for _, p in named)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= steps:
                break
    values = {n: p.detach().clone() for n, p in named}
    with torch.no_grad():
        for _, p in named:
            p.fill_(1.0)
    return values


def lasso_path(model, values: Dict[str, torch.Tensor]) -> SolutionPath:
    """A Lasso run's masks as a family: ranked by their absolute value, members able to keep the values."""
    return SolutionPath.from_scores(model, {n: v.abs() for n, v in values.items()}, values=values)
