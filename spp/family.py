"""The weight family: every pruned member of one search, selected by budget after the fact."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .flops import count_flops, count_params
from .models import model_geometry
from .path import SolutionPath
from .structure import PAIRS, Geometry, Widths, mask_names, widths_from_masks

__all__ = ["WeightFamily", "Member", "Summary"]

BUDGET_KINDS = ("params", "flops", "elements")
SCOPES = ("global", "pair", "part", "uniform")
RANKINGS = ("entry", "z")
VALUES = ("auto", "binary", "path", "settled")
# the pipeline's family.* / export.* also take "best": every reading tried by WeightFamily.select_best on val
CHOSEN_VALUES, CHOSEN_RANKINGS = (*VALUES, "best"), (*RANKINGS, "best")


@dataclass
class Summary:
    """What a member costs: whole-model params and FLOPs before/after, and every block's widths."""

    by: str
    target: float                 # requested kept fraction of the prunable cost (by `by`)
    kept: float                   # achieved kept fraction of the prunable cost
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    widths: List[Widths]
    elements: Dict[str, List[int]] = field(default_factory=dict)  # pair -> [kept, total]
    values: str = "binary"        # what kept elements hold: 1 ("binary"), M at the search's end ("path") or soon
                                  # after the member's last element entered ("settled")
    rank: str = "entry"           # the ranking the budget walk followed
    scores: Dict[str, float] = field(default_factory=dict)   # select_best: each reading's score ("entry, binary": ...)
    on_path: bool = False         # every kept element entered the support by the end of the search

    def to_dict(self) -> Dict:
        """The summary as JSON-ready plain values (``summary.json`` of an export)."""
        d = {k: getattr(self, k) for k in ("by", "target", "kept", "params_before", "params_after",
                                            "flops_before", "flops_after", "elements", "values", "rank", "scores",
                                            "on_path")}
        d["widths"] = [w.to_dict() for w in self.widths]
        return d

    def __str__(self) -> str:
        kv = any(w.num_kv_heads is not None for w in self.widths)
        lines = [f"member: {self.kept:.1%} of prunable {self.by} kept (target {self.target:.1%})",
                 f"params {self.params_before:,} -> {self.params_after:,} "
                 f"({self.params_after / self.params_before:.1%}), FLOPs {self.flops_before / 1e6:.2f}M -> "
                 f"{self.flops_after / 1e6:.2f}M ({self.flops_after / self.flops_before:.1%}), "
                 f"ranked by {'entry step' if self.rank == 'entry' else 'final z'}, kept elements hold "
                 + {"binary": "1", "path": "the path's final mask values",
                    "settled": "the mask values soon after their last element entered"}[self.values]
                 + (" (scores of each reading: " + ", ".join(f"{k} {v:.4g}" for k, v in self.scores.items()) + ")"
                    if self.scores else ""),
                 "block  heads  qk_heads  qk_dim  v_dim  mlp" + ("  kv_heads" if kv else "")]
        lines += [f"{i:5d}  {w.num_heads:5d}  {w.num_qk_heads:8d}  {w.qk_dim:6d}  {w.v_dim:5d}  {w.mlp_hidden:4d}"
                  + (f"  {w.num_kv_heads:8d}" if kv else "") for i, w in enumerate(self.widths)]
        return "\n".join(lines)


class Member(NamedTuple):
    masks: Dict[str, torch.Tensor]   # masks by parameter name: 0 for removed elements (summary.values says the rest)
    summary: Summary

    def __repr__(self) -> str:   # the summary's first two lines, not every mask's values
        s = self.summary
        return (f"Member({s.kept:.1%} of prunable {s.by} kept, params {s.params_before:,} -> {s.params_after:,}, "
                f"FLOPs {s.flops_before / 1e6:.2f}M -> {s.flops_after / 1e6:.2f}M, {len(self.masks)} masks; "
                "print(member.summary) for every block's widths)")


class _BlockWalk:
    """Kept elements of one block during a walk, and its widths (dead heads excluded)."""

    def __init__(self, geom: Geometry, granularity: str):
        self.geom, self.granularity = geom, granularity
        self.on = {p: np.zeros(geom.mask_size(p, granularity), bool) for p in ("qk", "v")}
        self.mlp = 0
        self._attention: Optional[Widths] = None   # the attention's widths, until a qk or v element changes them

    def add(self, pair: str, index: int, on: bool = True) -> None:
        if pair == "mlp":
            self.mlp += 1 if on else -1
        else:
            self.on[pair][index] = on
            self._attention = None

    def widths(self) -> Widths:
        if self._attention is None:   # most steps of a walk add MLP neurons, which leave the attention as it is
            self._attention = self.geom.widths_from_kept(self.on["qk"], self.on["v"], 0, self.granularity)
        a = self._attention
        return replace(a, mlp_hidden=self.mlp)


class WeightFamily:
    """All members of one search, each picked by a budget with no second search.

    Args:
        model: the model the path was searched on (masked or dense: only its shape is read).
        path: the :class:`SolutionPath` of the search.
        input_size: ``(C, H, W)`` (vision) or ``(tokens,)`` (LLMs) at which FLOPs are counted
            (default: the model's).
    """

    def __init__(self, model: nn.Module, path: SolutionPath, input_size: Optional[Sequence[int]] = None):
        self.path = path
        self.granularity = path.granularity
        self.geoms = model_geometry(model, input_size)
        self._check_path()
        self.params_before = count_params(model)
        self.flops_before = count_flops(model, input_size)
        blocks, pairs, local, entry, score = [], [], [], [], []
        self._offset: Dict[tuple, int] = {}
        start = 0
        for g in self.geoms:
            for p, name in mask_names(g).items():
                e = path.entries[name]
                n = e["entry_step"].numel()
                self._offset[(g.index, p)] = start
                start += n
                blocks.append(np.full(n, g.index))
                pairs.append(np.full(n, PAIRS.index(p)))
                local.append(np.arange(n))
                entry.append(e["entry_step"].numpy().ravel())
                score.append(e["z"].abs().numpy().ravel())
        self.block, self.pair, self.local = (np.concatenate(a) for a in (blocks, pairs, local))
        self.entry, self.score = np.concatenate(entry), np.concatenate(score)

    def __repr__(self) -> str:
        return (f"WeightFamily({len(self.geoms)} blocks, params {self.params_before:,} "
                f"({self.prunable('params'):,} prunable), FLOPs {self.flops_before / 1e6:.2f}M, "
                f"{self.granularity} masks, ranked along {self.path!r})")

    def _check_path(self) -> None:
        problems = []
        for g in self.geoms:
            size = {p: g.mask_size(p, self.granularity) for p in PAIRS}
            for p, name in mask_names(g).items():
                if name not in self.path.entries:
                    problems.append(f"{name} missing")
                elif self.path.entries[name]["entry_step"].numel() != size[p]:
                    problems.append(f"{name}: path has {self.path.entries[name]['entry_step'].numel()} "
                                    f"entries, model needs {size[p]}")
        if problems:
            raise ValueError("the solution path does not fit this model (was it searched on another "
                             "model or granularity?): " + "; ".join(problems[:6]))

    # ----- ranking -------------------------------------------------------------------------
    def ranking(self, rank: str = "entry") -> np.ndarray:
        """Element indices, most important first."""
        if rank not in RANKINGS:
            raise ValueError(f"rank={rank!r}: choose one of {RANKINGS}")
        if rank == "entry":  # earlier entry first; ties by larger |z|
            return np.lexsort((-self.score, self.entry))
        return np.argsort(-self.score, kind="stable")

    def _apply_floor(self, order: np.ndarray, floor: int):
        """Move the top ``floor`` elements of every (block, pair) to the front.

        Returns the new order and how many elements at its front are forced.
        """
        if floor <= 0:
            return order, 0
        group = (self.block[order] * len(PAIRS) + self.pair[order]).tolist()
        seen: Dict[int, int] = {}
        forced = np.zeros(order.size, bool)
        for i, g in enumerate(group):
            if seen.get(g, 0) < floor:
                seen[g] = seen.get(g, 0) + 1
                forced[i] = True
        if self.granularity == "head":  # a query-key head is only alive with its values
            position = np.empty(order.size, int)
            position[order] = np.arange(order.size)
            for e in order[forced & (self.pair[order] == PAIRS.index("qk"))].tolist():
                forced[position[self._offset[(int(self.block[e]), "v")] + int(self.local[e])]] = True
        return np.concatenate([order[forced], order[~forced]]), int(forced.sum())

    # ----- costs ---------------------------------------------------------------------------
    def _total(self, widths: Sequence[Widths], by: str) -> int:
        return sum(g.cost(w, by, self.granularity) for g, w in zip(self.geoms, widths))

    def _empty(self) -> List[Widths]:
        return [g.empty for g in self.geoms]

    def prunable(self, by: str = "params") -> int:
        """Cost of everything the masks can remove."""
        return self._total([g.full for g in self.geoms], by) - self._total(self._empty(), by)

    def reach(self, by: str = "params") -> float:
        """Fraction of the prunable ``by`` that the path covers: the cost of the elements that entered the
        support of Γ by the end of the search. A member that keeps at most this much is ranked along the path
        (by entry step); a larger one also keeps elements that never entered, ranked by their final |z|, which
        a longer search would order by entry instead (the entry steps up to a step do not depend on the steps
        after it; the final mask values and |z| do)."""
        if by not in BUDGET_KINDS:
            raise ValueError(f"by={by!r}: choose one of {BUDGET_KINDS}")
        return self.summarize(self._masks(np.isfinite(self.entry)), by=by).kept

    def _constant(self, by: str) -> int:
        dense = {"params": self.params_before, "flops": self.flops_before, "elements": 0}[by]
        return dense - self._total([g.full for g in self.geoms], by)

    # ----- walks ---------------------------------------------------------------------------
    def _walk_global(self, order: np.ndarray, target: float, by: str, forced: int) -> np.ndarray:
        walks = [_BlockWalk(g, self.granularity) for g in self.geoms]
        costs = [g.cost(w.widths(), by, self.granularity) for g, w in zip(self.geoms, walks)]
        base = total = sum(costs)
        kept = 0
        for i, e in enumerate(order.tolist()):
            b = int(self.block[e])
            walk = walks[b]
            walk.add(PAIRS[self.pair[e]], int(self.local[e]))
            new = self.geoms[b].cost(walk.widths(), by, self.granularity)
            total += new - costs[b]
            costs[b] = new
            if i >= forced and total - base > target * (1 + 1e-12):
                break
            kept = i + 1
        return order[:kept]

    def parts(self) -> List[str]:
        """The model's parts (CLIP's ``"vision"`` and ``"text"`` towers; one unnamed part for other models)."""
        return list(dict.fromkeys(g.part for g in self.geoms))

    def _walk_part(self, order: np.ndarray, keep: float, by: str, forced: int) -> np.ndarray:
        part_of_block = np.array([g.part for g in self.geoms])
        is_forced = np.arange(order.size) < forced
        chosen = []
        for part in self.parts():
            mine = part_of_block[self.block[order]] == part
            geoms = [g for g in self.geoms if g.part == part]
            prunable = sum(g.cost(g.full, by, self.granularity) - g.cost(g.empty, by, self.granularity) for g in geoms)
            chosen.append(self._walk_global(order[mine], keep * prunable, by, int(is_forced[mine].sum())))
        return np.concatenate(chosen)

    def _walk_pair(self, order: np.ndarray, keep: float, by: str, forced: int) -> np.ndarray:
        chosen = []
        unit = [g.unit_costs(by, self.granularity) for g in self.geoms]
        is_forced = np.arange(order.size) < forced
        for p, pair in enumerate(PAIRS):
            in_pair = self.pair[order] == p
            sub = order[in_pair]
            cost = np.array([unit[b][pair][i] if np.ndim(unit[b][pair]) else unit[b][pair]   # per entry, or one
                             for b, i in zip(self.block[sub].tolist(), self.local[sub].tolist())], dtype=np.float64)
            n = int(np.searchsorted(np.cumsum(cost), keep * cost.sum() * (1 + 1e-12), side="right"))
            chosen.append(sub[:max(n, int(is_forced[in_pair].sum()))])
        return np.concatenate(chosen)

    def _uniform_units(self, order: np.ndarray) -> List[np.ndarray]:
        """The units a uniform member is made of, most important first: the j-th ranked element of a pair type in
        every block (dims, neurons); with whole heads, the j-th ranked query head (its query-key and value entries
        together, at the better of their two places) of every key/value group of every block, or of every block
        where each head has its own key/value head. A unit's place is the mean place of its elements in ``order``."""
        position = np.empty(order.size, np.int64)
        position[order] = np.arange(order.size)
        units: Dict[tuple, List[int]] = {}
        places: Dict[tuple, List[int]] = {}
        for g in self.geoms:
            pairs = ("mlp",) if self.granularity == "head" else PAIRS
            for pair in pairs:
                start = self._offset[(g.index, pair)]
                ranked = np.argsort(position[start:start + g.mask_size(pair, self.granularity)], kind="stable")
                for j, local in enumerate(ranked.tolist()):
                    units.setdefault((pair, j), []).append(start + local)
                    places.setdefault((pair, j), []).append(int(position[start + local]))
            if self.granularity == "head":
                qk, v = self._offset[(g.index, "qk")], self._offset[(g.index, "v")]
                heads = g.mask_size("v", self.granularity)
                group = getattr(g, "group", 1)
                group = heads if group == 1 else group   # own key/value heads: any heads of the block
                for first in range(0, heads, group):
                    place = np.minimum(position[qk + first:qk + first + group], position[v + first:v + first + group])
                    for j, local in enumerate(np.argsort(place, kind="stable").tolist()):
                        units.setdefault(("head", j), []).extend([qk + first + local, v + first + local])
                        places.setdefault(("head", j), []).append(int(place[local]))
        keys = sorted(units, key=lambda k: (float(np.mean(places[k])), k))
        return [np.array(units[k], dtype=np.int64) for k in keys]

    def _add_unit(self, walks: List[_BlockWalk], unit: np.ndarray, on: bool) -> None:
        for e in unit.tolist():
            walks[int(self.block[e])].add(PAIRS[self.pair[e]], int(self.local[e]), on)

    def _walk_uniform(self, order: np.ndarray, target: float, by: str) -> np.ndarray:
        walks = [_BlockWalk(g, self.granularity) for g in self.geoms]
        costs = {b: g.cost(w.widths(), by, self.granularity) for b, (g, w) in enumerate(zip(self.geoms, walks))}
        base = total = sum(costs.values())
        chosen: List[np.ndarray] = []
        for unit in self._uniform_units(order):   # a unit that does not fit is taken back, and the walk goes on
            blocks = sorted(set(self.block[unit].tolist()))
            self._add_unit(walks, unit, True)
            new = {b: self.geoms[b].cost(walks[b].widths(), by, self.granularity) for b in blocks}
            added = sum(new[b] - costs[b] for b in blocks)
            if total + added - base <= target * (1 + 1e-12):
                total += added
                costs.update(new)
                chosen.append(unit)
            else:
                self._add_unit(walks, unit, False)
        return np.concatenate(chosen) if chosen else np.zeros(0, np.int64)

    # ----- selection -----------------------------------------------------------------------
    def select(self, keep: Optional[float] = None, remove: Optional[float] = None,
               budget: Optional[float] = None, by: str = "params", scope: str = "global",
               rank: str = "entry", floor: int = 0, round_to: int = 1, values: str = "auto") -> Member:
        """The member that fits a budget.

        Give exactly one of:
            keep: fraction of the prunable cost (``by``) to keep;
            remove: fraction of the prunable cost to remove;
            budget: absolute cost of the whole model (parameters, FLOPs per image or mask
                elements), ``scope="global"`` only.

        Args:
            by: ``"params"`` (default), ``"flops"`` (at the family's input size) or ``"elements"``.
            scope: ``"global"`` ranks all pairs together (default); ``"pair"`` meets the
                fraction within each pair type separately, on each element's own cost; ``"part"``
                meets it within each part of the model separately (CLIP's vision and text towers);
                ``"uniform"``: every block keeps the same widths (the same number of query-key pairs, value
                dims and neurons; with whole heads, the same query heads in every key/value group), each
                block's own best elements by the ranking, the widths chosen by the budget walk over units of
                one element per block: a member that one plain config describes
                (:meth:`spp.models.base.ModelFamily.plain_config`, whole heads on Llama-like models).
            rank: ``"entry"`` (entry step, ties by larger |z|; the paper's) or ``"z"``
                (final |z| alone).
            floor: keep at least this many entries of every pair of every block.
            round_to: round each kept width to a multiple of this (≥ 1 entry kept whenever any
                was); moves the cost off the target by up to half a multiple per width.
            values: what the kept elements hold. ``"binary"``: 1, the pretrained weights as
                they are. ``"path"``: the mask values ``M`` at the end of the search (folded
                into the weights by :func:`spp.compress`), the network the loss saw with the
                rest of the elements near 0. ``"settled"``: ``M`` as it was ``path.settle`` steps
                (3/ρ: three time constants of M's pull toward Γ) after the member's last element
                entered, the network the loss saw when the support was this member; unlike
                ``"path"`` it does not change when the search runs longer (the end's values are
                tuned to a support larger than a small member). A member past the path's end, or a
                path without snapshots, reads them at the end, as ``"path"`` (and its summary says
                ``"path"``). ``"auto"`` (default):
                ``"settled"`` when every element the budget walk keeps had entered the support of Γ
                by the end of the search (the member lies on the path the search covered),
                ``"binary"`` otherwise (a larger member, ranked past the path's end, where the
                search's values of the elements it kept out of the support would starve the
                elements it adds). :meth:`select_best` picks the reading on held-out data instead.

        Without floor and rounding, the kept elements are a prefix of one ranking, so a member
        at a smaller budget is a subset of every member at a larger one, and the global scope
        hits its target within one element's cost (an element that brings a head back to life
        costs what it revives).
        """
        if by not in BUDGET_KINDS:
            raise ValueError(f"by={by!r}: choose one of {BUDGET_KINDS}")
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r}: choose one of {SCOPES}")
        if sum(x is not None for x in (keep, remove, budget)) != 1:
            raise ValueError("give exactly one of keep=, remove= or budget=")
        if floor < 0:
            raise ValueError(f"floor={floor}: entries kept per pair of every block, >= 0")
        if round_to < 1:
            raise ValueError(f"round_to={round_to}: the multiple kept widths are rounded to, >= 1 (1: no rounding)")
        if values not in VALUES:
            raise ValueError(f"values={values!r}: choose one of {VALUES}")
        prunable = self.prunable(by)
        if budget is not None:
            if scope != "global":
                raise ValueError("budget= works with scope='global'; use keep= or remove= per pair")
            fixed = self._constant(by) + self._total(self._empty(), by)
            if not fixed <= budget <= fixed + prunable:
                raise ValueError(f"budget={budget:,} {by} is outside what members can cost: from {fixed:,} "
                                 f"(the unprunable part alone) to {fixed + prunable:,} (the whole model)")
            keep = (budget - fixed) / prunable
        for name, fraction in (("keep", keep), ("remove", remove)):
            if fraction is not None and not 0.0 <= fraction <= 1.0:
                raise ValueError(f"{name}={fraction}: a fraction of the prunable {by}, in [0, 1]")
        if remove is not None:
            keep = 1.0 - remove
        if scope == "uniform" and floor:
            raise ValueError("floor= does not apply to scope='uniform' (every block keeps the same widths); "
                             "leave floor at 0")
        order, forced = self._apply_floor(self.ranking(rank), floor)
        if scope == "uniform":
            chosen = self._walk_uniform(order, keep * prunable, by)
        elif scope == "global":
            chosen = self._walk_global(order, keep * prunable, by, forced)
        elif scope == "part":
            chosen = self._walk_part(order, keep, by, forced)
        else:
            chosen = self._walk_pair(order, keep, by, forced)
        kept = np.zeros(self.block.size, bool)
        kept[chosen] = True
        if round_to > 1:
            kept = self._round(kept, self.ranking(rank), round_to)
        masks = self._masks(kept)
        if values == "auto":
            values = "settled" if np.isfinite(self.entry[chosen]).all() else "binary"
        if values != "binary":
            end = {n: e["mask"] for n, e in self.path.entries.items()}
            source = self.path.values_at(self._last_entry(masks) + self.path.settle) if values == "settled" else end
            if all(source[n] is end[n] for n in masks):   # no snapshot that late (or none): the end's values
                values = "path"
            masks = {n: m * source[n] for n, m in masks.items()}
        member = Member(masks, self.summarize(masks, by=by, target=keep))
        member.summary.rank = rank
        if member.summary.values != "binary":   # summarize tells 1 from other values, not which others
            member.summary.values = values      # "settled" only where a snapshot gave them
        return member

    def _last_entry(self, masks: Dict[str, torch.Tensor]) -> float:
        """The step at which the last element kept by ``masks`` entered the support (``inf``: one never did)."""
        return max((float(self.path.entries[n]["entry_step"][m != 0].max()) for n, m in masks.items()
                    if bool((m != 0).any())), default=0.0)

    def select_best(self, score: Callable[[Member], float], ranks: Sequence[str] = RANKINGS,
                    values: Sequence[str] = ("binary", "settled", "path"), **budget) -> Member:
        """Of the members :meth:`select` gives for ``budget`` (its ``keep``/``remove``/``budget``, ``by``,
        ``scope``, ...) under each of ``ranks`` and ``values``, the one ``score`` (higher is better: accuracy
        on held-out data, say) rates highest; on a tie the earlier reading (entry before z, binary before settled
        before path).

        One search ranks its elements two ways (entry step, final |z|) and its members can keep 1 or the
        search's mask values, and each reading loses somewhere: the path's values help a member the search
        covered and hurt one it did not (the elements it kept out of the support sit near 0), and neither
        order wins on every model (docs/robustness.md). Scoring the readings on held-out data makes the choice with data
        instead of a rule, and with the default ``ranks`` and ``values`` the member is never worse there
        than its plain reading (entry order, binary values). Readings that give the same masks are scored once. ``summary.scores``
        holds every reading's score (``"entry, binary"``: ...), ``summary.rank`` and ``.values`` the chosen one's.
        """
        if "rank" in budget:
            raise ValueError("select_best tries the rankings itself: pass ranks= (a tuple), not rank=")
        ranks, values = ((x,) if isinstance(x, str) else tuple(x) for x in (ranks, values))
        readings, seen, scores = [], {}, {}
        for rank in ranks:
            for value in values:
                member = self.select(rank=rank, values=value, **budget)
                key = tuple((n, m.numpy().tobytes()) for n, m in sorted(member.masks.items()))
                label = f"{rank}, {value}"
                if key not in seen:
                    seen[key] = float(score(member))
                    readings.append((seen[key], member))
                scores[label] = seen[key]
        best = max(readings, key=lambda r: r[0])[1]   # the first of the highest
        best.summary.scores = scores
        return best

    def _round(self, kept: np.ndarray, order: np.ndarray, multiple: int) -> np.ndarray:
        kept = kept.copy()
        rounded_pairs = PAIRS if self.granularity == "dim" else ("mlp",)
        for b in range(len(self.geoms)):
            for pair in rounded_pairs:
                p = PAIRS.index(pair)
                group = order[(self.block[order] == b) & (self.pair[order] == p)]
                k = int(kept[group].sum())
                if k == 0:
                    continue
                k = min(group.size, max(multiple, int(round(k / multiple)) * multiple))
                kept[group] = False
                kept[group[:k]] = True
        return kept

    def _masks(self, kept: np.ndarray) -> Dict[str, torch.Tensor]:
        masks: Dict[str, torch.Tensor] = {}
        for g in self.geoms:
            names = mask_names(g)
            sel = {p: kept[(self.block == g.index) & (self.pair == PAIRS.index(p))] for p in PAIRS}
            qk, v = sel["qk"], sel["v"]
            qk = qk & v if self.granularity == "head" else (qk & v.any())  # dead heads keep no qk
            for pair, value in (("qk", qk), ("v", v), ("mlp", sel["mlp"])):
                masks[names[pair]] = torch.from_numpy(value.astype(np.float32))
        return masks

    def summarize(self, masks: Dict[str, torch.Tensor], by: str = "params", target: float = float("nan")) -> Summary:
        """Costs and widths of the member given by ``masks``, what its kept elements hold (``"binary"`` when
        every non-zero entry is 1, ``"path"`` otherwise) and whether they all entered the path's support."""
        values = "binary" if all(bool(((m == 0) | (m == 1)).all()) for m in masks.values()) else "path"
        on_path = all(bool(torch.isfinite(self.path.entries[n]["entry_step"][m != 0]).all()) for n, m in masks.items())
        widths = [widths_from_masks(g, *(masks[mask_names(g)[p]] for p in PAIRS), self.granularity)
                  for g in self.geoms]
        empty = self._total(self._empty(), by)
        kept = (self._total(widths, by) - empty) / max(self.prunable(by), 1)
        elements = {p: [0, 0] for p in PAIRS}
        for g in self.geoms:
            for p, name in mask_names(g).items():
                elements[p][0] += int((masks[name] != 0).sum())
                elements[p][1] += masks[name].numel()
        return Summary(by=by, target=float(target), kept=float(kept),
                       params_before=self.params_before,
                       params_after=self._constant("params") + self._total(widths, "params"),
                       flops_before=self.flops_before,
                       flops_after=self._constant("flops") + self._total(widths, "flops"),
                       widths=widths, elements=elements, values=values, on_path=on_path)

