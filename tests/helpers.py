"""Helpers the tests share (imported by name, not through conftest)."""
import json
import os
import signal
import subprocess
import time

import numpy as np
import torch

import spp

TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps"
_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _rotary_layout(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert script stores q and k rows interleaved per rotary pair; transformers undoes it."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def bpe_tokenizer(text: str = TEXT):
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([text] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


def write_gguf(path: str, model, tokenizer, architecture: str = "llama") -> str:
    """``model`` (a Llama) and ``tokenizer`` as a float32 GGUF file, laid out as llama.cpp's converter writes it."""
    import gguf

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




def tiny_gguf_llama(path: str, text: str = TEXT):
    """A tiny random Llama (2 layers, width 64, 4 query heads over 2 key/value heads, tied embeddings) and a
    byte-level BPE tokenizer trained on ``text``, written to ``path`` as a GGUF file: ``(model, tokenizer)``."""
    import transformers

    tokenizer = bpe_tokenizer(text)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    write_gguf(path, model, tokenizer)
    return model, tokenizer


# ------------------------------------------------------------------------------------------------
# Tiny random Hugging Face decoders and CLIP models (no download)
# ------------------------------------------------------------------------------------------------
VOCAB = 101


def decoder_config(kind: str, **overrides):
    """A tiny random decoder config: 2 layers, width 64, 4 heads (2 key/value heads), a 101-token vocabulary."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=96, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "opt":
        return transformers.OPTConfig(**{**common, "ffn_dim": 96, "word_embed_proj_dim": 64, **overrides})
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "gemma3": transformers.Gemma3TextConfig, "phi3": transformers.Phi3Config}[kind]
    return cls(**{**common, "intermediate_size": 96, "num_key_value_heads": 2, **overrides})


DECODERS = {   # name: (config kind, overrides)
    "llama-mha": ("llama", dict(num_key_value_heads=4)),
    "llama-gqa-bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "mistral-gqa": ("mistral", dict(sliding_window=64)),
    "qwen2-gqa": ("qwen2", {}),
    "qwen3-gqa": ("qwen3", dict(head_dim=16)),   # Qwen3Config's own default head_dim is 128
    # Gemma 3's shape in small: one key/value head, a softmax scale that is not head_dim's, a sliding-window layer
    # (its own RoPE base) before a global one
    "gemma3-mqa": ("gemma3", dict(head_dim=16, num_key_value_heads=1, query_pre_attn_scalar=24, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"])),
    # Phi-3 / Phi-4: fused qkv_proj and gate_up_proj; Phi-4-mini's partial RoPE in small: 8 of a head's 16 dims rotate
    "phi3-partial": ("phi3", dict(partial_rotary_factor=0.5)),
    "opt": ("opt", {}),
    "opt-nobias": ("opt", dict(enable_bias=False)),
}


def tiny_decoder(name: str, seed: int = 0):
    """A tiny random Hugging Face decoder of :data:`DECODERS` (2 layers, width 64, 4 heads)."""
    import transformers

    kind, overrides = DECODERS[name]
    torch.manual_seed(seed)
    config = decoder_config(kind, **overrides)
    cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
           "gemma3": transformers.Gemma3ForCausalLM, "phi3": transformers.Phi3ForCausalLM,
           "opt": transformers.OPTForCausalLM}[kind]
    return cls(config).eval()


def lbi_steps(model, optimizer, batches, steps: int, loss_fn):
    """``steps`` optimizer steps of ``loss_fn(model(x), y)`` over ``batches`` of ``(x, y)`` (cycled), in train mode;
    the model is left in eval mode. Returns the optimizer."""
    model.train()
    for step in range(steps):
        x, y = batches[step % len(batches)]
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return optimizer


def random_masks(model, seed: int, zero: float = 0.35):
    """Masks with a share of zeros and other entries away from 1 (so folding the values is tested too)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in spp.mask_parameters(model):
        r = torch.rand(p.shape, generator=g)
        out[name] = torch.where(r < zero, torch.zeros_like(r), 0.5 + r)
    return out


CLIP_VOCAB = 64
CLIP_TEXT = dict(vocab_size=CLIP_VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8)


def tiny_clip(kind: str = "both", seed: int = 0, attn: str = "sdpa"):
    """A tiny random CLIP (``both`` towers, or the ``vision`` / ``text`` one): 2 layers per tower, width 32
    (vision) and 48 (text), 4 heads, 32x32 images in 8x8 patches, captions of up to 16 tokens."""
    import transformers

    torch.manual_seed(seed)
    if kind == "vision":
        config = transformers.CLIPVisionConfig(**CLIP_VISION, projection_dim=24)
        model = transformers.CLIPVisionModelWithProjection(config)
    elif kind == "text":
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_TEXT))
    else:
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION,
                                                               projection_dim=24))
    model.set_attn_implementation(attn)
    return model.eval()


def clip_inputs(kind: str = "both", batch: int = 3, seed: int = 0):
    """Images and captions of different lengths (padding masked), each ending in the eos token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, CLIP_VOCAB, (batch, 12), generator=g)
    mask = torch.ones_like(ids)
    for i, length in enumerate([12, 7, 9, 5][:batch]):
        ids[i, length - 1], ids[i, length:], mask[i, length:] = 2, 0, 0
    x = {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask}
    keep = {"both": x.keys(), "vision": ["pixel_values"], "text": ["input_ids", "attention_mask"]}[kind]
    return {k: x[k] for k in keep}


# ------------------------------------------------------------------------------------------------
# timm models, Fashion-MNIST files, costs, killing a run part-way
# ------------------------------------------------------------------------------------------------
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)


def tiny_vit(name="vit_tiny_patch16_224", seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = {**TINY, **overrides}
    model = spp.create_model(name, **kwargs)
    # timm initialises some tensors to zero (biases, tokens); randomise everything so a
    # slicing error cannot hide behind a zero.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def random_pair_masks(model, granularity, keep=0.6, seed=0, binary=True):
    """Random masks for a ViT or Swin (a share ``keep`` of each mask's elements kept; ``binary=False``: scaled)."""
    from spp.models import model_geometry
    from spp.structure import mask_names
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for geom in model_geometry(model):
        n_attn = geom.mask_shape(granularity)
        for pair, name in mask_names(geom).items():
            size = geom.mlp_hidden if pair == "mlp" else n_attn
            m = (torch.rand(size, generator=g) < keep).float()
            if not binary:
                m = m * torch.rand(size, generator=g) * 2
            masks[name] = m
    return masks


SWIN = dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10)


def tiny_swin(seed=0, **overrides):
    """Two stages (patch merging between), window 4, shifted windows in every second block."""
    torch.manual_seed(seed)
    model = spp.create_model("swin_tiny_patch4_window7_224", **{**SWIN, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def write_idx(path, tensor):
    """A gzipped IDX file, the format Fashion-MNIST ships in."""
    import gzip
    header = bytes([0, 0, 8, tensor.dim()]) + b"".join(int(s).to_bytes(4, "big") for s in tensor.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + tensor.numpy().tobytes())


def fake_fashion_mnist(root, train=1000):
    """spp's synthetic images (class patterns plus noise) in Fashion-MNIST's files (28x28, 10 classes; the test
    split a quarter of ``train``), so no test needs the Debian package."""
    from spp.config import DataConfig
    from spp.data import _synthetic

    cfg = DataConfig(dataset="synthetic", img_size=28, in_chans=1, num_classes=10, synthetic_size=train)
    for split, name in (("train", "train"), ("test", "t10k")):
        data = _synthetic(cfg, split, seed=0)
        write_idx(os.path.join(root, f"{name}-images-idx3-ubyte.gz"), data.images[:, 0])
        write_idx(os.path.join(root, f"{name}-labels-idx1-ubyte.gz"), data.labels.to(torch.uint8))


def check_costs(masked, small):
    """A compressed model's parameters equal its geometry's closed form; FLOPs within 2% of torch.utils.flop_counter."""
    from spp.models import model_geometry
    geoms = model_geometry(masked)
    dense_params, dense_flops = spp.count_params(masked), spp.count_flops(masked)
    params = dense_params + sum(g.params(w) - g.params(g.full) for g, w in zip(geoms, small.spp_widths))
    flops = dense_flops + sum(g.flops(w) - g.flops(g.full) for g, w in zip(geoms, small.spp_widths))
    assert spp.count_params(small) == params
    assert abs(spp.count_flops(small) - flops) <= 0.02 * flops



def _descendants(pid: int) -> list:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own: killing the
    launcher's process group leaves them running)."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_after_checkpoint(cmd, checkpoint, total, env=None):
    """Start ``cmd``, SIGKILL it and every process it started once ``checkpoint`` exists; return the step the
    checkpoint holds (asserted part-way: a run that finished first would make a resume test vacuous)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.isfile(checkpoint) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    killed_at = torch.load(checkpoint, weights_only=True)["step"]
    assert 0 < killed_at < total, "the run must be killed part-way for this test to mean anything"
    return killed_at
