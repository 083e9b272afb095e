"""CUDA checks, run by scripts/gpu_check.sh on a GPU machine."""
import copy

import pytest
import torch

import spp

from helpers import random_pair_masks, tiny_vit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)")


@pytest.mark.parametrize("granularity", ["dim", "head"])
def test_compressed_equals_masked_on_cuda(granularity):
    model = tiny_vit().cuda()
    masks = random_pair_masks(model, granularity, keep=0.5)
    masks["blocks.0.attn.qk_mask"].zero_()
    spp.add_masks(model, granularity)
    spp.set_masks(model, {k: v.cuda() for k, v in masks.items()})
    pruned = spp.compress(model)
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        assert (model(x) - pruned(x)).abs().max().item() <= 1e-4  # TF32 matmuls on the GPU


def test_cuda_model_compresses_with_masks_on_the_cpu():
    # WeightFamily.select returns CPU masks; compressing a model on the GPU must take them as they are
    dense = tiny_vit().cuda().eval()
    masks = random_pair_masks(dense, "dim", keep=0.5, binary=False)
    masked = spp.add_masks(copy.deepcopy(dense), "dim")
    spp.set_masks(masked, {k: v.cuda() for k, v in masks.items()})
    pruned = spp.compress(dense, masks)
    assert next(pruned.parameters()).is_cuda
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        assert (masked(x) - pruned(x)).abs().max().item() <= 1e-4


def test_lbi_on_cuda_matches_cpu():
    torch.manual_seed(0)
    grads = [torch.randn(64, dtype=torch.float64) for _ in range(10)]
    results = []
    for device in ("cpu", "cuda"):
        p = torch.nn.Parameter(torch.ones(64, dtype=torch.float64, device=device))
        opt = spp.LBI([p], lr=0.5, kappa=4.0, nu=2.0, lam=0.3, foreach=True)
        for g in grads:
            p.grad = g.to(device)
            opt.step()
        results.append((p.detach().cpu(), opt.state[p]["entry_step"].cpu()))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_bf16_search_step_keeps_fp32_masks():
    model = spp.add_masks(tiny_vit().cuda(), "dim")
    opt = spp.LBI([p for _, p in spp.mask_parameters(model)], nu=30.0)
    x, y = torch.randn(8, 3, 32, 32, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    for _, p in spp.mask_parameters(model):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32 and torch.isfinite(p).all()


def test_a_2_4_member_in_the_semi_structured_format_computes_what_its_zeros_do():
    transformers = pytest.importorskip("transformers")
    from spp import elements
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("semi-structured sparsity needs an Ampere or newer GPU")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).cuda().to(torch.bfloat16).eval()
    scores = {n: layer.weight.float().abs() for n, layer in elements.element_layers(model).items()}
    elements.prune_weights(model, elements.element_masks(scores, pattern="2:4"))
    ids = torch.randint(0, 256, (2, 64), device="cuda")
    with torch.no_grad():
        want = model(ids).logits.float()
        elements.to_semi_structured(model)
        got = model(ids).logits.float()
    assert (got - want).abs().max().item() <= 0.05 * want.abs().max().item()   # bf16 accumulation order differs
