#!/usr/bin/env bash
# Everything that needs a GPU, in one call (under 10 minutes on one H200):
#   1. the CUDA tests;
#   2. the speed benchmark on CUDA with bf16;
#   3. the LLM speed benchmark: a random-weight 1.1B Llama in bf16, a search step against a finetune step (time,
#      peak memory), prefill and decode tokens/s of the dense model and of members at -20/-30/-50/-70% (widths
#      exact and rounded to 8), realised fractions (scripts/llm_speed.py);
#   4. 2:4 sparsity: dense against semi-structured matmuls and a 1.1B Llama's prefill (scripts/sparse_speed.py);
#   5. the quality benchmark on CUDA (fp32), cut to one seed, the README table's nu_scale 1 and lam 0.4 (three searches:
#      batch 128 and 192, and one over whole heads with one nu per pair type) and no one-epoch finetune
#      so that it fits (QUALITY_ARGS overrides that;
#      QUALITY_TIMEOUT caps it, its JSON lines print as it goes).
# Results land in $OUT (or ./gpu_results).
#
# On a machine with a package index this installs spp with `pip install -e ".[test,bench]"`. On one
# without (a lent GPU machine that has PyTorch but cannot download), prepare everything here first:
#   bash scripts/gpu_prepare.sh
# It puts the wheels of the packages such a machine may lack or hold too old (timm, torch-pruning,
# transformers with its dependencies)
# in .whl/, a copy of Fashion-MNIST in data/fashion-mnist and checks for the demo's pretrained ViT;
# carry .whl, data/fashion-mnist and outputs/demo/pretrain/best.safetensors to the machine. This
# script then installs the wheels into /tmp/spp-site and runs spp from this checkout (PYTHONPATH).
# Without the checkpoint the quality benchmark pretrains the model first (minutes; not timed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
QUALITY_ARGS=${QUALITY_ARGS:---seeds 0 --nu-scales 1.0 --lams 0.4 --head-nu-calibrations pair --epoch-removed}
QUALITY_TIMEOUT=${QUALITY_TIMEOUT:-300}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/spp-site .whl/*.whl \
    || { echo "installing the wheels in .whl failed"; exit 1; }
  export PYTHONPATH="/tmp/spp-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  python3 -m pip install -q -e ".[test,bench]" 2>&1 | tail -2
fi
python3 -c "import sys, torch, timm, spp; print('python', sys.version.split()[0], 'torch', torch.__version__, 'timm', timm.__version__)" \
  | tee "$OUT/versions.txt" || { echo "spp does not import: see above"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.txt"
PYTHONUNBUFFERED=1 python3 scripts/benchmark_speed.py --device cuda --amp bf16 \
  --batch-sizes 1 32 128 --train-batch 64 --repeats 20 --warmup 5 \
  --out "$OUT/benchmark_speed_cuda.json" 2>&1 | tee "$OUT/benchmark_speed_cuda.txt"
PYTHONUNBUFFERED=1 timeout "${LLM_TIMEOUT:-240}" python3 scripts/benchmark_speed.py --llm --device cuda \
  --out "$OUT/llm_speed_cuda.json" 2>&1 | tee "$OUT/llm_speed_cuda.txt"
PYTHONUNBUFFERED=1 timeout "${SPARSE_TIMEOUT:-120}" python3 scripts/sparse_speed.py \
  --out "$OUT/sparse_speed_cuda.json" 2>&1 | tee "$OUT/sparse_speed_cuda.txt"
DATA_ROOT=()
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -d data/fashion-mnist ]; then
  DATA_ROOT=(--data-root data/fashion-mnist)
fi
# shellcheck disable=SC2086  # QUALITY_ARGS is a list of arguments
PYTHONUNBUFFERED=1 timeout "$QUALITY_TIMEOUT" python3 scripts/benchmark_quality.py --device cuda "${DATA_ROOT[@]}" \
  $QUALITY_ARGS --out "$OUT/quality" 2>"$OUT/benchmark_quality_cuda.progress" | tee "$OUT/benchmark_quality_cuda.txt"
echo "quality benchmark exit status ${PIPESTATUS[0]} (124: stopped at QUALITY_TIMEOUT=${QUALITY_TIMEOUT}s)"
tail -c 3000 "$OUT/benchmark_quality_cuda.progress" | tr '\r' '\n' | tail -n 8
