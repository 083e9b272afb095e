#!/usr/bin/env python
"""What 2:4 sparsity buys on a GPU, as ratios measured in one run: a dense matmul against the same matmul with a 2:4
sparse weight (``torch.sparse.to_sparse_semi_structured``), and the prefill of a random-weight 1.1B Llama (TinyLlama's
shape, bf16) against its 2:4 member (every linear layer of its blocks, :func:`spp.elements.to_semi_structured`).

    python scripts/sparse_speed.py --out sparse_speed.json      (needs a CUDA GPU of compute capability 8.0 or newer)

Each figure is the median of ``--repeats`` runs after ``--warmup``. Prints one JSON line per measurement.
"""
from __future__ import annotations

import argparse
import json

import torch

from spp import elements
from spp.timing import median_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="sparse_speed.json")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sparse_speed.py needs a CUDA GPU (semi-structured sparsity runs on NVIDIA tensor cores)")
    device, results = torch.device("cuda"), []

    def record(row):
        results.append(row)
        print(json.dumps(row), flush=True)

    from torch.sparse import to_sparse_semi_structured
    for shape in ((2048, 2048), (5632, 2048), (2048, 5632)):
        weight = torch.randn(*shape, device=device, dtype=torch.bfloat16)
        keep = elements.element_masks({"w": weight.float().abs()}, pattern="2:4")["w"]
        weight = weight * keep
        sparse = to_sparse_semi_structured(weight)
        for tokens in args.tokens:
            x = torch.randn(tokens, shape[1], device=device, dtype=torch.bfloat16)
            dense_s = median_seconds(lambda: torch.nn.functional.linear(x, weight), device, args.repeats, args.warmup)
            sparse_s = median_seconds(lambda: torch.nn.functional.linear(x, sparse), device, args.repeats, args.warmup)
            record({"what": "linear", "weight": list(shape), "tokens": tokens, "dense_ms": dense_s * 1e3,
                    "sparse_2_4_ms": sparse_s * 1e3, "speedup": dense_s / sparse_s})
    import transformers
    config = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)
    model = transformers.LlamaForCausalLM(config).to(device, torch.bfloat16).eval()
    ids = torch.randint(0, 32000, (args.batch, args.seq_len), device=device)

    def prefill():
        with torch.no_grad():
            model(ids, use_cache=False)
    dense_s = median_seconds(prefill, device, args.repeats, args.warmup)
    scores = {n: layer.weight.float().abs() for n, layer in elements.element_layers(model).items()}
    elements.prune_weights(model, elements.element_masks(scores, pattern="2:4"))
    elements.to_semi_structured(model)
    sparse_s = median_seconds(prefill, device, args.repeats, args.warmup)
    record({"what": "prefill, 1.1B Llama", "batch": args.batch, "seq_len": args.seq_len, "dense_ms": dense_s * 1e3,
            "sparse_2_4_ms": sparse_s * 1e3, "speedup": dense_s / sparse_s,
            "gpu": torch.cuda.get_device_name()})
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
