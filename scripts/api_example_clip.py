"""The spp library tour on a tiny random CLIP, both towers (runs in seconds on a CPU).

    python scripts/api_example_clip.py            # needs transformers: pip install -e ".[llm]"

The same calls as scripts/api_example.py (the ViT tour): masks in both towers, ν, the LBI search with CLIP's
contrastive loss, members for the two towers together or the same fraction of each, exact compression, save
and load without pickles. For a real model use spp.create_model("hf:openai/clip-vit-base-patch32") (online)
or a local directory, and image-caption batches from your data (spp.data.caption_datasets reads a
Karpathy-split JSON).
"""
import tempfile

import torch
from transformers import CLIPConfig, CLIPModel

import spp


def batch(seed: int, size: int = 16):
    """A stand-in for one batch of image-caption pairs, in the form spp.tasks.Contrastive reads:
    ``(images, {"input_ids", "attention_mask", "target": [image id, match key, class or -1]})``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (size, 12), generator=g)
    ids[:, -1] = 2                                   # every caption ends in the eos token, which CLIP pools at
    image_id = torch.arange(size) + 100 * seed
    target = torch.stack([image_id, image_id, torch.full((size,), -1)], 1)
    return torch.randn(size, 3, 32, 32, generator=g), {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                       "target": target}


def main():
    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=12, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()
    spp.add_masks(model, granularity="dim")          # query-key, value and MLP masks in every layer of both towers
    print("masks:", len(spp.mask_parameters(model)), "e.g.", spp.mask_parameters(model)[0][0])
    task = spp.tasks.Contrastive()                   # the symmetric InfoNCE over each batch
    batches = [batch(seed) for seed in range(8)]
    nu = spp.calibrate_nu(model, batches[-2:], task.loss, batches=2, task=task)   # held-out batches
    optimizer = spp.search_optimizer(model, nu, rho=0.2, lam=0.05)   # a faster pull than the defaults, for 60 steps
    model.train()
    for step in range(1, 61):
        inputs, targets = task.split(batches[step % 6])
        loss = task.loss(model(**inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}  support {spp.support_sizes(optimizer, model)}")
    model.eval()

    family = spp.WeightFamily(model, spp.SolutionPath.from_optimizer(optimizer, model))
    inputs, _ = task.split(batches[7])
    for keep, scope in ((0.7, "global"), (0.5, "global"), (0.5, "part")):   # part: half of each tower
        member = family.select(keep=keep, scope=scope)
        small = spp.compress(model, member.masks)
        spp.set_masks(model, member.masks)
        with torch.no_grad():
            a, b = model(**inputs), small(**inputs)
        diff = max((a.image_embeds - b.image_embeds).abs().max().item(), (a.text_embeds - b.text_embeds).abs().max().item())
        print(f"keep {keep:.0%} ({scope}): {spp.count_params(small):,} params (predicted {member.summary.params_after:,}), "
              f"masked vs compressed embeddings max diff {diff:.1e}")
    with tempfile.TemporaryDirectory() as out:
        spp.save_pruned(small, out)                  # model.safetensors + config.json, no pickle
        loaded = spp.load_pruned(out)
        with torch.no_grad():
            same = torch.equal(loaded(**inputs).logits_per_image, small(**inputs).logits_per_image)
        print("saved and reloaded:", type(loaded).__name__, same)
    print(member.summary)


if __name__ == "__main__":
    main()
