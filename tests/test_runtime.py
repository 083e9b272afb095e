"""spp.keep_cpu_memory: freed CPU tensors are reused instead of page-faulted in again."""
import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import torch
import spp
kept = spp.keep_cpu_memory() if sys.argv[1] == "keep" else None
def churn():
    x = torch.ones(16 * 2 ** 20)  # 64 MiB: above glibc's largest default mmap threshold
    del x
churn(); churn()  # the heap grows to its size once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    churn()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def minor_faults(mode):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt and minor-fault counts are glibc/Linux")
def test_keep_cpu_memory_stops_refaulting_freed_tensors():
    kept, faults_kept = minor_faults("keep")
    if kept != "True":
        pytest.skip("this C library has no mallopt (not glibc): keep_cpu_memory changes nothing here")
    _, faults_system = minor_faults("system")
    pages = 3 * 64 * 2 ** 20 // 4096
    assert faults_system > 0.9 * pages, faults_system   # the default allocator maps each 64 MiB tensor afresh
    assert faults_kept < 0.01 * pages, faults_kept      # kept: the same pages come back, no faults

