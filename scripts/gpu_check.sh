#!/usr/bin/env bash
# Everything that needs a GPU, in one call (under 10 minutes on one H200):
#   1. the CUDA tests;
#   2. the speed benchmark on CUDA with bf16;
#   3. the quality benchmark on CUDA (fp32), cut to one seed and no one-epoch finetune so that it
#      fits (QUALITY_ARGS overrides that; QUALITY_TIMEOUT caps it, its JSON lines print as it goes).
# Results land in $OUT (or ./gpu_results).
#
# The quality benchmark needs Fashion-MNIST and the demo's pretrained ViT. A GPU machine without
# the Debian package can take a copy in the repository (ignored by git) and the checkpoint:
#   mkdir -p data && cp -r /usr/share/datasets/fashion-mnist data/
#   (carry data/fashion-mnist and outputs/demo/pretrain/best.safetensors to the machine)
# Without the checkpoint the benchmark pretrains the model first (5-8 min on 2 CPU cores; not timed on a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
QUALITY_ARGS=${QUALITY_ARGS:---seeds 0 --nu-scales 3 --epoch-removed}
QUALITY_TIMEOUT=${QUALITY_TIMEOUT:-300}
mkdir -p "$OUT"
python3 -m pip install -q -e ".[test,bench]" 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.txt"
PYTHONUNBUFFERED=1 python3 scripts/benchmark_speed.py --device cuda --amp bf16 \
  --batch-sizes 1 32 128 --train-batch 64 --repeats 20 --warmup 5 \
  --out "$OUT/benchmark_speed_cuda.json" 2>&1 | tee "$OUT/benchmark_speed_cuda.txt"
DATA_ROOT=()
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -d data/fashion-mnist ]; then
  DATA_ROOT=(--data-root data/fashion-mnist)
fi
# shellcheck disable=SC2086  # QUALITY_ARGS is a list of arguments
PYTHONUNBUFFERED=1 timeout "$QUALITY_TIMEOUT" python3 scripts/benchmark_quality.py --device cuda "${DATA_ROOT[@]}" \
  $QUALITY_ARGS --out "$OUT/quality" 2>"$OUT/benchmark_quality_cuda.progress" | tee "$OUT/benchmark_quality_cuda.txt"
echo "quality benchmark exit status ${PIPESTATUS[0]} (124: stopped at QUALITY_TIMEOUT=${QUALITY_TIMEOUT}s)"
tail -c 3000 "$OUT/benchmark_quality_cuda.progress" | tr '\r' '\n' | tail -n 8
