"""What the commands and the benchmarks write for people to read: JSON, Markdown tables, plots of the
solution path and of a family, and the path's reach in words."""
from __future__ import annotations

import json
import math
import statistics
from typing import Dict, List, Optional, Sequence, Union

from .family import WeightFamily
from .files import atomic_write
from .path import SolutionPath
from .structure import PAIRS

__all__ = ["write_json", "write_table", "plot_path", "plot_family", "mean_std", "reach_note"]


def write_json(obj, path: str) -> None:
    """``obj`` as indented JSON, written atomically (a benchmark's results after every run)."""
    atomic_write(path, lambda f: open(f, "w").write(json.dumps(obj, indent=1) + "\n"))


def write_table(rows: List[Dict], stem: str) -> str:
    """Write ``rows`` as ``stem.json`` and a Markdown table ``stem.md``; return the Markdown."""
    keys = list(rows[0]) if rows else []
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    markdown = "\n".join(lines) + "\n"
    write_json(rows, stem + ".json")
    atomic_write(stem + ".md", lambda f: open(f, "w").write(markdown))
    return markdown


def plot_path(path: SolutionPath, filename: str) -> None:
    """Support size of Γ per pair type against the step, and the cumulative entries."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = path.sizes()
    fig, ax = plt.subplots(figsize=(6, 4))
    if path.support:
        steps = [s for s, _ in path.support]
        for pair in PAIRS:
            ax.plot(steps, [100 * c[pair] / max(sizes[pair], 1) for _, c in path.support], label=f"support of Γ: {pair}")
    entry_steps, fraction = path.entry_curve()
    if entry_steps.numel():
        ax.step(entry_steps.numpy(), 100 * fraction.numpy(), where="post", color="k", ls="--", label="entered (all)")
    ax.set_xlabel("LBI step")
    ax.set_ylabel("% of mask entries")
    ax.set_title("Solution path")
    ax.set_ylim(0, 101)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)


def plot_family(rows: List[Dict], filename: str, dense: Optional[Dict] = None, label: str = "SPP family",
                metric: Union[str, Sequence[str]] = "top1") -> None:
    """Accuracy (or perplexity, recall: ``metric``, or several metrics) against parameters (M) for the
    members of one family."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [metric] if isinstance(metric, str) else [m for m in metric if all(math.isfinite(r[m]) for r in rows)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in metrics:
        ax.plot([r["params"] / 1e6 for r in rows], [r[m] for r in rows], "o-",
                label=label if len(metrics) == 1 else f"{label}: {m}")
    for r in rows:
        ax.annotate(f"{r['flops_kept']:.0%} FLOPs", (r["params"] / 1e6, r[metrics[0]]), fontsize=7,
                    textcoords="offset points", xytext=(4, -10))
    if dense:
        ax.axhline(dense[metrics[0]], color="gray", ls=":", label=f"dense ({dense[metrics[0]]:.2f})")
    ax.set_xlabel("parameters (M)")
    names = {"top1": "top-1 accuracy (%)", "recall@1": "recall@1 (%)", "zero-shot": "zero-shot top-1 (%)"}
    ax.set_ylabel(", ".join(names.get(m, m) for m in metrics) + ", no retraining")
    if metrics == ["perplexity"]:
        ax.set_yscale("log")
    ax.set_title("One search, every budget")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)


def mean_std(values: Sequence[float], digits: int = 2) -> str:
    """``"mean ± std"`` (sample std) of a benchmark's seeds; one value as it is, none as a dash."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def reach_note(family: WeightFamily, steps: int) -> str:
    """How far the path got: members up to that size are ranked along it; what to do about larger ones."""
    reach = family.reach("params")
    note = f"path: the support covers {reach:.1%} of the prunable params after {steps} steps"
    if reach < 0.999:
        note += (f"; members keeping more are ranked past its end by final |z| (a longer search, search.steps or "
                 f"search.epochs, extends the path; the entry steps up to step {steps} stay as they are)")
    return note
