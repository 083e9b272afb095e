"""LLM speed check: search step time, and tokens/s of the dense model and of compressed members.

    python scripts/llm_speed.py --device cuda                 # a random-weight 1.1B Llama (TinyLlama's shape), bf16
    python scripts/llm_speed.py --tiny --device cpu           # a seconds-long run of the same code (the tests')

Members are cut from a path of random scores (their speed depends on their widths, not on how they were
ranked) at 30% and 50% of the prunable parameters removed, with widths rounded to multiples of 8. Prints
one JSON line per measurement and writes them all to --out. Medians of --repeats after --warmup runs;
tokens/s: prefill (one forward over the prompt) and greedy decoding with the KV cache.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import spp
from spp.criteria import random_scores
from spp.report import lm_throughput

SHAPES = {
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=256),
}


def median_time(fn, device, repeats: int, warmup: int) -> float:
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (for a quick check of the script)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="llm_speed.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SHAPES["tiny" if args.tiny else "1.1b"]
    prompt, batches, search_batch = (32, (1, 2), (2, 32)) if args.tiny else (512, (1, 8), (4, 1024))
    new_tokens = 8 if args.tiny else 128
    torch.manual_seed(0)
    config = LlamaConfig(**shape)
    model = LlamaForCausalLM._from_config(config, dtype=dtype).to(device).eval()
    results = []

    def report(**row):
        row = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "dtype": str(dtype).replace("torch.", ""), **row}
        results.append(row)
        print(json.dumps(row), flush=True)

    # one search step: masks only, activation checkpointing, the next-token loss
    spp.add_masks(model)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    optimizer = spp.search_optimizer(model, 1.0)
    ids = torch.randint(0, shape["vocab_size"], search_batch, device=device)

    def step():
        loss = spp.next_token_loss(model(ids), ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.train()
    seconds = median_time(step, device, args.repeats, args.warmup)
    report(what="search step", batch=list(search_batch), seconds=round(seconds, 4),
           tokens_per_s=round(search_batch[0] * search_batch[1] / seconds, 1),
           peak_memory_gb=round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if device.type == "cuda" else None)
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    model.eval()
    family = spp.WeightFamily(model, spp.SolutionPath.from_scores(model, random_scores(model, 0)),
                              input_size=(prompt,))
    cuts = {f"-{r:.0%}": family.select(remove=r, round_to=8, values="binary").masks for r in (0.3, 0.5)}
    spp.remove_masks(model)   # the dense model is the library's own, unmasked
    for name in ("dense", *cuts):
        net = model if name == "dense" else spp.compress(model, cuts[name], granularity="dim").to(device, dtype).eval()
        for batch in batches:
            speed = lm_throughput(net, prompt, device, batch=batch, prompt=prompt, new_tokens=new_tokens,
                                  repeats=args.repeats, warmup=args.warmup)
            report(what="inference", member=name, params=spp.count_params(net), batch=batch, prompt=prompt, **speed)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
