import json
import os
import subprocess
import sys

import pytest
import torch

import spp

from helpers import TINY, random_pair_masks, tiny_vit

VARIANTS = {
    "cls": dict(name="vit_tiny_patch16_224"),
    "no_cls": dict(name="vit_tiny_patch16_224", class_token=False, global_pool="avg"),
    "distilled": dict(name="deit_tiny_distilled_patch16_224"),
}


def _x(n=3, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _out(model, x):
    with torch.no_grad():
        y = model(x)
    return torch.cat(y, -1) if isinstance(y, tuple) else y


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("granularity", ["dim", "head"])
def test_masks_at_one_leave_output_unchanged(variant, granularity):
    model = tiny_vit(**VARIANTS[variant])
    x = _x()
    before = _out(model, x)
    spp.add_masks(model, granularity)
    torch.testing.assert_close(_out(model, x), before, atol=1e-6, rtol=0)
    shapes = {n: p.shape[0] for n, p in spp.mask_parameters(model)}
    assert shapes["blocks.0.attn.qk_mask"] == (16 if granularity == "dim" else 4)
    assert shapes["blocks.1.mlp.mask"] == 256
    pairs = spp.mask_pairs(model)
    assert list(pairs) == list(shapes)  # the same names, in mask_parameters' order
    assert pairs["blocks.0.attn.qk_mask"] == ("qk", 0) and pairs["blocks.1.mlp.mask"] == ("mlp", 1)


def test_add_masks_freezes_weights_and_only_masks_get_gradients(vit):
    spp.add_masks(vit)
    _out_grad = vit(_x()).sum()
    _out_grad.backward()
    masks = {id(p) for _, p in spp.mask_parameters(vit)}
    for name, p in vit.named_parameters():
        if id(p) in masks:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_masked_attention_uses_sdpa(vit, monkeypatch):
    spp.add_masks(vit)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    vit(_x())
    assert len(calls) == 2


def test_unsupported_model_names_supported_families():
    import timm
    with pytest.raises(TypeError, match="VisionTransformer"):
        spp.add_masks(timm.create_model("resnet18", num_classes=2))
    with pytest.raises(TypeError, match="qk_norm"):
        spp.add_masks(tiny_vit(qk_norm=True))
    with pytest.raises(ValueError, match="granularity"):
        spp.add_masks(tiny_vit(), granularity="row")


def test_remove_masks_restores_timm_modules(vit):
    x = _x()
    before = _out(vit, x)
    spp.add_masks(vit)
    spp.remove_masks(vit)
    assert not spp.masks.is_masked(vit)
    torch.testing.assert_close(_out(vit, x), before)


def test_remove_masks_keeps_a_users_subclass(vit):
    """A model whose blocks use a subclass of timm's Attention / Mlp gets its own classes back."""
    from timm.layers import Mlp
    from timm.layers.attention import Attention

    class MyAttention(Attention):
        pass

    class MyMlp(Mlp):
        pass

    for block in vit.blocks:
        block.attn.__class__, block.mlp.__class__ = MyAttention, MyMlp
    x = _x()
    before = _out(vit, x)
    spp.add_masks(vit)
    assert isinstance(vit.blocks[0].attn, MyAttention)
    torch.testing.assert_close(_out(vit, x), before)
    spp.remove_masks(vit)
    assert type(vit.blocks[0].attn) is MyAttention and type(vit.blocks[1].mlp) is MyMlp
    assert not [n for n, _ in vit.named_parameters() if "mask" in n]


@pytest.mark.parametrize("how", ["timm.create_model", "class", "swin"])
def test_save_pruned_without_spp_create_model(tmp_path, how):
    """A ViT or Swin built by timm.create_model or by its class saves and loads: its constructor arguments are
    read off the model and checked by rebuilding it."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    from helpers import SWIN

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    if how == "swin":
        model = timm.create_model("swin_tiny_patch4_window7_224", **SWIN)
    else:
        model = timm.create_model("vit_tiny_patch16_224", **args) if how != "class" else VisionTransformer(**args)
    assert not hasattr(model, "spp_base")
    masks = random_pair_masks(model, "dim", seed=3)
    pruned = spp.compress(model.eval(), masks)
    spp.save_pruned(pruned, str(tmp_path))
    loaded = spp.load_pruned(str(tmp_path)).eval()
    x = _x()
    torch.testing.assert_close(_out(loaded, x), _out(pruned, x), rtol=0, atol=0)
    if how == "swin":   # the stochastic depth it was built with (timm's default for Swin: 0.1), for finetuning
        assert loaded.spp_base["kwargs"]["drop_path_rate"] == pytest.approx(0.1)


@pytest.mark.slow
def test_import_spp_loads_neither_timm_nor_transformers():
    """The core (optimizer, path, family, calibration, masks, compression) is model-independent; a family's
    library loads the first time a model of it is used."""
    import subprocess
    import sys
    code = ("import sys, spp, spp.family, spp.path, spp.optim, spp.calibrate, spp.masks, spp.compress, spp.criteria; "
            "print(sorted(m for m in ('timm', 'transformers', 'spp.config', 'spp.runtime') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _check_exact(model, masks, granularity):
    x = _x()
    spp.add_masks(model, granularity)
    spp.set_masks(model, masks)
    pruned = spp.compress(model)
    diff = (_out(model, x) - _out(pruned, x)).abs().max().item()
    assert diff <= 1e-5, diff
    assert not spp.masks.is_masked(pruned)
    return pruned


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("granularity", ["dim", "head"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compressed_equals_masked_for_random_binary_masks(variant, granularity, seed):
    model = tiny_vit(**VARIANTS[variant], seed=seed)
    masks = random_pair_masks(model, granularity, keep=0.5, seed=seed)
    pruned = _check_exact(model, masks, granularity)
    assert spp.count_params(pruned) < spp.count_params(model)


@pytest.mark.parametrize("granularity", ["dim", "head"])
def test_compressed_equals_masked_for_non_binary_masks(granularity):
    model = tiny_vit()
    _check_exact(model, random_pair_masks(model, granularity, keep=0.7, binary=False), granularity)


EDGE_CASES = {
    "qk_removed": lambda m: m["blocks.0.attn.qk_mask"].zero_(),
    "v_removed": lambda m: m["blocks.0.attn.v_mask"].zero_(),
    "mlp_removed": lambda m: m["blocks.1.mlp.mask"].zero_(),
    "attention_removed": lambda m: (m["blocks.1.attn.qk_mask"].zero_(), m["blocks.1.attn.v_mask"].zero_()),
    "everything_removed": lambda m: [t.zero_() for t in m.values()],
    "nothing_removed": lambda m: [t.fill_(1) for t in m.values()],
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("granularity", ["dim", "head"])
def test_compressed_equals_masked_edge_cases(case, granularity):
    model = tiny_vit()
    masks = random_pair_masks(model, granularity, keep=0.6, seed=3)
    EDGE_CASES[case](masks)
    pruned = _check_exact(model, masks, granularity)
    if case == "v_removed":
        attn = pruned.blocks[0].attn
        assert attn.num_heads == 0 and attn.qkv.out_features == 0
        assert attn.proj.bias is not None  # the constant branch is kept
    if case == "qk_removed":
        assert pruned.blocks[0].attn.num_qk_heads == 0


def test_head_granularity_removes_heads_and_uniform_heads():
    model = tiny_vit()
    masks = random_pair_masks(model, "head", keep=1.0)
    masks["blocks.0.attn.v_mask"][1] = 0      # head 1 deleted
    masks["blocks.0.attn.qk_mask"][2] = 0     # head 2 attends uniformly
    pruned = _check_exact(model, masks, "head")
    attn = pruned.blocks[0].attn
    assert (attn.num_heads, attn.num_qk_heads, attn.qk_dim, attn.v_dim) == (3, 2, 16, 16)


def test_softmax_scale_is_the_original_one():
    model = tiny_vit()
    masks = random_pair_masks(model, "dim", keep=0.5, seed=4)
    pruned = _check_exact(model, masks, "dim")
    assert pruned.blocks[0].attn.scale == pytest.approx(16 ** -0.5)
    assert pruned.blocks[0].attn.qk_dim < 16


@pytest.mark.parametrize("keep_qk,keep_v", [(0.3, 0.8), (0.8, 0.3)])
def test_unequal_head_widths_reach_the_fused_cpu_kernel(keep_qk, keep_v):
    """qk_dim != v_dim: zero-padded to one width on CPU so SDPA takes its fused kernel, with the
    same output as the unpadded math path and FLOPs counted at the true widths."""
    from torch.profiler import profile
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_vit()
    masks = random_pair_masks(model, "dim", keep=1.0)
    g = torch.Generator().manual_seed(0)
    for name in masks:
        keep = keep_qk if "qk" in name else keep_v if "v_mask" in name else 1.0
        masks[name] = (torch.rand(masks[name].shape, generator=g) < keep).float()
    pruned = _check_exact(model, masks, "dim")
    attn = pruned.blocks[0].attn
    assert attn.qk_dim != attn.v_dim and attn.num_qk_heads == attn.num_heads
    x = _x()
    with profile() as prof:
        padded = _out(pruned, x)
    kernels = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in kernels
    assert "aten::_scaled_dot_product_attention_math" not in kernels
    with spp.nominal_attention():
        torch.testing.assert_close(_out(pruned, x), padded, atol=1e-5, rtol=0)
    with torch.no_grad(), FlopCounterMode(display=False) as executed:
        pruned(x[:1])
    assert executed.get_total_flops() > spp.count_flops(pruned)  # the zero columns are not counted


@pytest.mark.parametrize("granularity", ["dim", "head"])
def test_compress_takes_masks_on_a_dense_model(granularity):
    model = tiny_vit()
    masks = random_pair_masks(model, granularity, keep=0.5, seed=5)
    pruned = spp.compress(model, masks, granularity=granularity)
    reference = spp.compress(spp.set_masks(spp.add_masks(tiny_vit(), granularity), masks))
    torch.testing.assert_close(_out(pruned, _x()), _out(reference, _x()))


@pytest.mark.parametrize("granularity", ["dim", "head"])
def test_predicted_params_and_flops_equal_compressed(granularity):
    model = spp.add_masks(tiny_vit(), granularity)
    opt = spp.LBI([p for _, p in spp.mask_parameters(model)])
    for n, p in spp.mask_parameters(model):
        g = torch.Generator().manual_seed(len(n))
        opt.state[p].update(entry_step=torch.randint(1, 100, p.shape, generator=g).float(),
                            z=torch.rand(p.shape, generator=g), gamma=torch.zeros_like(p), step=torch.tensor(100.0))
    family = spp.WeightFamily(model, spp.SolutionPath.from_optimizer(opt, model))
    for keep in (0.0, 0.05, 0.3, 0.7, 1.0):
        for by in ("params", "flops"):
            member = family.select(keep=keep, by=by)
            pruned = spp.compress(model, member.masks)
            assert spp.count_params(pruned) == member.summary.params_after
            assert spp.count_flops(pruned) == member.summary.flops_after
            got = [(b.attn.num_heads, b.attn.num_qk_heads, b.attn.qk_dim, b.attn.v_dim, b.mlp.fc1.out_features)
                   for b in pruned.blocks]
            assert got == [tuple(w.to_dict().values()) for w in member.summary.widths]


@pytest.mark.parametrize("variant", ["cls", "distilled"])
@pytest.mark.parametrize("granularity", ["dim", "head"])
def test_save_load_round_trip(tmp_path, variant, granularity):
    model = tiny_vit(**VARIANTS[variant])
    pruned = spp.compress(model, random_pair_masks(model, granularity, keep=0.5, seed=6), granularity=granularity)
    spp.save_pruned(pruned, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded = spp.load_pruned(str(tmp_path))
    torch.testing.assert_close(_out(loaded.eval(), _x()), _out(pruned, _x()), atol=0, rtol=0)
    assert json.load(open(tmp_path / "config.json"))["base"]["name"] == VARIANTS[variant]["name"]


def test_load_pruned_errors_name_the_file(tmp_path):
    model = tiny_vit()
    pruned = spp.compress(model, random_pair_masks(model, "dim", seed=7), granularity="dim")
    with pytest.raises(FileNotFoundError, match="config.json"):
        spp.load_pruned(str(tmp_path))
    spp.save_pruned(pruned, str(tmp_path))
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors.*truncated or corrupt"):
        spp.load_pruned(str(tmp_path))
    other = spp.compress(model, random_pair_masks(model, "dim", seed=8), granularity="dim")
    spp.save_pruned(other, str(tmp_path / "other"))
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="shape mismatches"):
        spp.load_pruned(str(tmp_path))
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "blocks": config["blocks"][:1]}))
    with pytest.raises(ValueError, match="config.json lists 1 blocks but the base model has 2"):
        spp.load_pruned(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else", "blocks": []}))
    with pytest.raises(ValueError, match="not an spp pruned-model config .format='something-else'"):
        spp.load_pruned(str(tmp_path))
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        spp.load_pruned(str(tmp_path))
    os.remove(tmp_path / "other" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors not found .written by spp.save_pruned"):
        spp.load_pruned(str(tmp_path / "other"))


def test_save_pruned_needs_a_compressed_model(tmp_path, vit):
    with pytest.raises(ValueError, match="compress"):
        spp.save_pruned(vit, str(tmp_path))


def test_load_checkpoint_formats(tmp_path):
    from safetensors.torch import save_file
    source = tiny_vit(seed=10)
    state = source.state_dict()
    torch.save({"model": state, "epoch": 3}, tmp_path / "deit.pth")
    torch.save(state, tmp_path / "plain.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    for name in ("deit.pth", "plain.pth", "w.safetensors"):
        target = spp.add_masks(tiny_vit(seed=11))
        result = spp.load_checkpoint(target, str(tmp_path / name))
        assert result.missing_keys == [] and result.unexpected_keys == []
        torch.testing.assert_close(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_a_checkpoint_at_another_resolution_loads_through_the_familys_filter(tmp_path):
    """A ViT checkpoint at 32 px loads into the same ViT at 64 px: the family's filter_state_dict (timm's) resizes
    the position embeddings; the model's own input size is the family's to say."""
    from spp.models import family_of
    source = tiny_vit(seed=10)
    torch.save(source.state_dict(), tmp_path / "at32.pth")
    target = tiny_vit(seed=11, img_size=64)
    assert family_of(target).input_size(target) == (3, 64, 64) and family_of(source).input_size(source) == (3, 32, 32)
    result = spp.load_checkpoint(target, str(tmp_path / "at32.pth"))
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert target.pos_embed.shape[1] == 1 + 8 * 8
    torch.testing.assert_close(target.blocks[1].mlp.fc1.weight, source.blocks[1].mlp.fc1.weight)


@pytest.mark.slow
def test_pretrained_weights_offline_say_what_to_do(tmp_path):
    """Without the network or a cached file, both ways to timm's weights name the local-file way out."""
    probe = ("import spp\n"
             "for attempt in (lambda: spp.create_model('vit_tiny_patch16_224', pretrained=True),\n"
             "                lambda: spp.load_checkpoint(spp.create_model('vit_tiny_patch16_224'), 'timm:vit_tiny_patch16_224')):\n"
             "    try:\n"
             "        attempt()\n"
             "    except FileNotFoundError as e:\n"
             "        print('ERROR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}   # an empty cache, no network
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 2, result.stdout + result.stderr[-2000:]
    for error in errors:
        assert "could not get timm's pretrained weights for 'vit_tiny_patch16_224'" in error
        assert "checkpoint=PATH" in error and "HF_HUB_OFFLINE" in error


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        spp.load_checkpoint(tiny_vit(), str(tmp_path / "nope.pth"))
    wide = tiny_vit(embed_dim=96, num_heads=4)
    torch.save({"model": wide.state_dict()}, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"shapes differ.*blocks.0.attn.qkv.weight: checkpoint \(288, 96\) vs model \(192, 64\)"):
        spp.load_checkpoint(tiny_vit(), str(tmp_path / "wide.pth"))
    partial = {k: v for k, v in tiny_vit().state_dict().items() if not k.startswith("head.")}
    torch.save({"model": {**partial, "extra.weight": torch.ones(1)}}, tmp_path / "partial.pth")
    result = spp.load_checkpoint(tiny_vit(), str(tmp_path / "partial.pth"))   # a backbone without its head
    assert result.unexpected_keys == ["extra.weight"] and result.missing_keys == ["head.bias", "head.weight"]
    with pytest.raises(ValueError, match="missing keys"):
        spp.load_checkpoint(tiny_vit(), str(tmp_path / "partial.pth"), strict=True)
    torch.save({"model": {"extra.weight": torch.ones(1)}}, tmp_path / "unrelated.pth")
    with pytest.raises(ValueError, match="holds only 0 of this VisionTransformer's 32 tensors.*another model's"):
        spp.load_checkpoint(tiny_vit(), str(tmp_path / "unrelated.pth"))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only"):
        spp.load_checkpoint(tiny_vit(), str(tmp_path / "evil.pth"))


def test_meta_skeleton_of_a_timm_model_matches_it_and_reads_no_checkpoint(tmp_path):
    """model.fsdp's other ranks build timm models on the meta device too: the same parameters and shapes,
    no weights allocated, model.checkpoint not read (a missing file is no error there)."""
    real = spp.create_model("vit_tiny_patch16_224", **TINY)
    skeleton = spp.create_model("vit_tiny_patch16_224", checkpoint=str(tmp_path / "absent.pth"), meta=True, **TINY)
    assert {n: p.shape for n, p in skeleton.named_parameters()} == {n: p.shape for n, p in real.named_parameters()}
    assert all(p.is_meta for p in skeleton.parameters())
    assert skeleton.spp_base == real.spp_base
