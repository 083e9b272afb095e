"""Why does a search rank well or badly at high sparsity? Variants of one LBI search, judged on val.

    python scripts/ablate_search.py --variants base long nu5 per_type

Same model, data split, seed and data order as ``scripts/benchmark_quality.py`` (the demo's
Fashion-MNIST ViT, 6,000 training images held out). Each variant runs one search over the
masks, then reads members off its path at ``--removed`` (global parameter budget, entry and
final-z rankings, the kept elements at 1: ``values="binary"``) and reports validation accuracy with no finetuning, the share of each pair
type kept, the share of elements that entered, and the search time. Lasso (one run per lam) is the
reference variant. What each variant measured is in docs/log/quality.md and docs/ablations.md, not here.
``--swap`` also judges each variant's choice of elements at each Lasso member's count per mask
tensor, and the other way round (rows "A choice, B counts"). ``--finetune-steps N`` also finetunes every
member N steps as the benchmark does and reports val after (``val_ft``; "before → after" in the table). Writes
``ablation.json`` and ``ablation.md`` to --out, keeping the rows of earlier runs into the same --out.
``--overrides`` apply after every variant's own (``search.steps=100`` for a quick look).

Every variant is ``spp search`` (``run_search``) on configs/demo_search.yaml with ``BASE`` and then
the overrides in ``VARIANTS`` (all plain gradient, kappa 10, lam 0.1, nu_scale 3, rho 0.01 unless named:
the table in docs/log/quality.md was measured when those were the defaults; the defaults now are the lam0.4_nu1.5 row):
  base      nu = 3 / RMS(mask gradient at M = 1), rho = 0.01, 600 steps, lam 0.1 (the defaults until lam 0.4)
  long      rho = 0.005, 1200 steps: the same path, resolved with twice the data per unit of path
  longer    rho = 0.0025, 2400 steps
  nu5       nu_scale 5 (between the sweep's 3 and 10)
  per_type  search.nu_calibration=pair: one nu per query-key, value and MLP masks (their gradients differ ~10x)
  per_mask  search.nu_calibration=mask: one nu per mask tensor (every pair type of every block)
  nu1       nu_scale 1
  lam0.2    lam 0.2 (c = kappa * lam = 2): entries need twice the evidence, so they come later,
  lam0.4    lam 0.4   when M has settled further from its dense start
  lam1      lam 1
The path rows (lam 0.4, nu_scale 3; a path spans about rho * steps units of pull, 6 at rho 0.01):
  lam0.4_rho0.005  rho 0.005: half the pull, 3 units
  lam0.4_long      rho 0.005, 1200 steps: rho 0.01's 6 units with twice the data
  lam0.4_long3     1800 steps: 18 units (its first 600 steps are the benchmark's seed-0 lam 0.4 search;
                   the lam0.4 row above came from the script's earlier search loop)
  lam0.4_rho0.03   rho 0.03: 18 units in 600 steps
  lam0.4_rho0.1    rho 0.1: 60 units in 600 steps (the DeiT configs' path is ~750 units at rho 0.02)
  lam0.4_adam      Adam-preconditioned gradient (auto nu = nu_scale, the Adam direction's scale)
The nu rows (lam 0.4 unless named) hold the mask's gradient step kappa*alpha = rho*nu at 0.03 / RMS
gradient, the base's, and move nu with rho = 0.03 / nu_scale (the configs' default now: nu_scale 1.5,
rho 0.02); the step0.* rows change the step too:
  lam0.4_nu1.5, lam0.4_nu1, lam0.4_nu0.6, lam0.4_nu0.3, lam1_nu1, lam1_nu0.3
  lam0.4_nu1_step0.015, lam0.4_nu0.1_step0.01, lam0.4_nu1_step0.1, lam0.4_nu0.3_step0.09
The batch rows (run with --seed 0, 1, 2 to see the seed spread): the default at batch 256, nu from batch
256's own RMS gradient (search.nu_batch=null, as before nu_batch existed):
  lam0.4_nu1.5_b256   nu_scale 1.5: nu ~1.4x the batch-128 default's (the RMS is mostly noise, ~1/sqrt(batch))
  lam0.4_nu1.06_b256  nu_scale 1.06 = 1.5 / sqrt(2): the batch-128 default's nu (what nu_batch 128 now does)
The same number of samples two ways, 1.5x the default's and 0.75x of four Lasso runs' (nu as at batch 128):
  lam0.4_nu1.5_b192       batch 192, 600 steps (the default's path, 12 units)
  lam0.4_nu1.5_b256_s450  batch 256, 450 steps (9 units of path)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark_quality as bq  # noqa: E402  (the benchmark's model, split and baselines)

import spp  # noqa: E402
from spp.runtime import seed_everything  # noqa: E402
from spp.calibrate import mask_gradient_rms  # noqa: E402
from spp.criteria import lasso_path, lasso_values  # noqa: E402

# what every variant changes from (a variant's own overrides come after): the defaults until lam 0.4
BASE = ["search.lam=0.1", "search.nu_scale=3", "search.rho=0.01"]
VARIANTS = {  # config overrides of configs/demo_search.yaml, after BASE
    "base": [],
    "long": ["search.rho=0.005", "search.steps=1200"],
    "longer": ["search.rho=0.0025", "search.steps=2400"],
    "nu5": ["search.nu_scale=5"],
    "per_type": ["search.nu_calibration=pair"],
    "per_mask": ["search.nu_calibration=mask"],
    "nu1": ["search.nu_scale=1"],
    "lam0.2": ["search.lam=0.2"],
    "lam0.4": ["search.lam=0.4"],
    "lam1": ["search.lam=1"],
    "lam0.4_rho0.03": ["search.lam=0.4", "search.rho=0.03"],
    "lam0.4_rho0.1": ["search.lam=0.4", "search.rho=0.1"],
    "lam0.4_long3": ["search.lam=0.4", "search.steps=1800"],
    "lam0.4_rho0.005": ["search.lam=0.4", "search.rho=0.005"],
    "lam0.4_long": ["search.lam=0.4", "search.rho=0.005", "search.steps=1200"],
    "lam0.4_adam": ["search.lam=0.4", "search.preconditioner=adam"],
    # nu against the gradient step: kappa*alpha = rho*nu = (rho * nu_scale) / RMS gradient
    "lam0.4_nu1.5": ["search.lam=0.4", "search.nu_scale=1.5", "search.rho=0.02"],
    "lam0.4_nu1": ["search.lam=0.4", "search.nu_scale=1", "search.rho=0.03"],
    "lam0.4_nu0.6": ["search.lam=0.4", "search.nu_scale=0.6", "search.rho=0.05"],
    "lam0.4_nu0.3": ["search.lam=0.4", "search.nu_scale=0.3", "search.rho=0.1"],
    "lam1_nu1": ["search.lam=1", "search.nu_scale=1", "search.rho=0.03"],
    "lam1_nu0.3": ["search.lam=1", "search.nu_scale=0.3", "search.rho=0.1"],
    "lam0.4_nu1_step0.015": ["search.lam=0.4", "search.nu_scale=1", "search.rho=0.015"],
    "lam0.4_nu0.1_step0.01": ["search.lam=0.4", "search.nu_scale=0.1", "search.rho=0.1"],
    "lam0.4_nu1_step0.1": ["search.lam=0.4", "search.nu_scale=1", "search.rho=0.1"],
    "lam0.4_nu0.3_step0.09": ["search.lam=0.4", "search.nu_scale=0.3", "search.rho=0.3"],
    # the default (lam0.4_nu1.5) with twice the data per step: does it cut the seed spread? Both calibrate nu
    # at batch 256's own RMS (search.nu_batch=null, as every search did before nu_batch), which is ~1/sqrt(2) of
    # batch 128's (mostly noise): the first row's nu is ~1.4x the default's; the second keeps the default's nu
    # (nu_scale 1.5 / sqrt 2, what nu_batch 128 now does) and rho, so its gradient step too
    "lam0.4_nu1.5_b256": ["search.lam=0.4", "search.nu_scale=1.5", "search.rho=0.02", "data.batch_size=256",
                          "search.nu_batch=null"],
    "lam0.4_nu1.06_b256": ["search.lam=0.4", "search.nu_scale=1.06", "search.rho=0.02", "data.batch_size=256",
                           "search.nu_batch=null"],
    # 1.5x the default's samples, which is 0.75x of four Lasso runs' (4 x 300 steps x 128): ν as at batch 128
    # (search.nu_batch 128, the default), so ν, ρ and the gradient step are the default's
    "lam0.4_nu1.5_b192": ["search.lam=0.4", "search.nu_scale=1.5", "search.rho=0.02", "data.batch_size=192"],
    "lam0.4_nu1.5_b256_s450": ["search.lam=0.4", "search.nu_scale=1.5", "search.rho=0.02", "data.batch_size=256",
                               "search.steps=450"],
}


def gradient_rms(bench, seed: int) -> Dict[str, float]:
    """RMS of the per-batch cross-entropy gradient of every mask tensor at M = 1 on training batches (what
    ``spp search`` calibrated ν from when these ablations ran; it now takes the validation split,
    ``search.nu_data: val``)."""
    loader = bench.loader("train", seed)
    loader.sampler.set_epoch(-1)  # an order of its own
    rms = mask_gradient_rms(bench.masked, loader, F.cross_entropy, 8, runtime=bench.runtime)
    return {n: r for n, (r, _) in rms.items()}


def pair_types(model) -> Dict[str, str]:
    return {n: pair for n, (pair, _) in spp.mask_pairs(model).items()}


def judge_masks(bench, masks, sizes, finetune: int = 0, seed: int = 0) -> Dict:
    """Validation accuracy of the member given by binary ``masks`` and the share of each pair type it keeps;
    with ``finetune`` steps, also its validation accuracy after the benchmark's finetune (``val_ft``)."""
    types = pair_types(bench.masked)
    kept = {t: 0 for t in sizes}
    for n, m in masks.items():
        kept[types[n]] += int(m.sum())
    member = spp.compress(bench.dense, masks, granularity="dim")
    row = {"val": round(bench.accuracy(member, "val"), 2), "kept": {t: f"{kept[t] / sizes[t]:.0%}" for t in sizes}}
    if finetune:
        tuned = bq.finetune(member, bench.loader("train", seed), finetune, seed, bench.runtime, bq.FINETUNE_LR)
        row["val_ft"] = round(bench.accuracy(tuned, "val"), 2)
    return row


def judge(bench, path, removed, rules=("entry", "z"), finetune: int = 0, seed: int = 0) -> Dict:
    family = spp.WeightFamily(bench.dense, path)
    return {f"{rule}@{r}": judge_masks(bench, family.select(remove=r, rank=rule, values="binary").masks, path.sizes(),
                                       finetune, seed)
            for rule in rules for r in removed}


def choice_at_counts(path, counts: Dict[str, int]) -> Dict[str, torch.Tensor]:
    """Binary masks keeping, in every mask tensor, its ``counts[name]`` elements that entered ``path``
    first (ties by larger |z|): the path's choice of elements with another member's budget per tensor."""
    masks = {}
    for name, e in path.entries.items():
        order = np.lexsort((-e["z"].abs().numpy().ravel(), e["entry_step"].numpy().ravel()))
        kept = np.zeros(order.size, np.float32)
        kept[order[:counts[name]]] = 1.0
        masks[name] = torch.from_numpy(kept).view_as(e["entry_step"])
    return masks


def swap(bench, a, b, removed, finetune: int = 0, seed: int = 0) -> Dict:
    """At each budget, path ``a``'s choice of elements at the per-tensor counts of ``b``'s member (entry
    order both): tells whether two rankings differ in how they spread the budget or in what they keep."""
    family = spp.WeightFamily(bench.dense, b)
    out = {}
    for r in removed:
        counts = {n: int(m.sum()) for n, m in family.select(remove=r, values="binary").masks.items()}
        out[f"entry@{r}"] = judge_masks(bench, choice_at_counts(a, counts), a.sizes(), finetune, seed)
    return out


def main():
    sys.stdout.reconfigure(line_buffering=True)  # figures show as they are measured, also in a log file
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="outputs/demo/pretrain/best.safetensors")
    parser.add_argument("--out", default="outputs/ablate_search")
    parser.add_argument("--variants", nargs="+", default=["base", "long", "nu5", "per_type"], choices=VARIANTS)
    parser.add_argument("--removed", type=float, nargs="+", default=[0.5, 0.7, 0.85])
    parser.add_argument("--lasso-lams", type=float, nargs="*", default=[3e-4, 1e-3])
    parser.add_argument("--lasso-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", help="folder with the Fashion-MNIST files (default: where the Debian package puts them)")
    parser.add_argument("--swap", action="store_true",
                        help="also judge each variant's choice of elements at each Lasso member's count per mask "
                             "tensor, and the other way round")
    parser.add_argument("--finetune-steps", type=int, default=0,
                        help="also finetune every member this many steps (the benchmark's finetune: AdamW, lr 2e-4, "
                             "warm-up then cosine) and report its val accuracy after")
    parser.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides applied after every variant's own, e.g. search.steps=100")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    bench = bq.Bench(argparse.Namespace(checkpoint=args.checkpoint, out=args.out, device="cpu", data_root=args.data_root))
    rows = {}
    tuning = (args.finetune_steps, args.seed)
    rms = gradient_rms(bench, args.seed)
    types = pair_types(bench.masked)
    print("gradient RMS at M = 1:", {n: f"{r:.1e}" for n, r in rms.items()})
    lasso = {}
    for lam in args.lasso_lams:
        seed_everything(args.seed)
        start = time.time()
        values = lasso_values(bench.masked, bench.loader("train", args.seed), lam, args.lasso_steps, 1e-2)
        seconds = time.time() - start
        lasso[f"lasso lam={lam}"] = lasso_path(bench.masked, values)
        rows[f"lasso lam={lam}"] = {"seconds": round(seconds, 1),
                                    **judge(bench, lasso[f"lasso lam={lam}"], args.removed, ("entry",), *tuning)}
        print(json.dumps({f"lasso lam={lam}": rows[f"lasso lam={lam}"]}))
    for name in args.variants:
        start = time.time()
        path = bench.search(args.seed, os.path.join(args.out, name), BASE + VARIANTS[name] + args.overrides)
        seconds = time.time() - start
        entered = sum(path.entered_by(path.steps).values()) / sum(path.sizes().values())
        rows[name] = {"seconds": round(seconds, 1), "entered": round(entered, 3),
                      **judge(bench, path, args.removed, ("entry", "z"), *tuning)}
        print(json.dumps({name: rows[name]}))
        for other, other_path in lasso.items() if args.swap else ():
            for chooser, counter, a, b in ((name, other, path, other_path), (other, name, other_path, path)):
                key = f"{chooser} choice, {counter} counts"
                rows[key] = {"seconds": 0.0, **swap(bench, a, b, args.removed, *tuning)}
                print(json.dumps({key: rows[key]}))
    write_tables(rows, rms, types, args.out)


def write_tables(rows: Dict, rms: Dict, types: Dict, out: str) -> None:
    """Merge ``rows`` into ``out``/ablation.json (earlier variants are kept) and write ablation.md."""
    filename = os.path.join(out, "ablation.json")
    if os.path.isfile(filename):
        with open(filename) as f:
            rows = {**json.load(f)["rows"], **rows}
    with open(filename, "w") as f:
        json.dump({"gradient_rms": rms, "pair_types": types, "base": BASE, "variants": VARIANTS, "rows": rows}, f, indent=1)
    keys = sorted({k for row in rows.values() for k in row if k not in ("seconds", "entered")},
                  key=lambda k: (k.split("@")[0], float(k.split("@")[1])))
    lines = ["| variant | " + " | ".join(keys) + " | entered | search s |", "|---" * (len(keys) + 3) + "|"]
    for name, row in rows.items():
        cells = [f"{row[k]['val']:.2f}" + (f" → {row[k]['val_ft']:.2f}" if "val_ft" in row[k] else "")
                 + f" (qk {row[k]['kept']['qk']}, v {row[k]['kept']['v']}, mlp {row[k]['kept']['mlp']})"
                 if k in row else "" for k in keys]
        entered = f"{row['entered']:.0%}" if "entered" in row else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {entered} | {row['seconds']} |")
    with open(os.path.join(out, "ablation.md"), "w") as f:
        f.write("Validation accuracy (%) with no finetuning (→ after --finetune-steps, where run); in brackets the "
                "share of each pair type kept.\n\n")
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
