"""Decoder LLMs (Llama, Mistral, Qwen2, OPT from transformers): masks, exact compression, save/load, a search.

Every model is a tiny random config built here (no download): 2 layers, hidden 64, 4 query heads.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import spp
from helpers import check_costs
from spp.models import model_geometry
from spp.structure import UnsupportedModel

transformers = pytest.importorskip("transformers", reason="the LLM families need transformers: pip install -e '.[llm]'")
from helpers import (DECODERS as MODELS, VOCAB, decoder_config as _config, lbi_steps, random_masks,  # noqa: E402
                     tiny_decoder as tiny)


def check_exact(masked, small, ids):
    """Logits equal to 1e-4, and 32 greedy tokens (KV cache on) identical with close scores at every step."""
    with torch.no_grad():
        diff = (masked(ids).logits - small(ids).logits).abs().max().item()
    assert diff < 1e-4, diff
    # min_new_tokens: no stop at an end-of-sequence token (its score is then -inf in both)
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, use_cache=True, output_scores=True,
                  return_dict_in_generate=True, pad_token_id=0)
    a, b = masked.generate(ids[:1, :6], **kwargs), small.generate(ids[:1, :6], **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    assert a.sequences.shape[1] == 6 + 32
    for sa, sb in zip(a.scores, b.scores):
        torch.testing.assert_close(sa, sb, rtol=0, atol=1e-4)


HEADS_ONLY = ("qwen3-gqa", "gemma3-mqa")   # q/k norms: granularity="dim" is refused (test_unsupported_models_say_why)


@pytest.mark.parametrize("name, granularity", [(n, g) for n in MODELS for g in ("dim", "head")
                                               if g == "head" or n not in HEADS_ONLY])
def test_masked_then_compressed_is_exact(name, granularity):
    model = tiny(name)
    ids = torch.randint(3, VOCAB, (2, 20))
    with torch.no_grad():
        dense = model(ids).logits
    spp.add_masks(model, granularity=granularity)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)   # masks at one change nothing
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.endswith("_mask"))
    spp.set_masks(model, random_masks(model, seed=1))
    small = spp.compress(model)
    assert isinstance(small, transformers.PreTrainedModel)
    assert spp.count_params(small) < spp.count_params(model)
    check_exact(model, small, ids)
    check_costs(model, small)


def test_rotary_pairs_and_gqa_layout():
    """A query-key entry is a rotary pair (head_dim / 2 entries) shared by every head; removing pair j removes
    dims j and j + d/2 of q_proj and k_proj in every query and key/value head, and the kept pairs keep their
    frequencies (the compressed attention indexes the model's cos/sin)."""
    model = tiny("llama-gqa-bias")
    spp.add_masks(model)
    geom = model_geometry(model)[0]
    assert (geom.num_heads, geom.num_kv_heads, geom.head_dim) == (4, 2, 16)
    names = geom.mask_names()
    sizes = {n: p.numel() for n, p in spp.mask_parameters(model)}
    assert sizes[names["qk"]] == 8 and sizes[names["v"]] == 16
    masks = {n: torch.ones(s) for n, s in sizes.items()}
    masks[names["qk"]][[1, 6]] = 0      # pairs 1 and 6: dims 1, 9, 6, 14 of each head
    spp.set_masks(model, masks)
    small = spp.compress(model)
    attn = small.model.layers[0].self_attn
    assert attn.q_proj.out_features == 4 * 12 and attn.k_proj.out_features == 2 * 12
    assert attn.rope_index.tolist() == [0, 2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 15]
    ids = torch.randint(3, VOCAB, (1, 24))
    check_exact(model, small, ids)


def test_edge_cases_no_query_keys_no_values_no_mlp():
    """A layer with no query-key pairs (uniform attention over the prefix), a layer with no value dims and no
    MLP neurons (constant bias outputs), and heads with values but no query-keys (granularity="head")."""
    for granularity in ("dim", "head"):
        model = tiny("llama-gqa-bias")
        spp.add_masks(model, granularity=granularity)
        masks = random_masks(model, seed=3, zero=0.2)
        g0, g1 = model_geometry(model)
        masks[g0.mask_names()["qk"]].zero_()
        masks[g1.mask_names()["v"]].zero_()
        masks[g1.mask_names()["mlp"]].zero_()
        if granularity == "head":
            masks[g0.mask_names()["qk"]][0] = 1.0      # one head keeps its query-keys, the others do not
        spp.set_masks(model, masks)
        small = spp.compress(model)
        w0, w1 = small.spp_widths
        assert w1.num_heads == 0 and w1.mlp_hidden == 0
        assert w0.num_qk_heads == (1 if granularity == "head" else 0)
        check_exact(model, small, torch.randint(3, VOCAB, (2, 16)))
        check_costs(model, small)


def test_head_granularity_drops_kv_heads_whose_query_heads_all_go():
    model = tiny("qwen2-gqa")
    spp.add_masks(model, granularity="head")
    masks = {n: torch.ones(p.shape) for n, p in spp.mask_parameters(model)}
    g0, g1 = model_geometry(model)
    masks[g0.mask_names()["v"]][torch.tensor([0, 1])] = 0     # both query heads of key/value head 0
    masks[g1.mask_names()["v"]][torch.tensor([1, 2])] = 0     # one query head of each group: uneven groups
    small = spp.compress(model, masks)
    a0, a1 = (layer.self_attn for layer in small.model.layers)
    assert (a0.num_heads, a0.num_kv_heads, a0.standard_groups) == (2, 1, True)
    assert (a1.num_heads, a1.num_kv_heads, a1.kv_map.tolist(), a1.standard_groups) == (2, 2, [0, 1], True)
    masks[g1.mask_names()["v"]] = torch.tensor([1.0, 0, 1, 1])   # groups of 1 and 2 query heads
    spp.set_masks(model, masks)
    small = spp.compress(model)
    a1 = small.model.layers[1].self_attn
    assert (a1.kv_map.tolist(), a1.standard_groups) == ([0, 1, 1], False)
    check_exact(model, small, torch.randint(3, VOCAB, (2, 16)))


@pytest.mark.parametrize("name", ["llama-gqa-bias", "opt"])
def test_save_load_safetensors_generate_and_hflm(tmp_path, name):
    model = tiny(name)
    spp.add_masks(model)
    small = spp.compress(model, random_masks(model, seed=5))
    spp.save_pruned(small, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded = spp.load_pruned(str(tmp_path))
    assert isinstance(loaded, transformers.PreTrainedModel)
    assert loaded.spp_widths == small.spp_widths
    ids = torch.randint(3, VOCAB, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, small(ids).logits)
    out = loaded.generate(ids[:1, :5], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 13)
    assert spp.create_model(str(tmp_path)).spp_widths == small.spp_widths   # a pruned directory by path
    hflm = pytest.importorskip("lm_eval.models.huggingface", reason="lm-evaluation-harness not installed (pip install lm-eval)")
    from lm_eval.api.instance import Instance
    lm = hflm.HFLM(pretrained=loaded, tokenizer=_tokenizer(), batch_size=1, max_length=64)
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=("the cat sat on the mat",), idx=0)
    (logprob,) = lm.loglikelihood_rolling([request])
    assert logprob < 0 and torch.isfinite(torch.tensor(logprob))


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = "the cat sat on mat a dog".split()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", pad_token="<pad>")


@pytest.mark.slow
@pytest.mark.parametrize("name, kv_heads", [("llama-gqa-bias", 2), ("qwen3-gqa", 2), ("gemma3-mqa", 1),
                                            ("phi3-partial", 2)])
def test_whole_heads_member_loads_with_plain_transformers(tmp_path, name, kv_heads):
    """Every layer keeping the same whole heads and MLP width: config.json is transformers' own, and
    AutoModelForCausalLM loads the directory in a process that cannot import spp."""
    model = tiny(name)
    spp.add_masks(model, granularity="head")
    masks = {n: torch.ones(p.shape) for n, p in spp.mask_parameters(model)}
    for g in model_geometry(model):
        masks[g.mask_names()["v"]][torch.tensor([0, 2])] = 0     # one query head per group
        masks[g.mask_names()["mlp"]][40:] = 0
    small = spp.compress(model, masks)
    spp.save_pruned(small, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (2, kv_heads, 40)
    assert config["spp"]["format"] == "spp-pruned"
    ids = torch.randint(3, VOCAB, (1, 12))
    with torch.no_grad():
        expected = small(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import sys
sys.modules["spp"] = None     # importing spp fails
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}).eval()
ids = torch.load({str(tmp_path / 'ids.pt')!r})
expected = torch.load({str(tmp_path / 'expected.pt')!r})
with torch.no_grad():
    diff = (m(ids).logits - expected).abs().max().item()
print("diff", diff)
assert diff < 1e-4
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert spp.load_pruned(str(tmp_path)).spp_widths == small.spp_widths   # spp still reads it


def test_uneven_member_has_spp_config_only(tmp_path):
    model = tiny("llama-mha")
    spp.add_masks(model)
    spp.save_pruned(spp.compress(model, random_masks(model, seed=2)), str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format"] == "spp-pruned" and config["family"] == "hf-llama" and len(config["layout"]) == 2


def test_local_hf_directory_through_create_model_and_load_checkpoint(tmp_path):
    model = tiny("llama-gqa-bias", seed=4)
    model.save_pretrained(str(tmp_path / "dense"))
    loaded = spp.create_model(str(tmp_path / "dense"))
    ids = torch.randint(3, VOCAB, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    other = tiny("llama-gqa-bias", seed=9)
    spp.add_masks(other)
    result = spp.load_checkpoint(other, str(tmp_path / "dense"))     # into a masked model
    assert not [k for k in result.missing_keys if k.endswith("_mask")]
    with torch.no_grad():
        assert torch.allclose(other(ids).logits, model(ids).logits, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="config.json"):
        spp.create_model(str(tmp_path))
    with pytest.raises(ValueError, match="shapes differ.*k_proj"):
        spp.load_checkpoint(tiny("llama-mha"), str(tmp_path / "dense"))     # 4 key/value heads, not 2
    with pytest.raises(ValueError, match="holds only .* another model"):
        spp.load_checkpoint(tiny("opt"), str(tmp_path / "dense"))


def test_the_registry_says_which_family_and_auto_class_load_a_directory(monkeypatch):
    """A Hugging Face directory's config model_type picks the family (and so the Auto class that loads it) from
    the registry; a registered family takes over its classes and model types."""
    from spp import models
    assert models.family_for_model_type("llama").auto_class == "AutoModelForCausalLM"
    assert models.family_for_model_type("clip_vision_model").auto_class == "AutoModel"
    assert models.family_for_model_type("qwen3").name == "hf-qwen3"
    assert models.family_for_model_type("gpt2") is None and models.family_for_model_type(None) is None
    assert models.family_of(tiny("llama-mha")).inputs == "text"
    monkeypatch.setattr(models, "_REGISTRY", list(models._REGISTRY))   # registrations end with the test

    class Mine(type(models.family_named("hf-llama"))):
        name, description = "mine", "my Llama"
        classes = ("transformers.models.llama.modeling_llama.LlamaForCausalLM",)
        model_types, auto_class = ("mine",), "AutoModel"

    mine = Mine()
    models.register(mine)
    assert models.family_for_model_type("mine") is mine and models.family_of(tiny("llama-mha")) is mine
    assert "mine: my Llama" in models.supported()
    with pytest.raises(ValueError, match="needs .classes"):
        models.register(models.ModelFamily())


def test_unsupported_models_say_why():
    with pytest.raises(UnsupportedModel, match=r"Qwen3ForCausalLM \(hf-qwen3\): granularity='dim'.*q_norm.*"
                                               r"use granularity='head' \(spp search: model.granularity=head\)"):
        spp.add_masks(tiny("qwen3-gqa"))
    with pytest.raises(UnsupportedModel, match=r"Gemma2ForCausalLM: Gemma 1 and 2 soft-cap .*Gemma3ForCausalLM"):
        spp.add_masks(transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, intermediate_size=32)))
    with pytest.raises(UnsupportedModel, match=r"PhiForCausalLM: Phi-1 and Phi-2 .*Phi3ForCausalLM, family hf-phi3"):
        spp.add_masks(transformers.PhiForCausalLM(transformers.PhiConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)))
    with pytest.raises(UnsupportedModel, match="hf-llama.*hf-opt|Supported"):
        spp.add_masks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    model = tiny("llama-mha")
    spp.add_masks(model)
    small = spp.compress(model, random_masks(model, seed=0))
    with pytest.raises(UnsupportedModel, match="already compressed"):
        spp.add_masks(small)


def _search_is_exact(model, ids, selections=({"keep": 0.7}, {"keep": 0.4})):
    """A library search on the masked ``model`` (its granularity): the member of each selection, with both value
    readings, compresses to a model that computes what the masked model computes (check_exact: logits and greedy
    generation) with the parameters the member's summary states."""
    spp.set_masks(model, {n: torch.ones_like(p) for n, p in spp.mask_parameters(model)})
    batches = [(x, x) for x in torch.randint(3, VOCAB, (4, 8, 24))]
    nu = spp.calibrate_nu(model, batches[:2], spp.next_token_loss, batches=2, per="pair")
    optimizer = lbi_steps(model, spp.search_optimizer(model, nu, per="pair", rho=0.2, lam=0.05), batches, 30,
                          spp.next_token_loss)
    family = spp.WeightFamily(model, spp.SolutionPath.from_optimizer(optimizer, model), input_size=(24,))
    for selection in selections:
        for values in ("binary", "path"):
            member = family.select(**selection, values=values)
            small = spp.compress(model, member.masks)
            assert spp.count_params(small) == member.summary.params_after
            spp.set_masks(model, member.masks)
            check_exact(model, small, ids)
    return family


def test_qwen3_whole_heads_searched_and_exact_with_sliding_window_layers():
    """Qwen3 (q/k norms over each head, GQA, a sliding-window layer beside a full one): masks at 1 change nothing,
    the query-key mask scales a head's normed query (so it is not a no-op under the norm), a library search at
    head granularity gives members that compress exactly, mask values that are not 1 included."""
    torch.manual_seed(0)
    config = _config("qwen3", head_dim=16, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    model = transformers.Qwen3ForCausalLM(config).eval()
    model.generation_config.eos_token_id = None   # check_exact compares 32 generated tokens, not a stop at EOS
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [None, 8]
    ids = torch.randint(3, VOCAB, (2, 20))
    with torch.no_grad():
        dense = model(ids).logits
    spp.add_masks(model, "head")
    names = [n for n, _ in spp.mask_parameters(model)]
    assert names[0] == "model.layers.0.self_attn.q_norm.qk_mask"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)
    spp.set_masks(model, {names[0]: torch.tensor([1.0, 2.0, 1.0, 1.0])})   # a head's logits doubled: not a no-op
    with torch.no_grad():
        assert (model(ids).logits - dense).abs().max() > 1e-3
    _search_is_exact(model, ids)


def test_gemma3_whole_heads_exact_a_dropped_attention_and_a_search():
    """Gemma 3 (q/k norms applied to (batch, heads, tokens, dim), one key/value head, query_pre_attn_scalar 24
    with head_dim 16, a sliding-window layer with its own RoPE base before a global one, GeGLU, norms before and
    after each block, the embedding scaled by √hidden): masks at 1 change nothing, a query-key mask entry scales
    its head's logits, a member whose first layer keeps no query head drops that attention exactly (logits and
    greedy generation with the KV cache), and a library search gives exact members."""
    model = tiny("gemma3-mqa")
    model.generation_config.eos_token_id = None
    layers = model.model.layers
    assert [a.self_attn.sliding_window for a in layers] == [8, None] and layers[0].self_attn.scaling == 24 ** -0.5
    assert model.config.rope_parameters["sliding_attention"]["rope_theta"] != \
        model.config.rope_parameters["full_attention"]["rope_theta"]
    ids = torch.randint(3, VOCAB, (2, 20))
    with torch.no_grad():
        dense = model(ids).logits
    spp.add_masks(model, "head")
    names = [n for n, _ in spp.mask_parameters(model)]
    assert names[:2] == ["model.layers.0.self_attn.q_norm.qk_mask", "model.layers.0.self_attn.o_proj.v_mask"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)
    spp.set_masks(model, {names[0]: torch.tensor([1.0, 2.0, 1.0, 1.0])})
    with torch.no_grad():
        assert (model(ids).logits - dense).abs().max() > 1e-3
    masks = random_masks(model, seed=4)
    masks[names[1]] = torch.zeros(4)                       # layer 0: every query head gone
    small = spp.compress(model, masks)
    assert small.spp_widths[0].num_heads == 0 and small.spp_widths[1].num_heads > 0
    assert type(small.model.layers[1].self_attn).__name__ == "PrunedDecoderAttention"
    assert small.model.layers[1].self_attn.scaling == 24 ** -0.5
    spp.set_masks(model, masks)
    check_exact(model, small, ids)
    check_costs(model, small)
    _search_is_exact(model, ids)


def test_phi3_fused_projections_and_partial_rotary_embeddings():
    """Phi-3 / Phi-4 (one qkv_proj, one gate_up_proj; 8 of a head's 16 dims rotate): the query-key mask holds 4
    rotary pairs and then 8 plain dims, each pair costing twice a plain dim; the mask scales only the query part
    of qkv_proj; a compressed member keeps both projections fused under Phi-3's names, rotates only its kept
    pairs, and computes what the masked model computes for members of a search by parameters (global and per pair
    type, where a query-key entry's cost is its own) and by mask elements."""
    model = tiny("phi3-partial")
    ids = torch.randint(3, VOCAB, (2, 20))
    with torch.no_grad():
        dense = model(ids).logits
    spp.add_masks(model, "dim")
    geom = model_geometry(model)[0]
    assert (geom.rot, geom.mask_size("qk", "dim"), geom.qk_at) == (8, 12, "qkv_proj")
    assert geom.qk_entry_of_dim().tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    costs = geom.unit_costs("params", "dim")["qk"]
    assert costs.tolist() == [costs[-1] * 2] * 4 + [costs[-1]] * 8 and costs[-1] == (4 + 2) * 64   # 4 q, 2 k rows
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)
    name = geom.mask_names()["qk"]
    spp.set_masks(model, {name: torch.cat([torch.zeros(2), torch.ones(8), torch.zeros(2)])})
    small = spp.compress(model)
    attn = small.model.layers[0].self_attn
    assert small.spp_widths[0].qk_dim == 2 * 2 + 6 and small.spp_widths[0].qk_rot_dim == 4
    assert attn.rope_index.tolist() == [2, 3, 6, 7]       # the kept pairs' entries of the cos / sin tables
    assert attn.qkv_proj.out_features == 4 * 10 + 2 * 10 + 2 * 16 and not hasattr(attn, "q_proj")
    assert small.model.layers[0].mlp.gate_up_proj.out_features == 2 * 96
    check_exact(model, small, ids)
    check_costs(model, small)
    family = _search_is_exact(model, ids, ({"keep": 0.6}, {"keep": 0.5, "scope": "pair"},
                                           {"keep": 0.5, "by": "elements"}))
    member = family.select(keep=0.5, scope="pair")
    kept = sum(float((m != 0).sum()) for n, m in member.masks.items() if n.endswith("qk_mask"))
    assert 0 < kept < 2 * 12



    model = tiny("opt")
    ids = torch.randint(3, VOCAB, (1, 10))
    with torch.no_grad():
        before = model(ids).logits
    spp.add_masks(model)
    spp.set_masks(model, random_masks(model, seed=1))
    spp.remove_masks(model)
    assert not spp.is_masked(model)
    assert not [n for n, _ in model.named_parameters() if n.endswith("_mask")]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def _checkpointing(model):
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing


def test_search_through_the_library_api():
    """calibrate_nu, search_optimizer, SolutionPath and WeightFamily unchanged on a tiny Llama with the
    next-token loss: frozen weights, members at three budgets by params and by FLOPs, each exact."""
    model = tiny("llama-gqa-bias")
    spp.add_masks(model)
    torch.manual_seed(0)
    batches = [(ids, ids) for ids in torch.randint(3, VOCAB, (6, 8, 32))]
    nu = spp.calibrate_nu(model, batches[:2], spp.next_token_loss, batches=2)
    optimizer = spp.search_optimizer(model, nu, rho=0.2, lam=0.05)
    _checkpointing(model)    # activation checkpointing: transformers' own switch works with frozen weights
    lbi_steps(model, optimizer, batches, 40, spp.next_token_loss)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith("_mask"))
    assert sum(spp.support_sizes(optimizer, model).values()) > 0
    family = spp.WeightFamily(model, spp.SolutionPath.from_optimizer(optimizer, model), input_size=(32,))
    sizes = []
    for by in ("params", "flops"):
        for keep in (0.8, 0.5, 0.3):
            member = family.select(keep=keep, by=by)
            assert abs(member.summary.kept - keep) < 0.05
            small = spp.compress(model, member.masks)
            assert spp.count_params(small) == member.summary.params_after
            if by == "flops":
                assert abs(spp.count_flops(small, (32,)) - member.summary.flops_after) <= 0.02 * member.summary.flops_after
            spp.set_masks(model, member.masks)
            with torch.no_grad():
                assert (model(batches[0][0]).logits - small(batches[0][0]).logits).abs().max() < 1e-4
            sizes.append(member.summary.params_after)
    assert sizes[0] > sizes[1] > sizes[2]


def test_activation_checkpointing_gives_the_same_mask_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny("mistral-gqa")
        spp.add_masks(model)
        if checkpointing:
            _checkpointing(model)
        model.train()
        ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
        spp.next_token_loss(model(ids), ids).backward()
        grads.append(torch.cat([p.grad.flatten() for _, p in spp.mask_parameters(model)]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_search_step_under_bf16_autocast():
    """A search step with bf16 autocast (CPU supports it; spp search's amp=bf16): float32 masks, finite mask
    gradients close to the float32 ones, and the LBI moves them."""
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for autocast in (False, True):
        model = tiny("llama-gqa-bias")
        spp.add_masks(model)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = spp.next_token_loss(model(ids), ids)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for _, p in spp.mask_parameters(model)]))
        assert all(p.dtype == torch.float32 for _, p in spp.mask_parameters(model))
    assert torch.isfinite(grads[1]).all()
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.95


def test_compress_copies_no_projection(monkeypatch):
    """compress copies the model outside its prunable projections, and of those only the kept slices."""
    model = tiny("llama-gqa-bias")
    spp.add_masks(model)
    copied = []
    original = torch.nn.Parameter.__deepcopy__

    def counting(self, memo):
        copied.append(self.numel())
        return original(self, memo)

    monkeypatch.setattr(torch.nn.Parameter, "__deepcopy__", counting)
    spp.compress(model, random_masks(model, seed=0))
    projections = sum(p.numel() for layer in model.model.layers for m in (layer.self_attn, layer.mlp)
                      for n, p in m.named_parameters())
    outside = spp.count_params(model) - projections + sum(p.numel() for _, p in spp.mask_parameters(model))
    assert sum(copied) <= outside


def test_bf16_member_saves_and_loads_in_bf16(tmp_path):
    """A bf16 model (as from_pretrained(dtype=torch.bfloat16) makes it) compresses, saves and loads in bf16,
    never materialised in float32, and computes what it computed before saving."""
    kind, overrides = MODELS["llama-gqa-bias"]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(_config(kind, **overrides), dtype=torch.bfloat16).eval()
    spp.add_masks(model)
    assert all(p.dtype == torch.float32 for _, p in spp.mask_parameters(model))   # masks stay float32
    small = spp.compress(model, random_masks(model, seed=7))
    spp.save_pruned(small, str(tmp_path))
    loaded = spp.load_pruned(str(tmp_path))
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ids = torch.randint(3, VOCAB, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, small(ids).logits)


def test_loops_run_next_token_task():
    """The search's loop and the evaluation take a task: with NextToken, a masked Llama trains its masks with
    the LBI on token batches, and evaluate reports token-level loss and perplexity = exp(loss)."""
    import math

    from spp.engine import evaluate, train_one_epoch
    from spp.runtime import Runtime
    from spp.tasks import NextToken

    model = tiny("qwen2-gqa")
    spp.add_masks(model)
    runtime = Runtime(device=torch.device("cpu"), amp_dtype=None)
    text = torch.randint(3, VOCAB, (24, 16), generator=torch.Generator().manual_seed(0))
    loader = [text[i:i + 8] for i in range(0, 24, 8)]
    task = NextToken()
    before = evaluate(model, loader, runtime, task=task)
    with torch.no_grad():
        manual = sum(spp.next_token_loss(model(ids), ids).item() for ids in loader) / len(loader)
    assert before["tokens"] == 24 * 15 and abs(before["loss"] - manual) < 1e-5
    assert abs(before["perplexity"] - math.exp(before["loss"])) < 1e-6 * before["perplexity"]
    optimizer = spp.search_optimizer(model, 1000.0, rho=0.3, lam=0.0)
    stats = train_one_epoch(model, lambda inputs, outputs, targets: task.loss(outputs, targets), loader * 4, optimizer,
                            runtime, step=0, task=task)
    assert stats["steps"] == 12 and stats["step"] == 12
    assert sum(spp.support_sizes(optimizer, model).values()) > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith("_mask"))


@pytest.mark.parametrize("name,granularity", [("llama-gqa-bias", "dim"), ("llama-gqa-bias", "head"), ("opt", "dim")])
def test_magnitude_scores_follow_the_mask_layout(name, granularity):
    """spp.criteria.magnitude_scores on an LLM: one score per mask entry, and the entry whose weights are zeroed
    scores lowest (a rotary pair is dims j and j + d/2 of every query and key/value head)."""
    from spp.criteria import magnitude_scores

    model = tiny(name)
    spp.add_masks(model, granularity=granularity)
    geom = model_geometry(model)[0]
    attn = model.get_submodule(geom.name).self_attn
    d = geom.head_dim
    with torch.no_grad():
        if granularity == "head":
            attn.q_proj.weight.view(geom.num_heads, d, -1)[2] = 0     # query head 2
        else:
            dims = [3, 3 + d // 2] if geom.rotary else [3]            # pair 3 (OPT: dim 3)
            attn.q_proj.weight.view(geom.num_heads, d, -1)[:, dims] = 0
            attn.k_proj.weight.view(geom.num_kv_heads, d, -1)[:, dims] = 0
        model.get_submodule(geom.name + "." + geom.mlp_out).weight[:, 5] = 0
    scores = magnitude_scores(model)
    sizes = {n: p.shape for n, p in spp.mask_parameters(model)}
    assert {n: s.shape for n, s in scores.items()} == sizes
    names = geom.mask_names()
    assert int(scores[names["qk"]].argmin()) == (2 if granularity == "head" else 3)
    assert scores[names["mlp"]][5] < scores[names["mlp"]].median()


def test_masks_at_one_is_the_dense_model_without_a_copy():
    """search.distill's teacher: the masked model run with every mask at 1 gives the dense logits, without
    gradients, and leaves the masks and the train/eval mode as they were."""
    from spp.masks import MasksAtOne

    model = tiny("llama-gqa-bias")
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        dense = model(ids).logits
    spp.add_masks(model)
    masks = random_masks(model, seed=4)
    spp.set_masks(model, masks)
    model.train()
    out = MasksAtOne(model)(ids).logits
    assert torch.equal(out, dense) and not out.requires_grad
    assert model.training
    assert all(torch.equal(p, masks[n]) for n, p in spp.mask_parameters(model))


@pytest.mark.slow
def test_fsdp2_sharded_search_gives_the_unsharded_path(tmp_path):
    """The LBI and the solution path on masks that FSDP2 shards (2 CPU processes over gloo): the same entry
    steps and Γ as one unsharded process given the same batches."""
    import subprocess
    import sys

    worker = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sharded, alone = str(tmp_path / "sharded"), str(tmp_path / "alone")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                             worker, sharded], capture_output=True, text=True, env=env, timeout=300)
    if result.returncode and "fully_shard" in result.stderr and "gloo" in result.stderr:
        pytest.skip(f"this torch has no FSDP2 over gloo on CPU: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run([sys.executable, worker, alone], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = spp.SolutionPath.load(sharded), spp.SolutionPath.load(alone)
    assert a.entries.keys() == b.entries.keys() and a.steps == b.steps == 12
    entered = 0
    for name in a.entries:
        assert torch.equal(a.entries[name]["entry_step"], b.entries[name]["entry_step"]), name
        assert torch.equal(a.entries[name]["gamma"] != 0, b.entries[name]["gamma"] != 0), name
        torch.testing.assert_close(a.entries[name]["z"], b.entries[name]["z"], rtol=1e-4, atol=1e-5)
        entered += int(torch.isfinite(a.entries[name]["entry_step"]).sum())
    assert 0 < entered < sum(e["entry_step"].numel() for e in a.entries.values())   # a path, not all or nothing


def test_unequal_widths_reach_sdpa_padded_to_one_and_compute_the_same(monkeypatch):
    """A layer with fewer query-key than value dims gives SDPA equal widths on a CPU prompt (its fused kernel, not the
    math fallback that writes out the T x T logits), with the same logits as unpadded; one decoded token is not
    padded (the cache is not copied), and FLOP counting sees the true widths."""
    model = spp.add_masks(tiny("llama-gqa-bias"), "dim")
    masks = {n: torch.ones_like(p) for n, p in spp.mask_parameters(model)}
    masks["model.layers.0.self_attn.q_proj.qk_mask"][2:] = 0       # 2 rotary pairs: qk_dim 4, v_dim 16
    small = spp.compress(model, masks)
    widths = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        widths.append((q.shape[-2], q.shape[-1], k.shape[-1], v.shape[-1]))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        padded = small(ids).logits
        assert widths[0] == (12, 16, 16, 16)
        with spp.nominal_attention():
            widths.clear()
            plain = small(ids).logits
        assert widths[0] == (12, 4, 4, 16)
        torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-5)
        widths.clear()
        small.generate(ids[:1, :4], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert widths[0] == (4, 16, 16, 16)                             # the prompt: padded
    assert any(w[1:] == (4, 4, 16) for w in widths[2:])            # the decoded token: not


def test_meta_skeletons_read_no_weights_and_match_the_loaded_models(tmp_path):
    """model.fsdp's other ranks: create_model / load_pruned with meta=True build the same architecture, dtype
    (the checkpoint's, for dtype auto), tied weights and key/value layout on the meta device, without the
    weight file."""
    kind, overrides = MODELS["llama-gqa-bias"]
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM._from_config(_config(kind, tie_word_embeddings=True, **overrides),
                                                        dtype=torch.bfloat16)
    dense.save_pretrained(str(tmp_path / "dense"))
    spp.add_masks(dense)
    small = spp.compress(dense, random_masks(dense, seed=3))
    spp.save_pruned(small, str(tmp_path / "pruned"))
    for directory, loaded in ((tmp_path / "dense", spp.create_model(str(tmp_path / "dense"))),
                              (tmp_path / "pruned", spp.load_pruned(str(tmp_path / "pruned")))):
        for f in os.listdir(directory):
            if f.endswith(".safetensors"):
                os.rename(directory / f, directory / (f + ".moved"))   # a meta build must not need it
        skeleton = spp.create_model(str(directory), meta=True)
        real = dict(loaded.named_parameters())
        assert {n: (p.shape, p.dtype) for n, p in skeleton.named_parameters()} == \
               {n: (p.shape, p.dtype) for n, p in real.items()}
        assert all(p.is_meta for p in skeleton.parameters())
        assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
        layers = [(a.self_attn, b.self_attn) for a, b in zip(skeleton.model.layers, loaded.model.layers)]
        assert all(getattr(a, "standard_groups", None) == getattr(b, "standard_groups", None) for a, b in layers)
    assert {p.dtype for p in skeleton.parameters()} == {torch.bfloat16}


def test_merged_lora_state_equals_peft_merge():
    """retrain.merged_lora (on a state dict, as gathered from a sharded model) gives peft's merge_and_unload."""
    peft = pytest.importorskip("peft", reason="LoRA needs peft")
    from spp.commands.retrain import merged_lora

    model = tiny("llama-gqa-bias", seed=5)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_()   # peft starts B at zero: no delta to merge
    merged = merged_lora(wrapped, wrapped.state_dict())
    reference = wrapped.merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(merged[k], reference[k], rtol=1e-5, atol=1e-5)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           tiny("llama-gqa-bias", seed=5).state_dict()["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_unequal_groups_decode_exactly(attn):
    """A member whose query heads share their key/value heads unequally (3 over 2) decodes with its query
    heads padded into equal groups, reading the cache as it is: the masked model's tokens and scores. The
    group size of a decoded token reaches the attention function for that call only: the module stays as built."""
    model = tiny("llama-gqa-bias")
    spp.add_masks(model, granularity="head")
    spp.set_masks(model, random_masks(model, seed=1))
    small = spp.compress(model)
    attention = small.model.layers[0].self_attn
    assert not attention.standard_groups and (attention.num_heads, attention.num_kv_heads) == (3, 2)
    assert attention.group_max == 2 and attention.slots.tolist() == [0, 2, 3]
    for m in (model, small):
        m.config._attn_implementation = attn
    seen = []
    hook = attention.register_forward_hook(lambda module, args, out: seen.append(module.num_key_value_groups))
    check_exact(model, small, torch.randint(3, VOCAB, (2, 20)))
    hook.remove()
    assert len(seen) > 2 and set(seen) == {1}   # prompt and decoded tokens alike


@pytest.mark.parametrize("name", ["llama-gqa-bias", "opt"])
def test_every_parameter_of_a_member_gets_a_gradient(name):
    """A member that lost every query-key dim of one layer and every value dim of another keeps its empty
    projections in the graph, so DDP (which expects a gradient for every parameter) can finetune it."""
    from spp.structure import mask_names
    model = tiny(name)
    spp.add_masks(model)
    masks = random_masks(model, seed=2, zero=0.2)
    first, second = (mask_names(g) for g in model_geometry(model))
    masks[first["qk"]] = torch.zeros_like(masks[first["qk"]])
    masks[second["v"]] = torch.zeros_like(masks[second["v"]])
    spp.set_masks(model, masks)
    small = spp.compress(model)
    layers = small.model.decoder.layers if name == "opt" else small.model.layers
    assert layers[0].self_attn.qk_dim == 0 and layers[1].self_attn.num_heads == 0
    ids = torch.randint(3, VOCAB, (2, 12))
    small.train()
    small(ids).logits.float().pow(2).mean().backward()
    assert [n for n, p in small.named_parameters() if p.grad is None] == []
    with torch.no_grad():
        model.eval(), small.eval()
        torch.testing.assert_close(small(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
