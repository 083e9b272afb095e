"""Text for language models: files → tokens → fixed-length sequences, split into train / val / test.

``data.root`` names the text (``data.dataset: text``):

* a folder with ``train``, ``val`` (or ``valid`` / ``validation``) and ``test`` entries, each a file or
  a folder of files: those splits;
* any other folder: every ``.txt``, ``.jsonl``, ``.md`` and ``.rst`` file under it, split **by file**
  (a seeded shuffle; ``data.val_fraction`` and ``data.test_fraction`` of the files, at least one each),
  so no document is in two splits;
* one file: its sequences split in order (the last ``test_fraction`` for test, the ``val_fraction``
  before them for val);
* ``hf:NAME[:CONFIG]`` (online, or in the Hugging Face cache): that dataset's train / validation / test
  splits through ``datasets.load_dataset``, e.g. ``hf:wikitext:wikitext-2-raw-v1``; offline, an error says
  how to use local files instead. With ``data.max_documents`` > 0 the splits are **streamed** and only
  their first that many documents read (``hf:allenai/c4:en`` without downloading C4); a dataset with a
  validation split and no test split (C4) gives its validation documents' second half as test.

``.jsonl`` files give the ``text`` field of each line. Documents are tokenized with the model's tokenizer
(``data.tokenizer``, default the model's directory), joined with its end-of-sequence token, and cut into
non-overlapping windows of ``data.seq_len`` tokens (the remainder dropped). A sample is ``(ids, ids)``:
the inputs and the targets the next-token loss shifts by one.
"""
from __future__ import annotations

import json
import os
import random
from typing import Dict, List, Sequence

import torch
from torch.utils.data import Dataset

from .gguf import gguf_source, load_gguf_tokenizer

__all__ = ["TokenChunks", "text_datasets", "split_files", "read_documents", "load_tokenizer", "TEXT_SUFFIXES"]

TEXT_SUFFIXES = (".txt", ".jsonl", ".md", ".rst")
_SPLIT_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


class TokenChunks(Dataset):
    """Fixed-length token windows ``(N, seq_len)``; item ``i`` is ``(ids, ids)``."""

    def __init__(self, ids: torch.Tensor, source: str = ""):
        self.ids, self.source = ids, source

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int):
        return self.ids[i], self.ids[i]

    def set_epoch(self, epoch: int) -> None:   # the loops call it on every dataset; text has no augmentation
        """Nothing to do: token windows have no augmentation (the loops call it on every dataset)."""
        pass


def _files_under(path: str) -> List[str]:
    if os.path.isfile(path):
        return [path]
    found = [os.path.join(d, f) for d, _, files in os.walk(path) for f in files if f.endswith(TEXT_SUFFIXES)]
    return sorted(found)


def read_documents(files: Sequence[str]) -> List[str]:
    """The documents of ``files``: a whole file each, or each line's ``text`` field of a ``.jsonl``."""
    docs = []
    for name in files:
        with open(name, encoding="utf-8", errors="replace") as f:
            if name.endswith(".jsonl"):
                for n, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if "text" not in record:
                            raise ValueError(f"{name}:{n} has no 'text' field (fields: {sorted(record)[:6]})")
                        docs.append(record["text"])
            else:
                docs.append(f.read())
    return [d for d in docs if d.strip()]


def _hub_documents(root: str, max_documents: int = 0) -> Dict[str, List[str]]:
    """The documents of each split of a Hugging Face dataset ``hf:NAME[:CONFIG]`` (its ``text`` field); with
    ``max_documents`` the first that many of each split, streamed (nothing else is downloaded)."""
    import itertools

    name, _, config = root[3:].partition(":")
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise ImportError(f"data.root={root} is a Hugging Face dataset: pip install datasets") from e
    try:
        data = load_dataset(name, config or None, streaming=max_documents > 0)
    except Exception as e:   # offline, unknown name or config: many exception types
        raise FileNotFoundError(
            f"could not load the Hugging Face dataset {name!r}{f' ({config})' if config else ''} for data.root={root} "
            f"({type(e).__name__}: {str(e)[:200]}). Offline, save its text as .txt or .jsonl files (a 'text' field) "
            "and set data.root to them (a folder with train/ val/ test/ entries keeps its splits)") from e
    splits = {"train": "train", "val": "validation", "test": "test"}
    out = {}
    for split, hub in splits.items():
        if hub in data:
            rows = itertools.islice(data[hub], max_documents) if max_documents > 0 else data[hub]
            texts = [row["text"] for row in rows] if max_documents > 0 else rows["text"]
            # line-per-row corpora (wikitext) are one running text per split; others give a document per row
            out[split] = ["".join(texts)] if name.startswith("wikitext") else [t for t in texts if t.strip()]
    if "test" not in out and len(out.get("val", [])) >= 2:   # C4: validation only, its second half as test
        half = len(out["val"]) // 2
        out["val"], out["test"] = out["val"][:half], out["val"][half:]
    return out


def split_files(root: str, val_fraction: float, test_fraction: float, seed: int) -> Dict[str, List[str]]:
    """The text files under ``root`` split by file into train / val / test (by ``val_fraction``, ``test_fraction``, ``seed``).
    """
    if not os.path.exists(root):
        raise FileNotFoundError(f"data.root={root} not found (looked for {os.path.abspath(root)}): give a text file "
                                f"({', '.join(TEXT_SUFFIXES)}) or a folder of them")
    if os.path.isdir(root):
        entries = {e.rsplit(".", 1)[0] if os.path.isfile(os.path.join(root, e)) else e: os.path.join(root, e)
                   for e in os.listdir(root)}
        named = {split: next((entries[n] for n in names if n in entries), None) for split, names in _SPLIT_NAMES.items()}
        if named["train"] and named["test"]:
            return {split: _files_under(path) if path else [] for split, path in named.items()}
    files = _files_under(root)
    if not files:
        raise FileNotFoundError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under data.root={root}")
    if len(files) == 1:
        return {"single": files}
    order = files[:]
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(files))) if val_fraction > 0 else 0
    n_test = max(1, round(test_fraction * len(files))) if test_fraction > 0 else 0
    if n_val + n_test >= len(files):
        raise ValueError(f"data.root={root} has {len(files)} files: too few to hold out {n_val} for val and "
                         f"{n_test} for test; lower data.val_fraction / data.test_fraction or add files")
    return {"val": sorted(order[:n_val]), "test": sorted(order[n_val:n_val + n_test]),
            "train": sorted(order[n_val + n_test:])}


def _tokenize(tokenizer, docs: Sequence[str], seq_len: int, what: str) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    stream: List[int] = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"]
        if eos is not None:
            stream.append(eos)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"{what}: {len(stream):,} tokens, fewer than one sequence of data.seq_len={seq_len}; "
                         "give more text or a shorter data.seq_len")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def load_tokenizer(source: str):
    """The tokenizer of a local directory, a GGUF model (a ``.gguf`` file or a folder holding one) or
    ``hf:ORG/NAME`` (``AutoTokenizer``); a directory without one is an error.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ImportError("text data needs transformers: pip install -e '.[llm]'") from e
    gguf = None if source.startswith("hf:") else gguf_source(source)
    if gguf:
        return load_gguf_tokenizer(*gguf)
    if os.path.isdir(source) and not any(os.path.isfile(os.path.join(source, f)) for f in
                                         ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise FileNotFoundError(f"no tokenizer in {source} (tokenizer.json / tokenizer_config.json); set "
                                "data.tokenizer to a tokenizer directory")
    return AutoTokenizer.from_pretrained(source[3:] if source.startswith("hf:") else source)


def text_datasets(root: str, tokenizer_source: str, seq_len: int, val_fraction: float, test_fraction: float,
                  seed: int, splits: Sequence[str], max_documents: int = 0) -> Dict[str, TokenChunks]:
    """The :class:`TokenChunks` of ``splits`` (of train, val, test), as the module docstring describes."""
    tokenizer = load_tokenizer(tokenizer_source)
    if root.startswith("hf:"):   # a hub dataset's own train / validation / test splits
        docs = _hub_documents(root, max_documents)
        missing = [split for split in splits if split not in docs]
        if missing:
            raise ValueError(f"data.root={root} has no {missing} split (it has {sorted(docs)})")
        return {split: TokenChunks(_tokenize(tokenizer, docs[split], seq_len, f"{split} text of {root}"), root)
                for split in splits}
    files = split_files(root, val_fraction, test_fraction, seed)
    if "single" in files:
        ids = _tokenize(tokenizer, read_documents(files["single"]), seq_len, root)
        n = ids.shape[0]
        n_test = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
        n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
        if n_val + n_test >= n:
            raise ValueError(f"{root}: {n} sequences of {seq_len} tokens, too few to hold out val and test")
        parts = {"train": ids[: n - n_val - n_test], "val": ids[n - n_val - n_test: n - n_test], "test": ids[n - n_test:]}
        return {s: TokenChunks(parts[s], root) for s in splits}
    out = {}
    for split in splits:
        chosen = files[split] or (files["test"] if split == "val" else [])
        if not chosen:
            raise ValueError(f"data.root={root} gives no {split} text: set data.val_fraction / test_fraction > 0, "
                             "or give a folder with train / val / test entries")
        out[split] = TokenChunks(_tokenize(tokenizer, read_documents(chosen), seq_len, f"{split} text in {root}"),
                                 root)
    return out
