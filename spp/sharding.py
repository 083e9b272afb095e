"""FSDP2 for models that do not fit one GPU (``model.fsdp: true`` under torchrun), for the search and the retrain.

Only rank 0 reads the weights: the other ranks build the model's skeleton on the meta device (no memory,
no file read), every rank shards it with ``torch.distributed.fsdp.fully_shard`` (each block, then the rest),
and rank 0's tensors are broadcast into the shards (``set_model_state_dict(..., broadcast_from_rank0=True)``).
Host memory is then one copy of the model on rank 0's node, not one per process. Parameters FSDP2 cannot
shard (scalars, empty tensors) stay whole on every rank, their gradients averaged as DDP averages them.
Checkpoints hold whole tensors, gathered to rank 0 (``get_model_state_dict`` / ``get_optimizer_state_dict``
with ``full_state_dict=True``), so the weights a sharded run saves load anywhere, sharded or not.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict

import torch
from torch import nn

from .models import family_of

if TYPE_CHECKING:   # annotations only: the core (spp.calibrate, spp.engine) imports this module, not the run plumbing
    from .runtime import Runtime

__all__ = ["is_sharded", "shard", "full_state_dict", "full_optimizer_state", "load_full_state"]


def is_sharded(model: nn.Module) -> bool:
    """``model``'s parameters are FSDP2's DTensors (forward and backward are collectives over the ranks)."""
    return any(hasattr(p, "device_mesh") for p in model.parameters())


def shard(model: nn.Module, runtime: Runtime) -> nn.Module:
    """Shard ``model`` over the ranks in place and fill the shards from rank 0's tensors; returns it.

    Every rank passes the same architecture: rank 0 with its weights (on the CPU or the device), the
    others on the meta device or with weights of their own, which are overwritten. Tied weights stay tied.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    full = model.state_dict() if runtime.is_main else {}   # whole tensors: kept until broadcast
    on_meta = any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model   # under peft's LoRA wrapper
    family = family_of(base)
    kept = _unsharded(model)   # replicated instead: scalars (CLIP's logit scale) and empty projections
    for block in family.blocks(base):
        fully_shard(block, ignored_params=set(kept) or None)
    fully_shard(model, ignored_params=set(kept) or None)   # moves rank 0's shards and every buffer to the device
    for method in family.forward_methods:
        if hasattr(base, method):
            register_fsdp_forward_method(base, method)
    if on_meta:
        model.to_empty(device=runtime.device)
        kept = _unsharded(model)   # to_empty made them anew
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for tensor in (*model.buffers(), *kept):   # non-persistent buffers (RoPE's inverse frequencies) are in no
        torch.distributed.broadcast(tensor.data, src=0)   # state dict; the replicated parameters are each rank's own
    for p in kept:
        if p.requires_grad:   # replicated, so their gradient is averaged here as DDP would
            p.register_post_accumulate_grad_hook(_average_gradient)
    if runtime.is_main:
        print(f"FSDP2: the model sharded over {runtime.world_size} processes, its weights read by rank 0 only",
              flush=True)
    return model


def _unsharded(model: nn.Module) -> list:
    """Parameters FSDP2 cannot shard, kept whole on every rank: scalars, and the empty projections of a member
    that has lost every dim of one kind in a layer."""
    return [p for p in model.parameters() if p.dim() == 0 or p.numel() == 0]


def _average_gradient(p: torch.Tensor) -> None:
    torch.distributed.all_reduce(p.grad)
    p.grad /= torch.distributed.get_world_size()


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The whole tensors of a sharded ``model`` on rank 0's CPU (``{}`` on the other ranks); a collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_options())


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict:
    """The optimizer state of a sharded ``model``, whole and keyed by parameter name, on rank 0; a collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: Dict, optimizer_state: Dict) -> None:
    """Load whole tensors (as :func:`full_state_dict` and :func:`full_optimizer_state` wrote them, read by
    every rank) into a sharded ``model`` and its ``optimizer``; each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
