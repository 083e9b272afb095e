"""The commands on a language model: a tiny random Llama and OPT from directories the tests write, with a
word-level tokenizer trained here and a folder of text files (seconds each)."""
import copy
import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from helpers import kill_after_checkpoint
from spp.cli import main
from spp.config import load_config
from spp.commands import run_eval

transformers = pytest.importorskip("transformers", reason="language models need transformers: pip install -e '.[llm]'")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke_llm.yaml")
WORDS = [f"w{i}" for i in range(60)]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", pad_token="<pad>")


def write_model(directory, kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=len(WORDS) + 4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "opt":
        model = transformers.OPTForCausalLM(transformers.OPTConfig(**common, ffn_dim=96, word_embed_proj_dim=64))
    elif kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, intermediate_size=96,
                                                                       num_key_value_heads=2, head_dim=16))
    elif kind == "gemma3":
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            **common, intermediate_size=96, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=24,
            sliding_window=8, layer_types=["sliding_attention", "full_attention"]))
    elif kind == "phi3":
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**common, intermediate_size=96,
                                                                      num_key_value_heads=2, partial_rotary_factor=0.5))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, intermediate_size=96,
                                                                        num_key_value_heads=2))
    model.save_pretrained(str(directory))
    _tokenizer().save_pretrained(str(directory))
    return str(directory)


def write_text(directory, files: int = 10):
    """Files of sentences with structure to learn: each word is mostly followed by the next one."""
    rng = random.Random(0)
    os.makedirs(directory, exist_ok=True)
    for f in range(files):
        words, w = [], rng.randrange(len(WORDS))
        for _ in range(400):
            words.append(WORDS[w])
            w = (w + 1) % len(WORDS) if rng.random() < 0.8 else rng.randrange(len(WORDS))
        with open(os.path.join(directory, f"doc{f}.txt"), "w") as out:
            out.write(" ".join(words))
    return str(directory)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text"))


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_search_family_export_eval_on_text(tmp_path, text, kind):
    model = write_model(tmp_path / "model", kind)
    out = str(tmp_path / "run")
    args = [SMOKE, f"output={out}", f"model.name={model}", f"data.root={text}"]
    assert main(["search", *args]) == 0
    path = json.load(open(os.path.join(out, "path.json")))
    assert path["steps"] == 16
    assert "per 32 tokens" in open(os.path.join(out, "family.md")).read()
    assert main(["family", *args]) == 0
    rows = json.load(open(os.path.join(out, "family_eval.json")))
    assert [r["target"] for r in rows] == [1.0, 0.5, 0.2]
    assert all(r["perplexity"] > 1 and "32-token windows" in r["protocol"] for r in rows)
    assert rows[0]["params"] > rows[1]["params"] > rows[2]["params"]
    assert os.path.isfile(os.path.join(out, "family_eval.png"))
    assert main(["export", *args]) == 0
    pruned = os.path.join(out, "pruned")
    assert os.path.isfile(os.path.join(pruned, "model.safetensors"))
    result = run_eval(load_config(SMOKE, [*args[1:], f"train.source={pruned}"]))
    assert result["perplexity"] > 1 and result["params"] < rows[0]["params"]
    assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0


def test_text_inputs_errors_name_the_problem(tmp_path, text, capsys):
    model = write_model(tmp_path / "model", "llama")
    args = [SMOKE, f"output={tmp_path / 'run'}", f"model.name={model}"]
    os.makedirs(tmp_path / "empty")
    for overrides, message in [
            ([f"data.root={tmp_path / 'nope'}"], "data.root=.*nope not found"),
            ([f"data.root={text}", "data.seq_len=128"], "data.seq_len=128 is longer than the model's 64 positions"),
            ([f"data.root={tmp_path / 'empty'}"], "no text files"),
            ([f"data.root={text}", f"data.tokenizer={tmp_path / 'empty'}"], "no tokenizer in"),
            ([f"data.root={text}", "model.name=vit_tiny_patch16_224"], "needs a language model")]:
        assert main(["search", *args, *overrides]) == 2, overrides
        err = capsys.readouterr().err
        assert re.search(message, err), (message, err)


def test_wrong_paths_are_reported_before_the_model_loads(tmp_path, text, capsys, monkeypatch):
    """A large model takes minutes to load: a wrong data.root, tokenizer or model path is reported first."""
    import spp.build

    model = write_model(tmp_path / "model", "llama")
    qwen3 = write_model(tmp_path / "qwen3", "qwen3")
    loads = []
    monkeypatch.setattr(spp.build, "create_model", lambda *a, **k: loads.append(a) or pytest.fail("model loaded"))
    os.makedirs(tmp_path / "empty")
    for command in ("search", "family", "export", "retrain", "eval"):
        for overrides, message in [
                ([f"model.name={model}", f"data.root={tmp_path / 'nope'}"], "data.root=.*nope not found"),
                ([f"model.name={model}", f"data.root={text}", f"data.tokenizer={tmp_path / 'empty'}"], "no tokenizer in"),
                ([f"model.name={tmp_path / 'missing.gguf'}", f"data.root={text}"], "model.name=.*missing.gguf not found"),
                ([f"model.name={qwen3}", f"data.root={text}"],
                 "model.granularity=dim is not exact .*hf-qwen3.*q_norm.*use model.granularity=head")]:
            assert main([command, SMOKE, f"output={tmp_path / 'run'}", *overrides]) == 2, (command, overrides)
            assert re.search(message, capsys.readouterr().err)
    assert loads == []


@pytest.mark.parametrize("kind, cls, granularity", [("qwen3", "Qwen3ForCausalLM", "head"),
                                                    ("gemma3", "Gemma3ForCausalLM", "head"),
                                                    ("phi3", "Phi3ForCausalLM", "dim")])
def test_newer_families_through_search_and_export(tmp_path, text, kind, cls, granularity):
    """A Qwen3 / Gemma 3 directory searched at model.granularity=head (one ν per pair type), a Phi-3 one (fused
    projections, partial RoPE) at dims, and each member exported: a compressed model of the same class that spp
    loads back, with fewer parameters and finite logits."""
    import spp

    model = write_model(tmp_path / "model", kind)
    out = str(tmp_path / "run")
    args = [f"output={out}", f"model.name={model}", f"data.root={text}", f"model.granularity={granularity}",
            "search.nu_calibration=pair"]
    assert main(["search", SMOKE, *args]) == 0
    assert main(["export", SMOKE, *args, "export.remove=0.3", "export.rank=entry", "export.values=binary"]) == 0
    small = spp.load_pruned(os.path.join(out, "pruned")).eval()
    dense = spp.create_model(model)
    assert type(small).__name__ == cls and spp.count_params(small) < spp.count_params(dense)
    with torch.no_grad():
        assert torch.isfinite(small(torch.randint(3, 20, (1, 16))).logits).all()


def test_retrain_finetunes_a_member_and_lowers_validation_perplexity(tmp_path, text):
    """spp retrain on text: the exported member is finetuned on next-token prediction (all weights), the
    best checkpoint by validation perplexity is saved as a pruned directory, with distillation from the
    dense model too."""
    import spp

    model = write_model(tmp_path / "model", "llama")
    out = str(tmp_path / "run")
    args = [f"output={out}", f"model.name={model}", f"data.root={text}"]
    assert main(["search", SMOKE, *args]) == 0
    assert main(["export", SMOKE, *args, "export.rank=entry", "export.values=binary"]) == 0
    pruned = os.path.join(out, "pruned")
    from spp.build import build_loaders, task_for
    from spp.engine import evaluate
    from spp.runtime import setup_runtime
    cfg = load_config(SMOKE, args)
    runtime = setup_runtime("cpu", "off", 0)
    small = spp.load_pruned(pruned)
    before = evaluate(small, build_loaders(cfg, runtime, ["val"])["val"], runtime, task=task_for(cfg))
    retrain = [*args, f"output={tmp_path / 'ft'}", f"train.source={pruned}", "train.epochs=3", "train.lr=0.05",
               "train.warmup_epochs=0", "train.distill=0.3", "train.log_every=2"]
    assert main(["retrain", SMOKE, *retrain]) == 0
    result = json.load(open(tmp_path / "ft" / "result.json"))
    assert result["best"]["perplexity"] < before["perplexity"]
    best = spp.load_pruned(str(tmp_path / "ft" / "best"))
    assert isinstance(best, transformers.PreTrainedModel) and spp.count_params(best) == spp.count_params(small)


def _search_cmd(out, model, text, *overrides):
    return [sys.executable, "-m", "spp", "search", SMOKE, f"output={out}", f"model.name={model}", f"data.root={text}",
            *overrides]


@pytest.mark.slow
def test_killed_llm_search_resumes_to_the_same_path(tmp_path, text):
    import spp
    from test_pipeline import _path_tensors

    model = write_model(tmp_path / "model", "llama")
    long = ["search.steps=60", "search.checkpoint_every=5"]
    reference = str(tmp_path / "reference")
    subprocess.run(_search_cmd(reference, model, text, *long), check=True, capture_output=True)
    out = str(tmp_path / "killed")
    kill_after_checkpoint(_search_cmd(out, model, text, *long), os.path.join(out, "checkpoint.pth"), total=60)
    subprocess.run(_search_cmd(out, model, text, *long, "resume=auto"), check=True, capture_output=True)
    (ref_path, ref), (got_path, got) = _path_tensors(reference), _path_tensors(out)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert ref_path.support == got_path.support
    assert spp.SolutionPath.load(out).steps == 60


@pytest.mark.slow
def test_torchrun_two_processes_give_one_identical_llm_path(tmp_path, text):
    model = write_model(tmp_path / "model", "opt")
    out = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                             "-m", "spp", "search", SMOKE, f"output={out}", f"model.name={model}", f"data.root={text}",
                             "search.steps=8"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "solution path identical on all 2 ranks" in result.stdout
    assert json.load(open(os.path.join(out, "path.json")))["steps"] == 8


@pytest.mark.slow
def test_demo_llm_dequantizes_once_prunes_finetunes_and_generates(tmp_path, text, capsys):
    """spp demo-llm on a tiny GGUF Llama (model.name=, as SmolLM2's file would be) and a small text folder: the model
    dequantized and cached, then search, family, export, LoRA finetune and the side-by-side generations; a second run
    takes the cached model."""
    pytest.importorskip("gguf", reason="the demo's model is a GGUF file: pip install -e '.[llm]'")
    pytest.importorskip("peft", reason="the demo finetunes with LoRA (peft)")
    from helpers import tiny_gguf_llama

    gguf_file = str(tmp_path / "tiny.gguf")
    tiny_gguf_llama(gguf_file, open(os.path.join(text, "doc0.txt")).read())
    out = str(tmp_path / "demo")
    small = [f"model.name={gguf_file}", f"data.root={text}", "data.seq_len=32", "data.val_fraction=0.2",
             "data.test_fraction=0.2", "search.steps=12", "family.targets=[1.0,0.9,0.7]", "train.steps=6"]
    assert main(["demo-llm", "--output", out, *small]) == 0
    printed = capsys.readouterr().out
    assert "1/6 dequantize tiny.gguf" in printed and "6/6 the same prompts" in printed
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "M (" in line]
    assert len(rows) == 3 and rows[2].split("|")[-2].strip()       # the exported 70% member was finetuned
    generated = open(os.path.join(out, "generations.md")).read().splitlines()
    assert generated[0] == "| prompt | dense | 10% removed, no finetune | 30% removed, finetuned |"
    assert len(generated) == 2 + 3 and all(line.count("|") >= 5 for line in generated)
    assert os.path.isfile(os.path.join(out, "model", "model.safetensors"))
    assert main(["demo-llm", "--output", out, *small]) == 0
    assert "1/6 model cached in" in capsys.readouterr().out


def test_retrain_with_lora_trains_adapters_and_saves_them_merged(tmp_path, text, capsys):
    """train.lora_rank: peft adapters on every projection of the member train, its own weights stay; the saved
    best model has them merged (a plain transformers model of the member's size) and the lower perplexity."""
    pytest.importorskip("peft", reason="LoRA needs peft")
    import spp
    from spp.build import build_loaders, task_for
    from spp.engine import evaluate
    from spp.runtime import setup_runtime

    model = write_model(tmp_path / "model", "llama")
    out = str(tmp_path / "run")
    args = [f"output={out}", f"model.name={model}", f"data.root={text}"]
    assert main(["search", SMOKE, *args]) == 0 and main(["export", SMOKE, *args]) == 0
    pruned = os.path.join(out, "pruned")
    retrain = [*args, f"output={tmp_path / 'lora'}", f"train.source={pruned}", "train.epochs=3", "train.lr=0.2",
               "train.warmup_epochs=0", "train.lora_rank=4", "train.weight_decay=0"]
    assert main(["retrain", SMOKE, *retrain]) == 0
    printed = capsys.readouterr().out
    assert "in LoRA adapters of rank 4" in printed
    best = spp.load_pruned(str(tmp_path / "lora" / "best"))
    small = spp.load_pruned(pruned)
    assert spp.count_params(best) == spp.count_params(small)
    assert not any("lora" in n for n in best.state_dict())
    changed = [n for n, p in best.state_dict().items() if not torch.equal(p, small.state_dict()[n])]
    assert changed and all(n.endswith("proj.weight") for n in changed)     # adapters merged into the projections
    cfg = load_config(SMOKE, args)
    runtime = setup_runtime("cpu", "off", 0)
    val = build_loaders(cfg, runtime, ["val"])["val"]
    assert evaluate(best, val, runtime, task=task_for(cfg))["perplexity"] < evaluate(small, val, runtime, task=task_for(cfg))["perplexity"]
    saved = json.load(open(tmp_path / "lora" / "best" / "config.json"))
    assert saved["params"] == spp.count_params(small)


def test_search_distills_from_the_dense_model(tmp_path, text):
    """search.distill > 0 adds the KL to the dense model's next-token distributions: another path, same steps."""
    import spp

    model = write_model(tmp_path / "model", "llama")
    paths = []
    for distill in (0.0, 0.5):
        out = str(tmp_path / f"d{distill}")
        assert main(["search", SMOKE, f"output={out}", f"model.name={model}", f"data.root={text}",
                     f"search.distill={distill}"]) == 0
        paths.append(spp.SolutionPath.load(out))
    assert paths[0].steps == paths[1].steps == 16
    assert any(not torch.equal(paths[0].entries[n]["z"], paths[1].entries[n]["z"]) for n in paths[0].entries)


def _torchrun(command, out, *overrides):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "spp", command,
            SMOKE, f"output={out}", *overrides]


def _torchrun_search(out, model, text, *overrides):
    return _torchrun("search", out, f"model.name={model}", f"data.root={text}", *overrides)


@pytest.mark.slow
def test_fsdp2_search_matches_ddp_and_resumes_after_a_kill(tmp_path, text):
    """model.fsdp=true under torchrun (2 CPU processes, gloo): weights and masks sharded by FSDP2, the same
    path as DDP at the same ν, one path on both ranks, and a killed run resumes to the identical path."""
    import spp

    model = write_model(tmp_path / "model", "llama")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    fixed = ["search.nu=5000", "search.rho=0.3", "search.lam=0.05", "search.steps=24", "search.checkpoint_every=4"]
    runs = {}
    for name, extra in (("ddp", []), ("fsdp", ["model.fsdp=true"])):
        out = str(tmp_path / name)
        result = subprocess.run(_torchrun_search(out, model, text, *fixed, *extra), capture_output=True, text=True,
                                env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "solution path identical on all 2 ranks" in result.stdout
        runs[name] = spp.SolutionPath.load(out)
    assert "FSDP2: the model sharded over 2 processes, its weights read by rank 0 only" in result.stdout
    entered = 0
    for n, e in runs["ddp"].entries.items():
        assert torch.equal(e["entry_step"], runs["fsdp"].entries[n]["entry_step"]), n
        torch.testing.assert_close(e["z"], runs["fsdp"].entries[n]["z"], rtol=1e-4, atol=1e-4)
        entered += int(torch.isfinite(e["entry_step"]).sum())
    assert entered > 0

    out = str(tmp_path / "killed")
    killed_at = kill_after_checkpoint(_torchrun_search(out, model, text, *fixed, "model.fsdp=true"),
                                      os.path.join(out, "checkpoint.pth"), total=24, env=env)
    result = subprocess.run(_torchrun_search(out, model, text, *fixed, "model.fsdp=true", "resume=auto"),
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {killed_at}" in result.stdout
    resumed = spp.SolutionPath.load(out)
    for n, e in runs["fsdp"].entries.items():
        for field in ("entry_step", "z", "gamma", "mask"):
            assert torch.equal(e[field], resumed.entries[n][field]), (n, field)
        snapshots = runs["fsdp"].snapshots[n]   # sharded like the masks, gathered whole into the path
        assert sorted(snapshots) == sorted(resumed.snapshots[n]) == sorted(runs["ddp"].snapshots[n]) == list(range(1, 25))
        assert all(torch.equal(m, resumed.snapshots[n][s]) for s, m in snapshots.items()), n
        assert all(m.shape == e["mask"].shape for m in snapshots.values())


@pytest.mark.slow
def test_fsdp2_retrain_matches_ddp_and_resumes_after_a_kill(tmp_path, text):
    """spp retrain with model.fsdp=true (2 CPU processes, gloo; rank 0 alone reads the weights): the same
    weights as DDP for a full finetune with distillation from the sharded dense model and for LoRA, on an
    evaluation split that leaves one rank a batch short; a killed run resumes to the identical model."""
    import spp

    model = write_model(tmp_path / "model", "llama")
    common = [f"model.name={model}", f"data.root={text}"]
    assert main(["search", SMOKE, f"output={tmp_path / 'search'}", *common]) == 0
    assert main(["export", SMOKE, f"output={tmp_path / 'search'}", *common]) == 0
    pruned = str(tmp_path / "search" / "pruned")
    fixed = [*common, f"train.source={pruned}", "train.epochs=2", "train.steps=6", "train.warmup_epochs=0",
             "train.lr=0.2", "train.weight_decay=0", "train.checkpoint_every=2", "data.eval_batch_size=1"]
    recipes = {"full": ["train.distill=0.5"], "lora": ["train.lora_rank=4"]}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    weights = {}
    for recipe, extra in recipes.items():
        for mode in ("ddp", "fsdp"):
            out = tmp_path / f"{recipe}-{mode}"
            sharding = ["model.fsdp=true"] if mode == "fsdp" else []
            result = subprocess.run(_torchrun("retrain", out, *fixed, *extra, *sharding), capture_output=True,
                                    text=True, env=env, timeout=300)
            assert result.returncode == 0, result.stderr[-3000:]
            assert ("its weights read by rank 0 only" in result.stdout) == (mode == "fsdp")
            weights[recipe, mode] = spp.load_pruned(str(out / "last")).state_dict()
        ddp, fsdp = weights[recipe, "ddp"], weights[recipe, "fsdp"]
        assert ddp.keys() == fsdp.keys()
        for k in ddp:
            torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-5, atol=1e-6)
    before = spp.load_pruned(pruned).state_dict()
    assert any((weights["full", "fsdp"][k] - before[k]).abs().max() > 1e-3 for k in before)   # it did train

    out = tmp_path / "killed"
    args = _torchrun("retrain", out, *fixed, *recipes["full"], "model.fsdp=true")
    killed_at = kill_after_checkpoint(args, str(out / "train_checkpoint.pth"), total=6, env=env)
    result = subprocess.run([*args, "resume=auto"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {killed_at}" in result.stdout
    resumed = spp.load_pruned(str(out / "last")).state_dict()
    for k, v in weights["full", "fsdp"].items():
        assert torch.equal(resumed[k], v), k


def test_fsdp_settings_it_cannot_shard_are_errors(tmp_path, text):
    """model.fsdp=true refuses, with the fix, what would not work sharded: EMA, fp16, a search dir as source."""
    from spp.build import source_model
    from spp.config import ConfigError
    from spp.commands.retrain import _check_shardable
    from spp.runtime import Runtime

    cfg = load_config(SMOKE, [f"model.name={tmp_path}", f"data.root={text}", "model.fsdp=true"])
    two = Runtime(device=torch.device("cpu"), amp_dtype=None, rank=1, world_size=2)
    assert _check_shardable(cfg, two) and not _check_shardable(cfg, Runtime(torch.device("cpu"), None))
    with pytest.raises(ConfigError, match="train.ema=false"):
        _check_shardable(load_config(SMOKE, [f"model.name={tmp_path}", "model.fsdp=true", "train.ema=true"]), two)
    with pytest.raises(ConfigError, match="amp=bf16"):
        _check_shardable(cfg, Runtime(torch.device("cpu"), torch.float16, rank=1, world_size=2))
    (tmp_path / "path.json").write_text("{}")
    with pytest.raises(ConfigError, match="spp export"):
        source_model(load_config(SMOKE, [f"model.name={tmp_path}", f"train.source={tmp_path}"]), two, meta=True)


def test_unsupported_llm_is_an_error_line(tmp_path, text, capsys):
    """A Phi-2 directory (attention and MLP in parallel) through spp search: one error line saying why and naming
    the family that takes Phi-3 and Phi-4. (A Qwen3 one at model.granularity=dim is refused before it loads:
    test_wrong_paths_...)"""
    torch.manual_seed(0)
    config = transformers.PhiConfig(vocab_size=len(WORDS) + 4, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                    num_attention_heads=4, max_position_embeddings=64, pad_token_id=0)
    transformers.PhiForCausalLM(config).save_pretrained(str(tmp_path / "phi"))
    _tokenizer().save_pretrained(str(tmp_path / "phi"))
    assert main(["search", SMOKE, f"output={tmp_path / 'run'}", f"model.name={tmp_path / 'phi'}",
                 f"data.root={text}"]) == 2
    err = capsys.readouterr().err
    assert "spp search: error: spp does not support PhiForCausalLM: Phi-1 and Phi-2" in err and "hf-phi3" in err


@pytest.mark.slow
def test_hub_dataset_offline_says_how_to_use_local_files(tmp_path):
    """data.root=hf:NAME:CONFIG reads a Hugging Face dataset; offline it is an error line pointing at local files."""
    pytest.importorskip("datasets", reason="hub datasets need the datasets package")
    model = write_model(tmp_path / "model", "llama")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-m", "spp", "search", SMOKE, f"output={tmp_path / 'run'}",
                             f"model.name={model}", "data.root=hf:wikitext:wikitext-2-raw-v1"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "could not load the Hugging Face dataset 'wikitext' (wikitext-2-raw-v1)" in result.stderr
    assert "Offline, save its text as .txt or .jsonl files" in result.stderr


@pytest.mark.slow
def test_eval_runs_zero_shot_tasks_through_lm_eval(tmp_path, text, capsys):
    """spp eval with eval.tasks: lm-evaluation-harness scores a compressed member on a multiple-choice task read
    from local files (eval.task_path), offline; an unknown task is an error line naming it."""
    pytest.importorskip("lm_eval", reason="zero-shot tasks need lm-evaluation-harness (pip install lm-eval)")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [{"question": f"w{i} w{i + 1}", "choices": [f" w{i + 2}", f" w{i + 9}"], "answer": 0} for i in range(12)]
    (tasks / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tasks / "next_word.yaml").write_text(
        f"task: next_word\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    model = write_model(tmp_path / "model", "llama")
    out = str(tmp_path / "run")
    args = [f"output={out}", f"model.name={model}", f"data.root={text}"]
    assert main(["search", SMOKE, *args]) == 0 and main(["export", SMOKE, *args]) == 0
    evaluate = [*args, f"train.source={os.path.join(out, 'pruned')}", f"eval.task_path={tasks}"]
    result = run_eval(load_config(SMOKE, [*evaluate, "eval.tasks=[next_word]"]))
    assert 0 <= result["tasks"]["next_word"]["acc"] <= 1
    assert main(["eval", SMOKE, *evaluate, "eval.tasks=[no_such_task]"]) == 2
    assert "lm-evaluation-harness has no task ['no_such_task']" in capsys.readouterr().err


@pytest.mark.slow
def test_llm_benchmark_uniform_whole_heads_members_have_plain_configs(tmp_path, text):
    """--granularity head with spp-uniform: one search, and each budget's uniform member keeps the same whole heads
    and MLP width in every layer, which its model's own config states (plain transformers loads it); the global
    walk's member at the same budget is reported beside it."""
    model = write_model(tmp_path / "llama", "llama")
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "benchmark_llm.py"), "--model", model, "--data-root", text,
         "--seq-len", "32", "--out", str(out), "--methods", "spp", "spp-uniform", "--granularity", "head",
         "--seeds", "0", "--removed", "0.5", "--batch", "4", "--eval-batch", "8", "--val-sequences", "8",
         "--test-sequences", "8", "--search-steps", "6", "--calibration-batches", "2", "--finetune-seeds"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.load(open(out / "benchmark_llm.json"))["runs"]
    uniform = runs["spp-uniform"]["0"]["0.5"]
    assert uniform["plain config"] and all(w == uniform["widths"][0] for w in uniform["widths"])
    assert uniform["widths"][0]["qk_dim"] == 16 and uniform["widths"][0]["num_heads"] < 4   # whole heads removed
    assert "plain config" in runs["spp"]["0"]["0.5"]


@pytest.mark.slow
def test_llm_benchmark_ranks_the_same_structures_for_every_method(tmp_path, text):
    """scripts/benchmark_llm.py end to end on the tiny Llama: every method's members meet each budget (one
    budget walk over the same structures), SPP's reading is chosen on val, the
    finetunes run, and the table has a row per method."""
    model = write_model(tmp_path / "llama", "llama")
    methods = ["spp", "spp-uniform", "magnitude", "random", "wanda-sp", "flap", "taylor", "lasso", "lasso-scales"]
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "benchmark_llm.py"), "--model", model, "--data-root", text,
         "--seq-len", "32", "--out", str(out), "--methods", *methods, "--seeds", "0", "1", "--removed", "0.3", "0.6",
         "--batch", "4", "--eval-batch", "8", "--val-sequences", "8", "--test-sequences", "8", "--search-steps", "6",
         "--calibration-batches", "2", "--lasso-steps", "4", "--lasso-lams", "1e-3", "--finetune-steps", "2",
         "--long-steps", "4", "--long-removed", "0.6", "--finetunes", "full", "scales", "--scale-steps", "4",
         "--scale-removed", "0.6"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "spp seed 1: step 6/6" in result.stdout and "lasso seed 1, lam 0.001: step 4/4" in result.stdout   # progress
    results = json.load(open(out / "benchmark_llm.json"))
    runs = results["runs"]
    assert set(runs) == set(methods)
    for r in ("0.3", "0.6"):   # the same walk: each hits the budget within about one structure's cost
        removed = {m: (results["dense"]["params"] - runs[m]["0"][r]["params"]) / results["prunable"] for m in methods}
        assert all(abs(x - float(r)) < 0.02 for x in removed.values()), removed
    assert runs["spp"]["0"]["0.6"]["params"] < runs["spp"]["0"]["0.3"]["params"]
    assert "reading" in runs["spp"]["0"]["0.3"] and runs["lasso"]["1"]["0.3"]["values"] == "binary"
    # spp-uniform: the same search (its seconds counted for both), every layer of a member at the same widths
    assert runs["spp-uniform"]["1"]["search seconds"] == runs["spp"]["1"]["search seconds"]
    for r in ("0.3", "0.6"):
        first, *rest = runs["spp-uniform"]["0"][r]["widths"]
        assert all(w == first for w in rest) and first["mlp_hidden"] < 96
    assert any(w != runs["spp"]["0"]["0.6"]["widths"][0] for w in runs["spp"]["0"]["0.6"]["widths"])
    # lasso-scales: the same Lasso run (trained once per seed, its time counted for both), members keep its values
    assert runs["lasso-scales"]["0"]["0.3"]["values"] == "path" and runs["lasso-scales"]["0"]["0.3"]["params"] == \
        runs["lasso"]["0"]["0.3"]["params"] and runs["lasso-scales"]["0"]["lasso seconds"] == runs["lasso"]["0"]["lasso seconds"]
    assert runs["lasso-scales"]["0"]["time"] >= runs["lasso"]["0"]["lasso seconds"]
    # --finetunes scales: every method's member at --scale-removed gets the Lasso's training without its penalty
    assert runs["spp"]["0"]["0.6"]["scales"] > 0 and "scales" not in runs["spp"]["0"]["0.3"]
    assert "scales" not in runs["lasso-scales"]["0"]["0.6"]
    assert runs["taylor"]["0"]["0.6"]["ft"] > 0 and runs["taylor"]["0"]["0.6"]["ft_long"] > 0
    assert runs["taylor"]["1"]["0.6"].get("ft") is None          # finetunes at --finetune-seeds only
    assert runs["random"]["0"]["0.3"]["test"] != runs["random"]["1"]["0.3"]["test"]
    table = (out / "benchmark_llm.md").read_text()
    assert all(f"| {m} |" in table for m in methods if m != "lasso-scales") and "32-token windows" in table
    assert "| lasso-scales (trained mask scales) |" in table and "steps of mask-scale training" in table
    assert (out / "benchmark_llm.png").stat().st_size > 0
    again = tmp_path / "again"        # --table-from measures nothing and writes the same table
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark_llm.py"), "--table-from",
                             str(out / "benchmark_llm.json"), "--out", str(again)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (again / "benchmark_llm.md").read_text() == table
    more = copy.deepcopy(results)   # a later run's seeds (7) join the tables, the finetuned rows included
    more["runs"] = {m: {"7": runs[m]["0"]} for m in ("spp", "taylor")}
    more["runs"]["random"] = {"1": {"0.3": {"ft": 123.0}}}   # a finetuned figure for a seed measured before
    more["methods"], more["args"]["seeds"], more["args"]["finetune_seeds"] = ["spp", "taylor"], [7], [7]
    (tmp_path / "more.json").write_text(json.dumps(more))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark_llm.py"), "--table-from",
                             str(out / "benchmark_llm.json"), str(tmp_path / "more.json"), "--out", str(again)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    merged = (again / "benchmark_llm.md").read_text()
    assert "**no finetuning** (seeds 0, 1, 7)" in merged and "finetuning steps** (seeds 0, 7)" in merged
    assert "| random |" in merged and "123.00" not in merged    # seed 1 is not among the finetuned seeds...
    more["args"]["finetune_seeds"] = [1, 7]
    (tmp_path / "more.json").write_text(json.dumps(more))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark_llm.py"), "--table-from",
                             str(out / "benchmark_llm.json"), str(tmp_path / "more.json"), "--out", str(again)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    random_rows = [line for line in (again / "benchmark_llm.md").read_text().splitlines() if line.startswith("| random")]
    assert len(random_rows) == 4 and random_rows[0].split("|")[3].strip() != "–"   # ...its test figures kept (rows: no finetuning, 2 finetunes, scale training)
    scales_only = copy.deepcopy(results)   # a run with --finetunes scales: no empty full-finetune tables
    for runs in scales_only["runs"].values():
        for run in runs.values():
            for row in run.values():
                if isinstance(row, dict):
                    row.pop("ft", None), row.pop("ft_long", None)
    (tmp_path / "scales.json").write_text(json.dumps(scales_only))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark_llm.py"), "--table-from",
                             str(tmp_path / "scales.json"), "--out", str(again)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    table = (again / "benchmark_llm.md").read_text()
    assert "finetuning steps**" not in table and "steps of mask-scale training" in table
    curve = tmp_path / "curve"        # --search-curve: SPP's perplexity against its search tokens
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark_llm.py"), "--search-curve",
                             str(out / "benchmark_llm.json"), "--out", str(curve)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    tokens = 6 * 4 * 32
    assert f"| 6 | {tokens:,} |" in (curve / "search_curve.md").read_text()
    assert (curve / "search_curve.png").stat().st_size > 0


@pytest.mark.slow
def test_hub_dataset_streams_its_first_documents_and_halves_validation_for_test(tmp_path, monkeypatch):
    """data.root=hf:NAME with data.max_documents streams the first documents of each split (a local dataset
    folder stands in for the hub offline); with a validation split and no test split (C4's layout) the
    validation documents' second half is the test split."""
    pytest.importorskip("datasets", reason="hub datasets need the datasets package")
    from spp.text import text_datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    model = write_model(tmp_path / "model", "llama")
    hub = tmp_path / "hub"
    hub.mkdir()
    for split, n in (("train", 12), ("validation", 6)):
        docs = [" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(40)) for i in range(n)]
        (hub / f"{split}.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    streamed = text_datasets(f"hf:{hub}", model, 8, 0.0, 0.0, 0, ["train", "val", "test"], max_documents=4)
    full = text_datasets(f"hf:{hub}", model, 8, 0.0, 0.0, 0, ["train", "val", "test"])
    tokens = {split: len(d) * 8 for split, d in streamed.items()}
    assert tokens == {"train": 4 * 41 // 8 * 8, "val": 2 * 41 // 8 * 8, "test": 2 * 41 // 8 * 8}, tokens   # 40 words + eos
    assert len(full["train"]) == 12 * 41 // 8 and len(full["val"]) == len(full["test"]) == 3 * 41 // 8
    assert torch.equal(streamed["train"].ids[0], full["train"].ids[0])


@pytest.mark.slow
def test_sparse_benchmark_reads_every_member_of_one_search(tmp_path, text):
    """scripts/benchmark_sparse.py end to end on the tiny Llama: every method at each sparsity and N:M pattern,
    SPP's members from one search per seed (spp-obs and spp-refit reuse it, its time counted), the table and
    --table-from."""
    model = write_model(tmp_path / "llama", "llama")
    out = tmp_path / "sparse"
    common = [sys.executable, os.path.join(ROOT, "scripts", "benchmark_sparse.py")]
    result = subprocess.run(
        [*common, "--model", model, "--data-root", text, "--seq-len", "32", "--out", str(out), "--seeds", "0", "1",
         "--sparsities", "0.5", "0.7", "--patterns", "2:4", "--calibration-sequences", "8", "--batch", "4",
         "--test-sequences", "8", "--eval-batch", "8", "--search-steps", "20"], capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("element search: block 2/2") == 4      # spp and spp-diagonal, two seeds each
    results = json.load(open(out / "results.json"))
    runs = results["runs"]
    assert set(runs) == {"spp", "spp-obs", "spp-refit", "spp-diagonal", "magnitude", "wanda", "wanda-refit", "ria",
                         "sparsegpt"}
    for method, seeds in runs.items():
        for target, want in (("0.5", 0.5), ("0.7", 0.7), ("2:4", 0.5)):
            assert abs(seeds["1"][target]["sparsity"] - want) < 0.01, (method, target)
            assert seeds["1"][target]["test"] > results["dense"] * 0.5
    assert runs["spp-obs"]["0"]["time"] > runs["spp"]["0"]["time"] * 0.5   # the search's time counts for it too
    assert runs["spp-refit"]["0"]["time"] > runs["spp"]["0"]["time"] * 0.5
    assert "seed 1 2:4: refit: block 2/2" in result.stdout and "seed 1 2:4: wanda: block 2/2" in result.stdout   # progress
    assert runs["magnitude"]["0"] == runs["magnitude"]["1"]                 # magnitude reads no data
    assert runs["wanda"]["0"]["0.7"]["test"] != runs["wanda"]["1"]["0.7"]["test"]
    table = (out / "table.md").read_text()
    assert "| spp-obs |" in table and "| method | 50% | 70% | 2:4 | time for all targets (s) |" in table
    merged = subprocess.run([*common, "--table-from", str(out / "results.json"), "--out", str(tmp_path / "merged")],
                            capture_output=True, text=True, timeout=120)
    assert merged.returncode == 0 and (tmp_path / "merged" / "table.md").read_text() == table


@pytest.mark.slow
def test_sparse_reconstruction_study_prints_every_layer(tmp_path, text):
    """scripts/sparse_reconstruction.py on the tiny Llama's second block: a row per layer and target, and on the
    calibration inputs the refit's error at most the OBS update's for the same masks (it is the exact solution)."""
    model = write_model(tmp_path / "llama", "llama")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sparse_reconstruction.py"), "--model",
                             model, "--data-root", text, "--seq-len", "32", "--block", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| mlp.") or
            line.startswith("| self_attn.")]
    assert len(rows) == 7 * 2
    for row in rows:
        mask_only, obs, refit, wanda_refit, sparsegpt, sparsegpt_refit = (float(c) for c in row[2:])
        assert refit <= obs * 1.001 and obs <= mask_only * 1.001 and 0 < refit < 1, row
        assert sparsegpt_refit <= sparsegpt * 1.001, row
