"""Speed of compressed LLMs, and the cost of a search step, as ratios measured in one run on one model.

    python scripts/llm_speed.py                               # CPU: a random-weight 27M Llama (GQA), float32
    python scripts/llm_speed.py --device cuda                 # GPU: a random-weight 1.1B Llama (TinyLlama's shape), bf16
    python scripts/llm_speed.py --shape tiny --device cpu     # a seconds-long run of the same code (the tests')
    (``python scripts/benchmark_speed.py --llm ...`` runs this script)

Measures, each figure the median of ``--repeats`` after ``--warmup`` runs:
  * a search step (masks only, frozen weights, LBI) against a full finetune step (AdamW on every weight), same
    model and batch; peak memory of both on CUDA;
  * the dense model and members at ``--removed`` fractions of the prunable parameters, with widths rounded to
    each of ``--round-to``: prefill tokens/s (one forward over ``--seq-len`` tokens) and greedy decoding
    tokens/s with the KV cache, at each of ``--batch-sizes``;
  * realised fraction: prefill speed-up ÷ FLOPs ratio (FLOPs per sequence, as ``torch.utils.flop_counter``
    counts), decode speed-up ÷ ratio of the weight bytes read per token (every linear layer's weight).
Members are cut from a path of random scores: their speed depends on their widths, not on how they were
ranked. Weights are random: speed does not depend on them. ``--paired`` also times each member in alternation
with the dense model (the median of per-pair ratios: steadier where the machine's speed drifts during a run).
``--profile`` prints where the time of a prefill, and on the CPU of a decoded token, goes (each model). Prints one JSON line per measurement, a table, and writes
everything to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

import spp
from spp.criteria import random_scores
from spp.timing import lm_throughput, median_seconds

SHAPES = {
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "cpu": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=8192, max_position_embeddings=1024),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=256),
}


def weight_elements(model: nn.Module) -> int:
    """Elements of every linear layer's weight: what decoding reads per token (the embedding reads one row)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def profile_prefill(models, seq_len: int, batch: int, device, rows: int = 8) -> None:
    """Self time by op of one prefill of each of ``models`` ({name: model}) after one untimed: where it goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU]
    for name, net in models.items():
        ids = torch.randint(0, net.config.vocab_size, (batch, seq_len), device=device)
        with torch.no_grad():
            net(ids)
            with profile(activities=activities) as prof:
                net(ids)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
        total = sum(getattr(e, key) for e in events) or 1
        top = ", ".join(f"{e.key} {getattr(e, key) / total:.0%}" for e in events[:rows])
        print(f"profile, prefill of {name} (batch {batch} x {seq_len}): {top}", flush=True)


MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")   # where the weights are read


def profile_decode(models, prompt: int, batch: int, new_tokens: int, device) -> dict:
    """Where a decoded token's time goes, for each of ``models`` ({name: model}): greedy tokens with the KV cache
    after a ``prompt``-token prefill, the model's own forward (``generate``'s bookkeeping left out), split into
    the matrix products (what reads the weights, and shrinks with the widths), every other op, and the time
    outside any op (Python: the modules' own code), in milliseconds per token of a profiled run (the profiler
    adds its own time to each op; ``ms_per_token`` is the same decoding unprofiled)."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for name, net in models.items():
        ids = torch.randint(0, net.config.vocab_size, (batch, prompt), device=device)

        def decode():
            step = net(ids, use_cache=True)
            cache, token = step.past_key_values, step.logits[:, -1:].argmax(-1)
            for _ in range(new_tokens):
                step = net(token, past_key_values=cache, use_cache=True)
                cache, token = step.past_key_values, step.logits[:, -1:].argmax(-1)

        def profiled(fn):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                begin = time.perf_counter()
                fn()
                seconds = time.perf_counter() - begin
            return seconds, {e.key: e.self_cpu_time_total for e in prof.key_averages()}

        with torch.no_grad():
            decode()
            prefill_s = median_seconds(lambda: net(ids, use_cache=True), device, 3, 0)
            unprofiled = (median_seconds(decode, device, 3, 0) - prefill_s) / new_tokens
            decode_s, ops = profiled(decode)
            prefill_s, prefill_ops = profiled(lambda: net(ids, use_cache=True))
        for k, v in prefill_ops.items():   # the prefill's share, taken out
            ops[k] = ops.get(k, 0) - v
        wall = (decode_s - prefill_s) / new_tokens
        matmul = sum(v for k, v in ops.items() if k in MATMUL) / new_tokens / 1e3
        other = sum(v for k, v in ops.items() if k not in MATMUL) / new_tokens / 1e3
        top = sorted(((v, k) for k, v in ops.items() if k not in MATMUL), reverse=True)[:5]
        out[name] = {"ms_per_token": round(unprofiled * 1e3, 3), "profiled_ms_per_token": round(wall * 1e3, 3),
                     "matmul_ms": round(matmul, 3), "other_ops_ms": round(other, 3),
                     "outside_ops_ms": round(wall * 1e3 - matmul - other, 3),
                     "top_other_ops": {k: round(v / new_tokens / 1e3, 3) for v, k in top}}
        print(f"profile, decode of {name} (batch {batch}): {json.dumps(out[name])}", flush=True)
    return out


def paired_speedups(dense, net, seq_len: int, batch: int, new_tokens: int, repeats: int, device) -> dict:
    """Speed-ups of ``net`` over ``dense`` timed in alternation (dense, member, dense, member, ...), one run of
    each per repeat after one untimed run of each: the median of the per-repeat ratios, so that a machine whose
    speed drifts during the run moves both sides of each ratio alike."""
    def once(model):
        return lm_throughput(model, seq_len, device, batch=batch, prompt=seq_len, new_tokens=new_tokens,
                             repeats=1, warmup=0)
    once(dense), once(net)
    ratios = {"prefill": [], "decode": []}
    for _ in range(repeats):
        a, b = once(dense), once(net)
        ratios["prefill"].append(b["prefill_tokens_per_s"] / a["prefill_tokens_per_s"])
        ratios["decode"].append(b["decode_tokens_per_s"] / a["decode_tokens_per_s"])
    return {f"paired_{k}_speedup": round(sorted(v)[len(v) // 2], 3) for k, v in ratios.items()}


def step_costs(model, ids, device, args, report) -> None:
    """A search step (masks, frozen weights, LBI) against a full finetune step, same batch."""
    def run(step):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = median_seconds(step, device, args.repeats, args.warmup)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
        return seconds, peak

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def finetune():
        loss = spp.next_token_loss(model(ids), ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    finetune_s, finetune_peak = run(finetune)
    optimizer.state.clear()           # free the finetune's state before the search step is measured
    model.zero_grad(set_to_none=True)
    spp.add_masks(model)
    search = spp.search_optimizer(model, 1.0)

    def search_step():
        loss = spp.next_token_loss(model(ids), ids)
        search.zero_grad()
        loss.backward()
        search.step()
    search_s, search_peak = run(search_step)
    report(what="search step vs finetune step", batch=list(ids.shape), search_s=round(search_s, 4),
           finetune_s=round(finetune_s, 4), ratio=round(search_s / finetune_s, 3),
           search_peak_gb=search_peak and round(search_peak, 2), finetune_peak_gb=finetune_peak and round(finetune_peak, 2))
    model.eval()


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="default: 1.1b on CUDA, cpu on the CPU")
    parser.add_argument("--tiny", action="store_true", help="the same as --shape tiny")
    parser.add_argument("--seq-len", type=int, help="prefill tokens (default 512; tiny: 32)")
    parser.add_argument("--new-tokens", type=int, help="decoded tokens (default 64; tiny: 8)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--removed", type=float, nargs="+", default=[0.2, 0.3, 0.5, 0.7])
    parser.add_argument("--round-to", type=int, nargs="+", default=[1, 8], help="width multiples measured (1: exact widths)")
    parser.add_argument("--granularity", choices=["dim", "head"], default="dim",
                        help="members cut by dims (every layer keeps its heads) or by whole heads (query heads then "
                             "share their key/value heads unequally)")
    parser.add_argument("--step-batch", type=int, nargs=2, metavar=("B", "T"), help="search/finetune step batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--paired", action="store_true",
                        help="also time each member in alternation with the dense model (steadier ratios on a busy "
                             "or drifting machine)")
    parser.add_argument("--profile", action="store_true",
                        help="also print where a prefill's time (and on the CPU a decoded token's) goes, each model")
    parser.add_argument("--out", default="llm_speed.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    shape_name = "tiny" if args.tiny else args.shape or ("1.1b" if device.type == "cuda" else "cpu")
    shape, tiny = SHAPES[shape_name], shape_name == "tiny"
    seq_len = args.seq_len or (32 if tiny else 512)
    new_tokens = args.new_tokens or (8 if tiny else 64)
    step_batch = args.step_batch or ((2, 32) if tiny else (4, 1024) if device.type == "cuda" else (2, 256))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(LlamaConfig(**shape), dtype=dtype).to(device).eval()
    results = []

    def report(**row):
        row = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "dtype": str(dtype).replace("torch.", ""), "shape": shape_name, **row}
        results.append(row)
        print(json.dumps(row), flush=True)

    ids = torch.randint(0, shape["vocab_size"], tuple(step_batch), device=device)
    step_costs(model, ids, device, args, report)

    if args.granularity != "dim":   # the search step's masks are by dim
        spp.remove_masks(model)
        spp.add_masks(model, granularity=args.granularity)
    family = spp.WeightFamily(model, spp.SolutionPath.from_scores(model, random_scores(model, 0)),
                              input_size=(seq_len,))
    cuts = {(r, k): family.select(remove=r, round_to=k, values="binary") for r in args.removed for k in args.round_to}
    spp.remove_masks(model)   # the dense model is the library's own, unmasked
    for p in model.parameters():
        p.requires_grad_(False)
    dense = {"flops": family.flops_before, "weights": weight_elements(model)}
    rows = {}
    for key in [None, *cuts]:
        if key is None:
            net, name, flops = model, "dense", dense["flops"]
        else:
            member = cuts[key]
            net = spp.compress(model, member.masks, granularity=args.granularity).to(device, dtype).eval()
            name, flops = f"-{key[0]:.0%} (round_to {key[1]})", member.summary.flops_after
        for batch in args.batch_sizes:
            speed = lm_throughput(net, seq_len, device, batch=batch, prompt=seq_len, new_tokens=new_tokens,
                                  repeats=args.repeats, warmup=args.warmup)
            row = {"member": name, "params": spp.count_params(net), "batch": batch, "seq_len": seq_len, **speed,
                   "flops_ratio": round(dense["flops"] / flops, 3),
                   "weight_bytes_ratio": round(dense["weights"] / weight_elements(net), 3)}
            if key is not None:
                base = rows[("dense", batch)]
                row["prefill_speedup"] = round(speed["prefill_tokens_per_s"] / base["prefill_tokens_per_s"], 3)
                row["decode_speedup"] = round(speed["decode_tokens_per_s"] / base["decode_tokens_per_s"], 3)
                row["prefill_realised"] = round(row["prefill_speedup"] / row["flops_ratio"], 3)
                row["decode_realised"] = round(row["decode_speedup"] / row["weight_bytes_ratio"], 3)
                if args.paired:
                    row.update(paired_speedups(model, net, seq_len, batch, new_tokens, args.repeats, device))
                    row["paired_prefill_realised"] = round(row["paired_prefill_speedup"] / row["flops_ratio"], 3)
                    row["paired_decode_realised"] = round(row["paired_decode_speedup"] / row["weight_bytes_ratio"], 3)
            rows[(name, batch)] = row
            report(what="inference", **row)
        if args.profile:
            profile_prefill({name: net}, seq_len, max(args.batch_sizes), device)
            if device.type == "cpu":
                report(what="decode profile", batch=min(args.batch_sizes),
                       **profile_decode({name: net}, seq_len, min(args.batch_sizes), new_tokens, device)[name],
                       member=name)
        del net
    paired = " prefill realised, paired | decode realised, paired |" if args.paired else ""
    print("\n| member | batch | params | prefill tok/s | × | FLOPs ratio | realised | decode tok/s | × | bytes ratio | realised |"
          + paired)
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if args.paired else ""))
    for (name, batch), r in rows.items():
        print(f"| {name} | {batch} | {r['params']:,} | {r['prefill_tokens_per_s']:,.0f} | {r.get('prefill_speedup', 1):.2f} | "
              f"{r['flops_ratio']:.2f} | {r.get('prefill_realised', 1):.2f} | {r['decode_tokens_per_s']:,.0f} | "
              f"{r.get('decode_speedup', 1):.2f} | {r['weight_bytes_ratio']:.2f} | {r.get('decode_realised', 1):.2f} |"
              + (f" {r['paired_prefill_realised']:.2f} | {r['paired_decode_realised']:.2f} |" if "paired_prefill_realised" in r
                 else (" | |" if args.paired else "")))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
