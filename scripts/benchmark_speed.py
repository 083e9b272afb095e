"""Speed and memory of SPP, as ratios measured in one run on one model.

    python scripts/benchmark_speed.py                       # DeiT-Small, CPU-sized batches
    python scripts/benchmark_speed.py --device cuda --amp bf16 --batch-sizes 1 32 128 --train-batch 64
    python scripts/benchmark_speed.py --model vit_small_patch16_224 --model-args depth=6 num_classes=100
    python scripts/benchmark_speed.py --llm [--device cuda]   # decoder LLMs: runs scripts/llm_speed.py (its --help)

Prints and writes (``--out``, JSON):
  * a search step (frozen weights, mask gradients, LBI) against a full finetune step (AdamW
    on every weight), same model and batch; target ≤ 0.70×;
  * the LBI optimizer step's share of a search step; target < 5%;
  * building a family, selecting a member and compressing it; target < 1 s for DeiT-Small;
  * compressed members (30/50/70% of prunable params removed) against the dense model:
    latency at each batch size and the fraction of the FLOPs reduction realised as speed-up
    (speed-up ÷ FLOPs ratio); target ≥ 0.9 at batch ≥ 32;
  * peak memory of a search step against a finetune step (CUDA: allocator peak; CPU: peak
    resident memory of a fresh process, growth over the steps once the model and input are built);
  * where the time goes at the largest batch: two profiled forwards of each model, self time by op
    category (CPU time on the CPU, kernel time on CUDA), and the realised fraction the work that does
    not shrink (layer norms, residual adds, patch embedding) allows;
  * a plot next to the JSON (same name, .png): speed-up against FLOPs ratio at each batch size,
    and where the time goes. ``--plot-from A.json B.json --out C.json`` draws earlier runs into
    C.png without measuring anything (docs/results.md's figure: one run per batch size and granularity).
On the CPU the process first calls ``spp.keep_cpu_memory()`` (``--cpu-allocator keep``): glibc
otherwise maps every tensor over 32 MiB afresh and page-faults it in on each forward, which slows
the dense model (the larger tensors) more than its members and so flatters their speed-up; the
latency table prints each model's minor page faults per timed forward (median).
Every figure is the median of ``--repeats`` timed runs after ``--warmup`` untimed ones; the
models compared in a ratio are timed in turn within each repeat, each right after an untimed run
of its own.
Weights are random: speed does not depend on them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import spp
from spp.runtime import provenance

try:
    import resource   # Unix only: page-fault counts
except ImportError:   # pragma: no cover - Windows
    resource = None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def minor_faults():
    """This process's minor page faults so far; None where the platform does not count them."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else None


def timed_together(fns, device, repeats, warmup, faults=None):
    """Median seconds of each function in ``fns`` (name → callable), timed in turn within every
    repeat, so a slow spell of a shared machine slows all of them alike and ratios hold. Each timed
    call follows an untimed call of the same function: it is timed in its own steady state (caches,
    allocator), as when it runs on its own, not in the state the previous function left. With a
    dict ``faults``, also fills in the median minor page faults of each function's timed calls:
    what it pays for memory the allocator hands back to the OS and maps afresh (``--cpu-allocator``)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    faulted = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            fn()
            sync(device)
            before = minor_faults()
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
            if before is not None:
                faulted[name].append(minor_faults() - before)
    if faults is not None:
        faults.update({name: int(statistics.median(f)) if f else None for name, f in faulted.items()})
    return {name: statistics.median(t) for name, t in times.items()}


def timed(fn, device, repeats, warmup):
    return timed_together({"": fn}, device, repeats, warmup)[""]


def peak_memory(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated() / 2 ** 20


# Self time of these ops, per category (anything else counts as "other"). Layer norms, residual adds and the
# patch embedding do the same work in every member: they bound the realised fraction from above.
CATEGORIES = {
    "linear layers": ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
                  "aten::_scaled_dot_product_attention_math", "aten::_softmax", "aten::softmax",
                  # CUDA kernels
                  "aten::_scaled_dot_product_flash_attention", "aten::_flash_attention_forward",
                  "aten::_scaled_dot_product_efficient_attention", "aten::_efficient_attention_forward",
                  "aten::_scaled_dot_product_cudnn_attention"),
    "GELU": ("aten::gelu",),
    "layer norm": ("aten::native_layer_norm", "aten::layer_norm"),
    "residual adds": ("aten::add", "aten::add_"),
    "patch embedding": ("aten::mkldnn_convolution", "aten::convolution", "aten::_convolution", "aten::conv2d",
                        "aten::cudnn_convolution"),
    "copies and padding": ("aten::copy_", "aten::cat", "aten::constant_pad_nd", "aten::pad", "aten::clone",
                           "aten::contiguous", "aten::_to_copy"),
}
FIXED = ("layer norm", "residual adds", "patch embedding")


def op_breakdown(models, x, autocast=nullcontext, runs=2):
    """Milliseconds per forward of each model in ``models`` (name → model), split into
    :data:`CATEGORIES` by the self time torch.profiler records: CPU time on the CPU, the time of the
    kernels each op launched on CUDA."""
    from torch.profiler import ProfilerActivity, profile

    cuda = x.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    category_of = {op: category for category, ops in CATEGORIES.items() for op in ops}
    result = {}
    for name, model in models.items():
        with torch.no_grad(), autocast():
            model(x)
            sync(x.device)
            with profile(activities=activities) as prof:
                for _ in range(runs):
                    model(x)
                sync(x.device)
        ms = dict.fromkeys([*CATEGORIES, "other"], 0.0)
        for event in prof.key_averages():
            us = (getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
                  if cuda else event.self_cpu_time_total)
            ms[category_of.get(event.key, "other")] += us / 1000 / runs
        result[name] = ms
    return result


def fixed_work_bounds(breakdown, flops_ratios):
    """The realised fraction each member would reach if everything but the fixed work (:data:`FIXED`)
    shrank exactly by its FLOPs ratio; ``breakdown`` is :func:`op_breakdown`'s, dense model first."""
    dense = next(iter(breakdown.values()))
    dense_total, dense_fixed = sum(dense.values()), sum(dense[c] for c in FIXED)
    bounds = {}
    for name in list(breakdown)[1:]:
        ratio = flops_ratios[name]
        ideal = sum(breakdown[name][c] for c in FIXED) + (dense_total - dense_fixed) / ratio
        bounds[name] = round(dense_total / ideal / ratio, 3)
    return bounds


def print_breakdown(breakdown):
    ms, batch, bounds = breakdown["ms"], breakdown["batch"], breakdown["realised_bound_from_fixed_work"]
    names = list(ms)
    print(f"\nwhere the time goes, batch {batch} (ms per forward, self {breakdown['clock']} time by torch.profiler; "
          f"fixed work: {', '.join(FIXED)})")
    print("| op | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for category in [*CATEGORIES, "other", "total"]:
        cells = [sum(b.values()) if category == "total" else b[category] for b in ms.values()]
        print(f"| {category} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    share = {name: 100 * sum(b[c] for c in FIXED) / sum(b.values()) for name, b in ms.items()}
    for name in names[1:]:
        print(f"{name}: fixed work is {share[name]:.0f}% of its time ({share[names[0]]:.0f}% of dense); with the "
              f"rest shrinking exactly by the FLOPs ratio it would realise {bounds[name]:.2f}")


def run_label(report, batch):
    """How a line of the plot is named: batch, and the granularity and precision when not the default."""
    # runs before the allocator field existed used the system's
    allocator = f"{report.get('cpu_allocator', 'system')} allocator"
    extra = [w for w, default in ((f"{report['granularity']} masks", "dim masks"), (report["amp"], "off"),
                                  (allocator, "keep allocator")) if w != default]
    return f"batch {batch}" + (f" ({', '.join(extra)})" if extra else "")


def plot(reports, filename):
    """Speed-up against FLOPs ratio (one line per run and batch size, with the FLOPs ratio itself and
    0.9 of it: the target) and, for the first report with a profile, where each model's time goes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiled = next((r for r in reports if r.get("breakdown")), None)
    fig, axes = plt.subplots(1, 2 if profiled else 1, figsize=(12 if profiled else 6, 4.5), squeeze=False)
    ax = axes[0][0]
    top = 1.0
    for report in reports:
        for batch in dict.fromkeys(r["batch"] for r in report["latency"]):
            rows = sorted((r for r in report["latency"] if r["batch"] == batch and "unpadded" not in r["model"]),
                          key=lambda r: r["flops_ratio"])
            ax.plot([r["flops_ratio"] for r in rows], [r["speedup"] for r in rows], marker="o", label=run_label(report, batch))
            top = max(top, *(max(r["flops_ratio"], r["speedup"]) for r in rows))
    line = [1.0, top * 1.05]
    ax.plot(line, line, color="gray", ls=":", label="speed-up = FLOPs ratio")
    ax.plot(line, [0.9 * v for v in line], color="gray", ls="--", label="0.9 × FLOPs ratio (target)")
    ax.set_xlabel("FLOPs ratio (dense ÷ member)")
    ax.set_ylabel("speed-up (dense latency ÷ member latency)")
    ax.set_title("; ".join(dict.fromkeys(f"{r['model']} on {r['device']}" for r in reports)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if profiled:
        ax = axes[0][1]
        ms = profiled["breakdown"]["ms"]
        names = list(ms)
        bottom = [0.0] * len(names)
        for category in dict.fromkeys(c for b in ms.values() for c in b):
            heights = [ms[n][category] for n in names]
            ax.bar(names, heights, bottom=bottom, label=category)
            bottom = [b + h for b, h in zip(bottom, heights)]
        clock = profiled["breakdown"].get("clock", "CPU")   # runs before the field existed were all on the CPU
        ax.set_ylabel(f"ms per forward (self {clock} time)")
        ax.set_title(f"where the time goes, {run_label(profiled, profiled['breakdown']['batch'])}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)


def random_path(model, seed=0):
    """A path with random entry steps in 1..999 (ties broken by a random z)."""
    g = torch.Generator().manual_seed(seed)
    entry, z = {}, {}
    for name, p in spp.mask_parameters(model):
        entry[name] = torch.randint(1, 1000, p.shape, generator=g).float()
        z[name] = torch.rand(p.shape, generator=g)
    return spp.SolutionPath.from_entries(model, entry, z, steps=1000)


def make_model(args):
    """The benchmarked model, freshly created: ``--model`` at ``--img-size`` with ``--model-args``."""
    return spp.create_model(args.model, img_size=args.img_size, **args.model_args)


def model_args(items):
    """``["depth=2", "embed_dim=64"]`` → ``{"depth": 2, "embed_dim": 64}`` (values parsed as YAML)."""
    import yaml

    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--model-args {item!r}: write key=value, e.g. depth=2")
        parsed[key] = yaml.safe_load(value)
    return parsed


def search_step_fn(args, device, autocast):
    """A search step: frozen weights, mask gradients, LBI. Returns ``(step, forward_backward, lbi)``."""
    x = torch.randn(args.train_batch, 3, args.img_size, args.img_size, device=device)
    searched = spp.add_masks(make_model(args).to(device), args.granularity)
    y = torch.randint(0, searched.num_classes, (args.train_batch,), device=device)
    lbi = spp.LBI([p for _, p in spp.mask_parameters(searched)], lr=3.0, nu=3000.0)
    searched.train()

    def forward_backward():
        with autocast():
            loss = F.cross_entropy(searched(x), y)
        lbi.zero_grad(set_to_none=True)
        loss.backward()

    def step():
        forward_backward()
        lbi.step()

    return step, forward_backward, lbi


def finetune_step_fn(args, device, autocast):
    """A full finetune step: AdamW on every weight of the dense model."""
    x = torch.randn(args.train_batch, 3, args.img_size, args.img_size, device=device)
    dense = make_model(args).to(device).train()
    y = torch.randint(0, dense.num_classes, (args.train_batch,), device=device)
    adamw = torch.optim.AdamW(dense.parameters(), lr=1e-4)

    def step():
        with autocast():
            loss = F.cross_entropy(dense(x), y)
        adamw.zero_grad(set_to_none=True)
        loss.backward()
        adamw.step()

    return step


def frozen_step_fn(args, device, autocast):
    """The floor of a search step: the same model without masks, every weight frozen, the gradient
    taken to the patch embedding's output (through every block, no weight gradients, no optimizer)."""
    x = torch.randn(args.train_batch, 3, args.img_size, args.img_size, device=device)
    frozen = make_model(args).to(device).train().requires_grad_(False)
    y = torch.randint(0, frozen.num_classes, (args.train_batch,), device=device)
    frozen.patch_embed.register_forward_hook(lambda module, inputs, out: out.detach().requires_grad_())

    def step():
        with autocast():
            loss = F.cross_entropy(frozen(x), y)
        loss.backward()

    return step


def cpu_peak_memory(args):
    """Peak resident memory (MiB) a search step and a finetune step add on CPU, each measured in a
    fresh process: Linux's high-water mark (VmHWM), reset once the model and input are built. The
    probes run with glibc's default allocator whatever ``--cpu-allocator`` says (as in runs 9-12)."""
    def probe(kind):
        command = [sys.executable, os.path.abspath(__file__), "--memory-probe", kind, "--model", args.model,
                   "--granularity", args.granularity,
                   "--img-size", str(args.img_size), "--train-batch", str(args.train_batch),
                   "--model-args", *(f"{k}={json.dumps(v)}" for k, v in args.model_args.items())]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"memory probe failed: {result.stderr.strip().splitlines()[-1:]}")
            return None
        return float(result.stdout.strip().splitlines()[-1]) / 1024

    return {"search_MiB": probe("search"), "finetune_MiB": probe("finetune")}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_probe(args):
    """Child process of :func:`cpu_peak_memory`: build, reset the peak, run two steps, print the
    growth of the peak over the resident memory before them (KiB)."""
    device = torch.device("cpu")
    step = (search_step_fn(args, device, nullcontext)[0] if args.memory_probe == "search"
            else finetune_step_fn(args, device, nullcontext))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = _status_kib("VmRSS")
    step()
    step()
    print(_status_kib("VmHWM") - before)


def train_steps(args, device, autocast):
    """(search step, its optimizer share, finetune step, frozen step without masks, peak memories)."""
    search_step, search_forward_backward, lbi = search_step_fn(args, device, autocast)
    search_forward_backward()
    opt_only = timed(lbi.step, device, args.repeats * 5, args.warmup)
    finetune_step = finetune_step_fn(args, device, autocast)
    steps = timed_together({"search": search_step, "finetune": finetune_step,
                            "frozen": frozen_step_fn(args, device, autocast)}, device, args.repeats, args.warmup)
    search, finetune = steps["search"], steps["finetune"]
    if device.type == "cuda":
        memory = {"search_MiB": peak_memory(search_step, device), "finetune_MiB": peak_memory(finetune_step, device)}
    else:
        memory = cpu_peak_memory(args)
    return search, opt_only, finetune, steps["frozen"], memory


def selection(args):
    model = spp.add_masks(make_model(args), args.granularity)
    path = random_path(model)
    start = time.perf_counter()
    family = spp.WeightFamily(model, path)
    build = time.perf_counter() - start
    select = timed(lambda: family.select(remove=0.5), torch.device("cpu"), args.repeats, 1)
    member = family.select(remove=0.5)
    compress = timed(lambda: spp.compress(model, member.masks), torch.device("cpu"), args.repeats, 1)
    return family, build, select, compress


def latency(args, family, device, autocast):
    dense = make_model(args).eval()
    members = {"dense": (dense, 1.0)}
    for removed in args.removed:
        member = family.select(remove=removed, round_to=args.round_to)
        members[f"-{removed:.0%} params"] = (spp.compress(dense, member.masks, granularity=args.granularity),
                                             member.summary.flops_before / member.summary.flops_after)
    timed_models = dict(members)
    if device.type == "cpu" and args.granularity == "dim":
        # the last member again on the unfused path, to show what the padding buys (whole heads need none)
        last = list(members)[-1]
        timed_models[f"{last}, unpadded"] = members[last]
    rows = []
    for model, _ in members.values():
        model.to(device)
    for batch in args.batch_sizes:
        x = torch.randn(batch, 3, args.img_size, args.img_size, device=device)

        def forward(model, padded=True):
            def run():
                with torch.no_grad(), autocast(), nullcontext() if padded else spp.nominal_attention():
                    model(x)
            return run

        fns = {name: forward(m, padded=name in members) for name, (m, _) in timed_models.items()}
        faults = {}
        seconds = timed_together(fns, device, args.repeats, args.warmup, faults)
        for name, (_, flops_ratio) in timed_models.items():
            speedup = seconds["dense"] / seconds[name]
            rows.append({"batch": batch, "model": name, "ms": round(1000 * seconds[name], 2),
                         "speedup": round(speedup, 3), "flops_ratio": round(flops_ratio, 3),
                         "realised": round(speedup / flops_ratio, 3), "page_faults": faults[name]})
    batch = max(args.batch_sizes)   # where the time goes, at the largest batch
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=device)
    try:
        ms = op_breakdown({name: m for name, (m, _) in members.items()}, x, autocast)
    except Exception as e:  # noqa: BLE001 - the profile explains the timings; never lose them to it
        print(f"profiling the forward failed ({type(e).__name__}: {e}); the timings stand without it")
        return rows, None
    bounds = fixed_work_bounds(ms, {name: ratio for name, (_, ratio) in members.items()})
    breakdown = {"batch": batch, "clock": "CUDA kernel" if device.type == "cuda" else "CPU", "ms": ms,
                 "realised_bound_from_fixed_work": bounds}
    return rows, breakdown


def main():
    sys.stdout.reconfigure(line_buffering=True)  # figures show as they are measured, also in a log file
    if "--llm" in sys.argv[1:]:   # the LLM runs: prefill / decode tokens/s, search vs finetune step
        import runpy
        sys.argv = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "llm_speed.py"),
                    *(a for a in sys.argv[1:] if a != "--llm")]
        runpy.run_path(sys.argv[0], run_name="__main__")
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--model-args", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more arguments for timm.create_model, e.g. depth=6 num_classes=10")
    parser.add_argument("--granularity", default="dim", choices=["dim", "head"],
                        help="mask layout: head dims shared by all heads (the paper's), or whole heads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="off", choices=["off", "bf16"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--removed", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cpu-allocator", default="keep", choices=["keep", "system"],
                        help="keep: spp.keep_cpu_memory(), freed CPU memory is reused (no page faults per forward); "
                             "system: glibc's defaults, as the earliest runs of docs/log/speed.md were measured")
    parser.add_argument("--out", default="benchmark_speed.json")
    parser.add_argument("--plot-from", nargs="+", metavar="JSON",
                        help="measure nothing: draw the JSON files of earlier runs into --out's .png")
    parser.add_argument("--memory-probe", choices=["search", "finetune"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model_args = model_args(args.model_args)
    figure = os.path.splitext(args.out)[0] + ".png"
    if args.plot_from:
        missing = [f for f in args.plot_from if not os.path.isfile(f)]
        if missing:
            raise SystemExit(f"--plot-from: {', '.join(missing)} not found; give the --out JSON of earlier runs")
        reports = []
        for filename in args.plot_from:
            with open(filename) as f:
                reports.append(json.load(f))
        plot(reports, figure)
        return print(f"wrote {figure}")
    if args.memory_probe:
        return memory_probe(args)
    kept = spp.keep_cpu_memory() if args.cpu_allocator == "keep" else False
    if args.cpu_allocator == "keep" and not kept:
        print("--cpu-allocator keep: this C library has no mallopt; timing with its own allocator")
    started = time.time()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.amp == "bf16" else None
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
    torch.manual_seed(0)

    search, opt_only, finetune, frozen, memory = train_steps(args, device, autocast)
    family, build, select, compress = selection(args)
    rows, breakdown = latency(args, family, device, autocast)

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    allocator = "keep" if kept else "system"
    result = {"model": args.model, "granularity": args.granularity, "device": machine, "amp": args.amp,
              "cpu_allocator": allocator, "train_batch": args.train_batch,
              "search_step_s": search, "finetune_step_s": finetune, "search_over_finetune": search / finetune,
              "frozen_step_s": frozen, "frozen_over_finetune": frozen / finetune,
              "optimizer_share_of_search_step": opt_only / search, "family_build_s": build,
              "select_s": select, "compress_s": compress, "memory": memory, "latency": rows, "breakdown": breakdown,
              "run": provenance(device.type, started)}
    print(f"\n{args.model} ({args.granularity} masks) on {machine}, amp={args.amp}, CPU allocator: {allocator}")
    run = result["run"]
    print(f"{run['processor']}, commit {run['commit']}, torch {run['torch']}, timm {run['timm']}; "
          f"started {run['started']}, {run['minutes']} min")
    print(f"search step {1000 * search:.1f} ms vs finetune step {1000 * finetune:.1f} ms "
          f"(batch {args.train_batch}): ratio {search / finetune:.2f} (target <= 0.70)")
    print(f"  floor: the model without masks, weights frozen, gradient to the input: {1000 * frozen:.1f} ms = "
          f"{frozen / finetune:.2f} of a finetune step; the masks add {100 * (search / frozen - 1):.0f}% to it")
    print(f"LBI optimizer step {1000 * opt_only:.3f} ms = {100 * opt_only / search:.2f}% of a search step (target < 5%)")
    print(f"family build {1000 * build:.0f} ms (once, includes a FLOP count); select {1000 * select:.1f} ms; "
          f"compress {1000 * compress:.1f} ms; select + compress {select + compress:.3f} s (target < 1 s)")
    if memory["search_MiB"] and memory["finetune_MiB"]:
        print(f"peak memory: search {memory['search_MiB']:.0f} MiB vs finetune {memory['finetune_MiB']:.0f} MiB "
              f"(ratio {memory['search_MiB'] / memory['finetune_MiB']:.2f})")
    print("\n| batch | model | ms | speed-up | FLOPs ratio | realised | page faults per forward |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['model']} | {r['ms']} | {r['speedup']:.2f}x | {r['flops_ratio']:.2f}x | {r['realised']:.2f} "
              f"| {r['page_faults']} |")
    if breakdown:
        print_breakdown(breakdown)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot([result], figure)
    print(f"\nwrote {args.out} and {figure}")


if __name__ == "__main__":
    main()
