"""The conformance suite every registered model family passes, on a tiny random model of it: masks at 1 change
nothing, a compressed member computes what the masked model computes (both granularities), its parameters equal
the geometry's closed form and its FLOPs torch.utils.flop_counter's within 2%, save_pruned / load_pruned
reproduce it, and a decoder's greedy generation with the KV cache is the masked model's. A new family adds one
builder to FAMILIES; what is specific to a family stays in its own test file (test_decoder.py, test_clip.py,
test_swin.py, test_masks_compress.py)."""
import copy

import pytest
import torch

import spp
from helpers import check_costs, tiny_swin, tiny_vit
from helpers import clip_inputs, random_masks, tiny_clip, tiny_decoder
from spp.models import _REGISTRY, family_named, family_of

pytest.importorskip("transformers", reason="the Hugging Face families need transformers: pip install -e '.[llm]'")


def _image(model):
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _tokens(model):
    return torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


FAMILIES = {   # registered name: (a tiny random model, a batch of its inputs)
    "timm-vit": (tiny_vit, _image),
    "timm-swin": (tiny_swin, _image),
    "hf-llama": (lambda: tiny_decoder("llama-gqa-bias"), _tokens),
    "hf-qwen3": (lambda: tiny_decoder("qwen3-gqa"), _tokens),
    "hf-gemma3": (lambda: tiny_decoder("gemma3-mqa"), _tokens),
    "hf-phi3": (lambda: tiny_decoder("phi3-partial"), _tokens),
    "hf-opt": (lambda: tiny_decoder("opt"), _tokens),
    "hf-clip": (tiny_clip, lambda model: clip_inputs()),
}


# every family at each granularity it compresses exactly (Qwen3, Gemma 3: whole heads only; test_decoder.py checks the refusal)
CASES = [(name, g) for name in FAMILIES for g in ("dim", "head") if g in family_named(name).granularities]


def _first(name) -> str:
    return family_named(name).granularities[0]


def _out(model, x) -> torch.Tensor:
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    for name in ("logits_per_image", "logits"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return out


def _member(name, granularity):
    build, batch = FAMILIES[name]
    dense = build()
    x = batch(dense)
    masked = spp.add_masks(copy.deepcopy(dense), granularity)
    spp.set_masks(masked, random_masks(masked, seed=3))
    return dense, masked, spp.compress(masked), x


def test_every_registered_family_is_in_the_suite():
    assert set(FAMILIES) == {entry.name for entry in _REGISTRY}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_masks_at_one_change_nothing(name):
    build, batch = FAMILIES[name]
    dense = build()
    x = batch(dense)
    assert family_of(dense).name == name
    masked = spp.add_masks(copy.deepcopy(dense), _first(name))
    assert spp.is_masked(masked) and len(spp.mask_parameters(masked)) == 3 * len(family_of(dense).blocks(dense))
    torch.testing.assert_close(_out(masked, x), _out(dense, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name, granularity", CASES)
def test_compressed_member_computes_the_masked_model(name, granularity):
    dense, masked, small, x = _member(name, granularity)
    assert spp.count_params(small) < spp.count_params(dense) and not spp.is_masked(small)
    torch.testing.assert_close(_out(small, x), _out(masked, x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name, granularity", CASES)
def test_costs_match_the_geometry_and_the_flop_counter(name, granularity):
    _, masked, small, _ = _member(name, granularity)
    check_costs(masked, small)


@pytest.mark.parametrize("name, granularity", CASES)
def test_save_and_load_reproduce_the_member(name, granularity, tmp_path):
    _, _, small, x = _member(name, granularity)
    spp.save_pruned(small, str(tmp_path / "member"))
    loaded = spp.load_pruned(str(tmp_path / "member")).eval()
    assert family_of(loaded).name == name
    torch.testing.assert_close(_out(loaded, x), _out(small, x), rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n in FAMILIES if family_of(FAMILIES[n][0]()).inputs == "text"])
def test_greedy_generation_with_the_kv_cache_is_the_masked_models(name):
    _, masked, small, x = _member(name, _first(name))
    kwargs = dict(max_new_tokens=16, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(masked.generate(x[:1, :6], **kwargs), small.generate(x[:1, :6], **kwargs))
