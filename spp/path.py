"""The solution path: when each mask element entered the support of Γ."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .checkpoint import atomic_write
from .masks import granularity_of, mask_parameters
from .structure import PAIRS, mask_pairs

__all__ = ["SolutionPath", "support_sizes"]

FIELDS = ("entry_step", "z", "gamma", "mask")
PATH_VERSION = 1


@torch.no_grad()
def support_sizes(optimizer: torch.optim.Optimizer, model: nn.Module) -> Dict[str, int]:
    """Number of non-zero entries of Γ per pair type (``qk``, ``v``, ``mlp``)."""
    pairs = mask_pairs(model)
    counts = dict.fromkeys(PAIRS, 0)
    for name, p in mask_parameters(model):
        gamma = optimizer.state.get(p, {}).get("gamma")
        if gamma is not None:
            counts[pairs[name][0]] += int(torch.count_nonzero(gamma))
    return counts


class SolutionPath:
    """Entry steps of every mask element along one LBI run, plus what breaks their ties.

    ``entries[name]`` maps each field of ``FIELDS`` to a CPU tensor shaped like the mask
    ``name``: ``entry_step`` (first step with Γ ≠ 0, ``inf`` if never), and at the last step
    ``z``, ``gamma`` and the mask value ``mask``. ``support`` is an optional history of
    ``(step, {pair: support size})`` recorded during the run.
    """

    def __init__(self, entries: Mapping[str, Mapping[str, torch.Tensor]], pairs: Mapping[str, Tuple[str, int]],
                 granularity: str, steps: int, support: Optional[List] = None,
                 meta: Optional[Mapping] = None):
        self.entries = {n: {f: e[f].detach().float().cpu() for f in FIELDS} for n, e in entries.items()}
        self.pairs = {n: (p, int(b)) for n, (p, b) in pairs.items()}
        self.granularity = granularity
        self.steps = int(steps)
        self.support = [(int(s), dict(c)) for s, c in (support or [])]
        self.meta = dict(meta or {})

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer, model: nn.Module,
                       support: Optional[List] = None, meta: Optional[Mapping] = None) -> "SolutionPath":
        """Read the path off an :class:`spp.LBI` optimizer over ``model``'s masks."""
        entries, steps = {}, 0
        for name, p in mask_parameters(model):
            state = optimizer.state.get(p, {})
            if "entry_step" in state:
                steps = max(steps, int(state["step"]))
                entries[name] = {"entry_step": state["entry_step"], "z": state["z"],
                                 "gamma": state["gamma"], "mask": p.detach()}
            else:
                entries[name] = {"entry_step": torch.full_like(p, float("inf")), "z": torch.zeros_like(p),
                                 "gamma": torch.zeros_like(p), "mask": p.detach()}
        return cls(entries, mask_pairs(model), granularity_of(model), steps, support, meta)

    def entered_by(self, step: float) -> Dict[str, int]:
        """Elements per pair type that had entered the support by ``step``."""
        counts = dict.fromkeys(PAIRS, 0)
        for name, e in self.entries.items():
            counts[self.pairs[name][0]] += int((e["entry_step"] <= step).sum())
        return counts

    def sizes(self) -> Dict[str, int]:
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
        info = {"version": PATH_VERSION, "granularity": self.granularity, "steps": self.steps,
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
        entries: Dict[str, Dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            name, field = key.rsplit("/", 1)
            entries.setdefault(name, {})[field] = value
        incomplete = [n for n in info["pairs"] if set(entries.get(n, {})) != set(FIELDS)]
        if incomplete:
            raise ValueError(f"{tensor_path} lacks tensors for masks {incomplete[:5]}")
        return cls(entries, {n: tuple(v) for n, v in info["pairs"].items()}, info["granularity"],
                   info["steps"], info.get("support"), info.get("meta"))
