"""`spp search`: one LBI run over the masks of a frozen pretrained model → the solution path."""
from __future__ import annotations

import os
from typing import Dict, List

import torch
from torch.nn.parallel import DistributedDataParallel

from ..build import build_criterion, build_loaders, build_model, check_inputs, input_size_for, task_for
from ..calibrate import calibrate_nu, lbi_groups, search_optimizer
from ..config import Config, save_config
from ..data import build_loader
from ..engine import train_one_epoch
from ..errors import CheckpointError, NonFiniteLoss
from ..family import WeightFamily
from ..masks import MasksAtOne, add_masks, mask_parameters
from ..models import mask_pairs
from ..optim import LBI
from ..path import SolutionPath, support_sizes, whole
from ..runtime import (Runtime, RunLogger, check_same_run, check_shapes,
                      gather_rng_states, load_training_checkpoint, main_print, reseed_ranks,
                      resume_file, restore_rng_states, save_training_checkpoint, setup_runtime)
from ..sharding import shard
from ..tables import plot_path, reach_note, write_table
from ..tasks import task_class

__all__ = ["run_search"]

CHECKPOINT = "checkpoint.pth"


def _path_checksum(optimizer: LBI, masks) -> torch.Tensor:
    rows = []
    for p in masks:
        s = {k: whole(v) for k, v in optimizer.state[p].items()}
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
    masks = {n: whole(p.detach()).cpu() for n, p in model_masks}   # FSDP2: gathered, also a collective
    optim = optimizer.state_dict()
    # whole tensors, one at a time onto the CPU: the state holds up to search.snapshots copies of the masks
    optim["state"] = {i: {k: whole(v).cpu() for k, v in st.items()} for i, st in optim["state"].items()}
    if not runtime.is_main:
        return
    state = {"kind": "search", "model_name": cfg.model.name, "config": cfg.to_dict(),
             "masks": masks,
             "optimizer": optim, "support": support, "step": step,
             "epoch": epoch, "batch": batch, "rng": rng}
    save_training_checkpoint(state, os.path.join(cfg.output, CHECKPOINT))


def _calibration_loader(cfg: Config, loaders, runtime: Runtime):
    """The batches ν is calibrated on (``search.nu_data``): shuffled batches of ``data.batch_size`` from the
    validation split (held out of train with ``data.val_fraction``, else the dataset's own validation set:
    images the model was not trained on), or from the training set, in an order of its own."""
    if cfg.search.nu_data == "train":
        loaders["train"].sampler.set_epoch(-1)   # the search's epochs keep their order
        return loaders["train"]
    val = loaders["val"].dataset
    batch = min(cfg.data.batch_size, len(val) // runtime.world_size)   # ν is taken as at search.nu_batch anyway
    if batch < 2:
        raise ValueError(f"search.nu_data=val: the validation split has {len(val)} images, too few to calibrate nu "
                         f"on {runtime.world_size} process(es); hold out more (data.val_fraction) or calibrate on "
                         f"training batches (search.nu_data=train)")
    batch -= batch % 2   # mixup pairs the samples of a batch
    loader = build_loader(val, batch, True, cfg.data.workers, cfg.seed + 7919, runtime.world_size, runtime.rank)
    source = task_class(cfg.data.dataset)().held_out(len(val), cfg.data)
    main_print(runtime, f"nu: calibrated on {min(len(loader), cfg.search.calibration_batches)} batches of {source}")
    return loader


def run_search(cfg: Config) -> SolutionPath:
    """``spp search``: one LBI run over the masks of the frozen model; writes and returns the solution path."""
    check_inputs(cfg)
    runtime = setup_runtime(cfg.device, cfg.amp, cfg.seed)
    sharded = runtime.distributed and cfg.model.fsdp
    model = build_model(cfg, runtime, meta=sharded and not runtime.is_main)   # FSDP2: rank 0 reads the weights
    add_masks(model, cfg.model.granularity, freeze=True)
    if sharded:
        shard(model, runtime)
    else:
        model.to(runtime.device)
    reseed_ranks(runtime, cfg.seed)
    named_masks = mask_parameters(model)   # after sharding: FSDP2 replaces the parameters with DTensors
    masks = [p for _, p in named_masks]
    loaders = build_loaders(cfg, runtime)
    loader = loaders["train"]
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"the training set has fewer samples per process than data.batch_size={cfg.data.batch_size}")
    total_steps = cfg.search.steps or cfg.search.epochs * steps_per_epoch
    teacher = MasksAtOne(model) if cfg.search.distill > 0 else None   # the dense model: the same weights, masks at 1
    mixup_fn, criterion = build_criterion(cfg.data, teacher, cfg.search.distill)
    task = task_for(cfg)
    net = DistributedDataParallel(model, device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None) \
        if runtime.distributed and not sharded else model
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
                p.copy_(_like(state["masks"][name].to(runtime.device), p))
        optimizer = LBI(lbi_groups(named_masks, s.nu_calibration, pairs))
        if len(optimizer.param_groups) != len(state["optimizer"]["param_groups"]):
            raise CheckpointError(f"{resume} was written with another search.nu_calibration "
                                  f"({len(state['optimizer']['param_groups'])} ν groups, this config makes "
                                  f"{len(optimizer.param_groups)}); resume with the setting it was started with")
        optimizer.load_state_dict(state["optimizer"])  # restores every group's lr and ν too
        for p in masks:   # FSDP2: the whole tensors saved are sharded again like their masks
            optimizer.state[p] = {k: _like(v, p) for k, v in optimizer.state[p].items()}
        support, step, epoch, batch = state["support"], state["step"], state["epoch"], state["batch"]
        restore_rng_states(state["rng"], runtime)
        main_print(runtime, f"resumed {resume} at step {step} (epoch {epoch}, batch {batch})")
    else:
        if s.nu == "auto":
            nu = calibrate_nu(net, _calibration_loader(cfg, loaders, runtime), criterion.base, s.nu_scale,
                              s.calibration_batches, s.nu_calibration, s.nu_batch, s.preconditioner,
                              mixup_fn=mixup_fn, runtime=runtime, task=task)
        else:
            nu = float(s.nu)
        optimizer = search_optimizer(model, nu, rho=s.rho, kappa=s.kappa, lam=s.lam,
                                     lr=None if s.lr == "auto" else s.lr, per=s.nu_calibration,
                                     preconditioner=s.preconditioner, shrink=s.shrink, snapshots=s.snapshots,
                                     clip=s.clip)
    if runtime.is_main:  # after the resume checks: a refused resume leaves the folder as it was
        os.makedirs(cfg.output, exist_ok=True)
        save_config(cfg, os.path.join(cfg.output, "config.yaml"))
    group = optimizer.param_groups[0]
    per_group = "" if len(optimizer.param_groups) == 1 else f" ({s.nu_calibration} 1 of {len(optimizer.param_groups)})"
    main_print(runtime, f"search: {total_steps} steps ({steps_per_epoch}/epoch), lr={group['lr']:.4g} "
                        f"kappa={group['kappa']} nu={group['nu']:.4g}{per_group} lam={group['lam']} clip={group['clip']}")
    if cfg.model.granularity == "head" and s.nu_calibration == "pooled" and s.nu == "auto":
        main_print(runtime, "note: whole-head masks under one pooled nu, which their large gradients set; "
                            "search.nu_calibration=pair ranked better on the quality benchmark (docs/settings.md)")
    logger = RunLogger(cfg.output, runtime)

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
                                    mixup_fn=mixup_fn, scaler=scaler, on_step=on_step, task=task,
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
    hyper = {k: group[k] for k in ("lr", "kappa", "nu", "lam", "preconditioner", "shrink", "clip")}
    if len(optimizer.param_groups) > 1:  # lr and ν per mask
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        for k in ("lr", "nu"):
            hyper[k] = {name: group_of[id(p)][k] for name, p in named_masks}
    meta = {"model": cfg.model.name, "nu_calibration": s.nu_calibration, "hyperparameters": hyper}
    path = SolutionPath.from_optimizer(optimizer, model, support, meta)
    # the family's FLOP count runs the model: under FSDP2 every rank takes part in that forward
    family = WeightFamily(model, path, input_size_for(cfg)) if runtime.is_main or sharded else None
    if runtime.is_main:
        path.save(cfg.output)
        write_family_table(model, path, cfg.search.targets, cfg.output, input_size_for(cfg), family=family)
        plot_path(path, os.path.join(cfg.output, "path.png"))
        main_print(runtime, f"wrote {cfg.output}/path.json, path.safetensors, family.md, path.png")
        main_print(runtime, reach_note(family, path.steps))
    logger.close()
    runtime.barrier()
    return path


def _like(tensor: torch.Tensor, param) -> torch.Tensor:
    """``tensor`` (whole) sharded as ``param`` is, where ``param`` is a DTensor of the same shape."""
    if hasattr(param, "device_mesh") and tensor.shape == param.shape:
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements)
    return tensor


def write_family_table(model, path: SolutionPath, targets, output: str, input_size=None,
                       family: WeightFamily = None) -> List[Dict]:
    family = family or WeightFamily(model, path, input_size)
    rows = []
    for keep in targets:
        s = family.select(keep=keep).summary
        flops = f"{s.flops_after / 1e9:.4f}" + (f" per {input_size[0]} tokens" if input_size else "")
        rows.append({"kept (prunable params)": f"{s.kept:.1%}", "params": f"{s.params_after / 1e6:.3f}M",
                     "params kept": f"{s.params_after / s.params_before:.1%}", "GFLOPs": flops,
                     "FLOPs kept": f"{s.flops_after / s.flops_before:.1%}",
                     "ranked": "along the path" if s.on_path else "past its end, by final z"})
    write_table(rows, os.path.join(output, "family"))
    return rows
