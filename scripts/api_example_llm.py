"""The spp library tour on a tiny random Llama with grouped-query attention (runs in seconds on a CPU).

    python scripts/api_example_llm.py            # needs transformers: pip install -e ".[llm]"

The same calls as scripts/api_example.py (the ViT tour): masks, ν, the LBI search with the next-token loss,
members by parameter or FLOP budget, exact compression, greedy generation, save and load without pickles.
For a real model use spp.create_model("path/to/hf_dir") (or "hf:meta-llama/Llama-2-7b-hf" online).
"""
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import spp


def main():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    spp.add_masks(model, granularity="dim")          # rotary-pair, value-dim and MLP masks at 1; weights frozen
    print("masks:", {n: tuple(p.shape) for n, p in spp.mask_parameters(model)[:3]}, "...")
    text = torch.randint(0, 128, (64, 32))           # stand-in for tokenized text: 64 sequences of 32 tokens
    batches = [(ids, ids) for ids in text.split(8)]  # (inputs, targets): the next-token loss shifts them
    nu = spp.calibrate_nu(model, batches[-2:], spp.next_token_loss, batches=2)   # held-out batches
    optimizer = spp.search_optimizer(model, nu, rho=0.2, lam=0.05)   # a faster pull than the defaults, for 60 steps
    model.train()
    for step in range(1, 61):
        ids, _ = batches[step % 6]
        loss = spp.next_token_loss(model(ids), ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}  support {spp.support_sizes(optimizer, model)}")
    model.eval()

    path = spp.SolutionPath.from_optimizer(optimizer, model)
    family = spp.WeightFamily(model, path, input_size=(32,))     # FLOPs priced per sequence of 32 tokens
    prompt = text[:1, :8]
    for keep, by in ((0.7, "params"), (0.5, "params"), (0.5, "flops")):
        member = family.select(keep=keep, by=by)
        small = spp.compress(model, member.masks)
        spp.set_masks(model, member.masks)
        with torch.no_grad():
            diff = (model(text[:4]).logits - small(text[:4]).logits).abs().max().item()
        same = torch.equal(model.generate(prompt, max_new_tokens=16, do_sample=False),
                           small.generate(prompt, max_new_tokens=16, do_sample=False))
        print(f"keep {keep:.0%} of {by}: {spp.count_params(small):,} params (predicted {member.summary.params_after:,}), "
              f"masked vs compressed logits max diff {diff:.1e}, 16 greedy tokens identical: {same}")
    with tempfile.TemporaryDirectory() as out:
        spp.save_pruned(small, out)                  # model.safetensors + config.json, no pickle
        loaded = spp.load_pruned(out)
        with torch.no_grad():
            print("saved and reloaded:", type(loaded).__name__, torch.equal(loaded(text[:2]).logits, small(text[:2]).logits))
    print(member.summary)


if __name__ == "__main__":
    main()
