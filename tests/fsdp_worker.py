"""A short LBI search on a tiny Llama, its weights and masks sharded by FSDP2 when run under torchrun
(tests/test_decoder.py runs it with 2 CPU processes over gloo and alone, and compares the paths).

    torchrun --nproc_per_node=2 tests/fsdp_worker.py OUT       # sharded
    python tests/fsdp_worker.py OUT                            # one process, unsharded
"""
import os
import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import spp


def main(out: str) -> None:
    sharded = "WORLD_SIZE" in os.environ
    if sharded:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    spp.add_masks(model)
    if sharded:   # every layer, then the rest: frozen weights and masks alike are split over the ranks
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = spp.search_optimizer(model, 3000.0, rho=0.3, lam=0.1)
    batches = torch.randint(0, 64, (12, 4, 16), generator=torch.Generator().manual_seed(1))
    for ids in batches:   # the same batch on every rank: the averaged gradient is the one-process gradient
        loss = spp.next_token_loss(model(ids), ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sizes = spp.support_sizes(optimizer, model)
    path = spp.SolutionPath.from_optimizer(optimizer, model)   # gathers sharded state: every rank calls it
    if not sharded or dist.get_rank() == 0:
        path.save(out)
        print("support", sizes, flush=True)
    if sharded:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
