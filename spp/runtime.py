"""Run plumbing: device and precision, the CPU allocator, torchrun/DDP, seeding, logging, checkpoints."""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import platform
import random
import subprocess
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from .errors import CheckpointError, ConfigError, NonFiniteLoss
from .files import atomic_torch_save

__all__ = ["Runtime", "setup_runtime", "keep_cpu_memory", "provenance", "RunLogger", "gather_rng_states", "restore_rng_states", "CheckpointError",
           "save_training_checkpoint", "load_training_checkpoint", "check_same_run", "NonFiniteLoss"]


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        """The run's autocast context (bf16 / fp16 on its device), or a no-op."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def barrier(self) -> None:
        """Wait for every rank (a no-op in one process)."""
        if self.distributed:
            dist.barrier()

    def all_mean(self, value: float) -> float:
        """The mean of ``value`` over the DDP ranks (the value itself in one process)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world_size


def setup_runtime(device: str = "auto", amp: str = "auto", seed: int = 0) -> Runtime:
    """Read torchrun's environment, start the process group, pick device and precision, seed by rank.

    On the CPU it also calls :func:`keep_cpu_memory`."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        keep_cpu_memory()  # no page faults on large activations each step (see keep_cpu_memory)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if amp == "auto":
        amp_dtype = torch.bfloat16 if use_cuda and torch.cuda.is_bf16_supported() else None
    else:
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    if amp_dtype is torch.float16 and not use_cuda:
        raise ConfigError("amp=fp16 needs CUDA (fp16 autocast with a gradient scaler); use amp=bf16 or amp=off on the CPU")
    seed_everything(seed + rank)
    return Runtime(dev, amp_dtype, rank, world_size, local_rank)


# glibc's mallopt options (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_cpu_memory() -> bool:
    """Keep freed CPU memory in this process instead of handing it back to the OS (glibc only).

    By default glibc serves every allocation above a threshold (which grows to at most 32 MiB)
    with a fresh ``mmap`` and unmaps it when it is freed, and it trims the top of its heap when
    much of it is free. A ViT's activations pass that size at large batches (DeiT-Small's MLP
    hidden layer at batch 32 is 37 MiB), so each forward page-faults them in again on first touch:
    1.7 million minor faults per DeiT-Small forward at batch 128, 28% of its time on a 2-core CPU
    (``scripts/benchmark_speed.py`` prints the faults per forward). This raises both
    thresholds to their maximum, so freed pages are reused, as CUDA's caching allocator reuses
    device memory; the price is that the resident size stays at its peak. The environment
    variables ``MALLOC_MMAP_THRESHOLD_=2147483647 MALLOC_TRIM_THRESHOLD_=2147483647`` do the same
    for a whole process, and jemalloc or tcmalloc (``LD_PRELOAD``) do it their own way.

    Returns whether it took effect; on a C library without ``mallopt`` (macOS, Windows) it
    changes nothing and returns False.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    largest = 2 ** 31 - 1
    return all([mallopt(_M_MMAP_THRESHOLD, largest) == 1, mallopt(_M_TRIM_THRESHOLD, largest) == 1])


def reseed_ranks(runtime: Runtime, seed: int) -> None:
    """Seed every rank again (``seed + rank``) once its model is built. In a distributed run the random streams
    then do not depend on how a rank built its model (whole, or as a meta-device skeleton under FSDP2), so a
    sharded run draws what a DDP run draws; in one process nothing changes."""
    if runtime.distributed:
        seed_everything(seed + runtime.rank)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    """All RNG states, in types that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gather_rng_states(runtime: "Runtime") -> list:
    """Every rank's RNG states, in rank order (a collective: call it on all ranks)."""
    state = rng_state()
    if not runtime.distributed:
        return [state]
    states = [None] * runtime.world_size
    dist.all_gather_object(states, state)
    return states


def restore_rng_states(states: list, runtime: "Runtime") -> None:
    """Put back the RNG states :func:`gather_rng_states` saved, this rank's own."""
    if len(states) != runtime.world_size:
        raise CheckpointError(f"the checkpoint was written by {len(states)} processes, this run has "
                              f"{runtime.world_size}; resume with the same number of processes")
    set_rng_state(states[runtime.rank])


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Atomically write ``path``, keeping the previous one as ``<path>.prev``; ``path`` is never missing."""
    atomic_torch_save(state, path, keep_previous=path + ".prev")


def load_training_checkpoint(path: str, kind: str, model_name: str) -> Dict[str, Any]:
    """A search or train checkpoint, loaded without unpickling code; errors name another kind or model."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        prev = path + ".prev"
        hint = f" The previous checkpoint is intact: resume={prev}" if os.path.isfile(prev) else ""
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint ({type(e).__name__}: "
                              f"{str(e)[:200]}). It was left untouched.{hint}") from None
    if not isinstance(state, dict) or state.get("kind") != kind:
        raise CheckpointError(f"{path} is not a {kind} checkpoint (found {state.get('kind') if isinstance(state, dict) else type(state).__name__})")
    if state.get("model_name") != model_name:
        raise CheckpointError(f"{path} was written for model {state.get('model_name')!r}, not {model_name!r}")
    return state


# What a resumed run must share with the run that wrote its checkpoint (dotted prefixes), and what it may
# change: paths, logging, evaluation, and how far it runs (an LBI path has no schedule to stretch).
SAME_RUN = {"search": ("seed", "model.", "data.", "search."), "train": ("seed", "model.", "data.", "train.", "export.")}
FREE_ON_RESUME = ("model.checkpoint", "model.pretrained", "data.root", "data.workers", "data.eval_batch_size",
                  "search.steps", "search.epochs", "search.targets", "search.log_every", "search.checkpoint_every",
                  "train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every", "export.out")


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "kwargs":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_same_run(state: Dict[str, Any], config: Dict[str, Any], path: str) -> None:
    """Refuse to resume ``path`` under settings that change what the run computes (``config``:
    ``Config.to_dict()``), naming each one. Checkpoints written before settings were stored pass, and
    settings one side does not know (added or removed by another spp version) are not compared."""
    if "config" not in state:
        return
    kind = state["kind"]
    was, now = _flatten(state["config"]), _flatten(config)
    differ = [key for key in sorted(set(was) & set(now))
              if key.startswith(SAME_RUN[kind]) and not key.startswith(FREE_ON_RESUME) and was[key] != now[key]]
    if differ:
        listed = "; ".join(f"{key} is {was[key]!r} there and {now[key]!r} here" for key in differ[:6])
        raise CheckpointError(f"{path} belongs to a run with other settings: {listed}. Resume it with its settings, "
                              "give another output=, or start this folder afresh with resume=null (its files are "
                              "overwritten)")


def resume_file(resume: Optional[str], default: str) -> Optional[str]:
    """The checkpoint to resume from: ``resume="auto"`` takes ``default`` if it exists, else the one before it
    (``default.prev``: a folder whose checkpoint was deleted, or written by a version of spp that renamed it
    away before writing the next)."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        return next((f for f in (default, default + ".prev") if os.path.isfile(f)), None)
    if not os.path.isfile(resume):
        raise CheckpointError(f"resume={resume} not found (use resume=auto, a checkpoint file, or null)")
    return resume


def check_shapes(saved: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor], source: str) -> None:
    diffs = [f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(v.shape)}"
             for k, v in own.items() if k in saved and saved[k].shape != v.shape]
    missing = sorted(set(own) - set(saved))
    if diffs or missing:
        raise CheckpointError(f"{source} does not match this model: shapes differ for {diffs[:6]}; "
                              f"missing {missing[:6]}")


def provenance(device: str, started: Optional[float] = None) -> Dict[str, Any]:
    """What a run ran on, for its log or table to say: the commit of the checkout ``spp`` was imported from
    (``-dirty`` when tracked files differ from it; None for an installed copy), Python, torch and timm versions,
    the processor and CPU threads; with ``started`` (a ``time.time()``), that start and the minutes since."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = None
    if os.path.exists(os.path.join(root, ".git")):   # not a repository further up (a copied or vendored checkout)
        try:
            commit = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty", "--abbrev=7"],
                                    capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    if str(device).startswith("cuda"):
        processor = torch.cuda.get_device_name(torch.device(device))
    else:
        processor = platform.processor() or platform.machine()
        if os.path.isfile("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                processor = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), processor)
    import timm
    record = {"commit": commit, "python": platform.python_version(), "torch": torch.__version__,
              "timm": timm.__version__, "device": str(device), "processor": processor, "threads": torch.get_num_threads()}
    if started is not None:
        record["started"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
        record["minutes"] = round((time.time() - started) / 60, 1)
    return record


class RunLogger:
    """TensorBoard scalars and a JSON-lines log, written by the main process only. Each start (a resumed run
    too) first logs where it runs (:func:`provenance`, with the number of processes)."""

    def __init__(self, directory: str, runtime: Runtime):
        self.enabled = runtime.is_main
        self.writer = None
        self.file = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter
            os.makedirs(directory, exist_ok=True)
            self.writer = SummaryWriter(os.path.join(directory, "tb"))
            self.file = open(os.path.join(directory, "log.jsonl"), "a")
            record = {**provenance(str(runtime.device)), "processes": runtime.world_size}
            self.file.write(json.dumps({"time": round(time.time(), 3), "run": record}) + "\n")
            self.file.flush()   # on disk even if the run dies before its first step is logged
            self.writer.add_text("run", json.dumps(record, indent=1))

    def log(self, step: int, **scalars: Any) -> None:
        """Record the ``scalars`` at ``step`` (TensorBoard and ``log.jsonl``, rank 0 only)."""
        if not self.enabled:
            return
        for key, value in scalars.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **scalars}) + "\n")
        self.file.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer and the log file."""
        if self.enabled:
            self.writer.close()
            self.file.close()


def main_print(runtime: Runtime, *args: Any) -> None:
    if runtime.is_main:
        print(*args, flush=True)
