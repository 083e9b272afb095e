"""spp.runtime: keep_cpu_memory (also called by the pipeline on the CPU): freed CPU tensors are reused, not
page-faulted in again; provenance: what a run or benchmark ran on; training checkpoints that a kill at any
instant leaves whole."""
import os
import subprocess
import sys
import time

import pytest
import timm
import torch

import spp
from spp.runtime import provenance, resume_file, save_training_checkpoint

PROBE = """
import resource, sys
import torch
import spp
if sys.argv[1] == "runtime":  # the pipeline's commands on the CPU
    from spp.runtime import setup_runtime
    kept = setup_runtime(device="cpu", amp="off").device.type
else:
    kept = spp.keep_cpu_memory() if sys.argv[1] == "keep" else None
def churn():
    x = torch.ones(16 * 2 ** 20)  # 64 MiB: above glibc's largest default mmap threshold
    del x
for _ in range(8):  # the heap grows to its size (in one to three rounds, rarely more: posix_memalign's slack)
    churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    churn()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def minor_faults(mode):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept, int(faults)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt and minor-fault counts are glibc/Linux")
@pytest.mark.parametrize("mode", ["keep", "runtime"])
def test_keep_cpu_memory_stops_refaulting_freed_tensors(mode):
    kept, faults_kept = minor_faults("keep")
    if kept != "True":
        pytest.skip("this C library has no mallopt (not glibc): keep_cpu_memory changes nothing here")
    if mode == "runtime":
        faults_kept = minor_faults(mode)[1]
    _, faults_system = minor_faults("system")
    pages = 3 * 64 * 2 ** 20 // 4096
    assert faults_system > 0.9 * pages, faults_system   # the default allocator maps each 64 MiB tensor afresh
    # kept: the same pages come back; at most one of the three rounds still grows the heap (seen once in many runs)
    assert faults_kept < 0.34 * pages, (faults_kept, faults_system)


def test_provenance_names_the_checkout_commit_and_versions():
    record = provenance("cpu", started=time.time() - 90)
    assert (record["torch"], record["timm"], record["device"]) == (torch.__version__, timm.__version__, "cpu")
    assert record["threads"] == torch.get_num_threads() and record["processor"]
    assert 1.4 <= record["minutes"] <= 2.0 and record["started"].endswith("UTC")
    assert "minutes" not in provenance("cpu")   # no start given: no wall time
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(spp.__file__)))
    if not os.path.exists(os.path.join(checkout, ".git")):
        assert record["commit"] is None   # an installed copy: no commit to claim
        return
    head = subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    short = record["commit"].removesuffix("-dirty").rsplit("-g", 1)[-1]   # describe: [TAG-N-g]HASH[-dirty]
    assert len(short) >= 7 and head.startswith(short)


def test_run_logger_records_the_start_before_any_step(tmp_path):
    import json

    from spp.runtime import RunLogger, Runtime

    logger = RunLogger(str(tmp_path), Runtime(torch.device("cpu"), None))
    first = json.loads(open(tmp_path / "log.jsonl").readline())   # flushed at once, not at the first step
    assert first["run"]["processes"] == 1 and first["run"]["device"] == "cpu"
    logger.close()
    RunLogger(str(tmp_path / "quiet"), Runtime(torch.device("cpu"), None, rank=1, world_size=2)).close()   # rank 1: no files
    assert not (tmp_path / "quiet").exists()


def test_training_checkpoint_exists_at_every_instant_of_its_rewrite(tmp_path, monkeypatch):
    """The previous checkpoint moves to ``.prev`` only once the new one is written: a run killed while it saves
    (any instant) still has ``path`` to resume from."""
    path = str(tmp_path / "checkpoint.pth")
    save_training_checkpoint({"step": 4}, path)
    seen = []
    real_save = torch.save

    def watching_save(obj, f, *args, **kwargs):
        seen.append(os.path.isfile(path) and torch.load(path, weights_only=True)["step"])
        real_save(obj, f, *args, **kwargs)
        seen.append(os.path.isfile(path) and torch.load(path, weights_only=True)["step"])

    monkeypatch.setattr(torch, "save", watching_save)
    save_training_checkpoint({"step": 8}, path)
    assert seen == [4, 4]
    assert torch.load(path, weights_only=True)["step"] == 8
    assert torch.load(path + ".prev", weights_only=True)["step"] == 4
    save_training_checkpoint({"step": 12}, path)
    assert torch.load(path + ".prev", weights_only=True)["step"] == 8
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "checkpoint.pth.prev"]   # no temporary file left


def test_resume_auto_falls_back_to_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    assert resume_file("auto", path) is None and resume_file(None, path) is None
    save_training_checkpoint({"step": 4}, path)
    save_training_checkpoint({"step": 8}, path)
    assert resume_file("auto", path) == path
    os.remove(path)
    assert resume_file("auto", path) == path + ".prev"
    with pytest.raises(spp.runtime.CheckpointError, match="not found"):
        resume_file(str(tmp_path / "other.pth"), path)
