#!/usr/bin/env python
"""One block's layers of SmolLM2 (or any model benchmark_sparse.py reads): how well each mask and weight update
reconstructs a layer's outputs on the calibration inputs.

    python scripts/sparse_reconstruction.py --block 0            # about 2 minutes on 2 cores

For every linear layer of ``--block`` (its inputs from the dense model, the Gram matrix H of 128 calibration windows
drawn by ``--seed`` as benchmark_sparse.py draws them), at 50% per row and at 2:4: the relative reconstruction error
tr((W − Ŵ) H (W − Ŵ)ᵀ) / tr(W H Wᵀ) of SPP's masks (one element search of the layer, the defaults) with the kept
weights as they are, with SparseGPT's OBS update for those masks, and refit by least squares
(``spp.element_criteria.refit``); Wanda's masks refit; SparseGPT's own masks and update, and its masks refit.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import os

import torch

from spp import element_criteria as ec
from spp import elements as el


def _benchmark_sparse():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark_sparse.py")
    spec = importlib.util.spec_from_file_location("benchmark_sparse", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def relative_error(w: torch.Tensor, new: torch.Tensor, h: torch.Tensor) -> float:
    d, w, h = (w - new).double(), w.double(), h.double()
    return float(torch.einsum("ij,jk,ik->", d, h, d) / torch.einsum("ij,jk,ik->", w, h, w))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, or a model directory or GGUF file")
    parser.add_argument("--data-root", help="a folder of text files (default: the demo's, python3.11-doc)")
    parser.add_argument("--seq-len", type=int, help="tokens per window (default: the LLM demo's, 64)")
    parser.add_argument("--block", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", nargs="+", default=["0.5", "2:4"])
    args = parser.parse_args()
    bench = _benchmark_sparse().Bench(argparse.Namespace(model=args.model, data_root=args.data_root,
                                                         seq_len=args.seq_len, test_sequences=1,
                                                         calibration_sequences=128, batch=16))
    walk = el.BlockInputs(bench.dense, bench.calibration(args.seed))
    for index in range(args.block):
        walk.advance(index, walk.run(index))
    layers = el.element_layers(bench.dense, [walk.blocks[args.block]])
    grams = el.input_grams(layers, lambda: walk.run(args.block))
    search = {k: p.default for k, p in inspect.signature(el.element_search).parameters.items()   # its defaults
              if k in ("steps", "enter_at", "kappa", "nu_scale", "correlations", "damp")}
    print("| layer | target | SPP masks | + OBS update | + refit | Wanda + refit | SparseGPT | SparseGPT's masks + refit |\n"
          "|---|---|---|---|---|---|---|---|")
    for name, layer in layers.items():
        w, gram = layer.weight.detach().float(), grams[name]
        h = gram.xtx.float()
        entry, z, _ = el._search_layer(w, gram.mean(), **search)
        path = el.ElementPath({name: entry}, {name: z}, search["steps"])
        for target in args.targets:
            spec = {"pattern": target} if ":" in target else {"sparsity": float(target)}
            keep = el.element_masks(path, **spec)[name].bool()
            wanda = el.element_masks({name: ec.wanda(w, gram)}, **spec)[name].bool()
            sparsegpt = ec.sparsegpt_update(w, gram, **spec)
            cells = [w * keep, ec.sparsegpt_update(w, gram, keep=keep), ec.refit(w, gram, keep),
                     ec.refit(w, gram, wanda), sparsegpt, ec.refit(w, gram, sparsegpt != 0)]
            print(f"| {name.split('.', 3)[-1]} | {target} | "
                  + " | ".join(f"{relative_error(w, c, h):.5f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
