"""`spp search`: one LBI run over the masks of a frozen pretrained model → the solution path."""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch.nn.parallel import DistributedDataParallel

from .build import build_criterion, build_loaders, build_model
from .config import NU_CALIBRATIONS, Config, SearchConfig, save_config
from .engine import train_one_epoch
from .family import WeightFamily
from .masks import add_masks, mask_parameters
from .optim import LBI
from .path import SolutionPath, support_sizes
from .runtime import (CheckpointError, NonFiniteLoss, Runtime, RunLogger, check_same_run, check_shapes,
                      gather_rng_states, load_training_checkpoint, main_print, resume_file,
                      restore_rng_states, save_training_checkpoint, setup_runtime)
from .structure import mask_pairs

__all__ = ["run_search", "calibrate_nu", "mask_gradient_rms", "nu_from_rms", "lbi_groups"]

CHECKPOINT = "checkpoint.pth"


def _bare(model):
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def mask_gradient_rms(model, loader, criterion, runtime: Runtime, batches: int,
                      mixup_fn=None) -> Dict[str, Tuple[float, int]]:
    """``{mask name: (RMS of its per-batch gradients, numel)}`` at the current masks, over the
    first ``batches`` batches of ``loader`` in an order of its own (the search's epochs stay
    untouched), averaged over ranks."""
    named = mask_parameters(_bare(model))
    loader.sampler.set_epoch(-1)
    squares = dict.fromkeys((n for n, _ in named), 0.0)
    seen = 0
    model.train()
    for i, (images, targets) in enumerate(loader):
        if i >= batches:
            break
        images, targets = images.to(runtime.device), targets.to(runtime.device)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        with runtime.autocast():
            loss = criterion(images, model(images), targets)
        for (name, _), g in zip(named, torch.autograd.grad(loss, [p for _, p in named])):
            squares[name] += float(g.float().pow(2).sum())
        seen += 1
    if seen == 0:
        raise RuntimeError("no training batch to calibrate nu from; the training set is smaller than one batch")
    return {n: (math.sqrt(runtime.all_mean(squares[n] / (seen * p.numel()))), p.numel()) for n, p in named}


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


def calibrate_nu(model, loader, criterion, runtime: Runtime, batches: int, scale: float,
                 mixup_fn=None, per: str = "pooled", batch: Optional[int] = SearchConfig.nu_batch,
                 preconditioner: str = "none") -> Dict[str, float]:
    """``{mask name: ν}`` with ν = ``scale`` / RMS of the per-batch mask gradients at M = 1, the RMS
    taken as at ``batch`` samples per batch; with ``preconditioner="adam"``, ν = ``scale``.

    The mask settles near ``-ν g`` (ALGORITHM.md §6), so ν must match the gradient scale,
    which depends on the loss, the batch size and the model; this makes one setting carry
    over. On the demo's Fashion-MNIST ViT, ``scale = 1.5`` gives ν ≈ 1500 (half the prototype's
    hand-tuned 3000); with ρ = 0.03 / ``scale`` (the same gradient step κα = ρν), ``scale`` 1.5
    kept the most accuracy of 0.3, 1, 1.5 and 3.

    ``per`` says which masks share one ν: ``"pooled"`` (all: one ν, the default), ``"pair"``
    (one per pair type: query-key, value, MLP) or ``"mask"`` (one per mask tensor). On the
    demo the pair types' gradients differ ~10x, and pooling ranked best: the gap is signal
    (``scripts/ablate_search.py``).

    At M = 1 a pretrained model's mask gradient is mostly sampling noise, so its per-batch RMS
    falls as 1/√(batch size): at ``loader``'s batch B it is scaled by √(B / ``batch``), so that
    ν stays put when the batch changes. On the demo (3 seeds, val, 85% removed), batch 256 at its
    own RMS had a ν 1.4x larger and lost 4.3 points to batch 128; at batch 128's ν it gained 1.7,
    and its seed spread fell from 2.9 to 0.6 points. ``batch=None`` takes the RMS at B as it is.

    The Adam direction m̂/(√v̂ + eps) has RMS 1 at its first step (sign(g)) whatever the gradient
    scale, so the ν for it is ``scale`` itself, with no gradient pass (ν from the raw gradient,
    ~1e3 on the demo, made every element enter at once).
    """
    if preconditioner == "adam":
        return dict.fromkeys((n for n, _ in mask_parameters(_bare(model))), float(scale))
    rms = mask_gradient_rms(model, loader, criterion, runtime, batches, mixup_fn)
    if batch is not None:
        factor = math.sqrt(loader.batch_size / batch)
        rms = {n: (r * factor, k) for n, (r, k) in rms.items()}
    pairs = mask_pairs(_bare(model))
    return nu_from_rms(rms, scale, _nu_key(per, pairs))


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
            group["nu"] = nu[name]
    return list(groups.values())


def _path_checksum(optimizer: LBI, masks) -> torch.Tensor:
    rows = []
    for p in masks:
        s = optimizer.state[p]
        entry = s["entry_step"]
        rows.append(torch.stack([s["gamma"].double().sum(), s["z"].double().sum(),
                                 entry[torch.isfinite(entry)].double().sum(), torch.isinf(entry).double().sum()]))
    return torch.stack(rows).flatten()


def _check_ranks_agree(runtime: Runtime, optimizer: LBI, masks) -> None:
    if not runtime.distributed:
        return
    local = _path_checksum(optimizer, masks).to(runtime.device)
    gathered = [torch.zeros_like(local) for _ in range(runtime.world_size)]
    torch.distributed.all_gather(gathered, local)
    if any(not torch.equal(gathered[0], g) for g in gathered[1:]):
        raise RuntimeError("Γ or the entry steps differ between ranks; the search is not synchronised")
    main_print(runtime, f"solution path identical on all {runtime.world_size} ranks")


def _save(cfg: Config, model_masks, optimizer, support, step, epoch, batch, runtime) -> None:
    rng = gather_rng_states(runtime)  # collective: every rank takes part
    if not runtime.is_main:
        return
    state = {"kind": "search", "model_name": cfg.model.name, "config": cfg.to_dict(),
             "masks": {n: p.detach().cpu() for n, p in model_masks},
             "optimizer": optimizer.state_dict(), "support": support, "step": step,
             "epoch": epoch, "batch": batch, "rng": rng}
    save_training_checkpoint(state, os.path.join(cfg.output, CHECKPOINT))


def run_search(cfg: Config) -> SolutionPath:
    runtime = setup_runtime(cfg.device, cfg.amp, cfg.seed)
    model = build_model(cfg, runtime)
    add_masks(model, cfg.model.granularity, freeze=True)
    model.to(runtime.device)
    named_masks = mask_parameters(model)
    masks = [p for _, p in named_masks]
    loaders = build_loaders(cfg, runtime)
    loader = loaders["train"]
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"the training set has fewer samples per process than data.batch_size={cfg.data.batch_size}")
    total_steps = cfg.search.steps or cfg.search.epochs * steps_per_epoch
    mixup_fn, criterion = build_criterion(cfg.data)
    net = DistributedDataParallel(model, device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None) \
        if runtime.distributed else model
    scaler = torch.amp.GradScaler(runtime.device.type) if runtime.amp_dtype is torch.float16 else None

    resume = resume_file(cfg.resume, os.path.join(cfg.output, CHECKPOINT))
    support: List = []
    step, epoch, batch = 0, 0, 0
    s = cfg.search
    pairs = mask_pairs(model)
    if resume:
        state = load_training_checkpoint(resume, "search", cfg.model.name)
        check_shapes(state["masks"], dict(named_masks), resume)   # another model: which shapes differ
        check_same_run(state, cfg.to_dict(), resume)              # same model: which settings differ
        with torch.no_grad():
            for name, p in named_masks:
                p.copy_(state["masks"][name])
        optimizer = LBI(lbi_groups(named_masks, s.nu_calibration, pairs))
        if len(optimizer.param_groups) != len(state["optimizer"]["param_groups"]):
            raise CheckpointError(f"{resume} was written with another search.nu_calibration "
                                  f"({len(state['optimizer']['param_groups'])} ν groups, this config makes "
                                  f"{len(optimizer.param_groups)}); resume with the setting it was started with")
        optimizer.load_state_dict(state["optimizer"])  # restores every group's lr and ν too
        support, step, epoch, batch = state["support"], state["step"], state["epoch"], state["batch"]
        restore_rng_states(state["rng"], runtime)
        main_print(runtime, f"resumed {resume} at step {step} (epoch {epoch}, batch {batch})")
    else:
        if s.nu == "auto":
            nu = calibrate_nu(net, loader, criterion, runtime, s.calibration_batches, s.nu_scale, mixup_fn,
                              per=s.nu_calibration, batch=s.nu_batch, preconditioner=s.preconditioner)
        else:
            nu = dict.fromkeys((n for n, _ in named_masks), float(s.nu))
        groups = lbi_groups(named_masks, s.nu_calibration, pairs, nu)
        for group in groups:
            group["lr"] = s.lr if s.lr != "auto" else s.rho * group["nu"] / s.kappa
        optimizer = LBI(groups, kappa=s.kappa, lam=s.lam, preconditioner=s.preconditioner, shrink=s.shrink)
    if runtime.is_main:  # after the resume checks: a refused resume leaves the folder as it was
        os.makedirs(cfg.output, exist_ok=True)
        save_config(cfg, os.path.join(cfg.output, "config.yaml"))
    group = optimizer.param_groups[0]
    per_group = "" if len(optimizer.param_groups) == 1 else f" ({s.nu_calibration} 1 of {len(optimizer.param_groups)})"
    main_print(runtime, f"search: {total_steps} steps ({steps_per_epoch}/epoch), lr={group['lr']:.4g} "
                        f"kappa={group['kappa']} nu={group['nu']:.4g}{per_group} lam={group['lam']}")
    logger = RunLogger(cfg.output, runtime.is_main)

    def on_step(global_step: int, loss: float) -> None:
        if global_step % cfg.search.log_every == 0 or global_step == total_steps:
            sizes = support_sizes(optimizer, model)
            support.append((global_step, sizes))
            logger.log(global_step, loss=loss, **{f"support/{k}": v for k, v in sizes.items()})
        if cfg.search.checkpoint_every and global_step % cfg.search.checkpoint_every == 0:
            _save(cfg, named_masks, optimizer, support, global_step, current_epoch,
                  global_step - epoch_start, runtime)

    try:
        while step < total_steps:
            current_epoch = epoch
            epoch_start = step - batch
            loader.sampler.set_epoch(epoch, start=batch * cfg.data.batch_size)
            loader.dataset.set_epoch(epoch)
            stats = train_one_epoch(net, criterion, loader, optimizer, runtime, step=step, max_steps=total_steps,
                                    mixup_fn=mixup_fn, scaler=scaler, on_step=on_step,
                                    desc=f"search epoch {epoch}")
            step = stats["step"]
            epoch, batch = (epoch + 1, 0) if step - epoch_start >= steps_per_epoch else (epoch, step - epoch_start)
            _save(cfg, named_masks, optimizer, support, step, epoch, batch, runtime)
            main_print(runtime, f"epoch {current_epoch}: loss {stats['loss']:.4f}, step {step}/{total_steps}, "
                                f"support {support[-1][1] if support else {}}")
    except NonFiniteLoss as e:
        logger.close()
        raise NonFiniteLoss(f"{e}; the search stopped. The last good checkpoint is "
                            f"{os.path.join(cfg.output, CHECKPOINT)}; lower search.lr or raise search.nu") from None
    _check_ranks_agree(runtime, optimizer, masks)
    hyper = {k: group[k] for k in ("lr", "kappa", "nu", "lam", "preconditioner", "shrink")}
    if len(optimizer.param_groups) > 1:  # lr and ν per mask
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        for k in ("lr", "nu"):
            hyper[k] = {name: group_of[id(p)][k] for name, p in named_masks}
    meta = {"model": cfg.model.name, "nu_calibration": s.nu_calibration, "hyperparameters": hyper}
    path = SolutionPath.from_optimizer(optimizer, model, support, meta)
    if runtime.is_main:
        path.save(cfg.output)
        write_family_table(model, path, cfg.search.targets, cfg.output)
        from .report import plot_path
        plot_path(path, os.path.join(cfg.output, "path.png"))
        main_print(runtime, f"wrote {cfg.output}/path.json, path.safetensors, family.md, path.png")
    logger.close()
    runtime.barrier()
    return path


def write_family_table(model, path: SolutionPath, targets, output: str) -> List[Dict]:
    from .report import write_table

    family = WeightFamily(model, path)
    rows = []
    for keep in targets:
        s = family.select(keep=keep).summary
        rows.append({"kept (prunable params)": f"{s.kept:.1%}", "params": f"{s.params_after / 1e6:.3f}M",
                     "params kept": f"{s.params_after / s.params_before:.1%}", "GFLOPs": f"{s.flops_after / 1e9:.4f}",
                     "FLOPs kept": f"{s.flops_after / s.flops_before:.1%}"})
    write_table(rows, os.path.join(output, "family"))
    return rows
