"""The harness the benchmark scripts share (``scripts/benchmark_llm.py``, ``benchmark_clip.py``): one dense model
and its masked copy read by every method, members cut by one budget walk and compressed, the finetune recipe run
through :func:`spp.engine.train_one_epoch`, the loop over methods and seeds that times each method and writes the
results after every run, and the Markdown tables of mean ± std over seeds.

A method is a function ``(bench, seed, removed) -> ({removed: (compressed member, info)}, extra)``; ``info`` holds at
least ``params``; ``extra`` goes into the run's record (``"shared seconds"``: time an earlier method spent on work this
one reuses, added to its time; ``"failed"``: why it produced no member).
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .compress import compress
from .criteria import add_biases, magnitude_scores
from .engine import evaluate, train_one_epoch
from .family import WeightFamily
from .masks import add_masks
from .path import SolutionPath
from .runtime import Runtime, seed_everything
from .tables import mean_std, write_json
from .tasks import Task, to_device

__all__ = ["MaskedBench", "take", "finetune", "run_methods", "budget_section", "seed_cells"]

Chosen = Tuple[nn.Module, Dict[str, Any]]
"""A compressed member and what was chosen (``params``, a reading, ``masks`` ...)."""
CPU = Runtime(torch.device("cpu"), None)


class MaskedBench:
    """The dense model, its masked copy (every prunable structure of the family, at ``granularity``: dims by
    default, or whole heads) and the task its batches are read by. A benchmark adds its data: ``loader(split, seed)``."""

    def __init__(self, dense: nn.Module, task: Task, input_size: Optional[Tuple[int, ...]] = None,
                 runtime: Runtime = CPU, granularity: str = "dim"):
        self.dense, self.task, self.input_size, self.runtime = dense.eval(), task, input_size, runtime
        self.masked = add_masks(copy.deepcopy(self.dense), granularity).eval()
        self.prunable = self.family_of(SolutionPath.from_scores(self.masked, magnitude_scores(self.masked))).prunable()

    def loader(self, split: str, seed: int) -> Iterable:
        """The batches of ``split`` (``train``, ``val``, ``test``); the training order set by ``seed``."""
        raise NotImplementedError

    def family_of(self, path: SolutionPath) -> WeightFamily:
        """The family of members ``path`` ranks, over the masked model."""
        return WeightFamily(self.masked, path, input_size=self.input_size)

    def compressed(self, masks: Dict[str, torch.Tensor]) -> nn.Module:
        """The masked model with ``masks``, compressed (in eval mode)."""
        return compress(self.masked, masks).eval()

    def members(self, path: SolutionPath, removed: Sequence[float], values: str = "binary",
                biases: Optional[Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = None
                ) -> Dict[float, Chosen]:
        """The path's member at each budget (``remove=r`` of the prunable parameters), compressed, with its
        parameter count and masks. ``biases(masks)``: a bias compensation (FLAP's) added to each compressed member,
        whose info then holds no masks (the member is more than its masks)."""
        family, out = self.family_of(path), {}
        for r in removed:
            member = family.select(remove=r, values=values)
            small = self.compressed(member.masks)
            if biases is not None:
                add_biases(small, biases(member.masks))
            out[r] = (small, {"params": member.summary.params_after,
                              **({} if biases is not None else {"masks": member.masks})})
        return out

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """The task's training loss of ``model`` on one loader batch."""
        inputs, targets = to_device(self.task.split(batch), self.runtime.device)
        return self.task.loss(self.task.forward(model, inputs), targets)

    def metrics(self, model: nn.Module, loader: Iterable) -> Dict[str, float]:
        """The task's metrics of ``model`` over ``loader``."""
        return evaluate(model, loader, self.runtime, task=self.task)


def take(loader_at: Callable[[int], Iterable], steps: int) -> Iterator:
    """``steps`` batches, epoch after epoch: ``loader_at(done)`` gives the loader of the epoch that starts after
    ``done`` batches (its seed may follow ``done``, or not)."""
    done = 0
    while done < steps:
        for batch in loader_at(done):
            yield batch
            done += 1
            if done >= steps:
                return


def finetune(bench: MaskedBench, model: nn.Module, batches: Iterable, steps: int, lr: float, *,
             weight_decay: float, betas: Tuple[float, float] = (0.9, 0.999), warmup: int = 10, cosine: bool = False,
             clip: float = 1.0, at: Sequence[int] = (), evaluate_at: Optional[Callable[[nn.Module], Any]] = None
             ) -> Dict[int, Any]:
    """Full finetuning of a copy of ``model`` on ``steps`` of ``batches`` with the task's loss: AdamW, the lr warmed
    up linearly over ``warmup`` steps, then constant or (``cosine``) annealed to 0 at ``steps``, gradients clipped
    to norm ``clip``. Returns ``{step: evaluate_at(model)}`` at each step of ``at`` (and at ``steps``)."""
    model = copy.deepcopy(model).train()
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)
    shape = (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))) if cosine else (lambda s: 1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, shape(s)))
    out: Dict[int, Any] = {}

    def on_step(step: int, loss: float) -> None:
        schedule.step()
        if evaluate_at is not None and (step in at or step == steps):
            out[step] = evaluate_at(model)
            model.train()

    train_one_epoch(model, lambda inputs, outputs, targets: bench.task.loss(outputs, targets), batches,
                    optimizer, bench.runtime, step=0, max_steps=steps, clip_grad=clip, on_step=on_step,
                    desc="finetune", task=bench.task)
    return out


def run_methods(bench: MaskedBench, results: Dict, path: str, methods: Sequence[str], seeds: Sequence[int],
                removed: Sequence[float], runners: Dict[str, Callable], score: Callable[..., Dict],
                one_ranking: Sequence[str] = ()) -> Dict:
    """Every method at every seed: ``seed_everything(seed)``, the method's members at every budget (timed), each
    scored by ``score(method, seed, removed, member, info) -> row``, the run written to ``path`` (atomic JSON)
    after every seed. ``one_ranking``: methods whose ranking no seed changes (run once, copied to the others)."""
    for method in methods:
        for seed in seeds:
            if method in one_ranking and seed != seeds[0]:
                results["runs"][method][str(seed)] = results["runs"][method][str(seeds[0])]
                continue
            seed_everything(seed)
            start = time.time()
            members, extra = runners[method](bench, seed, removed)
            run = {"time": time.time() - start + extra.pop("shared seconds", 0.0), **extra}
            if "failed" in extra:
                print(f"{method}: {extra['failed']}", flush=True)
            for r, (model, info) in members.items():
                run[str(r)] = score(method, seed, r, model, info)
            results["runs"].setdefault(method, {})[str(seed)] = run
            write_json(results, path)
    return results


def budget_section(title: str, seeds: Sequence[int], removed: Sequence[float],
                   rows: List[Union[str, Tuple[str, List[str], List[float]]]]) -> List[str]:
    """A Markdown table under ``**title** (seeds ...)``: a row per ``(label, cells, seconds of each seed)`` (a string:
    that line as it is), a column per budget and the mean seconds each method took for all budgets."""
    lines = [f"**{title}** (seeds {', '.join(map(str, seeds))})", "",
             "| method | " + " | ".join(f"−{r:.0%}" for r in removed) + " | time for all budgets (s) |",
             "|---|" + "---|" * (len(removed) + 1)]
    for row in rows:
        if isinstance(row, str):
            lines.append(row)
            continue
        label, cells, times = row
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {statistics.mean(times):.0f} |" if times else "")
    return lines + [""]


def seed_cells(runs: Dict, seeds: Sequence[int], removed: Sequence[float], value: Callable[[Dict], Optional[float]]
               ) -> List[str]:
    """Each budget's ``mean ± std`` over the seeds of ``runs`` whose row gives a value."""
    cells = []
    for r in removed:
        values = [value(runs[str(s)][str(r)]) for s in seeds if str(s) in runs]
        cells.append(mean_std([v for v in values if v is not None]))
    return cells
