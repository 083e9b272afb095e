"""Setting up a search: ν from the mask gradients at the start, and the LBI optimizer over a model's masks.

``spp search`` builds its optimizer with these two functions, and so can a notebook::

    spp.add_masks(model)
    nu = spp.calibrate_nu(model, val_loader)          # ν = 1.5 / RMS of the mask gradients at M = 1, held-out data
    optimizer = spp.search_optimizer(model, nu)       # κ 10, λ 0.4, α = ρν/κ with ρ 0.02
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .masks import require_masks
from .models import family_of, mask_pairs
from .optim import LBI
from .sharding import is_sharded
from .tasks import to_device

__all__ = ["calibrate_nu", "search_optimizer", "search_clip", "search_nu_scale", "mask_gradient_rms", "nu_from_rms",
           "lbi_groups"]

NU_CALIBRATIONS = ("pooled", "pair", "mask")   # which masks share one calibrated ν
# spp search's defaults (its config's search.* fields take these): see calibrate_nu and spp.LBI
DEFAULTS = dict(nu_scale="auto", calibration_batches=8, nu_calibration="pooled", nu_batch=128, rho=0.02, kappa=10.0,
                lam=0.4, preconditioner="none", shrink="two_sided", snapshots=64, clip="auto")
NU_SCALE = 1.5   # nu_scale="auto" for a family that sets none of its own (the quality benchmark's pick, docs/settings.md)


class _OneProcess:
    """What the calibration needs of :class:`spp.runtime.Runtime`, for one process in full precision."""

    def __init__(self, device):
        self.device = device

    def autocast(self):
        return contextlib.nullcontext()

    @staticmethod
    def all_mean(value: float) -> float:
        return value


def _bare(model):
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def _named_masks(model) -> List[Tuple[str, torch.nn.Parameter]]:
    return require_masks(_bare(model))


def mask_gradient_rms(model, data: Iterable, loss_fn: Callable = F.cross_entropy, batches: int = 8, *,
                      reference_batch: Optional[int] = None, mixup_fn: Optional[Callable] = None,
                      runtime=None, task=None, losses: Optional[List[float]] = None) -> Dict[str, Tuple[float, int]]:
    """``{mask name: (RMS of its per-batch gradients, numel)}`` at the current masks.

    Takes the first ``batches`` ``(images, targets)`` pairs of ``data`` (a loader or any iterable),
    with ``loss = loss_fn(model(images), targets)`` and the model in train mode, as a search runs
    it. With ``reference_batch`` the RMS is given as at that many samples per batch: at M = 1 the
    gradient is mostly sampling noise, its per-batch RMS ∝ 1/√(batch size), so the RMS at the
    batches' size B is scaled by √(B / ``reference_batch``). ``runtime`` (device, autocast, the
    mean over DDP ranks) defaults to one process on the masks' device, in full precision. A ``task``
    (:mod:`spp.tasks`) reads batches of another form: ``loss_fn(task.forward(model, inputs), targets)``
    with ``(inputs, targets) = task.split(batch)`` (CLIP's image-caption batches). ``losses``: a list that
    receives each batch's loss.
    """
    named = _named_masks(model)
    if runtime is None:
        runtime = _OneProcess(named[0][1].device)
    squares = dict.fromkeys((n for n, _ in named), 0.0)
    sharded = is_sharded(model)   # FSDP2's DTensors: not leaves of the graph
    world = torch.distributed.get_world_size() if sharded else 1
    seen = samples = 0
    model.train()
    for i, batch in enumerate(data):
        if i >= batches:
            break
        if task is not None:
            batch = task.split(batch)
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"data must yield (images, targets) pairs; batch {i} is a {type(batch).__name__}"
                            + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else "")
                            + ": wrap it, e.g. ((b['image'], b['label']) for b in loader)")
        images, targets = to_device(batch, runtime.device)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        with runtime.autocast():
            loss = loss_fn(task.forward(model, images) if task is not None else model(images), targets)
        if sharded:   # FSDP2: backward reduce-scatters the masks' gradient, averaged over the ranks' batches
            for _, p in named:
                p.grad = None
            loss.backward()
            grads = [p.grad.full_tensor() for _, p in named]
        else:
            grads = torch.autograd.grad(loss, [p for _, p in named])
        for (name, _), g in zip(named, grads):
            squares[name] += float(g.float().pow(2).sum())
        if losses is not None:
            losses.append(float(loss.detach()))
        seen += 1
        samples += targets.shape[0] * (world if sharded else 1)   # sharded: one gradient of every rank's samples
    if seen == 0:
        raise ValueError("no batch to calibrate nu from: data yielded none (is the data set smaller than one batch?)")
    rms = {n: (math.sqrt(runtime.all_mean(squares[n] / (seen * p.numel()))), p.numel()) for n, p in named}
    if reference_batch is not None:
        factor = math.sqrt(samples / seen / reference_batch)
        rms = {n: (r * factor, k) for n, (r, k) in rms.items()}
    return rms


def _nu_key(calibration: str, pairs: Dict[str, Tuple[str, int]]):
    """Which masks share one ν: all (``pooled``), those of one pair type (``pair``), or none (``mask``)."""
    if calibration not in NU_CALIBRATIONS:
        raise ValueError(f"nu calibration {calibration!r}: choose one of {', '.join(NU_CALIBRATIONS)}")
    return {"pooled": lambda name: "all", "pair": lambda name: pairs[name][0], "mask": lambda name: name}[calibration]


def nu_from_rms(rms: Dict[str, Tuple[float, int]], scale: float, key) -> Dict[str, float]:
    """``{mask name: ν}`` with ν = ``scale`` / RMS of the gradients of the masks sharing ``key(name)``
    (the RMS pooled over their elements)."""
    squares: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    for name, (r, n) in rms.items():
        squares[key(name)] = squares.get(key(name), 0.0) + r * r * n
        counts[key(name)] = counts.get(key(name), 0) + n
    return {name: scale / max(math.sqrt(squares[key(name)] / counts[key(name)]), 1e-12) for name in rms}


def calibrate_nu(model, data: Iterable, loss_fn: Callable = F.cross_entropy,
                 scale: Union[float, str] = DEFAULTS["nu_scale"],
                 batches: int = DEFAULTS["calibration_batches"], per: str = DEFAULTS["nu_calibration"],
                 reference_batch: Optional[int] = DEFAULTS["nu_batch"],
                 preconditioner: str = DEFAULTS["preconditioner"], *, mixup_fn: Optional[Callable] = None,
                 runtime=None, task=None) -> Dict[str, float]:
    """``{mask name: ν}`` with ν = ``scale`` / RMS of the per-batch mask gradients at M = 1, the RMS
    taken as at ``reference_batch`` samples per batch; with ``preconditioner="adam"``, ν = ``scale``.
    The defaults are ``spp search``'s (``search.nu_scale``, ``calibration_batches``,
    ``nu_calibration``, ``nu_batch``); ``scale="auto"`` is the model family's (:func:`search_nu_scale`).
    :func:`mask_gradient_rms` says how ``data`` and ``loss_fn`` are used. Call it on the masked model before the
    search's first step, so that M = 1.

    Pass held-out batches, images the model was not trained on (``spp search`` takes its validation
    split, ``search.nu_data: val``). A mask settles near ``M ≈ -ν g`` and moves ``ρν·g`` a step, so ν
    must match the gradient of a loss on data the model has not memorised: on the training batches of
    a model at ~100% training accuracy the loss is near 0, the gradients far smaller, ν far too large,
    and the family collapses (the measurements: docs/settings.md).

    ``per`` says which masks share one ν: ``"pooled"`` (all: one ν, the default), ``"pair"``
    (one per pair type: query-key, value, MLP) or ``"mask"`` (one per mask tensor). Pooling keeps the
    gap between the pair types' gradients (about 10x), which is signal. With whole-head masks
    (``granularity="head"``) take ``"pair"``: a head's gradient sums over all its dims, so the head
    masks would set a pooled ν and every head would enter at once.

    At M = 1 the mask gradient is mostly sampling noise, so its per-batch RMS falls as 1/√(batch
    size): at the batches' size B it is scaled by √(B / ``reference_batch``), so that ν stays put when
    the batch changes (``reference_batch=None`` takes the RMS at B as it is). The Adam direction
    m̂/(√v̂ + eps) has RMS 1 at its first step whatever the gradient scale, so the ν for it is
    ``scale`` itself, with no gradient pass.
    """
    key = _nu_key(per, mask_pairs(_bare(model)))
    scale = search_nu_scale(model) if scale == "auto" else scale
    if preconditioner == "adam":
        return dict.fromkeys((n for n, _ in _named_masks(model)), float(scale))
    losses: List[float] = []
    rms = mask_gradient_rms(model, data, loss_fn, batches, reference_batch=reference_batch, mixup_fn=mixup_fn,
                            runtime=runtime, task=task, losses=losses)
    _warn_if_memorised(losses)
    return nu_from_rms(rms, scale, key)


MEMORISED_LOSS = 0.02   # a mean calibration loss below this: the model fits those batches almost exactly


def _warn_if_memorised(losses: List[float]) -> None:
    """Warn when the calibration batches' mean loss is near zero: data the model memorised gives gradients far
    smaller than held-out data, ν far too large, and a family that collapses without another sign."""
    mean = sum(losses) / max(len(losses), 1)
    if mean < MEMORISED_LOSS:
        warnings.warn(f"calibrate_nu: the mean loss on the calibration batches is {mean:.2g}: the model fits them "
                      "almost exactly (data it was trained on?), so nu comes out far too large and the family "
                      "collapses. Calibrate on held-out batches (spp search: search.nu_data=val)", stacklevel=3)


def lbi_groups(named_masks, calibration: str, pairs, nu: Dict[str, float] = None, **settings) -> List[Dict]:
    """LBI parameter groups: one per set of masks sharing a ν under ``calibration`` (in mask order),
    with that ν when ``nu`` is given. The same masks and calibration always give the same groups,
    so a checkpoint's optimizer state loads into them."""
    key = _nu_key(calibration, pairs)
    groups: Dict[str, Dict] = {}
    for name, p in named_masks:
        group = groups.setdefault(key(name), {"params": [], **settings})
        group["params"].append(p)
        if nu is not None:
            if group.setdefault("nu", nu[name]) != nu[name]:
                raise ValueError(f"nu differs between masks that per={calibration!r} puts in one group "
                                 f"({group['nu']:.4g} and {nu[name]:.4g} at {name}); pass the per= "
                                 f"that calibrate_nu was given")
    return list(groups.values())


def search_optimizer(model, nu: Union[float, Mapping[str, float]], *, rho: float = DEFAULTS["rho"],
                     kappa: float = DEFAULTS["kappa"], lam: float = DEFAULTS["lam"], lr: Optional[float] = None,
                     per: str = DEFAULTS["nu_calibration"], preconditioner: str = DEFAULTS["preconditioner"],
                     shrink: str = DEFAULTS["shrink"], snapshots: int = DEFAULTS["snapshots"],
                     clip: Union[float, str, None] = DEFAULTS["clip"]) -> LBI:
    """The LBI optimizer over ``model``'s masks, set as ``spp search`` sets it.

    ``nu`` is one number or :func:`calibrate_nu`'s ``{mask name: ν}``; masks sharing a ν (under
    ``per``, which must be the ``per`` that calibrated it) form one parameter group. Each group's
    step is ``lr``, or by default α = ``rho`` · ν / ``kappa``: the per-step pull ρ = κα/ν of the
    masks toward Γ, which spreads entries over a few hundred steps. ``snapshots``: the most snapshots of
    each mask kept for members' settled values (0: none). ``clip``: the largest loss gradient a step takes, in
    units of 1/ν (see :class:`spp.LBI`; None: no bound; ``"auto"``: the model family's, :func:`search_clip`). The defaults are ``spp search``'s (the quality
    benchmark's picks; see :class:`spp.LBI`).
    """
    named = _named_masks(model)
    if isinstance(nu, Mapping):
        missing = [n for n, _ in named if n not in nu]
        if missing:
            names = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise ValueError(f"nu has no value for {len(missing)} of the model's masks ({names}); "
                             f"pass calibrate_nu's result for this model, or one number")
    else:
        nu = dict.fromkeys((n for n, _ in named), float(nu))
    if not (rho > 0 and kappa > 0):
        raise ValueError(f"rho={rho} and kappa={kappa} must be > 0")
    groups = lbi_groups(named, per, mask_pairs(_bare(model)), nu)
    for group in groups:
        group["lr"] = lr if lr is not None else rho * group["nu"] / kappa
    return LBI(groups, kappa=kappa, lam=lam, preconditioner=preconditioner, shrink=shrink, snapshots=snapshots,
               clip=search_clip(model) if clip == "auto" else clip)


def search_clip(model) -> Optional[float]:
    """The step bound ``clip="auto"`` gives ``model``: its family's ``search_defaults`` (10 for the decoder LLMs,
    whose mask gradients are heavy-tailed; none for the vision and CLIP families, whose sparsest members a bound
    costs accuracy). The measurements: docs/ablations.md."""
    return family_of(_bare(model)).search_defaults.get("clip")


def search_nu_scale(model) -> float:
    """The ``nu_scale`` that ``"auto"`` gives ``model``: its family's ``search_defaults`` (4 for the decoder LLMs),
    else 1.5, the vision benchmark's pick. The measurements: docs/ablations.md."""
    return float(family_of(_bare(model)).search_defaults.get("nu_scale", NU_SCALE))
