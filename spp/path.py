"""The solution path: when each mask element entered the support of Γ."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .files import atomic_write
from .masks import granularity_of, mask_parameters
from .models import mask_pairs
from .optim import LBI, SNAPSHOT, snapshot_steps
from .structure import PAIRS

__all__ = ["SolutionPath", "support_sizes", "whole"]

FIELDS = ("entry_step", "z", "gamma", "mask")
PATH_VERSION = 2   # 2: snapshots of the masks along the run (version 1, without them, reads as a path that has none)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor (FSDP2) as the whole tensor; any other tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


@torch.no_grad()
def support_sizes(optimizer: torch.optim.Optimizer, model: nn.Module) -> Dict[str, int]:
    """Number of non-zero entries of Γ per pair type (``qk``, ``v``, ``mlp``)."""
    pairs = mask_pairs(model)
    counts = dict.fromkeys(PAIRS, 0)
    for name, p in mask_parameters(model):
        gamma = optimizer.state.get(p, {}).get("gamma")
        if gamma is not None:
            counts[pairs[name][0]] += int(torch.count_nonzero(whole(gamma)))
    return counts


class SolutionPath:
    """Entry steps of every mask element along one LBI run, plus what breaks their ties.

    ``entries[name]`` maps each field of ``FIELDS`` to a CPU tensor shaped like the mask
    ``name``: ``entry_step`` (first step with Γ ≠ 0, ``inf`` if never), and at the last step
    ``z``, ``gamma`` and the mask value ``mask``. ``support`` is an optional history of
    ``(step, {pair: support size})`` recorded during the run. ``snapshots[name]`` maps steps to the mask's
    values after them (:class:`spp.LBI` keeps them), and ``settle`` is the steps a member waits after its last
    element entered before its mask values are read (:meth:`values_at`; ``values="settled"`` of
    :meth:`spp.WeightFamily.select`); a path without snapshots reads the values at the end.
    """

    def __init__(self, entries: Mapping[str, Mapping[str, torch.Tensor]], pairs: Mapping[str, Tuple[str, int]],
                 granularity: str, steps: int, support: Optional[List] = None,
                 meta: Optional[Mapping] = None, snapshots: Optional[Mapping[str, Mapping[int, torch.Tensor]]] = None,
                 settle: float = 0.0):
        # copies: the path must not follow the model's masks when set_masks later changes them; masks sharded by
        # FSDP2 (DTensors) are gathered whole, a collective every rank takes part in
        self.entries = {n: {f: whole(e[f]).detach().float().cpu().clone() for f in FIELDS} for n, e in entries.items()}
        self.snapshots = {n: {int(step): whole(m).detach().float().cpu().clone() for step, m in sorted(s.items())}
                          for n, s in (snapshots or {}).items()}
        self.settle = float(settle)
        self.pairs = {n: (p, int(b)) for n, (p, b) in pairs.items()}
        self.granularity = granularity
        self.steps = int(steps)
        self.support = [(int(s), dict(c)) for s, c in (support or [])]
        self.meta = dict(meta or {})

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer, model: nn.Module,
                       support: Optional[List] = None, meta: Optional[Mapping] = None) -> "SolutionPath":
        """Read the path off an :class:`spp.LBI` optimizer over ``model``'s masks (its snapshots included)."""
        entries, snapshots, steps = {}, {}, 0
        for name, p in mask_parameters(model):
            state = optimizer.state.get(p, {})
            if "entry_step" in state:
                steps = max(steps, int(state["step"]))
                entries[name] = {"entry_step": state["entry_step"], "z": state["z"],
                                 "gamma": state["gamma"], "mask": p.detach()}
                snapshots[name] = {s: state[f"{SNAPSHOT}{s}"] for s in snapshot_steps(state)}
            else:
                entries[name] = {"entry_step": torch.full_like(p, float("inf")), "z": torch.zeros_like(p),
                                 "gamma": torch.zeros_like(p), "mask": p.detach()}
        groups = [g for g in optimizer.param_groups if "nu" in g and "kappa" in g]
        settle = max((LBI.settle_steps(g) for g in groups), default=0.0)
        return cls(entries, mask_pairs(model), granularity_of(model), steps, support, meta, snapshots, settle)

    @classmethod
    def from_entries(cls, model: nn.Module, entry_step: Mapping[str, torch.Tensor],
                     z: Optional[Mapping[str, torch.Tensor]] = None, steps: Optional[int] = None,
                     meta: Optional[Mapping] = None,
                     values: Optional[Mapping[str, torch.Tensor]] = None) -> "SolutionPath":
        """A path over ``model``'s masks from given entry steps, for rankings that no LBI run made.

        ``entry_step[name]`` is shaped like the mask ``name`` (``inf``: never entered); ``z``
        (default 0) breaks ties between equal steps and is the final-z ranking's key. ``values``
        (default 1) are the mask values that members selected with ``values="path"`` keep, for a
        criterion that trained its own masks. Γ is left at 0. ``steps`` defaults to the last finite
        entry step.
        """
        masks = _masks_of(model)
        z = z if z is not None else {n: torch.zeros_like(p) for n, p in masks.items()}
        values = values if values is not None else {n: torch.ones_like(p) for n, p in masks.items()}
        _check_fit(masks, {"entry_step": entry_step, "z": z, "values": values})
        entry = {n: entry_step[n].detach().float().cpu() for n in masks}
        if any(torch.isnan(e).any() for e in entry.values()):
            raise ValueError("entry_step has NaN entries; use inf for elements that never entered")
        if steps is None:
            finite = [e[torch.isfinite(e)] for e in entry.values()]
            steps = int(max((f.max().item() for f in finite if f.numel()), default=0))
        entries = {n: {"entry_step": entry[n], "z": z[n], "gamma": torch.zeros_like(entry[n]),
                       "mask": values[n].detach().float().cpu()} for n in masks}
        return cls(entries, mask_pairs(model), granularity_of(model), steps, meta=meta)

    @classmethod
    def from_scores(cls, model: nn.Module, scores: Mapping[str, torch.Tensor],
                    meta: Optional[Mapping] = None,
                    values: Optional[Mapping[str, torch.Tensor]] = None) -> "SolutionPath":
        """A path that ranks ``model``'s mask elements by descending ``scores``.

        Turns any importance criterion (weight magnitude, first-order Taylor, a Lasso run,
        your own) into a family: :class:`spp.WeightFamily` reads its members off by the same
        budget walk, floors and rounding as a search's. ``scores[name]`` is shaped like the mask
        ``name``; the element with the highest score enters at step 1, the next at step 2 and so
        on (equal scores in mask order), and both rankings (``entry``, ``z``) give that order.
        ``values``: as in :meth:`from_entries` (a Lasso run's mask values, say); every element counts
        as entered, so ``values="auto"`` selects with them.
        """
        masks = _masks_of(model)
        _check_fit(masks, {"scores": scores})
        flat = torch.cat([scores[n].detach().float().cpu().flatten() for n in masks])
        if torch.isnan(flat).any():
            raise ValueError("scores have NaN entries: every element needs a score to be ranked")
        order = torch.argsort(flat, descending=True, stable=True)
        rank = torch.empty(flat.numel())
        rank[order] = torch.arange(1, flat.numel() + 1, dtype=torch.float32)
        entry, z, start = {}, {}, 0
        for n, p in masks.items():
            entry[n] = rank[start:start + p.numel()].view(p.shape)
            z[n] = 1 - (entry[n] - 1) / flat.numel()  # positive and falling with rank, for rank="z"
            start += p.numel()
        return cls.from_entries(model, entry, z, flat.numel(), meta, values)

    def __repr__(self) -> str:
        entered, sizes = self.entered_by(float(self.steps)), self.sizes()
        counts = ", ".join(f"{pair} {entered[pair]}/{sizes[pair]}" for pair in PAIRS)
        hyper = self.meta.get("hyperparameters", {})
        settings = "".join(f", {k}={v}" for k, v in hyper.items() if k in ("kappa", "lam") and not isinstance(v, dict))
        snapshots = max((len(s) for s in self.snapshots.values()), default=0)
        kept = f", {snapshots} snapshots of the masks (settle {self.settle:g} steps)" if snapshots else ""
        return (f"SolutionPath({self.steps} steps, {len(self.entries)} masks ({self.granularity}), "
                f"entered {counts}{settings}{kept})")

    def values_at(self, step: float) -> Dict[str, torch.Tensor]:
        """The mask values at the first snapshot at or after ``step``, per mask; the values at the end of the run
        for a mask with no snapshot that late (or none at all: a path from scores, or saved before version 2)."""
        out = {}
        for name, e in self.entries.items():
            later = [s for s in self.snapshots.get(name, {}) if s >= step]
            out[name] = self.snapshots[name][later[0]] if later else e["mask"]
        return out

    def entered_by(self, step: float) -> Dict[str, int]:
        """Elements per pair type that had entered the support by ``step``."""
        counts = dict.fromkeys(PAIRS, 0)
        for name, e in self.entries.items():
            counts[self.pairs[name][0]] += int((e["entry_step"] <= step).sum())
        return counts

    def sizes(self) -> Dict[str, int]:
        """Mask elements per pair type: ``{"qk": n, "v": n, "mlp": n}``."""
        counts = dict.fromkeys(PAIRS, 0)
        for name, e in self.entries.items():
            counts[self.pairs[name][0]] += e["entry_step"].numel()
        return counts

    def entry_curve(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(steps, fraction entered)``: the cumulative support along the path."""
        entry = torch.cat([e["entry_step"].flatten() for e in self.entries.values()])
        finite = entry[torch.isfinite(entry)].sort().values
        fraction = torch.arange(1, finite.numel() + 1, dtype=torch.float64) / entry.numel()
        return finite, fraction

    def save(self, directory: str) -> None:
        """Write ``path.safetensors`` (tensors) and ``path.json`` (everything else)."""
        from safetensors.torch import save_file

        tensors = {f"{n}/{f}": e[f].contiguous() for n, e in self.entries.items() for f in FIELDS}
        tensors.update({f"{n}/{SNAPSHOT}{step}": m.contiguous() for n, s in self.snapshots.items() for step, m in s.items()})
        info = {"version": PATH_VERSION, "granularity": self.granularity, "steps": self.steps, "settle": self.settle,
                "pairs": {n: list(v) for n, v in self.pairs.items()},
                "support": [[s, c] for s, c in self.support], "meta": self.meta}
        atomic_write(os.path.join(directory, "path.safetensors"), lambda f: save_file(tensors, f))
        atomic_write(os.path.join(directory, "path.json"),
                     lambda f: open(f, "w").write(json.dumps(info, indent=1) + "\n"))

    @classmethod
    def load(cls, directory: str) -> "SolutionPath":
        from safetensors.torch import load_file

        json_path = os.path.join(directory, "path.json")
        tensor_path = os.path.join(directory, "path.safetensors")
        for path in (json_path, tensor_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} not found; a solution path is saved as path.json + "
                                        "path.safetensors by SolutionPath.save (or `spp search`)")
        try:
            with open(json_path) as f:
                info = json.load(f)
            tensors = load_file(tensor_path)
        except Exception as e:  # noqa: BLE001 - report which file is broken
            raise ValueError(f"cannot read the solution path in {directory}: {e}") from e
        if info.get("version", 1) > PATH_VERSION:
            raise ValueError(f"{json_path} is a version {info['version']} path; this spp reads up to version "
                             f"{PATH_VERSION}: upgrade spp (git pull, then pip install -e .)")
        entries: Dict[str, Dict[str, torch.Tensor]] = {}
        snapshots: Dict[str, Dict[int, torch.Tensor]] = {}
        for key, value in tensors.items():
            name, field = key.rsplit("/", 1)
            if field.startswith(SNAPSHOT):
                snapshots.setdefault(name, {})[int(field[len(SNAPSHOT):])] = value
            else:
                entries.setdefault(name, {})[field] = value
        incomplete = [n for n in info["pairs"] if set(entries.get(n, {})) != set(FIELDS)]
        if incomplete:
            raise ValueError(f"{tensor_path} lacks tensors for masks {incomplete[:5]}")
        return cls(entries, {n: tuple(v) for n, v in info["pairs"].items()}, info["granularity"],
                   info["steps"], info.get("support"), info.get("meta"), snapshots, info.get("settle", 0.0))


def _masks_of(model: nn.Module) -> Dict[str, torch.Tensor]:
    masks = dict(mask_parameters(model))
    if not masks:
        raise ValueError("the model has no masks: call spp.add_masks(model) first")
    return masks


def _check_fit(masks: Mapping[str, torch.Tensor], given: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Raise if any of ``given`` (``{what: {mask name: tensor}}``) lacks a mask, names something that is
    not a mask, or holds a tensor not shaped like its mask."""
    problems = []
    for what, tensors in given.items():
        problems += [f"{what} lacks {n}" for n in masks if n not in tensors]
        problems += [f"{what} has {n}, which is not a mask of the model" for n in tensors if n not in masks]
        problems += [f"{what}[{n!r}] has shape {tuple(tensors[n].shape)}, the mask {tuple(p.shape)}"
                     for n, p in masks.items() if n in tensors and tensors[n].shape != p.shape]
    if problems:
        raise ValueError("; ".join(problems[:6]) + " (spp.mask_parameters(model) names the masks: "
                         "give one tensor per mask, shaped like it)")
