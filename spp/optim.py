"""Linearized Bregman Iteration (LBI) over mask parameters: the SPP optimizer."""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["LBI", "lbi", "SNAPSHOT", "snapshot_steps"]

_PRECONDITIONERS = ("none", "adam")
_SHRINKS = ("two_sided", "one_sided")
SNAPSHOT = "mask@"   # state key prefix of a snapshot of the mask: "mask@120" is M after step 120


def snapshot_steps(state: dict) -> List[int]:
    """The steps at which a mask's optimizer ``state`` holds a snapshot of it, ascending."""
    return sorted(int(k[len(SNAPSHOT):]) for k in state if k.startswith(SNAPSHOT))


class LBI(Optimizer):
    r"""Linearized Bregman Iteration: a discretized differential inclusion for sparse masks.

    Paper: Ding et al., "Adaptive Pruning of Pretrained Transformer via Differential
    Inclusions", ICLR 2025 (https://arxiv.org/abs/2501.03289); optimizer from Fu et al.,
    "DessiLBI", ICML 2020.

    Each parameter ``M`` (a mask) has a sparse companion ``Γ`` and its dual ``z``. With step
    ``α`` (``lr``), one step on a minibatch gradient ``g`` is::

        d       = M_k - Γ_k
        z_{k+1} = z_k + (α / ν) d
        M_{k+1} = M_k - κ α (g_k + d / ν)
        Γ_{k+1} = κ · shrink(z_{k+1}, λ)

    with ``shrink(z, λ) = sign(z) max(|z| - λ, 0)`` (``"two_sided"``) or ``max(z - λ, 0)``
    (``"one_sided"``). ``M₀`` is the parameter as given (masks start at 1), ``z₀ = Γ₀ = 0``.
    The support of ``Γ`` grows from empty to full along the path: structures that enter
    early are the important ones. ``entry_step`` records, per element, the first step at
    which ``Γ`` became non-zero (``inf`` if never).

    The optimizer also keeps snapshots of ``M`` along the run (state keys ``"mask@STEP"``), from which a member
    of the family can hold the mask values as they were soon after its last element entered instead of at the
    end (``values="settled"`` of :meth:`spp.WeightFamily.select`). ``M`` relaxes toward the coupling's
    equilibrium with time constant 1/ρ steps (ρ = κα/ν), so a snapshot every ``snapshot_every`` = 0.2/ρ steps (10
    at the defaults) places one within a fifteenth of the 3/ρ a member waits. At most ``snapshots`` are kept per
    mask: past that the interval doubles and every other snapshot is dropped, so a longer run keeps the same
    number, further apart. They cost ``snapshots`` copies of the masks (64 at the defaults; the masks are a few
    hundred thousand numbers for a 7B LLM, so about 160 MB).

    With ``clip`` the loss gradient a step takes is bounded, ``|g| ≤ clip/ν`` element-wise: a mask then settles at
    most ``clip`` from Γ (``M ≈ Γ - ν g``) and moves at most ``ρ·clip`` a step. On a real pretrained LLM the mask
    gradients are heavy-tailed (the largest 20-50 times their RMS): unbounded, the first steps throw those masks
    several units away, the masked model's loss explodes, and what the path records after that is noise.
    This class's default is no bound, as the equations above; :func:`spp.search_optimizer` and ``spp search`` take
    the model family's (``clip="auto"``): 10 for the decoder LLMs, none for ViT, Swin and CLIP (on the vision
    demo's ViT a bound of 10 cost its sparsest member 5 points; the measurements: docs/ablations.md).

    With ``preconditioner="adam"`` the loss gradient ``g`` is replaced by its Adam direction
    ``m̂ / (√v̂ + eps)`` (the authors' code does this); the coupling term is unchanged.

    Defaults (``lr=3, kappa=10, lam=0.4, nu=1500``, plain gradient, two-sided shrink): ρ = κα/ν = 0.02
    spreads entries over a few hundred steps; κλ = 4 asks three quarters of an element's evidence to come
    from sustained gradient support rather than the transient of the masks leaving 1. ``nu`` must match
    the loss-gradient scale (a mask outside the support sits near ``-ν g``): :func:`spp.calibrate_nu` sets
    it from the gradients at the start of a search, :func:`spp.search_optimizer` builds this optimizer as
    ``spp search`` does. Why these values, and what the alternatives measured: docs/settings.md.

    Args:
        params: mask parameters or param groups (every key below can be set per group).
        lr: step size α > 0.
        kappa: damping κ > 0 (Γ = κ shrink(z)).
        nu: coupling ν > 0 between M and Γ.
        lam: sparsity threshold λ ≥ 0 of the shrink.
        preconditioner: ``"none"`` (the paper's equations) or ``"adam"``.
        betas: Adam coefficients, used with ``preconditioner="adam"``.
        eps: Adam denominator term.
        shrink: ``"two_sided"`` or ``"one_sided"``.
        foreach: use the ``torch._foreach_*`` implementation (default: on when supported).
        snapshots: the most snapshots of each mask kept (0: none).
        snapshot_every: steps between snapshots at the start of a run (default: 0.2/ρ, at least 1).
        clip: the largest ``|g|`` a step takes, in units of ``1/ν`` (None: unbounded; not applied to the Adam direction).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 3.0,
        kappa: float = 10.0,
        nu: float = 1500.0,
        lam: float = 0.4,
        preconditioner: str = "none",
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        shrink: str = "two_sided",
        foreach: Optional[bool] = None,
        snapshots: int = 64,
        snapshot_every: Optional[int] = None,
        clip: Optional[float] = None,
    ):
        _check_hyperparameters(lr=lr, kappa=kappa, nu=nu, lam=lam, preconditioner=preconditioner,
                               betas=betas, eps=eps, shrink=shrink, snapshots=snapshots, snapshot_every=snapshot_every,
                               clip=clip)
        defaults = dict(lr=lr, kappa=kappa, nu=nu, lam=lam, preconditioner=preconditioner,
                        betas=betas, eps=eps, shrink=shrink, foreach=foreach, snapshots=snapshots,
                        snapshot_every=snapshot_every, clip=clip)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_hyperparameters(**{k: group[k] for k in defaults if k != "foreach"})

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("preconditioner", "none")
            group.setdefault("betas", (0.9, 0.999))
            group.setdefault("eps", 1e-8)
            group.setdefault("shrink", "two_sided")
            group.setdefault("foreach", None)
            group.setdefault("snapshots", 0)   # an optimizer pickled before snapshots existed had none
            group.setdefault("snapshot_every", None)
            group.setdefault("clip", None)

    def _init_group(self, group, params, grads, masks_state):
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("LBI does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0)
                state["z"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["gamma"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["entry_step"] = torch.full_like(p, float("inf"), memory_format=torch.preserve_format)
            if group["preconditioner"] == "adam" and "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            masks_state.append(state)

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one LBI step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: List[Tensor] = []
            grads: List[Tensor] = []
            states: List[dict] = []
            self._init_group(group, params, grads, states)
            if not params:
                continue
            adam = group["preconditioner"] == "adam"
            lbi(
                params,
                grads,
                [s["z"] for s in states],
                [s["gamma"] for s in states],
                [s["entry_step"] for s in states],
                [s["step"] for s in states],
                [s["exp_avg"] for s in states] if adam else None,
                [s["exp_avg_sq"] for s in states] if adam else None,
                lr=group["lr"], kappa=group["kappa"], nu=group["nu"], lam=group["lam"],
                betas=group["betas"], eps=group["eps"], shrink=group["shrink"],
                foreach=group["foreach"], clip=group["clip"],
            )
            self._snapshot(group, params, states)
        return loss

    @staticmethod
    def settle_steps(group: dict) -> float:
        """3/ρ = 3ν/(κα): the steps ``M`` takes to close 95% of its way to a new equilibrium with Γ (three of
        its time constants), which a member waits after its last element entered (``values="settled"``)."""
        return 3 / _pull(group)

    @torch.no_grad()
    def _snapshot(self, group: dict, params: List[Tensor], states: List[dict]) -> None:
        limit = group["snapshots"]
        if not limit:
            return
        every = group["snapshot_every"] or max(1, round(0.2 / _pull(group)))
        for mask, state in zip(params, states):
            step = int(state["step"])
            if step % every:   # snapshots are taken, and thinned, only at multiples of the first interval
                continue
            interval = every
            while step // interval > limit:   # the multiples of the interval up to this step: at most `limit`
                interval *= 2
            for old in snapshot_steps(state):
                if old % interval:
                    del state[f"{SNAPSHOT}{old}"]
            if step % interval == 0:
                state[f"{SNAPSHOT}{step}"] = mask.detach().clone()


def _pull(group: dict) -> float:
    """ρ = κα/ν: the per-step pull of a group's masks toward Γ."""
    return group["kappa"] * group["lr"] / group["nu"]


def _check_hyperparameters(*, lr, kappa, nu, lam, preconditioner, betas, eps, shrink, snapshots=0,
                           snapshot_every=None, clip=None):
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"Invalid learning rate lr={lr!r}: must be a number > 0")
    if not (isinstance(kappa, (int, float)) and kappa > 0):
        raise ValueError(f"Invalid kappa={kappa!r}: must be a number > 0")
    if not (isinstance(nu, (int, float)) and nu > 0):
        raise ValueError(f"Invalid nu={nu!r}: must be a number > 0")
    if not (isinstance(lam, (int, float)) and lam >= 0):
        raise ValueError(f"Invalid lam={lam!r}: must be a number >= 0")
    if preconditioner not in _PRECONDITIONERS:
        raise ValueError(f"Invalid preconditioner={preconditioner!r}: choose one of {_PRECONDITIONERS}")
    if shrink not in _SHRINKS:
        raise ValueError(f"Invalid shrink={shrink!r}: choose one of {_SHRINKS}")
    if not (len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"Invalid betas={betas!r}: need two values in [0, 1)")
    if not eps >= 0:
        raise ValueError(f"Invalid eps={eps!r}: must be >= 0")
    if not (isinstance(snapshots, int) and snapshots >= 0):
        raise ValueError(f"Invalid snapshots={snapshots!r}: the most snapshots of each mask kept, an integer >= 0")
    if not (snapshot_every is None or (isinstance(snapshot_every, int) and snapshot_every >= 1)):
        raise ValueError(f"Invalid snapshot_every={snapshot_every!r}: steps between snapshots, an integer >= 1 "
                         "(None: 0.2/rho)")
    if not (clip is None or (isinstance(clip, (int, float)) and clip > 0)):
        raise ValueError(f"Invalid clip={clip!r}: a number > 0 (the largest |g| in units of 1/nu), or None for none")


def lbi(
    params: List[Tensor],
    grads: List[Tensor],
    zs: List[Tensor],
    gammas: List[Tensor],
    entry_steps: List[Tensor],
    steps: List[Tensor],
    exp_avgs: Optional[List[Tensor]],
    exp_avg_sqs: Optional[List[Tensor]],
    *,
    lr: float,
    kappa: float,
    nu: float,
    lam: float,
    betas: Tuple[float, float],
    eps: float,
    shrink: str,
    foreach: Optional[bool] = None,
    clip: Optional[float] = None,
):
    """Functional LBI step (see :class:`LBI`); updates every tensor in place."""
    if foreach is None:   # sharded masks (FSDP2's DTensors) take the per-tensor path: DTensor has no _foreach_copy_
        foreach = all(p.device.type in ("cuda", "cpu") and type(p.data) is torch.Tensor for p in params) \
            and not torch.jit.is_scripting()
    fn = _multi_tensor_lbi if foreach else _single_tensor_lbi
    if clip is not None and exp_avgs is None:   # |g| ≤ clip/ν (the Adam direction is bounded by itself)
        grads = [g.clamp(-clip / nu, clip / nu) for g in grads]
    fn(params, grads, zs, gammas, entry_steps, steps, exp_avgs, exp_avg_sqs,
       lr=lr, kappa=kappa, nu=nu, lam=lam, betas=betas, eps=eps, shrink=shrink)


def _adam_direction(grad, exp_avg, exp_avg_sq, step, betas, eps):
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias1 = 1 - beta1 ** step
    bias2 = 1 - beta2 ** step
    return (exp_avg / bias1) / ((exp_avg_sq / bias2).sqrt_().add_(eps))


def _single_tensor_lbi(params, grads, zs, gammas, entry_steps, steps, exp_avgs, exp_avg_sqs,
                       *, lr, kappa, nu, lam, betas, eps, shrink):
    for i, mask in enumerate(params):
        z, gamma, entry, step_t = zs[i], gammas[i], entry_steps[i], steps[i]
        step_t += 1
        step = step_t.item()
        grad = grads[i]
        if exp_avgs is not None:
            grad = _adam_direction(grad, exp_avgs[i], exp_avg_sqs[i], step, betas, eps)

        coupling = mask - gamma                                    # M_k - Γ_k
        z.add_(coupling, alpha=lr / nu)                            # z_{k+1}
        mask.sub_(grad + coupling / nu, alpha=kappa * lr)          # M_{k+1}
        if shrink == "two_sided":
            shrunk = z.sign() * (z.abs() - lam).clamp_(min=0)
        else:
            shrunk = (z - lam).clamp_(min=0)
        gamma.copy_(shrunk.mul_(kappa))                            # Γ_{k+1}
        entered = (gamma != 0) & torch.isinf(entry)
        entry.masked_fill_(entered, step)


def _multi_tensor_lbi(params, grads, zs, gammas, entry_steps, steps, exp_avgs, exp_avg_sqs,
                      *, lr, kappa, nu, lam, betas, eps, shrink):
    torch._foreach_add_(steps, 1)
    step = steps[0].item()
    if any(s.item() != step for s in steps):
        raise RuntimeError("LBI foreach path needs every parameter of a group at the same step")
    if exp_avgs is not None:
        beta1, beta2 = betas
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denom = torch._foreach_div(exp_avg_sqs, 1 - beta2 ** step)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        grads = torch._foreach_div(exp_avgs, 1 - beta1 ** step)
        torch._foreach_div_(grads, denom)

    coupling = torch._foreach_sub(params, gammas)                  # M_k - Γ_k
    torch._foreach_add_(zs, coupling, alpha=lr / nu)               # z_{k+1}
    update = torch._foreach_div(coupling, nu)
    torch._foreach_add_(update, grads)
    torch._foreach_add_(params, update, alpha=-kappa * lr)         # M_{k+1}
    # shrink(z, λ) = z - clamp(z, -λ, λ) (two-sided) or z - min(z, λ) (one-sided)
    clipped = torch._foreach_clamp_max(zs, lam)
    if shrink == "two_sided":
        torch._foreach_clamp_min_(clipped, -lam)
    new_gammas = torch._foreach_sub(zs, clipped)
    torch._foreach_mul_(new_gammas, kappa)
    torch._foreach_copy_(gammas, new_gammas)                       # Γ_{k+1}
    for gamma, entry in zip(gammas, entry_steps):
        entry.masked_fill_((gamma != 0) & torch.isinf(entry), step)
