"""Do the shipped search defaults carry over? SPP against one-shot criteria on models and data they were not tuned on.

    pip install -e .[bench] && python scripts/benchmark_robustness.py

Every default of ``spp search`` was chosen on one model and dataset (the demo's ViT on Fashion-MNIST). Here
each setting differs from the demo in a way that matters, and SPP runs exactly as the README's library
example does, with no setting tuned:

  digits-memorised  scikit-learn's digits (8x8 images, 10 classes; 1,000 train / 297 val / 500 test), a ViT
                    of patch 2, width 64, depth 4, 4 heads, trained to 100% training accuracy: a model that has
                    memorised its training data, whose training loss is near zero
  fmnist-deep       Fashion-MNIST, 20,000 training images, a ViT of patch 4 (49 tokens), width 96, depth 6,
                    6 heads of 16 dims, MLP ratio 2: another width, depth, patch and head size
  fmnist-32px-5cls  Fashion-MNIST padded to 32x32, its first 5 classes, 15,000 training images, a ViT of
                    patch 8, width 192, depth 2, 3 heads of 64 dims: another input size and number of classes

Each setting holds out a validation split from its training images (never trained on). Methods, each
ranking the same structures (query-key dims, value dims, MLP neurons) cut by the same global
parameter-budget walk (``spp.WeightFamily``), members untouched (no finetuning):

  spp              ``calibrate_nu`` on held-out batches, ``search_optimizer`` with its defaults, --search-steps
                   (1,800) of batch 128 on the training images; each member by ``WeightFamily.select_best(remove=r)`` with
                   val accuracy as the score (``spp family`` / ``spp export``'s ``rank`` and ``values: best``)
  spp-auto         the same searches' members by ``select(remove=r)`` with no data (entry order; the search's
                   settled mask values for a member inside the support it reached, 1 for a larger one)
  spp-RANK-VALUES  the same searches' members ranked by entry step or final |z|, holding 1 (binary), M as it was
                   3/ρ steps after the member's last element entered (settled) or M at the search's end (path)
  spp-train-nu     as spp, ν calibrated on training batches (the default before it moved to held-out data)
  taylor           |m · dL/dm| at M = 1 over 20 training batches
  magnitude        RMS of each structure's weights (one ranking: its seeds agree)
  random           random ranking

Test accuracy (mean ± std over --seeds; a seed sets the search's data order, Taylor's batches and the random
ranking) at --removed fractions of the prunable parameters. Writes JSON and a Markdown table to --out and
prints, per setting and budget, whether spp is at or above Taylor.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import spp
from spp.calibrate import DEFAULTS as SEARCH_DEFAULTS
from spp.criteria import magnitude_scores, random_scores, taylor_scores
from spp.data import FASHION_MNIST_DIRS, _fashion_mnist
from spp.engine import evaluate
from spp.runtime import Runtime, provenance, seed_everything

RUNTIME = Runtime(torch.device("cpu"), None)


@dataclass
class Setting:
    name: str
    load: Callable[[argparse.Namespace], Dict[str, TensorDataset]]   # train / val / test, normalised
    model: Dict                   # timm ViT arguments
    epochs: int                   # pretraining epochs
    batch: int = 128
    lr: float = 1e-3


def _split(x: torch.Tensor, y: torch.Tensor, sizes: List[int], seed: int = 0) -> List[TensorDataset]:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for n in sizes:
        idx = order[start:start + n]
        out.append(TensorDataset(x[idx], y[idx]))
        start += n
    return out


def _normalise(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return (x - reference.mean()) / reference.std()


def load_digits(args) -> Dict[str, TensorDataset]:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0      # (1797, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    x = _normalise(x, x)
    train, val, test = _split(x, y, [1000, 297, 500])
    return {"train": train, "val": val, "test": test}


def _fashion(args, classes: int, size: int, train_images: int, val_images: int) -> Dict[str, TensorDataset]:
    def tensors(split):
        data = _fashion_mnist(args.data_root, split)
        keep = data.labels < classes
        x = data.images[keep].float() / 255.0
        pad = (size - x.shape[-1]) // 2
        return F.pad(x, (pad, pad, pad, pad)), data.labels[keep].long()

    x, y = tensors("train")
    xt, yt = tensors("test")
    train, val = _split(x, y, [train_images, val_images])
    mean_std = train.tensors[0]
    return {"train": TensorDataset(_normalise(train.tensors[0], mean_std), train.tensors[1]),
            "val": TensorDataset(_normalise(val.tensors[0], mean_std), val.tensors[1]),
            "test": TensorDataset(_normalise(xt, mean_std), yt)}


SETTINGS = {s.name: s for s in (
    Setting("digits-memorised", load_digits,
            dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4),
            epochs=150, batch=64),
    Setting("fmnist-deep", lambda a: _fashion(a, 10, 28, 20_000, 5_000),
            dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=6,
                 mlp_ratio=2.0), epochs=6),
    Setting("fmnist-32px-5cls", lambda a: _fashion(a, 5, 32, 15_000, 5_000),
            dict(img_size=32, patch_size=8, in_chans=1, num_classes=5, embed_dim=192, depth=2, num_heads=3),
            epochs=5),
)}


def loader(data: TensorDataset, batch: int, seed: Optional[int] = None) -> DataLoader:
    """Shuffled (and dropping a last short batch) when ``seed`` is given, in order otherwise."""
    if seed is None:
        return DataLoader(data, batch_size=batch)
    return DataLoader(data, batch_size=batch, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def batches(data: TensorDataset, batch: int, seed: int, steps: int):
    """``steps`` shuffled training batches, epoch after epoch."""
    epoch = 0
    while True:
        for b in loader(data, batch, seed * 1000 + epoch):
            if steps == 0:
                return
            steps -= 1
            yield b
        epoch += 1


def accuracy(model, data: TensorDataset) -> float:
    return evaluate(model, loader(data, 500), RUNTIME, desc="eval")["top1"]


def pretrain(setting: Setting, data, path: str, epochs: int = 0):
    """The setting's dense model: AdamW, cosine lr, no augmentation (cached at ``path``)."""
    from safetensors.torch import load_file, save_file
    from timm.scheduler import CosineLRScheduler

    seed_everything(0)
    model = spp.create_model("vit_tiny_patch16_224", **setting.model)
    if os.path.isfile(path):
        model.load_state_dict(load_file(path))
        return model.eval()
    steps = (epochs or setting.epochs) * (len(data["train"]) // setting.batch)
    opt = torch.optim.AdamW(model.parameters(), lr=setting.lr, weight_decay=0.05)
    schedule = CosineLRScheduler(opt, t_initial=steps, warmup_t=steps // 20, warmup_lr_init=1e-5, t_in_epochs=False)
    model.train()
    for step, (x, y) in enumerate(tqdm(batches(data["train"], setting.batch, 0, steps), total=steps,
                                       desc=f"pretrain {setting.name}", mininterval=5)):
        schedule.step_update(step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(model.state_dict(), path)
    return model.eval()


def spp_search(dense, data, seed: int, steps: int, calibration: str, snapshots: int = SEARCH_DEFAULTS["snapshots"]):
    """The README's library example: masks, ν from ``calibration`` batches, the default LBI (keeping ``snapshots``
    of the masks for the settled values), ``steps`` of batch 128."""
    seed_everything(seed)
    model = spp.add_masks(copy.deepcopy(dense), "dim")
    nu = spp.calibrate_nu(model, loader(data[calibration], 128, 10_000 + seed))
    opt = spp.search_optimizer(model, nu, snapshots=snapshots)
    model.train()
    for x, y in batches(data["train"], 128, seed, steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return spp.SolutionPath.from_optimizer(opt, model), next(iter(nu.values()))


def member_test(dense, path, removed: float, data, values: str = "binary") -> Dict:
    member = spp.WeightFamily(dense, path).select(remove=removed, values=values)
    return {"test": accuracy(spp.compress(dense, member.masks), data["test"]), "values": member.summary.values}


READINGS = tuple(f"{r}, {v}" for r in ("entry", "z") for v in ("binary", "settled", "path"))   # select_best's order


def spp_readings(dense, path, removed: float, data) -> Dict[str, Dict]:
    """The member at ``removed`` read each way (ranked by entry step or final |z|; kept elements holding 1, the
    search's mask values soon after the member's last element entered, or at the search's end; val and test
    accuracy of each), ``auto`` (``WeightFamily.select``'s defaults) and ``best`` (the reading with the highest
    val accuracy: ``select_best``, the pipeline's ``rank`` and ``values: best``)."""
    family = spp.WeightFamily(dense, path)
    out = {}
    for reading in READINGS:
        rank, values = reading.split(", ")
        small = spp.compress(dense, family.select(remove=removed, rank=rank, values=values).masks)
        out[reading] = {"val": accuracy(small, data["val"]), "test": accuracy(small, data["test"]), "reading": reading}
    out["auto"] = out[f"entry, {family.select(remove=removed).summary.values}"]
    out["best"] = out[max(READINGS, key=lambda r: out[r]["val"])]   # max keeps the first of equals
    return out


def run_setting(setting: Setting, args) -> Dict:
    data = setting.load(args)
    dense = pretrain(setting, data, os.path.join(args.out, "models", f"{setting.name}.safetensors"), args.pretrain_epochs)
    train_loss = evaluate(dense, loader(data["train"], 500), RUNTIME, desc="train")
    info = {"train_top1": train_loss["top1"], "train_loss": train_loss["loss"],
            "val_top1": accuracy(dense, data["val"]), "test_top1": accuracy(dense, data["test"]),
            "params": spp.count_params(dense), "images": {k: len(v) for k, v in data.items()}}
    print(f"{setting.name}: dense train {info['train_top1']:.2f}% (loss {info['train_loss']:.4f}), "
          f"test {info['test_top1']:.2f}%", flush=True)
    masked = spp.add_masks(copy.deepcopy(dense), "dim")
    rows: Dict[str, Dict[int, Dict]] = {}
    magnitude = spp.SolutionPath.from_scores(masked, magnitude_scores(masked))
    for seed in args.seeds:
        for method, calibration in (("spp", "val"), ("spp-train-nu", "train")):
            if calibration not in args.nu_data:
                continue
            start = time.time()
            path, nu = spp_search(dense, data, seed, args.search_steps, calibration, args.snapshots)
            seconds = time.time() - start
            readings = {str(r): spp_readings(dense, path, r, data) for r in args.removed}
            names = {"best": method, "auto": f"{method}-auto", **{r: f"{method}-{r.replace(', ', '-')}" for r in READINGS}}
            for reading, name in names.items():
                if method == "spp-train-nu" and reading != "best":
                    continue
                rows.setdefault(name, {})[seed] = {"seconds": seconds, "nu": nu,
                                                   "removed": {r: x[reading] for r, x in readings.items()}}
        start = time.time()
        taylor = taylor_scores(masked, batches(data["train"], 128, seed, args.taylor_batches), args.taylor_batches)
        baselines = {"taylor": (spp.SolutionPath.from_scores(masked, taylor), time.time() - start),
                     "magnitude": (magnitude, 0.0),
                     "random": (spp.SolutionPath.from_scores(masked, random_scores(masked, seed)), 0.0)}
        for method, (path, seconds) in baselines.items():
            rows.setdefault(method, {})[seed] = {
                "seconds": seconds, "removed": {str(r): member_test(dense, path, r, data) for r in args.removed}}
        print(f"{setting.name} seed {seed}: " + ", ".join(
            f"{m} " + "/".join(f"{s[seed]['removed'][str(x)]['test']:.1f}" for x in args.removed)
            for m, s in rows.items()), flush=True)
    return {"dense": info, "methods": rows}


def summarise(result: Dict, removed: List[float]) -> Dict[str, Dict[str, List[float]]]:
    """``{method: {budget: [mean, std]}}`` of test accuracy over seeds."""
    out = {}
    for method, seeds in result["methods"].items():
        out[method] = {}
        for r in removed:
            xs = [s["removed"][str(r)]["test"] for s in seeds.values()]
            out[method][str(r)] = [statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]
    return out


def write_markdown(results: Dict, args, filename: str) -> None:
    lines = []
    for name, result in results.items():
        d = result["dense"]
        lines += [f"### {name}", "",
                  f"Dense: train {d['train_top1']:.2f}% (loss {d['train_loss']:.4f}), test {d['test_top1']:.2f}%, "
                  f"{d['params']:,} params; {d['images']}.", "",
                  "| method | " + " | ".join(f"−{r:.0%}" for r in args.removed) + " |",
                  "|---|" + "---|" * len(args.removed)]
        for method, cells in summarise(result, args.removed).items():
            lines.append(f"| {method} | " + " | ".join(f"{m:.2f} ± {s:.2f}" for m, s in cells.values()) + " |")
        lines.append("")
    with open(filename, "w") as f:
        f.write("\n".join(lines))


def target_check(results: Dict, removed: List[float]) -> List[str]:
    """One line per setting and budget: spp's mean against Taylor's."""
    lines = []
    for name, result in results.items():
        s = summarise(result, removed)
        for r in removed:
            ours, theirs = s["spp"][str(r)][0], s["taylor"][str(r)][0]
            lines.append(f"{name} −{r:.0%}: spp {ours:.2f} vs taylor {theirs:.2f} "
                         f"{'ok' if ours >= theirs else 'BELOW'}")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/benchmark_robustness")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--data-root", help="folder with the Fashion-MNIST files (default: " + FASHION_MNIST_DIRS[0] + ")")
    parser.add_argument("--removed", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.85])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--search-steps", type=int, default=1800)
    parser.add_argument("--nu-data", nargs="+", default=["val", "train"], choices=["val", "train"],
                        help="the batches ν is calibrated on, one search each: val (spp) and train (spp-train-nu)")
    parser.add_argument("--snapshots", type=int, default=SEARCH_DEFAULTS["snapshots"],
                        help="mask snapshots each search keeps for the settled values (search_optimizer's snapshots)")
    parser.add_argument("--taylor-batches", type=int, default=20)
    parser.add_argument("--pretrain-epochs", type=int, default=0,
                        help="pretrain every setting this many epochs instead of its own (a quick check of the script)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    os.makedirs(args.out, exist_ok=True)
    results = {name: run_setting(SETTINGS[name], args) for name in args.settings}
    summary = {"args": vars(args), "provenance": provenance("cpu", started), "results": results,
               "summary": {n: summarise(r, args.removed) for n, r in results.items()}}
    with open(os.path.join(args.out, "benchmark_robustness.json"), "w") as f:
        json.dump(summary, f, indent=1)
    write_markdown(results, args, os.path.join(args.out, "benchmark_robustness.md"))
    print("\n".join(target_check(results, args.removed)))
    print(f"wrote {args.out}/benchmark_robustness.json and .md ({(time.time() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
