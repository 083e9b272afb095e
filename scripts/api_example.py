"""A tour of the spp library API on a tiny ViT with random data (runs in seconds on a CPU).

    python scripts/api_example.py
"""
import tempfile

import torch
import torch.nn.functional as F

import spp


def main():
    torch.manual_seed(0)
    model = spp.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64,
                             depth=2, num_heads=4, num_classes=10)
    spp.add_masks(model, granularity="dim")          # masks at 1; weights frozen
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    held_out = [(torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)))]   # images the model was not trained on
    nu = spp.calibrate_nu(model, held_out, F.cross_entropy)   # ν = 1.5 / RMS of the mask gradients at M = 1
    # spp search's optimizer, with a larger pull per step and a lower threshold than its defaults
    # (rho 0.02, lam 0.4) so that elements enter within this 50-step tour
    optimizer = spp.search_optimizer(model, nu, rho=0.1, lam=0.1)
    print(f"nu {optimizer.param_groups[0]['nu']:.4g}, lr {optimizer.param_groups[0]['lr']:.4g}")
    for step in range(1, 51):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}  support {spp.support_sizes(optimizer, model)}")

    path = spp.SolutionPath.from_optimizer(optimizer, model)
    family = spp.WeightFamily(model, path)
    print(f"the path covers {family.reach():.1%} of the prunable params (members up to that are ranked along it)")
    for keep in (0.7, 0.5, 0.3):
        member = family.select(keep=keep, by="params")
        pruned = spp.compress(model, member.masks)
        spp.set_masks(model, member.masks)
        model.eval()
        diff = (model(x) - pruned(x)).abs().max().item()
        print(f"keep {keep:.0%}: {spp.count_params(pruned):,} params "
              f"(predicted {member.summary.params_after:,}), masked vs compressed max diff {diff:.1e}")
    with tempfile.TemporaryDirectory() as out:
        spp.save_pruned(pruned, out)
        loaded = spp.load_pruned(out)
        print("saved and reloaded:", torch.equal(loaded(x), pruned(x)))
    print(member.summary)

    # Read a member the way that scores best on held-out data (entry or final-z order, kept elements at 1 or at
    # the search's mask values: settled after the member's last entry, or at the end), as spp family and spp
    # export do on their validation split.
    def held_out_accuracy(candidate):
        with torch.no_grad():
            small = spp.compress(model, candidate.masks).eval()
            return sum((small(hx).argmax(-1) == hy).float().mean().item() for hx, hy in held_out) / len(held_out)

    best = family.select_best(held_out_accuracy, keep=0.5)
    print(f"select_best at 50%: ranked by {best.summary.rank}, values {best.summary.values}, "
          f"scores {best.summary.scores}")

    # Any other importance criterion gives a family too: here the norm of each MLP neuron's fc1 row
    # (attention masks all scored 0), read off by the same budget walk.
    scores = {n: torch.zeros(p.shape) for n, p in spp.mask_parameters(model)}
    for i, block in enumerate(model.blocks):
        scores[f"blocks.{i}.mlp.mask"] = block.mlp.fc1.weight.norm(dim=1).detach()
    baseline = spp.WeightFamily(model, spp.SolutionPath.from_scores(model, scores)).select(keep=0.5, by="params")
    print("fc1-norm member at 50% of params:", [w.mlp_hidden for w in baseline.summary.widths], "MLP neurons kept")


if __name__ == "__main__":
    main()
