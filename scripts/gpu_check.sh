#!/usr/bin/env bash
# Everything that needs a GPU, in one call (under 10 minutes on one H200):
# the CUDA tests, then the speed benchmark on CUDA with bf16. Results land in $OUT (or ./gpu_results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
python3 -m pip install -q -e ".[test]" 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.txt"
PYTHONUNBUFFERED=1 python3 scripts/benchmark_speed.py --device cuda --amp bf16 \
  --batch-sizes 1 32 128 --train-batch 64 --repeats 20 --warmup 5 \
  --out "$OUT/benchmark_speed_cuda.json" 2>&1 | tee "$OUT/benchmark_speed_cuda.txt"
