"""One-shot importance criteria over the same structures SPP's masks rank, as families.

Each function returns ``{mask name: scores}`` (higher is more important) for
:meth:`spp.SolutionPath.from_scores`, so that a baseline's members are cut by the same budget walk
as SPP's and only the ranking differs::

    scores = spp.criteria.taylor_scores(masked, loader, batches=20)
    family = spp.WeightFamily(dense, spp.SolutionPath.from_scores(masked, scores))

``model`` is a masked model (:func:`spp.add_masks`) with its masks at 1. ``data`` yields ``(inputs,
targets)`` pairs; with ``task`` (:mod:`spp.tasks`) it yields the task's batches (CLIP's image-caption
pairs: ``task=spp.tasks.Contrastive()``), split and run as the search runs them.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .masks import granularity_of, require_masks
from .models import family_of
from .path import SolutionPath
from .structure import mask_names
from .tasks import to_device

__all__ = ["magnitude_scores", "taylor_scores", "random_scores", "lasso_values", "lasso_path", "activation_stats",
           "wanda_sp_scores", "flap_scores", "flap_biases", "add_biases", "weight_taylor_scores"]


def _batches(data: Iterable, batches: int, device, task=None):
    """The first ``batches`` of ``data`` as ``(inputs, targets)`` on ``device``."""
    for i, batch in enumerate(data):
        if batches is not None and i >= batches:
            break
        yield to_device(task.split(batch) if task is not None else batch, device)


def _run(model, inputs, task=None):
    return task.forward(model, inputs) if task is not None else model(inputs)


def magnitude_scores(model) -> Dict[str, torch.Tensor]:
    """RMS of the weights each element removes: a query-key dim's (rotary pair's) rows of W_q and W_k, a
    value dim's row of W_v and column of the output projection, a neuron's rows of the MLP's input
    matrices and column of its output matrix (each matrix's mean square, so a structure's size does not
    decide its rank). Rank by weight norm, as in Li et al., "Pruning Filters for Efficient ConvNets"
    (ICLR 2017), over SPP's pairs; the family's :meth:`~spp.models.base.ModelFamily.channels` say which
    rows and columns those are."""
    scores = {}
    for mask, chans in _channels(model):
        size = model.get_parameter(mask).numel()
        total = torch.zeros(size, dtype=torch.float64)
        for c in chans:   # the mean square of the element's rows (columns) in this matrix
            w = c.linear.weight.detach().double().cpu()
            square = w[:, c.index].pow(2).mean(0) if c.axis == 1 else w[c.index].pow(2).mean(1)
            count = torch.zeros(size, dtype=torch.float64).index_add_(0, c.element, torch.ones_like(square))
            total += torch.zeros(size, dtype=torch.float64).index_add_(0, c.element, square) / count.clamp_min(1)
        scores[mask] = (total / len(chans)).sqrt().float().view(model.get_parameter(mask).shape)
    return scores


def taylor_scores(model, data: Iterable, batches: int, loss_fn: Callable = F.cross_entropy,
                  task=None) -> Dict[str, torch.Tensor]:
    """First-order Taylor importance ``Σ_batches |m · ∂L/∂m|`` at M = 1 over the first ``batches``
    ``(inputs, targets)`` of ``data``: the loss change if the element were removed, to first order
    (Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019)."""
    named = require_masks(model)
    total = {n: torch.zeros_like(p) for n, p in named}
    was_training = model.training
    model.eval()
    device = named[0][1].device
    for x, y in _batches(data, batches, device, task):
        grads = torch.autograd.grad(loss_fn(_run(model, x, task), y), [p for _, p in named])
        for (n, p), g in zip(named, grads):
            total[n] += (p.detach() * g).abs()
    model.train(was_training)
    return total


def random_scores(model, seed: int) -> Dict[str, torch.Tensor]:
    """Uniform random scores, reproducible from ``seed``: the floor every criterion must beat."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) for n, p in require_masks(model)}


def lasso_values(model, data: Iterable, lam: float, steps: int, lr: float,
                 loss_fn: Callable = F.cross_entropy, task=None,
                 start: Optional[Dict[str, torch.Tensor]] = None,
                 progress: Optional[Callable[[int, float], None]] = None) -> Dict[str, torch.Tensor]:
    """The masks after ``steps`` of Adam on ``loss + lam · ‖M‖₁`` from M = 1, cycling over ``data``
    (an L1-penalised mask search, one run per budget in the benchmarks). The model's masks are set back
    to 1 afterwards; the elements rank by the absolute value returned (:func:`lasso_path`).

    ``start``: ``{mask name: tensor}`` to start from instead of 1 (a member's masks); its zero entries stay
    zero (their gradient is dropped), so with ``lam=0`` this trains the scales of a member's kept structures.
    ``progress(step, loss)`` is called after every step (a long run's progress lines)."""
    named = require_masks(model)
    with torch.no_grad():
        for name, p in named:
            p.copy_(start[name] if start is not None else torch.ones_like(p))
    hooks = [p.register_hook(lambda g, keep=(start[name] != 0).to(p.dtype): g * keep)
             for name, p in named] if start is not None else []
    opt = torch.optim.Adam([p for _, p in named], lr=lr)
    model.train()
    device = named[0][1].device
    step = 0
    while step < steps:
        for x, y in _batches(data, None, device, task):
            loss = loss_fn(_run(model, x, task), y) + lam * sum(p.abs().sum() for _, p in named)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if progress is not None:
                progress(step, loss.item())
            if step >= steps:
                break
    for hook in hooks:
        hook.remove()
    values = {n: p.detach().clone() for n, p in named}
    with torch.no_grad():
        for _, p in named:
            p.fill_(1.0)
    return values


def lasso_path(model, values: Dict[str, torch.Tensor]) -> SolutionPath:
    """A Lasso run's masks as a family: ranked by their absolute value, members able to keep the values."""
    return SolutionPath.from_scores(model, {n: v.abs() for n, v in values.items()}, values=values)


# ------------------------------------------------------------------------------------------------
# Criteria from activations and weight gradients (the structured LLM pruners)
# ------------------------------------------------------------------------------------------------
def _channels(model) -> List[Tuple[str, list]]:
    """``[(mask name, [Channels, ...]), ...]``: the weight rows and columns each mask's elements remove."""
    require_masks(model)
    granularity, family = granularity_of(model), family_of(model)
    out = []
    for geom, block in zip(family.geometry(model), family.blocks(model)):
        names = mask_names(geom)
        out += [(names[pair], chans) for pair, chans in family.channels(block, geom, granularity).items()]
    return out


def _linear_names(model) -> Dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


@torch.no_grad()
def activation_stats(model, data: Iterable, batches: int, task=None) -> Dict[str, Dict[str, torch.Tensor]]:
    """Per linear layer that a mask element reads or writes, over the first ``batches`` ``(inputs, targets)``
    of ``data`` at M = 1 (every token a sample): ``{layer name: {"tokens", "in_mean", "in_sq", "out_mean",
    "out_sq"}}``, the mean and mean square of each input and output feature (float64). One calibration
    pass feeds :func:`wanda_sp_scores`, :func:`flap_scores` and :func:`flap_biases`."""
    layers = {id(c.linear): c.linear for _, chans in _channels(model) for c in chans}
    names = _linear_names(model)
    sums: Dict[str, Dict[str, torch.Tensor]] = {}

    def hook(module, args, output):
        x, y = args[0].detach().flatten(0, -2).double(), output.detach().flatten(0, -2).double()
        s = sums.setdefault(names[id(module)], {"tokens": torch.zeros((), dtype=torch.float64)})
        for key, t in (("in_mean", x), ("in_sq", x * x), ("out_mean", y), ("out_sq", y * y)):
            s[key] = s.get(key, 0) + t.sum(0).cpu()
        s["tokens"] += x.shape[0]

    handles = [m.register_forward_hook(hook) for m in layers.values()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for x, _ in _batches(data, batches, device, task):
            _run(model, x, task)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not sums:
        raise ValueError("activation_stats saw no batch: data is empty or batches < 1")
    return {n: {k: (v / s["tokens"] if k != "tokens" else v) for k, v in s.items()} for n, s in sums.items()}


def _score(model, stats, per_channel: Callable, readers_only: bool) -> Dict[str, torch.Tensor]:
    """Pool ``per_channel(weight (float64), channels, layer stats) -> a value per listed row/column`` into
    each mask's elements. ``readers_only``: score an element by the layers that read its channels (columns)
    where it has one, by the layers that write them (rows) otherwise."""
    names = _linear_names(model)
    scores = {}
    for mask, chans in _channels(model):
        if readers_only and any(c.axis == 1 for c in chans):
            chans = [c for c in chans if c.axis == 1]
        total = torch.zeros(model.get_parameter(mask).numel(), dtype=torch.float64)
        for c in chans:
            weight = c.linear.weight.detach().double().cpu()
            total.index_add_(0, c.element, per_channel(weight, c, stats.get(names[id(c.linear)])))
        scores[mask] = total.float().view(model.get_parameter(mask).shape)
    return scores


def wanda_sp_scores(model, stats: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Structured Wanda ("Wanda-sp", as An et al. define it for FLAP, AAAI 2024, after Sun et al.'s Wanda,
    ICLR 2024): ``Σ |W_ij| · ‖X_j‖₂`` summed over a structure, with ``‖X_j‖₂`` the norm over the calibration
    tokens of the input feature ``j`` of the weight (``stats`` from :func:`activation_stats`). A value dim
    or an MLP neuron is scored on the output projection's columns it feeds (``o_proj`` / ``down_proj``), as
    Wanda-sp scores heads and channels; a query-key pair, which no column reads, on its rows of ``W_q`` and
    ``W_k`` against their inputs."""
    def per_channel(w, c, s):
        norm = (s["in_sq"] * s["tokens"]).sqrt()
        if c.axis == 1:
            return w[:, c.index].abs().sum(0) * norm[c.index]
        return (w[c.index].abs() * norm).sum(1)
    return _score(model, stats, per_channel, readers_only=True)


def flap_scores(model, stats: Dict[str, Dict[str, torch.Tensor]], standardize: bool = True) -> Dict[str, torch.Tensor]:
    """FLAP's fluctuation metric (An et al., "Fluctuation-based Adaptive Structured Pruning for Large
    Language Models", AAAI 2024): for an input feature ``j`` of the output projection, the sample variance
    of ``X_j`` over the calibration tokens times ``‖W_:,j‖²``, the energy of the change in the output if
    ``X_j`` were replaced by its mean (what :func:`flap_biases` adds back). A query-key pair, which FLAP
    removes only with its head, is scored by the same quantity at its own outputs: the variance of its
    query and key features. ``standardize`` (FLAP's adaptive structure): each block's and pair's scores
    become ``(s - mean) / std`` so that one global ranking compares layers and modules."""
    def per_channel(w, c, s):
        if c.axis == 1:
            var = (s["in_sq"] - s["in_mean"] ** 2).clamp_min(0)
            return var[c.index] * w[:, c.index].pow(2).sum(0)
        return (s["out_sq"] - s["out_mean"] ** 2).clamp_min(0)[c.index]
    scores = _score(model, stats, per_channel, readers_only=True)
    if standardize:
        scores = {n: (s - s.mean()) / s.std().clamp_min(1e-12) if s.numel() > 1 else s * 0
                  for n, s in scores.items()}
    return scores


@torch.no_grad()
def flap_biases(model, stats: Dict[str, Dict[str, torch.Tensor]], masks: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """FLAP's bias compensation for a member: ``{layer name: bias}`` for each output projection
    (``o_proj`` / ``down_proj``, a ViT's ``proj`` / ``fc2``), ``Σ_j W_:,j · mean(X_j)`` over the input
    features ``j`` of the elements ``masks`` removes (mask 0), so that the removed features contribute their
    calibration mean instead of nothing. Apply with :func:`add_biases` to the masked or compressed model."""
    names = _linear_names(model)
    biases = {}
    for mask, chans in _channels(model):
        removed = (masks[mask].flatten().cpu() == 0)
        for c in chans:
            if c.axis != 1:
                continue
            name = names[id(c.linear)]
            cols = c.index[removed[c.element]]
            if not len(cols):
                continue
            w = c.linear.weight.detach().double().cpu()
            bias = w[:, cols] @ stats[name]["in_mean"][cols]
            biases[name] = biases.get(name, 0) + bias.float()
    return biases


@torch.no_grad()
def add_biases(model, biases: Dict[str, torch.Tensor]) -> None:
    """Add ``{layer name: vector}`` to those linear layers' biases in place (creating a bias where a layer
    has none, as FLAP does for Llama's bias-free projections). The layers keep their names through
    :func:`spp.compress`, so the same dict serves the masked and the compressed model."""
    for name, bias in biases.items():
        linear = model.get_submodule(name)
        bias = bias.to(device=linear.weight.device, dtype=linear.weight.dtype)
        if linear.bias is None:
            linear.bias = torch.nn.Parameter(bias.clone(), requires_grad=linear.weight.requires_grad)
        else:
            linear.bias.add_(bias)


def weight_taylor_scores(model, data: Iterable, batches: int, loss_fn: Callable = F.cross_entropy,
                         task=None) -> Dict[str, torch.Tensor]:
    """LLM-Pruner's first-order element-wise Taylor importance of a structure (Ma et al., "LLM-Pruner: On
    the Structural Pruning of Large Language Models", NeurIPS 2023, ``param_first``): ``Σ |W ⊙ ∂L/∂W|``
    over every weight the structure removes (its rows of ``W_q``, ``W_k``, ``W_v``, the MLP's input
    matrices, its columns of the output projections), with the gradient summed over the first ``batches``
    of ``data``. :func:`taylor_scores` is the vector-wise variant, ``|Σ W ⊙ ∂L/∂W|`` (the mask's own
    gradient). Weights get gradients for the duration only."""
    layers = {id(c.linear): c.linear for _, chans in _channels(model) for c in chans}
    weights = [m.weight for m in layers.values()]
    flags = [w.requires_grad for w in weights]
    grads = {id(w): torch.zeros_like(w, dtype=torch.float32) for w in weights}
    was_training = model.training
    model.eval()
    device = weights[0].device
    try:
        for w in weights:
            w.requires_grad_(True)
        for x, y in _batches(data, batches, device, task):
            for w, g in zip(weights, torch.autograd.grad(loss_fn(_run(model, x, task), y), weights)):
                grads[id(w)] += g.float()
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
        model.train(was_training)
    products = {id(m): (m.weight.detach().double() * grads[id(m.weight)].double()).abs().cpu() for m in layers.values()}

    def per_channel(w, c, s):
        p = products[id(c.linear)]
        return p[:, c.index].sum(0) if c.axis == 1 else p[c.index].sum(1)
    return _score(model, {}, per_channel, readers_only=False)
